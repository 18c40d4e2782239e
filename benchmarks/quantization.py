"""Weight quantization side by side in one run: weight bytes (as the memory plan counts them)
and output tokens/s of the same model as float32, int8 (layer matrices, and with the
embedding table too), fp8, a GGUF Q4_1 file kept packed, and float32 weights over an int8 KV
cache.

    python benchmarks/quantization.py                       # SmolLM2 on CPU
    python benchmarks/quantization.py --rounds 3 --json out.json

Every engine is built first (same limits), then the rounds alternate between them so the
machine's drift falls on all alike; each figure is the median over rounds. The same random
token prompts, greedy with a fixed output length (ignore_eos); the report also counts how many
requests produced exactly the float model's tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# variant -> (which checkpoint, LLM keywords)
VARIANTS = {
    "float32": ("hf", {}),
    "int8": ("hf", {"quantization": "int8"}),
    "int8-emb": ("hf", {"quantization": "int8", "quantize_embeddings": True}),
    "fp8": ("hf", {"quantization": "fp8"}),
    "gguf": ("gguf", {}),
    "kv-int8": ("hf", {"kv_cache_dtype": "int8"}),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default", help="HF folder; 'default' = SmolLM2")
    p.add_argument("--gguf", default=None, help="a 4-bit GGUF of the same model (default: the "
                   "default model's Q4_1 file)")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--num-requests", type=int, default=16)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from jaxserve import LLM, SamplingParams
    from benchmarks.workloads import random_prompts

    model = args.model
    if model == "default":
        from checkpoints.default_model import GGUF_NAME, ensure_default_model
        model = ensure_default_model()
        args.gguf = args.gguf or os.path.join(model, GGUF_NAME)
    llms = {}
    for name in args.variants:
        source, kwargs = VARIANTS[name]
        llms[name] = LLM(model if source == "hf" else args.gguf, max_num_seqs=args.max_num_seqs,
                         max_model_len=args.input_len + args.output_len + 16, **kwargs)
    prompts = random_prompts([args.input_len] * args.num_requests, seed=0)
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    rates = {name: [] for name in llms}
    tokens = {}
    for _ in range(args.rounds):
        for name, llm in llms.items():
            start = time.perf_counter()
            outs = llm.generate(prompts, params)
            elapsed = time.perf_counter() - start
            rates[name].append(sum(len(o.outputs[0].token_ids) for o in outs) / elapsed)
            tokens[name] = [o.outputs[0].token_ids for o in outs]
    base = tokens.get("float32")
    rows = {}
    print(f"{'variant':<10} {'weights (MiB)':>14} {'out tok/s':>10} {'vs float32':>11} "
          f"{'same tokens':>12}")
    for name, llm in llms.items():
        runner = llm.engine.runner
        rate = statistics.median(rates[name])
        same = None if base is None else sum(a == b for a, b in zip(tokens[name], base))
        rows[name] = {"weight_bytes": runner.plan.weight_bytes, "output_tokens_per_s": rate,
                      "rounds": rates[name], "same_tokens_as_float32": same,
                      "linear_backend": runner.linear_backend,
                      "kv_cache_dtype": runner.plan.kv_cache_dtype,
                      "num_pages": runner.plan.num_pages}
        ratio = rate / statistics.median(rates["float32"]) if "float32" in rates else float("nan")
        print(f"{name:<10} {runner.plan.weight_bytes / 2**20:>14.1f} {rate:>10.1f} "
              f"{ratio:>10.2f}x {'' if same is None else f'{same}/{len(prompts)}':>12}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"benchmark": "quantization", "args": vars(args), "results": rows}, f,
                      indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
