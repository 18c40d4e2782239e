"""The persistent XLA compilation cache: a second start loads its step variants from disk.

Every step variant (bucket shape x extras) is compiled at warm-up; on a CPU that is minutes for
a 30-layer model. jax can keep compiled executables in a folder, keyed by the program, the
compiler options and the device, so a restart with the same model and settings only traces and
loads. build_engine turns it on (EngineConfig.compilation_cache_dir, default
$XDG_CACHE_HOME/jaxserve/xla); None leaves jax's own setting alone.
"""

from __future__ import annotations

import os

import jax
from jax.experimental.compilation_cache import compilation_cache


def use_compilation_cache(path: str | None) -> None:
    """Point jax's persistent compilation cache at `path` (created if missing)."""
    if path is None:
        return
    path = os.path.abspath(os.path.expanduser(path))
    os.makedirs(path, exist_ok=True)
    if jax.config.jax_compilation_cache_dir != path:
        # jax opens its cache once per process, at the first compilation; re-pointing it
        # takes a reset, or the old folder (or none) would stay in use
        compilation_cache.reset_cache()
        jax.config.update("jax_compilation_cache_dir", path)
    # Cache every executable, however quick to compile: a tiny model's variants compile in
    # under jax's default threshold of 1 s, and many quick ones still add up at start-up.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
