"""Roofline floors: the fastest a step or a whole workload could possibly run on a device.

A decode step must read every weight once and the KV cache of every sequence in the batch, so
    decode step time >= (weight bytes read + KV bytes read) / memory bandwidth;
a prefill must do its matrix products, so
    prefill time >= FLOPs / matmul rate.
throughput.py divides these floors by what it measured ("fraction of roofline"), which says how
much of the gap is ours and how much is physics.

Conventions (tighter than REFERENCE.md's anchors, which count every parameter): an untied
embedding table is gathered, not read whole, so it counts T rows, not V; logits are computed
for the sampled rows only (one per sequence), as our step does. For Llama-3-8B bf16 on an H100
(3.35 TB/s) this gives 4.5 ms at batch 1 where the anchor's all-parameter count gives 4.8 ms.

    python benchmarks/roofline.py --model-config llama3-8b --batch 64 --context 1024 --device h100
    python benchmarks/roofline.py --model-config tiny --measure     # this machine's own rates
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.model_shapes import (builtin_names, itemsize, kv_bytes_per_token,  # noqa: E402
                                     leaf_counts, resolve_config)
from jaxserve.models.config import ModelConfig  # noqa: E402


@dataclasses.dataclass(frozen=True)
class DeviceRates:
    name: str
    bandwidth_gbs: float   # GB/s (1e9 bytes) of HBM (or DRAM) read+write traffic
    tflops: float          # dense matmul TFLOP/s in the benchmark's dtype
    source: str            # "spec", "measured copy/matmul (published)", "measured here", "given"


# Published anchors (REFERENCE.md): "-spec" is the datasheet; the plain name is what a large
# device copy and a bf16 matmul reach in practice, the fairer floor for "how close are we".
ANCHORS = {
    "h100": DeviceRates("H100 SXM", 3000.0, 790.0, "published measured copy / bf16 matmul"),
    "h100-spec": DeviceRates("H100 SXM", 3350.0, 790.0, "datasheet bandwidth"),
    "h200": DeviceRates("H200", 4300.0, 790.0, "published measured copy / bf16 matmul"),
    "h200-spec": DeviceRates("H200", 4800.0, 790.0, "datasheet bandwidth"),
}


def anchor_for_device_kind(kind: str) -> DeviceRates | None:
    """'NVIDIA H100 80GB HBM3' -> the h100 anchor; None for devices we hold no figures for."""
    kind = kind.lower()
    for key in ("h200", "h100"):
        if key in kind:
            return ANCHORS[key]
    return None


# -- measuring the current device ---------------------------------------------------------------

def _best_seconds(fn, x, *args, repeats: int = 5):
    """Best wall time of x = fn(x, *args) (after one warm call); returns (seconds, last x)."""
    import jax
    x = jax.block_until_ready(fn(x, *args))  # compile and warm
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        x = jax.block_until_ready(fn(x, *args))
        best = min(best, time.perf_counter() - start)
    return best, x


def measure_device(copy_mib: int | None = None, matmul_n: int | None = None,
                   dtype: str | None = None) -> DeviceRates:
    """Bandwidth from a big device copy (bytes read + written), matmul rate from an n^3 product.
    Sizes default small on CPU (a second or two) and large on GPUs (past the caches)."""
    import jax
    import jax.numpy as jnp

    dev = jax.devices()[0]
    on_cpu = dev.platform == "cpu"
    copy_mib = copy_mib or (256 if on_cpu else 4096)
    matmul_n = matmul_n or (768 if on_cpu else 8192)
    dtype = dtype or ("float32" if on_cpu else "bfloat16")
    nbytes = copy_mib * 2**20
    # Donated, so the output reuses the input's buffer: without it every call would also pay
    # for a fresh allocation (page faults on CPU), which is not what a KV read costs.
    copy = jax.jit(lambda a: a * 1.0001, donate_argnums=0)  # a multiply: cannot be elided
    seconds, x = _best_seconds(copy, jnp.ones((nbytes // 4,), jnp.float32))
    bandwidth = 2 * nbytes / seconds / 1e9
    del x
    b = jnp.full((matmul_n, matmul_n), 1.0 / matmul_n, dtype)  # b @ b == b: no overflow
    mm = jax.jit(lambda p, q: jnp.dot(p, q, preferred_element_type=p.dtype))
    seconds, _ = _best_seconds(mm, b, b)
    tflops = 2 * matmul_n**3 / seconds / 1e12
    return DeviceRates(dev.device_kind, bandwidth, tflops,
                       f"measured here ({copy_mib} MiB copy, {matmul_n}^3 {dtype} matmul)")


def resolve_rates(device: str | None = None, bandwidth_gbs: float | None = None,
                  tflops: float | None = None, measure: bool = False) -> DeviceRates:
    """Given numbers win; then a named anchor; then --measure or an unknown device is measured;
    a known GPU uses its published anchor."""
    if bandwidth_gbs and tflops:
        return DeviceRates(device or "given", bandwidth_gbs, tflops, "given")
    if device:
        if device not in ANCHORS:
            raise ValueError(f"unknown --device {device!r}; known: {', '.join(ANCHORS)}")
        base = ANCHORS[device]
    elif measure:
        base = measure_device()
    else:
        import jax
        base = anchor_for_device_kind(jax.devices()[0].device_kind) or measure_device()
    return dataclasses.replace(base, bandwidth_gbs=bandwidth_gbs or base.bandwidth_gbs,
                               tflops=tflops or base.tflops)


# -- floors -------------------------------------------------------------------------------------

def weight_bytes_read(cfg: ModelConfig, num_tokens: int = 1) -> int:
    """Bytes of weights one step reads: every layer, the output projection, the embedding rows
    gathered (all of the table when it doubles as the tied output projection)."""
    c = leaf_counts(cfg)
    embed_read = c["embed"] if cfg.tie_word_embeddings else num_tokens * cfg.hidden_size
    return (c["layers"] + c["lm_head"] + c["final_norm"] + embed_read) * itemsize(cfg.dtype)


def matmul_flops(cfg: ModelConfig, num_tokens: int, num_logits: int,
                 attended_pairs: int) -> float:
    """FLOPs of one step: 2 per weight per token in the layers, 2*H*V per logits row, and
    QK^T plus PV for every (query, key) pair attended to."""
    c = leaf_counts(cfg)
    layer_matmul = c["layers"] - 2 * cfg.num_layers * cfg.hidden_size  # minus the norm vectors
    attention = 4 * attended_pairs * cfg.num_heads * cfg.head_dim * cfg.num_layers
    return 2.0 * layer_matmul * num_tokens + 2.0 * cfg.hidden_size * cfg.vocab_size * num_logits \
        + attention


def decode_step_floor(cfg: ModelConfig, batch: int, context: int | list[int],
                      rates: DeviceRates) -> dict:
    """Floor of one decode step: `batch` sequences at `context` tokens each (or a list)."""
    contexts = context if isinstance(context, list) else [context] * batch
    kv = sum(contexts) * kv_bytes_per_token(cfg)
    weights = weight_bytes_read(cfg, batch)
    memory_s = (weights + kv) / (rates.bandwidth_gbs * 1e9)
    compute_s = matmul_flops(cfg, batch, batch, sum(contexts)) / (rates.tflops * 1e12)
    step_s = max(memory_s, compute_s)
    return {"batch": batch, "weight_bytes": weights, "kv_bytes": kv, "memory_s": memory_s,
            "compute_s": compute_s, "step_s": step_s, "tokens_per_s": batch / step_s}


def prefill_floor(cfg: ModelConfig, prompt_len: int, rates: DeviceRates,
                  num_prompts: int = 1) -> dict:
    """Floor of prefilling `num_prompts` prompts of `prompt_len` tokens (causal attention)."""
    tokens = prompt_len * num_prompts
    pairs = num_prompts * prompt_len * (prompt_len + 1) // 2
    flops = matmul_flops(cfg, tokens, num_prompts, pairs)
    compute_s = flops / (rates.tflops * 1e12)
    memory_s = (weight_bytes_read(cfg, tokens) + tokens * kv_bytes_per_token(cfg)) \
        / (rates.bandwidth_gbs * 1e9)
    seconds = max(compute_s, memory_s)
    return {"tokens": tokens, "flops": flops, "compute_s": compute_s, "memory_s": memory_s,
            "seconds": seconds, "tokens_per_s": tokens / seconds}


def workload_floor(cfg: ModelConfig, input_lens: list[int], output_lens: list[int],
                   max_num_seqs: int, rates: DeviceRates) -> dict:
    """A lower bound on the wall time of an offline run (all requests at t=0).

    Compute: every prompt and generated token's FLOPs. Memory: the weights once per decode
    step, with at least max(longest output, total output / max_num_seqs) steps, plus every
    generated token's read of its own context. The floor is the larger of the two, so it is a
    true bound even when prefill overlaps decode in mixed steps.
    """
    kvt = kv_bytes_per_token(cfg)
    flops = 0.0
    kv_read = 0
    for n_in, n_out in zip(input_lens, output_lens):
        total = n_in + n_out - 1  # the last sampled token is never fed back
        pairs = total * (total + 1) // 2
        flops += matmul_flops(cfg, total, n_out, pairs)
        # decode token j (1..n_out-1) attends to n_in + j positions
        kv_read += ((n_out - 1) * n_in + (n_out - 1) * n_out // 2) * kvt
    steps = max(max(output_lens), -(-sum(output_lens) // max_num_seqs))
    weight_reads = steps * weight_bytes_read(cfg, max_num_seqs)
    memory_s = (weight_reads + kv_read) / (rates.bandwidth_gbs * 1e9)
    compute_s = flops / (rates.tflops * 1e12)
    seconds = max(memory_s, compute_s)
    return {"seconds": seconds, "memory_s": memory_s, "compute_s": compute_s,
            "min_decode_steps": steps, "flops": flops, "bytes": weight_reads + kv_read,
            "output_tokens_per_s": sum(output_lens) / seconds,
            "bound": "memory" if memory_s >= compute_s else "compute"}


# -- command line -------------------------------------------------------------------------------

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-config", choices=builtin_names(), help="a built-in model shape")
    p.add_argument("--model", help="a Hugging Face folder (only config.json is read)")
    p.add_argument("--dtype", default=None, help="float32/bfloat16 (default: the config's)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 64, 256])
    p.add_argument("--context", type=int, nargs="+", default=[1024])
    p.add_argument("--prompt-len", type=int, nargs="+", default=[1024])
    p.add_argument("--device", choices=sorted(ANCHORS), help="use a published anchor")
    p.add_argument("--bandwidth-gbs", type=float, help="memory bandwidth, GB/s")
    p.add_argument("--tflops", type=float, help="matmul rate, TFLOP/s")
    p.add_argument("--measure", action="store_true", help="measure this machine's device")
    p.add_argument("--json", help="write the figures to this file")
    args = p.parse_args(argv)
    try:
        cfg = resolve_config(args.model_config, args.model, args.dtype)
        rates = resolve_rates(args.device, args.bandwidth_gbs, args.tflops, args.measure)
    except ValueError as e:
        p.error(str(e))
    name = args.model_config or args.model
    print(f"model {name}: {cfg.num_layers} layers, {cfg.dtype}, weights read per decode step "
          f"{weight_bytes_read(cfg) / 1e9:.3f} GB, KV {kv_bytes_per_token(cfg) / 1024:.1f} "
          "KiB/token")
    print(f"device {rates.name}: {rates.bandwidth_gbs:.0f} GB/s, {rates.tflops:.3g} TFLOP/s "
          f"({rates.source})")
    decode = []
    print(f"{'batch':>6} {'context':>8} {'step ms':>9} {'tok/s':>10}  bound")
    for b in args.batch:
        for c in args.context:
            f = decode_step_floor(cfg, b, c, rates)
            decode.append({"context": c, **f})
            bound = "memory" if f["memory_s"] >= f["compute_s"] else "compute"
            print(f"{b:>6} {c:>8} {f['step_s'] * 1e3:>9.3f} {f['tokens_per_s']:>10.0f}  {bound}")
    prefill = []
    print(f"{'prompt':>6} {'prefill ms':>11} {'tok/s':>10}")
    for n in args.prompt_len:
        f = prefill_floor(cfg, n, rates)
        prefill.append({"prompt_len": n, **f})
        print(f"{n:>6} {f['seconds'] * 1e3:>11.3f} {f['tokens_per_s']:>10.0f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"model": name, "dtype": cfg.dtype, "device": dataclasses.asdict(rates),
                       "decode": decode, "prefill": prefill}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
