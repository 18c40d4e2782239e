"""Compiling and registering the native XLA:CPU kernels (pallas_kernels/native/*.cc).

Each source is compiled on first use with the system's C++ compiler (`$CXX`, else `c++`) against
the headers of the installed jaxlib, into `$XDG_CACHE_HOME/jaxserve/native` keyed by the source,
the jaxlib version, the flags and the CPU (the build uses -march=native), so it happens once per
machine and jaxlib. No compiler, or a failed build: `load_target` returns the reason, and the
callers fall back to XLA's own ops.
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

NATIVE_DIR = Path(__file__).with_name("native")
# The parts of -ffast-math that let the dot products and sums vectorize (reassociation, FMA
# contraction), named one by one: -ffast-math itself makes GCC link crtfastmath.o into the
# library, which at load time turns on flush-to-zero / denormals-are-zero for the whole
# process (Python floats and numpy included). Infinities and NaNs keep their meaning (no
# -ffinite-math-only): the decode kernel relies on -inf as "no key".
FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fno-signed-zeros",
         "-fassociative-math", "-freciprocal-math", "-ffp-contract=fast", "-fopenmp-simd",
         "-std=c++17", "-shared", "-fPIC", "-w")
_BUILD_TIMEOUT_S = 300


class NativeBuildError(RuntimeError):
    """A native kernel could not be built or loaded on this machine."""


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


def build(source: Path) -> Path:
    """Compile one kernel source (once per source, jaxlib, flags and CPU); its library's path."""
    import jaxlib

    cxx = _compiler()
    # the source and the shared headers it may include (parallel_for.h)
    text = b"\0".join(p.read_bytes() for p in [source, *sorted(NATIVE_DIR.glob("*.h"))])
    key = hashlib.sha256(b"\0".join([
        text, jaxlib.__version__.encode(), " ".join(FLAGS).encode(), cxx.encode(),
        _cpu_signature().encode(), platform.machine().encode()])).hexdigest()[:20]
    out = _cache_dir() / f"{source.stem}-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # build into a temporary name and rename: concurrent first starts never load half a file
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    cmd = [cxx, *FLAGS, f"-I{jax.ffi.include_dir()}", str(source), "-o", tmp]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=_BUILD_TIMEOUT_S)
        if done.returncode != 0:
            raise NativeBuildError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
        os.replace(tmp, out)
    except subprocess.TimeoutExpired:
        raise NativeBuildError(f"compiling {source.name} took over {_BUILD_TIMEOUT_S} s") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


@functools.lru_cache(maxsize=None)
def load_target(source_name: str, symbol: str, target: str) -> str | None:
    """Build `native/<source_name>`, load it and register its handler `symbol` as the CPU FFI
    target `target`: None on success, else the reason it failed (tried once per process)."""
    try:
        lib = ctypes.cdll.LoadLibrary(str(build(NATIVE_DIR / source_name)))
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)),
                                    platform="cpu")
    except (NativeBuildError, OSError, AttributeError) as e:
        return f"{type(e).__name__}: {e}"
    return None
