"""runner/programs.py: compiled programs are shared while held and released after, bounded."""

from __future__ import annotations

import gc
import weakref

import jax
import jax.numpy as jnp

from jaxserve.runner import programs


def _jobs(tag: str, sizes, calls: list) -> dict:
    """One compile job per size: a fresh jitted function (as every runner builds its own)."""
    def thunk(n):
        calls.append((tag, n))
        fn = jax.jit(lambda x: jnp.tanh(x) * 2.0 + 1.0)
        return fn.lower(jax.ShapeDtypeStruct((n,), jnp.float32)).compile()
    return {programs.shapes_key(("test_programs", tag), (), (jnp.zeros(n),)):
            (lambda n=n: thunk(n)) for n in sizes}


def test_held_programs_are_shared_and_not_recompiled():
    calls = []
    first = programs.compile_all(_jobs("shared", [3, 5], calls), 2, "t", progress=False)
    again = programs.compile_all(_jobs("shared", [3, 5, 7], calls), 2, "t", progress=False)
    assert sorted(calls) == [("shared", 3), ("shared", 5), ("shared", 7)]  # 3 and 5 once
    for key, compiled in first.items():
        assert again[key] is compiled
    x = jnp.arange(5, dtype=jnp.float32)
    (key5,) = [k for k in again if k[3][0][0] == (5,)]
    assert jnp.allclose(again[key5](x), jnp.tanh(x) * 2.0 + 1.0)


def test_dropped_programs_are_released_after_the_recent_sets():
    calls = []
    held = programs.compile_all(_jobs("dropped", [11, 13], calls), 1, "t", progress=False)
    refs = [weakref.ref(c) for c in held.values()]
    del held
    gc.collect()
    assert all(r() is not None for r in refs)  # kept: among the last warm-ups' sets
    for i in range(programs.KEEP_LAST_SETS):
        programs.compile_all(_jobs(f"other{i}", [17 + i], calls), 1, "t", progress=False)
    gc.collect()
    assert all(r() is None for r in refs)  # nothing holds them now: freed, not kept forever
    again = programs.compile_all(_jobs("dropped", [11], calls), 1, "t", progress=False)
    assert calls.count(("dropped", 11)) == 2 and len(again) == 1  # compiled (or loaded) anew


def test_a_program_a_runner_holds_outlives_the_recent_sets():
    calls = []
    held = programs.compile_all(_jobs("held", [19], calls), 1, "t", progress=False)
    for i in range(programs.KEEP_LAST_SETS + 1):
        programs.compile_all(_jobs(f"later{i}", [23 + i], calls), 1, "t", progress=False)
    gc.collect()
    again = programs.compile_all(_jobs("held", [19], calls), 1, "t", progress=False)
    assert calls.count(("held", 19)) == 1
    assert list(again.values())[0] is list(held.values())[0]
