"""Compiled programs shared by every runner of the process, compiled ahead on a thread pool.

A program is keyed by (jitted function, static arguments, argument shapes, dtypes and
shardings): engines rebuilt with the same model and settings (tests, restarts) reuse the
executables, and a target model and its draft model share nothing by accident.
"""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import jax
from tqdm import tqdm

_EXECUTABLES: dict = {}


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
