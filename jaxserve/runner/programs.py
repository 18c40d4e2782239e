"""Compiled programs shared by every runner of the process, compiled ahead on a thread pool.

A program is keyed by (jitted function, static arguments, argument shapes, dtypes and
shardings): engines rebuilt with the same model and settings (tests, restarts) reuse the
executables, and a target model and its draft model share nothing by accident.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import jax
from tqdm import tqdm

_EXECUTABLES: dict = {}


class _CompileOrCacheLock:
    """Compiles share it; persistent-cache reads and writes hold it alone.

    XLA:CPU aborted the process twice (a CI run and a local suite) in a warm-up thread's
    `executable.serialize()` for the persistent cache while the other thread was compiling.
    Compiles still run in parallel; a cache read or write waits for the running compiles to
    finish and keeps new ones out (writer preference: it never starves), and takes milliseconds.
    """

    def __init__(self):
        self._cond = threading.Condition()
        self._compiling = 0
        self._exclusive_waiting = 0
        self._exclusive = False

    @contextlib.contextmanager
    def shared(self):
        with self._cond:
            self._cond.wait_for(lambda: not self._exclusive and not self._exclusive_waiting)
            self._compiling += 1
        try:
            yield
        finally:
            with self._cond:
                self._compiling -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self):
        with self._cond:
            self._exclusive_waiting += 1
            self._cond.wait_for(lambda: not self._exclusive and self._compiling == 0)
            self._exclusive_waiting -= 1
            self._exclusive = True
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


_LOCK = _CompileOrCacheLock()


def _guard_compilation_cache() -> None:
    """Route jax's compile and its persistent-cache read/write through _LOCK (jax looks these
    functions up as module attributes at call time). Left alone if a jax version lacks them."""
    from jax._src import compilation_cache, compiler

    def wrap(module, name, hold):
        fn = getattr(module, name, None)
        if fn is None or getattr(fn, "_jaxserve_guarded", False):
            return

        def guarded(*args, **kwargs):
            with hold():
                return fn(*args, **kwargs)
        guarded._jaxserve_guarded = True
        setattr(module, name, guarded)

    wrap(compiler, "backend_compile_and_load", _LOCK.shared)
    wrap(compilation_cache, "put_executable_and_time", _LOCK.exclusive)
    wrap(compilation_cache, "get_executable_and_time", _LOCK.exclusive)


_guard_compilation_cache()


def shapes_key(fn, statics: tuple, args) -> tuple:
    leaves, treedef = jax.tree.flatten(args)  # the treedef holds static fields (n_out)
    return (fn, statics, treedef, tuple((x.shape, str(x.dtype), getattr(x, "sharding", None))
                                        for x in leaves))


def compile_all(jobs: dict[tuple, Callable], workers: int, desc: str, progress: bool) -> None:
    """Compile (or load from the persistent cache) each job not compiled yet, on `workers`
    threads (XLA compiles outside the GIL)."""
    todo = {key: thunk for key, thunk in jobs.items() if key not in _EXECUTABLES}

    def compile_one(item):
        key, thunk = item
        _EXECUTABLES[key] = thunk()
    with ThreadPoolExecutor(workers) as pool:
        list(tqdm(pool.map(compile_one, todo.items()), total=len(todo),
                  desc=f"{desc} ({workers} threads)", unit="program",
                  file=sys.stderr, disable=not progress, leave=False))


def executable(key: tuple):
    return _EXECUTABLES[key]
