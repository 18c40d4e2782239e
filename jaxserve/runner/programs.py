"""Compiled programs shared by the runners of a process, compiled ahead on a thread pool.

A program is keyed by (what it computes, static arguments, argument shapes, dtypes and
shardings). "What it computes" is a hashable description of the jitted function (the model
config, the attention function, the output shardings and a name), not the jitted function
object: every runner builds its own jitted functions, so that jax's caches behind them (traces,
lowerings, executables) die with the runner instead of growing for the life of the process.

Retention is bounded. A program stays in memory while a runner holds it, and the program sets
of the last KEEP_LAST_SETS warm-ups stay a while longer, so that an engine rebuilt with the same
settings right after the last one was dropped (tests, a restart in the same process) reuses its
executables; anything older reloads from the persistent compilation cache. Why a bound at all:
each XLA:CPU executable maps its kernels' code as a few hundred small memory mappings, and a
process that kept every engine's programs (the test suite builds hundreds of engines) ran into
Linux's vm.max_map_count (65530) and aborted inside XLA.
"""

from __future__ import annotations

import collections
import sys
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import jax
from tqdm import tqdm

KEEP_LAST_SETS = 2
_LIVE: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # key -> held executable
_RECENT: collections.deque = collections.deque(maxlen=KEEP_LAST_SETS)  # {key: executable}
_LOCK = threading.Lock()


def shapes_key(identity, statics: tuple, args) -> tuple:
    """identity: a hashable description of the jitted function (not the function object)."""
    leaves, treedef = jax.tree.flatten(args)  # the treedef holds static fields (n_out)
    return (identity, statics, treedef, tuple((x.shape, str(x.dtype), getattr(x, "sharding", None))
                                              for x in leaves))


def compile_all(jobs: dict[tuple, Callable], workers: int, desc: str,
                progress: bool) -> dict[tuple, object]:
    """Compile (or load from the persistent cache) each job no runner holds yet, on `workers`
    threads (XLA compiles outside the GIL); key -> executable for every job. The caller keeps
    what it uses: that reference is what keeps a program in memory."""
    with _LOCK:
        done = {key: c for key in jobs if (c := _LIVE.get(key)) is not None}

    def compile_one(item):
        key, thunk = item
        done[key] = thunk()
    todo = [(key, thunk) for key, thunk in jobs.items() if key not in done]
    with ThreadPoolExecutor(workers) as pool:
        list(tqdm(pool.map(compile_one, todo), total=len(todo),
                  desc=f"{desc} ({workers} threads)", unit="program",
                  file=sys.stderr, disable=not progress, leave=False))
    with _LOCK:
        for key, compiled in done.items():
            _LIVE[key] = compiled
        _RECENT.append(dict(done))
    return done
