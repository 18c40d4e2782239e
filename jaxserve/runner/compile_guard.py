"""Counts XLA backend compilations through jax.monitoring, to prove none happen after warm-up,
and persistent-cache hits and misses, to show what a start loaded instead of compiling.

A backend "compilation" is counted for a persistent-cache hit too (jax reports one either way),
so compile_count() counts executables built in any way; cache_counts() splits them."""

from __future__ import annotations

import threading

import jax

_BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"
_CACHE_MISS_EVENT = "/jax/compilation_cache/cache_misses"
_lock = threading.Lock()
_count = 0
_hits = 0
_misses = 0
_registered = False


def _listener(event: str, duration: float, **kwargs) -> None:
    global _count
    if event == _BACKEND_COMPILE_EVENT:
        with _lock:
            _count += 1


def _cache_listener(event: str, **kwargs) -> None:
    global _hits, _misses
    if event in (_CACHE_HIT_EVENT, _CACHE_MISS_EVENT):
        with _lock:
            if event == _CACHE_HIT_EVENT:
                _hits += 1
            else:
                _misses += 1


def _register() -> None:
    global _registered
    if not _registered:
        jax.monitoring.register_event_duration_secs_listener(_listener)
        jax.monitoring.register_event_listener(_cache_listener)
        _registered = True


def compile_count() -> int:
    """Backend compilations in this process since the guard was first used."""
    with _lock:
        _register()
        return _count


def cache_counts() -> tuple[int, int]:
    """(persistent-cache hits, misses) in this process since the guard was first used; a miss
    is a real compilation (with the cache on), a hit an executable loaded from disk."""
    with _lock:
        _register()
        return _hits, _misses
