"""Where one engine step's time goes: attention, the rest of the forward (matmuls), sampling.

Builds real step inputs for a few step shapes (decode batches at a given context, a prefill
chunk, a mixed step), then times, each as its own jitted function on the same inputs:

  step        the engine's whole jitted step (forward + sampling), plain variant
  step+lp     the same with logprobs (the `extras` variant: penalties and top-20 logprobs)
  forward     the model forward alone (writes K/V, attention, matmuls, logits)
  no-attn     the forward with attention replaced by a function of the same shape that reads
              nothing (so forward - no-attn is what attention costs inside the model)
  attention   one layer's attention call x num_layers, outside the model
  sampler     sampling alone on the step's logits

Times are the minimum of --repeats runs (a shared machine only ever adds time). Attention
backends can be compared in one run (--backends native blocked reference; default: the
platform's default backend).

    python benchmarks/step_profile.py --model default --backends native blocked
    python benchmarks/step_profile.py --model-config tiny --smoke
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxserve.engine.sampling_params import SamplingParams  # noqa: E402
from jaxserve.models import KVCache, build_model  # noqa: E402
from jaxserve.runner import sampling  # noqa: E402
from jaxserve.models.linear import pack_layer_matrices  # noqa: E402
from jaxserve.runner.batch import Buckets, pack_batch  # noqa: E402
from jaxserve.runner.step import step_functions  # noqa: E402
from pallas_kernels import registry  # noqa: E402

PAGE_SIZE = 16


class _Seq:
    def __init__(self, token_ids, start_pos, page_ids):
        self.token_ids, self.start_pos, self.page_ids = token_ids, start_pos, page_ids


def scenarios(max_model_len: int, smoke: bool) -> dict[str, list[tuple[int, int]]]:
    """name -> [(q_len, context after the step)] per sequence."""
    rng = np.random.default_rng(0)
    if smoke:
        return {"decode4@40": [(1, 40)] * 4, "prefill24": [(24, 24)],
                "mixed": [(20, 30)] + [(1, 50)] * 3}
    short = rng.integers(100, 600, 32).tolist()
    return {
        "decode32@100-600": [(1, int(c)) for c in short],
        "decode32@1500": [(1, min(1500, max_model_len))] * 32,
        "decode8@300": [(1, 300)] * 8,
        "prefill512@512": [(512, 512)],
        "prefill256@1280": [(256, 1280)],
        "mixed481+31": [(481, 600)] + [(1, int(c)) for c in short[:31]],
        # one sequence decoding, and the same verifying 3 speculative drafts (4 query rows)
        "decode1@200": [(1, 200)],
        "verify1x4@200": [(4, 200)],
    }


def make_step_inputs(seqs, num_tokens, num_slots, pages_per_seq, num_pages):
    page = 0
    inputs = []
    for q_len, ctx in seqs:
        n_pages = -(-ctx // PAGE_SIZE)
        pages = list(range(page, page + n_pages))
        page += n_pages
        inputs.append(_Seq([7] * q_len, ctx - q_len, pages))
    if page > num_pages:
        raise SystemExit(f"scenario needs {page} pages, the cache has {num_pages}")
    return pack_batch(inputs, num_tokens, num_slots, pages_per_seq, PAGE_SIZE, num_pages)


def timeit(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return 1e3 * best


def profile(loaded, backend: str, seqs, max_model_len: int, repeats: int,
            linear: str = "xla") -> dict:
    cfg = loaded.config
    params = jax.tree.map(jnp.asarray, loaded.params)
    if linear == "native":  # the layer matrices as the native CPU matmul reads them
        params = pack_layer_matrices(params)
    dtype = params["final_norm"].dtype
    pages_per_seq = -(-max_model_len // PAGE_SIZE)
    num_pages = max(sum(-(-c // PAGE_SIZE) for _, c in seqs), 1) + 1
    num_tokens = sum(q for q, _ in seqs)
    # the shape the engine would give this step (at the benchmark's limits: 512 tokens, 32 seqs)
    T, S = Buckets.make(max(512, num_tokens), max(32, len(seqs))).pick(num_tokens, len(seqs))
    batch = jax.tree.map(jnp.asarray, make_step_inputs(seqs, T, S, pages_per_seq, num_pages))
    cache = KVCache.zeros(cfg.num_layers, num_pages, cfg.num_kv_heads, PAGE_SIZE, cfg.head_dim,
                          dtype)
    attn = registry.get_attention_fn(backend)
    model = build_model(cfg, attn)

    def no_attention(q, *args, **kwargs):  # same output shape, reads no cache
        return q * 1.0

    bare = build_model(cfg, no_attention)
    out = {}
    # the cache is donated, as in the engine's step: without donation every call would copy
    # the whole cache to write this step's K/V, and that copy would be timed as the model
    for tag, m in (("forward", model), ("no-attn", bare)):
        fwd = jax.jit(m.forward, donate_argnums=(1,))
        cache, logits = fwd(params, cache, batch)
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            cache, logits = fwd(params, cache, batch)
            jax.block_until_ready(logits)
            best = min(best, time.perf_counter() - t0)
        out[tag] = 1e3 * best
    q = jnp.ones((T, cfg.num_heads, cfg.head_dim), dtype)
    one = jax.jit(lambda q, c, b: attn(q, c.k, c.v, jnp.int32(0), b.kv_lens, b.page_indices,
                                       b.cu_q_lens, b.num_seqs, sm_scale=cfg.head_dim ** -0.5,
                                       sliding_window=cfg.sliding_window))
    out["attention"] = cfg.num_layers * timeit(one, q, cache, batch, repeats=repeats)
    inputs = [(SamplingParams(max_tokens=8, temperature=0.0), [7] * c, []) for _, c in seqs]
    md = jax.tree.map(jnp.asarray, sampling.build_sampling_metadata(
        inputs, S, cfg.vocab_size, use_penalties=False))
    logits = jax.random.normal(jax.random.key(0), (S, cfg.vocab_size), jnp.float32)
    key = jax.random.key_data(jax.random.key(1))
    for tag, lp in (("sampler", False), ("sampler+lp", True)):
        f = jax.jit(lambda x, m, k, lp=lp: sampling.sample(x, m, k, num_top_logprobs=20,
                                                           use_penalties=lp, logprobs=lp))
        md_v = md if not lp else jax.tree.map(jnp.asarray, sampling.build_sampling_metadata(
            inputs, S, cfg.vocab_size, use_penalties=True, penalty_width=max_model_len))
        out[tag] = timeit(f, logits, md_v, key, repeats=repeats)
    step = step_functions(cfg, attn)
    targets = jnp.zeros(T, jnp.int32)
    prev = jnp.zeros(S, jnp.int32)
    for tag, extras in (("step", False), ("step+lp", True)):
        md_v = md if not extras else jax.tree.map(jnp.asarray, sampling.build_sampling_metadata(
            inputs, S, cfg.vocab_size, use_penalties=True, penalty_width=max_model_len))

        def run(c, md_v=md_v, extras=extras):
            c, o, _ = step(params, c, batch, md_v, key, jnp.uint32(1), targets, prev,
                           use_penalties=extras, logprobs=extras, all_logits=False)
            return c, o.token_ids

        cache, _ = run(cache)  # compile (the cache is donated: keep threading it)
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            cache, ids = run(cache)
            jax.block_until_ready(ids)
            best = min(best, time.perf_counter() - t0)
        out[tag] = 1e3 * best
    out["matmuls+rest"] = out["no-attn"]
    out["attention in model"] = out["forward"] - out["no-attn"]
    return {k: round(v, 2) for k, v in out.items()} | {"T": T, "S": S}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="HF folder or .gguf; 'default' = the embedded SmolLM2")
    src.add_argument("--model-config", help="random weights at a built-in shape (e.g. tiny)")
    p.add_argument("--backends", nargs="+", default=None,
                   help="attention variants (default: the platform's default variant)")
    p.add_argument("--linear-backends", nargs="+", choices=("native", "xla"), default=None,
                   help="the layers' matmuls (default: native on CPU where it builds, else xla)")
    p.add_argument("--max-model-len", type=int, default=1536)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--scenarios", nargs="*", default=None, help="subset of scenario names")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, 1 repeat (CI)")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args(argv)
    if args.model:
        from jaxserve.loading import load_model
        path = args.model
        if path == "default":
            from checkpoints.default_model import ensure_default_model
            path = ensure_default_model()
        loaded = load_model(path, "float32")
    else:
        from benchmarks.model_shapes import builtin_config, random_model
        loaded = random_model(builtin_config(args.model_config, "float32"), 0)
    repeats = 1 if args.smoke else args.repeats
    cases = scenarios(args.max_model_len, args.smoke)
    if args.scenarios:
        cases = {k: v for k, v in cases.items() if k in args.scenarios}
    results = {}
    cols = ["step", "step+lp", "forward", "no-attn", "attention in model", "attention",
            "sampler", "sampler+lp"]
    platform = jax.devices()[0].platform
    if args.linear_backends:
        linears = args.linear_backends
    else:
        from pallas_kernels import native_matmul
        linears = ["native" if platform == "cpu" and native_matmul.is_available() else "xla"]
    print(f"{'scenario':<20} {'backend':<17} {'T':>4} {'S':>3} " +
          " ".join(f"{c:>12}" for c in cols) + "   (ms)")
    for name, seqs in cases.items():
        for backend, linear in itertools.product(
                args.backends or [registry.default_variant(platform)], linears):
            r = profile(loaded, backend, seqs, args.max_model_len, repeats, linear)
            tag = f"{backend}+{linear}"
            results[f"{name}/{tag}"] = r
            print(f"{name:<20} {tag:<17} {r['T']:>4} {r['S']:>3} " +
                  " ".join(f"{r[c]:>12.2f}" for c in cols), flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"benchmark": "step_profile", "jax_version": jax.__version__,
                       "device": str(jax.devices()[0].device_kind), "results": results},
                      fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
