"""Decode rows of paged attention as native code on XLA:CPU (an XLA FFI custom call).

Why: XLA:CPU turns a decode step's attention into several passes over the live K/V (page gather,
transpose, mask, small batched dots with G ~ 3 query rows) at ~2 GB/s; in a SmolLM2 decode step
that was ~250 of ~400 ms. `native/paged_decode.cc` reads each (sequence, kv head)'s live pages
once, in place, on XLA's intra-op thread pool (~9 GB/s on the same machine). It computes only
decode rows (q_len == 1); the "native" variant of the registry pairs it with the blocked jnp
path for prefill tiles, whose dots are large enough for XLA to run well.

The source is compiled on first use with the system's C++ compiler (`$CXX`, else `c++`) against
the headers of the installed jaxlib, into `$XDG_CACHE_HOME/jaxserve/native` keyed by the source,
the jaxlib version, the flags and the CPU (the build uses -march=native), so it happens once per
machine and jaxlib. No compiler, or a failed build: `unavailable_reason()` says why and the
registry's CPU default falls back to "blocked".
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.reference import check_operands

TARGET = "jaxserve_paged_decode"
_SOURCE = Path(__file__).with_name("native") / "paged_decode.cc"
# -ffast-math lets the dot products and sums vectorize (reassociation); infinities stay exact
# (-fno-finite-math-only): the kernel relies on -inf as "no key" (measured: 1.9 -> 1.25 ms for one
# layer of a 32-sequence decode, with the vectorizable exp in the source)
_FLAGS = ("-O3", "-march=native", "-ffast-math", "-fno-finite-math-only", "-fopenmp-simd",
          "-std=c++17", "-shared", "-fPIC", "-w")
_BUILD_TIMEOUT_S = 300


class NativeBuildError(RuntimeError):
    """The native decode kernel could not be built or loaded on this machine."""


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "jaxserve" / "native"


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU's feature flags (a cached build must match them)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compiler() -> str:
    cxx = os.environ.get("CXX") or "c++"
    path = shutil.which(cxx)
    if path is None:
        raise NativeBuildError(f"no C++ compiler found ({cxx!r} is not on PATH; set CXX)")
    return path


def _build() -> Path:
    """Compile the kernel (once per source, jaxlib, flags and CPU) and return the library path."""
    import jaxlib

    cxx = _compiler()
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([
        source, jaxlib.__version__.encode(), " ".join(_FLAGS).encode(), cxx.encode(),
        _cpu_signature().encode(), platform.machine().encode()])).hexdigest()[:20]
    out = _cache_dir() / f"paged_decode-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # build into a temporary name and rename: concurrent first starts never load half a file
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    cmd = [cxx, *_FLAGS, f"-I{jax.ffi.include_dir()}", str(_SOURCE), "-o", tmp]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=_BUILD_TIMEOUT_S)
        if done.returncode != 0:
            raise NativeBuildError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
        os.replace(tmp, out)
    except subprocess.TimeoutExpired:
        raise NativeBuildError(f"compiling {_SOURCE.name} took over {_BUILD_TIMEOUT_S} s") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


@functools.lru_cache(maxsize=1)
def _load() -> str | None:
    """Build, load and register the FFI target; None on success, else the reason it failed."""
    try:
        lib = ctypes.cdll.LoadLibrary(str(_build()))
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.JaxservePagedDecode),
                                    platform="cpu")
    except (NativeBuildError, OSError, AttributeError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def unavailable_reason() -> str | None:
    """None when the native kernel is ready on this machine, else why not (builds on first call)."""
    return _load()


def is_available() -> bool:
    return _load() is None


def paged_decode(
    q,             # [T, Hq, D]  f32 or bf16
    k_cache,       # [L, P, Hkv, page_size, D]
    v_cache,       # [L, P, Hkv, page_size, D]
    layer,         # i32[]
    kv_lens,       # i32[S]
    page_indices,  # i32[S, pages_per_seq]
    cu_q_lens,     # i32[S + 1]
    num_seqs,      # i32[1]
    *,
    sm_scale: float,
    soft_cap: float | None = None,
    sliding_window: int | None = None,
):  # -> f32[S, Hq, D]: the decode row's output per sequence slot, zero for other slots
    check_operands(q, k_cache, v_cache, layer, kv_lens, page_indices, cu_q_lens, num_seqs,
                   sm_scale=sm_scale, soft_cap=soft_cap, sliding_window=sliding_window)
    if q.dtype not in (jnp.float32, jnp.bfloat16):
        raise ValueError(f"the native decode kernel takes float32 or bfloat16, got {q.dtype}")
    reason = _load()
    if reason is not None:
        raise NativeBuildError(f"native decode kernel unavailable: {reason}")
    S = page_indices.shape[0]
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((S, *q.shape[1:]), jnp.float32))
    i32 = functools.partial(jnp.asarray, dtype=jnp.int32)
    return call(q, k_cache, v_cache, i32(layer), i32(kv_lens), i32(page_indices),
                i32(cu_q_lens), i32(num_seqs), sm_scale=np.float32(sm_scale),
                soft_cap=np.float32(soft_cap or 0.0), sliding_window=np.int32(sliding_window or 0))
