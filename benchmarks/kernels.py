"""Paged-attention kernel benchmark: every registered variant over a grid of shapes.

For each shape (batch, context, GQA ratio, head_dim, page size, dtype) and variant it checks the
output against the reference, times the call, and prints time, achieved bytes/s and FLOP/s, and
their fractions of this device's measured copy bandwidth (a large elementwise pass) and bf16
matmul rate (a large matmul). Bytes are the K/V of every live token of one layer plus q and the
output; FLOPs are 4 * D per (query head, visible key) pair. Timed calls cycle through the cache's
layers inside one jitted loop, as a model's layer scan would, so dispatch overhead and XLA
hoisting do not distort microsecond kernels.

    python benchmarks/kernels.py                  # GPU: the full grid
    python benchmarks/kernels.py --smoke          # CPU, interpret mode, a few seconds (CI)
    python benchmarks/kernels.py --compile-report # CPU: lower for CUDA, ptxas stats (needs triton)
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import lowering_check, registry
from pallas_kernels.problems import make_problem


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    q_lens: tuple[int, ...]
    kv_lens: tuple[int, ...]
    num_q_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    page_size: int = 16
    dtype: str = "bfloat16"
    num_layers: int = 4

    def problem(self, poison=False):
        return make_problem(self.q_lens, self.kv_lens, num_q_heads=self.num_q_heads,
                            num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
                            page_size=self.page_size, dtype=jnp.dtype(self.dtype),
                            num_layers=self.num_layers, layer=0, spare_pages=1, poison=poison)


def _decode(batch, context, hq=32, hkv=8, d=128, ps=16, dtype="bfloat16"):
    return Shape(f"decode b{batch} ctx{context} {hq}/{hkv}h d{d} ps{ps} {dtype}",
                 (1,) * batch, (context,) * batch, hq, hkv, d, ps, dtype)


GPU_SHAPES = [
    _decode(1, 4096), _decode(1, 32768), _decode(8, 8192), _decode(64, 1024), _decode(64, 8192),
    _decode(256, 1024),
    _decode(8, 4096, hq=32, hkv=32), _decode(8, 4096, hq=64, hkv=8),   # GQA 1 and 8
    _decode(8, 4096, hq=32, hkv=8, d=64), _decode(8, 4096, ps=32),
    _decode(8, 4096, dtype="float32"),
    Shape("prefill b1 2048 32/8h d128", (2048,), (2048,)),
    Shape("prefill b4 512 32/8h d128", (512,) * 4, (512,) * 4),
    Shape("mixed 32 decode + 512 chunk", (1,) * 32 + (512,), (2048,) * 32 + (1536,)),
]
# Decode-shaped (T <= S), so pallas_splitk_decode runs its split-K kernel, not the fallback.
SMOKE_SHAPES = [Shape("smoke decode b2", (1, 1), (40, 17), 4, 2, 64, 16, "float32", 2)]


def _timeit(fn, *args, repeats=5):
    jax.block_until_ready(fn(*args))  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def device_peaks(small: bool):
    """Measured copy bandwidth (bytes/s, read + write) and bf16 matmul rate (FLOP/s)."""
    n = 1 << (22 if small else 28)  # 8 MiB or 512 MiB of bf16 per array
    x = jnp.ones((n,), jnp.bfloat16)
    copy = jax.jit(lambda a: a + 1)
    bandwidth = 2 * x.nbytes / _timeit(copy, x)
    m = 512 if small else 8192
    a = jnp.ones((m, m), jnp.bfloat16)
    matmul = jax.jit(lambda p, q: jnp.dot(p, q, preferred_element_type=jnp.float32))
    flops = 2 * m ** 3 / _timeit(matmul, a, a)
    return bandwidth, flops


def _timed_loop(fn, iters, num_layers, kwargs):
    """jit of `iters` calls, call i reading layer i % L: the kernel cannot be hoisted or CSE'd."""
    def run(q, k, v, kv_lens, pages, cu, num_seqs):
        def body(i, acc):
            out = fn(q, k, v, i % num_layers, kv_lens, pages, cu, num_seqs, **kwargs)
            return acc + out[0, 0, 0].astype(jnp.float32)
        return jax.lax.fori_loop(0, iters, body, jnp.float32(0))
    return jax.jit(run)


def bench_shape(shape, variants, *, interpret, iters, check, peaks):
    problem = shape.problem(poison=check and interpret)
    q, k, v, _, kv_lens, pages, cu, num_seqs = problem.args
    kwargs = dict(sm_scale=shape.head_dim ** -0.5)
    bytes_moved = problem.kv_bytes + 2 * q.size * q.dtype.itemsize
    ref = None
    if check:
        reference = jax.jit(functools.partial(registry.get_attention_fn("reference"), **kwargs))
        ref = np.asarray(reference(*problem.args), np.float32)
    rows = []
    for name in variants:
        fn = registry.get_attention_fn(name)
        kw = dict(kwargs) if name == "reference" else dict(kwargs, interpret=interpret)
        call = jax.jit(functools.partial(fn, **kw))
        error = None
        if check:
            out = np.asarray(call(*problem.args), np.float32)
            error = float(np.max(np.abs(out - ref))) if np.all(np.isfinite(out)) else float("nan")
        if interpret:  # smoke: one more call of the compiled function, no timing loop to compile
            seconds = _timeit(call, *problem.args, repeats=1)
        else:
            loop = _timed_loop(fn, iters, shape.num_layers, kw)
            seconds = _timeit(loop, q, k, v, kv_lens, pages, cu, num_seqs, repeats=3) / iters
        rows.append(dict(shape=shape.name, variant=name, dtype=shape.dtype, us=seconds * 1e6,
                         max_abs_err=error, bytes_per_s=bytes_moved / seconds,
                         flop_per_s=problem.flops / seconds,
                         bw_frac=bytes_moved / seconds / peaks[0],
                         flop_frac=problem.flops / seconds / peaks[1]))
    return rows


def print_table(rows):
    head = f"{'shape':40s} {'variant':22s} {'time us':>10s} {'max err':>9s} {'GB/s':>8s} " \
           f"{'%bw':>6s} {'TFLOP/s':>8s} {'%mm':>6s}"
    print(head)
    print("-" * len(head))
    for r in rows:
        err = "-" if r["max_abs_err"] is None else f"{r['max_abs_err']:.1e}"
        print(f"{r['shape'][:40]:40s} {r['variant']:22s} {r['us']:10.1f} {err:>9s} "
              f"{r['bytes_per_s'] / 1e9:8.1f} {100 * r['bw_frac']:5.1f}% "
              f"{r['flop_per_s'] / 1e12:8.2f} {100 * r['flop_frac']:5.1f}%")


def compile_report(shapes, variants):
    """Lower each Pallas variant for CUDA here and report ptxas stats (sm_90) per kernel."""
    try:
        import triton  # noqa: F401
        have_triton = True
    except ImportError:
        have_triton = False
        print("(triton not installed: only the Triton-IR rule checks run)")
    for shape in shapes:
        dtype = jnp.dtype(shape.dtype)
        t, s = sum(shape.q_lens), len(shape.q_lens)
        pps = -(-max(shape.kv_lens) // shape.page_size)

        def spec(sh, dt=jnp.int32):
            return jax.ShapeDtypeStruct(sh, dt)
        cache = spec((shape.num_layers, s * pps + 1, shape.num_kv_heads, shape.page_size,
                      shape.head_dim), dtype)
        args = (spec((t, shape.num_q_heads, shape.head_dim), dtype), cache, cache, spec(()),
                spec((s,)), spec((s, pps)), spec((s + 1,)), spec((1,)))
        for name in variants:
            if name == "reference":
                continue
            fn = registry.get_attention_fn(name)
            _, kernels = lowering_check.lower_for_cuda(
                lambda *a, fn=fn: fn(*a, sm_scale=0.1), *args)
            for kernel in kernels:
                stats = lowering_check.compile_ttir(kernel) if have_triton else {}
                problems = lowering_check.ttir_problems(kernel.ttir)
                print(f"{shape.name[:40]:40s} {name:22s} {kernel.name:26s} grid={kernel.grid} "
                      f"warps={kernel.num_warps} stages={kernel.num_stages} {stats} "
                      f"{'OK' if not problems else problems}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes in interpret mode on CPU (seconds; for CI)")
    parser.add_argument("--compile-report", action="store_true",
                        help="lower for CUDA on this host and report Triton/ptxas stats")
    parser.add_argument("--variants", default=",".join(registry.available_variants()),
                        help="comma-separated registry names")
    parser.add_argument("--iters", type=int, default=None, help="kernel calls per timing")
    parser.add_argument("--no-check", action="store_true", help="skip the reference check")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        registry.get_attention_fn(v)  # unknown names fail before any work

    if args.compile_report:
        compile_report(GPU_SHAPES, variants)
        return 0
    on_gpu = any(d.platform == "gpu" for d in jax.devices())
    if not on_gpu and not args.smoke:
        parser.error("no GPU visible: use --smoke (interpret mode) or --compile-report")
    shapes = SMOKE_SHAPES if args.smoke else GPU_SHAPES
    iters = args.iters or (2 if args.smoke else 20)
    peaks = device_peaks(small=args.smoke)
    print(f"device: {jax.devices()[0].device_kind}  jax {jax.__version__}  "
          f"copy {peaks[0] / 1e9:.1f} GB/s  bf16 matmul {peaks[1] / 1e12:.1f} TFLOP/s"
          + ("  (interpret mode: times are not kernel speed)" if not on_gpu else ""))
    rows = []
    for shape in shapes:
        rows += bench_shape(shape, variants, interpret=not on_gpu, iters=iters,
                            check=not args.no_check, peaks=peaks)
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=jax.devices()[0].device_kind, jax=jax.__version__,
                           copy_bytes_per_s=peaks[0], matmul_flop_per_s=peaks[1], rows=rows), f,
                      indent=1)
    tolerance = {"float32": 1e-4, "bfloat16": 5e-2}  # max abs error on O(1) outputs
    bad = [r for r in rows if r["max_abs_err"] is not None
           and not r["max_abs_err"] <= tolerance[r["dtype"]]]
    if bad:
        print(f"FAILED: {len(bad)} rows differ from the reference", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
