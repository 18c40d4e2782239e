"""The cost of structured output: one batch of chat requests, constrained by a JSON schema and
unconstrained, on one engine in one run, plus the unconstrained batch run synchronously (as
constrained steps are) to separate the cost of the lost async overlap from the masks' own.

    python benchmarks/structured.py                       # SmolLM2 on CPU, 16 requests
    python benchmarks/structured.py --num-requests 16 --max-tokens 96 --json out.json

Reports output tokens/s of each run, the share of constrained outputs that validate against the
schema (jsonschema), and the host milliseconds per step spent filling masks (llguidance).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "city": {"type": "string", "maxLength": 24},
        "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 16},
                    "maxItems": 3},
        "employed": {"type": "boolean"},
    },
    "required": ["name", "age", "city", "hobbies", "employed"],
    "additionalProperties": False,
}
PEOPLE = ["a retired teacher", "a young painter", "a ship captain", "a chess champion",
          "a baker in Lyon", "a software engineer", "a marathon runner", "a museum guard"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default", help="HF folder or .gguf; 'default' = SmolLM2")
    p.add_argument("--num-requests", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--json", default=None, help="write the figures here")
    return p.parse_args(argv)


def run(llm, prompts, params, sync: bool) -> dict:
    engine = llm.engine
    engine.async_scheduling = not sync
    steps0, mask0 = engine.num_steps, engine.mask_seconds
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    engine.async_scheduling = True
    steps = engine.num_steps - steps0
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"elapsed_s": elapsed, "output_tokens": n_out, "output_tokens_per_s": n_out / elapsed,
            "steps": steps, "mask_ms_per_step": 1e3 * (engine.mask_seconds - mask0) / max(steps, 1),
            "texts": [o.outputs[0].text for o in outs],
            "finish_reasons": [o.outputs[0].finish_reason for o in outs]}


def main(argv=None) -> int:
    args = parse_args(argv)
    import jsonschema

    from jaxserve import LLM, SamplingParams, StructuredOutputsParams

    llm = LLM(None if args.model == "default" else args.model,  # None: the default SmolLM2
              max_num_seqs=args.max_num_seqs)
    model = llm.config.model
    tok = llm.get_tokenizer()
    prompts = [tok.apply_chat_template(
        [{"role": "user", "content": f"Describe {PEOPLE[i % len(PEOPLE)]} as a JSON object "
          "with name, age, city, hobbies and employed."}],
        add_generation_prompt=True, tokenize=False) for i in range(args.num_requests)]
    base = dict(max_tokens=args.max_tokens, temperature=args.temperature, seed=0)
    constrained = SamplingParams(**base, structured_outputs=StructuredOutputsParams(json=SCHEMA))
    plain = SamplingParams(**base)
    llm.generate(prompts[:2], constrained)  # compile the grammar, build llguidance's tokenizer
    results = {"plain_async": run(llm, prompts, plain, sync=False),
               "plain_sync": run(llm, prompts, plain, sync=True),
               "json_schema": run(llm, prompts, constrained, sync=False)}
    valid = 0
    for text, reason in zip(results["json_schema"]["texts"], results["json_schema"]["finish_reasons"]):
        try:
            jsonschema.validate(json.loads(text), SCHEMA)
            valid += 1
        except (ValueError, jsonschema.ValidationError):
            assert reason == "length", f"a completed constrained output does not validate: {text}"
    c, a, s = (results[k]["output_tokens_per_s"] for k in ("json_schema", "plain_async",
                                                              "plain_sync"))
    summary = {"model": model, "num_requests": args.num_requests, "max_tokens": args.max_tokens,
               "temperature": args.temperature, "valid_json": valid,
               "constrained_vs_plain_async": c / a, "constrained_vs_plain_sync": c / s,
               "sync_vs_async": s / a, "date": time.strftime("%Y-%m-%d"),
               **{k: {m: v for m, v in r.items() if m not in ("texts",)}
                  for k, r in results.items()}}
    for k, r in results.items():
        print(f"{k:12s} {r['output_tokens_per_s']:7.1f} out tok/s  {r['output_tokens']:5d} tokens "
              f"{r['steps']:4d} steps  masks {r['mask_ms_per_step']:.2f} ms/step")
    print(f"valid JSON {valid}/{args.num_requests}; constrained / plain async "
          f"{c / a:.2f}x, / plain sync {c / s:.2f}x; sync / async {s / a:.2f}x")
    print("example:", results["json_schema"]["texts"][0])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
