"""Speculative decoding (n-gram, or a draft model) against plain decoding, side by side in one
run, on one model: a copy-heavy workload (chat requests asking to repeat or lightly edit a
passage that is in the prompt) and random token prompts (where nothing matches and speculation
should cost little).

    python benchmarks/speculative.py                      # SmolLM2 on CPU, n-gram
    python benchmarks/speculative.py --num-requests 8 --max-num-seqs 1 --json out.json
    python checkpoints/make_layer_draft.py checkpoints/models/SmolLM2-135M-Instruct /tmp/d8 \
        --layers 8 && python benchmarks/speculative.py --max-num-seqs 1 --num-requests 4 \
        --speculative-config '{"method": "draft_model", "model": "/tmp/d8"}'
    python benchmarks/speculative.py --logprobs 1         # every request asks for logprobs

Greedy, fixed output lengths (ignore_eos), both engines built with the same limits. Reports
output tokens/s, steps, the acceptance rate (accepted / proposed drafts) and the mean tokens a
verified step emits per sequence, and checks that both engines produced the same tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PASSAGES = [
    "The quick brown fox jumps over the lazy dog. The dog does not move, and the fox runs "
    "into the forest, where it finds a small river and drinks the cold clear water.",
    "To make bread, mix flour, water, salt and yeast. Knead the dough for ten minutes, let it "
    "rise for an hour, shape it, let it rise again, and bake it in a hot oven until golden.",
    "The library opens at nine in the morning and closes at six in the evening. Books can be "
    "borrowed for three weeks and renewed twice, unless another reader has reserved them.",
    "Mount Everest is the highest mountain on Earth. Climbers usually start from a base camp "
    "and spend weeks getting used to the thin air before they try to reach the summit.",
]
TASKS = ["Repeat the following text exactly, word for word:\n\n{}",
         "Copy this paragraph, replacing every 'the' with 'a':\n\n{}"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default", help="HF folder or .gguf; 'default' = SmolLM2")
    p.add_argument("--num-requests", type=int, default=16)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--speculative-config", default='{"method": "ngram", '
                   '"num_speculative_tokens": 3, "prompt_lookup_min": 2, "prompt_lookup_max": 4}')
    p.add_argument("--logprobs", type=int, default=None,
                   help="every request also asks for this many top logprobs (the extras step)")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="every request also sets this repetition_penalty (the extras step)")
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def workloads(tok, n: int, seed: int = 0) -> dict[str, list[list[int]]]:
    copy = [tok.apply_chat_template(
        [{"role": "user", "content": TASKS[i % 2].format(PASSAGES[i % len(PASSAGES)])}],
        add_generation_prompt=True, tokenize=True) for i in range(n)]
    copy = [list(getattr(p, "input_ids", p)) for p in copy]
    rng = random.Random(seed)
    vocab = len(tok)
    randoms = [[rng.randrange(vocab) for _ in range(len(copy[i]))] for i in range(n)]
    return {"copy": copy, "random": randoms}


def run(llm, prompts, output_len: int, logprobs: int | None = None,
        repetition_penalty: float = 1.0) -> dict:
    from jaxserve import SamplingParams
    engine = llm.engine
    counters0 = (engine.spec_num_draft_tokens, engine.spec_num_accepted_tokens,
                 engine.spec_num_drafts, engine.num_steps)
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True,
                            logprobs=logprobs, repetition_penalty=repetition_penalty)
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    drafts = engine.spec_num_draft_tokens - counters0[0]
    accepted = engine.spec_num_accepted_tokens - counters0[1]
    verified = engine.spec_num_drafts - counters0[2]
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"elapsed_s": elapsed, "output_tokens_per_s": n_out / elapsed,
            "steps": engine.num_steps - counters0[3], "draft_tokens": drafts,
            "accepted_tokens": accepted,
            "acceptance_rate": accepted / drafts if drafts else None,
            "tokens_per_verified_step": (accepted + verified) / verified if verified else None,
            "token_ids": [o.outputs[0].token_ids for o in outs]}


def main(argv=None) -> int:
    args = parse_args(argv)
    from jaxserve import LLM

    common = dict(max_num_seqs=args.max_num_seqs, max_model_len=1024)
    plain = LLM(None if args.model == "default" else args.model, **common)  # None: SmolLM2
    model = plain.config.model
    spec = LLM(model, speculative_config=json.loads(args.speculative_config), **common)
    loads = workloads(plain.get_tokenizer(), args.num_requests)
    report = {"model": model, "speculative_config": json.loads(args.speculative_config),
              "num_requests": args.num_requests, "output_len": args.output_len,
              "max_num_seqs": args.max_num_seqs, "logprobs": args.logprobs,
              "repetition_penalty": args.repetition_penalty,
              "date": time.strftime("%Y-%m-%d")}
    for name, prompts in loads.items():
        extras = (args.logprobs, args.repetition_penalty)
        for llm in (plain, spec):  # warm caches on both
            run(llm, prompts[:2], 4, *extras)
        a = run(plain, prompts, args.output_len, *extras)
        b = run(spec, prompts, args.output_len, *extras)
        same = sum(x == y for x, y in zip(a.pop("token_ids"), b.pop("token_ids")))
        report[name] = {"plain": a, "speculative": b, "identical": same,
                        "speedup": b["output_tokens_per_s"] / a["output_tokens_per_s"]}
        rate = b["acceptance_rate"]
        print(f"{name:7s} plain {a['output_tokens_per_s']:7.1f} tok/s ({a['steps']} steps)  "
              f"speculative {b['output_tokens_per_s']:7.1f} tok/s ({b['steps']} steps)  "
              f"{report[name]['speedup']:.2f}x; acceptance "
              f"{'n/a' if rate is None else f'{rate:.2f}'}, "
              f"{b['tokens_per_verified_step'] or 0:.2f} tokens per verified step; "
              f"identical {same}/{len(prompts)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
