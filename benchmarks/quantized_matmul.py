"""The layers' matmul alone, float32 vs quantized, side by side in one run: a scan over L
layers of one [K, N] matrix (SmolLM2's gate_proj by default) at several row counts, timed as

  f32       native float32 panels (pallas_kernels/native/packed_matmul.cc)
  int8      native int8 codes, one scale per column (native/quantized_matmul.cc)
  fp8       native float8 e4m3fn codes, one scale per column
  q4        native 4-bit codes with float16 scales and offsets per 32 rows (GGUF Q4_1's form)
  xla-int8  XLA's dot on the same int8 QuantizedStack (dequantized inside the dot)

Each figure is the minimum over --repeats calls (a shared machine only ever adds time).

    python benchmarks/quantized_matmul.py
    python benchmarks/quantized_matmul.py --k 1536 --n 576 --rows 1 16 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxserve.models import quant  # noqa: E402
from jaxserve.models.linear import _pack_quantized  # noqa: E402
from pallas_kernels import native_matmul  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--k", type=int, default=576)
    p.add_argument("--n", type=int, default=1536)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64, 256])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def _scan(matmul, layers):
    """jit(x, *operands) -> the sum over layers of matmul(x, layer, *operands).sum(): summing
    every output keeps XLA from computing only the elements that are read."""
    @jax.jit
    def run(x, *operands):
        def body(total, layer):
            return total + matmul(x, layer, *operands).sum(), None
        return jax.lax.scan(body, jnp.float32(0), jnp.arange(layers))[0]
    return run


def _best_ms(fn, args, repeats):
    fn(*args).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def main(argv=None) -> int:
    args = parse_args(argv)
    L, K, N = args.layers, args.k, args.n
    rng = np.random.default_rng(0)
    w = rng.standard_normal((L, K, N)).astype(np.float32) * 0.05
    int8 = jax.tree.map(jnp.asarray, quant.stack_quantized(
        [quant.quantize_int8(w[i].T) for i in range(L)]))
    fp8 = quant.stack_quantized([quant.quantize_fp8(w[i].T) for i in range(L)])
    groups = K // 32
    q4 = quant.stack_quantized([quant.HFQuantized(
        rng.integers(0, 16, (N, K)).astype(np.uint8),
        rng.uniform(0.001, 0.01, (N, groups)).astype(np.float16),
        rng.uniform(-0.05, 0.0, (N, groups)).astype(np.float16), 4) for _ in range(L)])
    packed = {name: _pack_quantized(jax.tree.map(jnp.asarray, s))
              for name, s in (("int8", int8), ("fp8", fp8), ("q4", q4))}

    def native(name):
        p = packed[name]
        ops = (p.codes, p.scale) + (() if p.offset is None else (p.offset,))
        fn = _scan(lambda x, layer, c, s, *o: native_matmul.quantized_packed_matmul(
            x, c, s, o[0] if o else None, layer, n_out=N, bits=p.bits), L)
        return fn, ops

    variants = {
        "f32": (_scan(lambda x, layer, p: native_matmul.packed_matmul(x, p, layer, n_out=N), L),
                (jnp.asarray(native_matmul.pack(w)),)),
        "int8": native("int8"), "fp8": native("fp8"), "q4": native("q4"),
        "xla-int8": (_scan(lambda x, layer, s: s.matmul(x, layer), L), (int8,)),
    }
    print(f"{L} layers of [{K}, {N}], ms per scan (min of {args.repeats})")
    print(f"{'rows':>6} " + " ".join(f"{name:>9}" for name in variants))
    table = {}
    for rows in args.rows:
        x = jnp.asarray(rng.standard_normal((rows, K)).astype(np.float32))
        table[rows] = {name: _best_ms(fn, (x, *ops), args.repeats)
                       for name, (fn, ops) in variants.items()}
        print(f"{rows:>6} " + " ".join(f"{table[rows][n]:>9.2f}" for n in variants))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"benchmark": "quantized_matmul", "args": vars(args), "ms": table}, f,
                      indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
