"""Check Pallas-Triton kernels for CUDA on a host without a GPU.

Interpret mode runs a kernel's logic on CPU but ignores every Triton rule; lowering for CUDA
applies them. This module (used by tests/kernels and benchmarks/kernels.py):

* `cuda_lowering_context()`: jax >= 0.11 asks for a GPU description when lowering Triton kernels
  on a GPU-less host; an abstract H100 in an abstract mesh provides it (jax 0.10.2 needs nothing).
* `lower_for_cuda(fn, *args)`: lowers `jax.jit(fn)` for "cuda" and captures each Pallas kernel's
  Triton IR (TTIR) with its launch parameters.
* `ttir_problems(ttir)`: what the Pallas lowering does not verify itself: tensor sizes that are not
  powers of 2, `tt.dot` dimensions below 16, f32 dots silently using TF32.
* `compile_ttir(...)`: with the optional `triton` package (not a dependency; the GPU machine has
  3.6.0), compiles the TTIR ahead of time for sm_90 and reports shared memory, registers and
  spills from ptxas: the closest we get to "it compiles on an H100" without one. XLA embeds its
  own Triton, so a GPU run stays the final word.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import subprocess
import tempfile

import jax

H100_KIND = "NVIDIA H100 80GB HBM3"


@dataclasses.dataclass(frozen=True)
class TritonKernel:
    name: str
    ttir: str       # Triton IR as MLIR text
    num_warps: int
    num_stages: int
    grid: tuple[int, int, int]


def cuda_lowering_context(device_kind: str = H100_KIND, num_cores: int = 132):
    """Context in which `.lower(lowering_platforms=("cuda",))` works without a GPU."""
    if not hasattr(jax.sharding, "AbstractDevice") or any(
            d.platform == "gpu" for d in jax.devices()):
        return contextlib.nullcontext()  # jax 0.10.x, or a real GPU describes itself
    device = jax.sharding.AbstractDevice(device_kind=device_kind, num_cores=num_cores,
                                         platform="gpu")
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
    return jax.sharding.use_abstract_mesh(mesh)


def lower_for_cuda(fn, *args) -> tuple[str, list[TritonKernel]]:
    """Lower jax.jit(fn)(*args) for CUDA; return the StableHLO text and its Triton kernels.

    `args` may be jax.ShapeDtypeStruct. The Triton IR is captured by wrapping the Pallas lowering
    entry point for the duration of the call (private API; checked on jax 0.10.2 and 0.11.2).
    """
    from jax._src.pallas.triton import lowering as triton_lowering

    captured = []
    original = triton_lowering.lower_jaxpr_to_triton_module

    def capture(*a, **k):
        result = original(*a, **k)
        captured.append(result.module.operation.get_asm())
        return result

    triton_lowering.lower_jaxpr_to_triton_module = capture
    try:
        with cuda_lowering_context():
            text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    finally:
        triton_lowering.lower_jaxpr_to_triton_module = original
    # One custom call per kernel, one line each; drop the serialized IR string before parsing.
    calls = [re.sub(r'ir = "(?:[^"\\]|\\.)*"', "ir = ...", line)
             for line in text.splitlines() if "__gpu$xla.gpu.triton" in line]
    if len(calls) != len(captured):
        raise RuntimeError(f"found {len(calls)} Triton custom calls for {len(captured)} kernels")
    kernels = []
    for ttir, call in zip(captured, calls):
        def attr(key, call=call):
            return int(re.search(rf"{key} = (\d+)", call).group(1))
        name = re.search(r'name = "([^"]*)"', call)
        kernels.append(TritonKernel(name.group(1) if name else "?", ttir, attr("num_warps"),
                                    attr("num_stages"),
                                    (attr("grid_x"), attr("grid_y"), attr("grid_z"))))
    return text, kernels


_TENSOR = re.compile(r"tensor<((?:\d+x)+)([a-z0-9!.]+)")
_DOT = re.compile(r"tt\.dot .*?(?:inputPrecision = (\w+))?\s*:\s*tensor<(\d+)x(\d+)x(\w+)>"
                  r"\s*\*\s*tensor<(\d+)x(\d+)x\w+>")


def ttir_problems(ttir: str) -> list[str]:
    """Violations of Triton rules the Pallas lowering leaves to the GPU compile step."""
    problems = []
    for dims, elem in set(_TENSOR.findall(ttir)):
        size = 1
        for d in dims.rstrip("x").split("x"):
            size *= int(d)
        if size & (size - 1):
            problems.append(f"tensor<{dims}{elem}> has {size} elements, not a power of 2")
    dots = 0
    for line in ttir.splitlines():
        if "tt.dot" not in line:
            continue
        dots += 1
        m = _DOT.search(line)
        if m is None:
            problems.append(f"unparsed tt.dot: {line.strip()}")
            continue
        precision, m_dim, k_dim, elem, _, n_dim = m.groups()
        if min(int(m_dim), int(k_dim), int(n_dim)) < 16:
            problems.append(f"tt.dot with M={m_dim}, K={k_dim}, N={n_dim}: every dim must be >= 16")
        if elem == "f32" and precision not in (None, "ieee"):
            problems.append(f"f32 tt.dot runs with inputPrecision={precision}, not ieee")
    if dots == 0:
        problems.append("no tt.dot: the attention matmuls are missing")
    return problems


def compile_ttir(kernel: TritonKernel, arch: int = 90) -> dict:
    """AOT-compile captured TTIR with the `triton` package; raises ImportError without it.

    Returns shared memory bytes, registers per thread and spill bytes (from `ptxas -v`).
    """
    import triton
    from triton.backends.compiler import GPUTarget

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"{kernel.name}.ttir")
        with open(path, "w") as f:
            f.write(kernel.ttir)
        compiled = triton.compile(path, target=GPUTarget("cuda", arch, 32),
                                  options=dict(num_warps=kernel.num_warps,
                                               num_stages=kernel.num_stages))
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                             "ptxas")
        suffix = "a" if arch == 90 else ""
        info = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}{suffix}", ptx, "-o",
                               os.path.join(tmp, "k.cubin")],
                              capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", info)
    spills = re.search(r"(\d+) bytes spill stores", info)
    return dict(shared=int(compiled.metadata.shared), registers=int(regs.group(1)) if regs else -1,
                spill_bytes=int(spills.group(1)) if spills else -1)
