"""The warm-up compiles in parallel but never overlaps a persistent-cache read or write with a
compile (jaxserve/runner/programs.py: XLA:CPU aborted in executable.serialize() during another
thread's compile)."""

from __future__ import annotations

import threading
import time

from jaxserve.runner import programs


def test_jax_compile_and_cache_io_are_routed_through_the_lock():
    from jax._src import compilation_cache, compiler
    for fn in (compiler.backend_compile_and_load, compilation_cache.put_executable_and_time,
               compilation_cache.get_executable_and_time):
        assert getattr(fn, "_jaxserve_guarded", False), fn


def test_compiles_overlap_and_cache_io_runs_alone():
    lock = programs._CompileOrCacheLock()
    events, guard = [], threading.Lock()

    def record(what):
        with guard:
            events.append((time.monotonic(), what))

    def compile_job():
        with lock.shared():
            record("compile start")
            time.sleep(0.2)
            record("compile end")

    def cache_write():
        time.sleep(0.05)  # arrives while both compiles run
        with lock.exclusive():
            record("write start")
            time.sleep(0.05)
            record("write end")

    threads = [threading.Thread(target=f) for f in (compile_job, compile_job, cache_write)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    order = [what for _, what in sorted(events)]
    # both compiles ran at once; the write waited for them and nothing overlapped it
    assert order[:2] == ["compile start", "compile start"]
    assert order[2:4] == ["compile end", "compile end"]
    assert order[4:] == ["write start", "write end"]
    # and a compile arriving while a write waits is held back until the write is done
    lock2 = programs._CompileOrCacheLock()
    events.clear()

    def long_compile():
        with lock2.shared():
            record("a start")
            time.sleep(0.2)
            record("a end")

    def writer():
        time.sleep(0.05)
        with lock2.exclusive():
            record("w")

    def late_compile():
        time.sleep(0.1)  # the writer is waiting by now
        with lock2.shared():
            record("b start")

    threads = [threading.Thread(target=f) for f in (long_compile, writer, late_compile)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert [what for _, what in sorted(events)] == ["a start", "a end", "w", "b start"]
