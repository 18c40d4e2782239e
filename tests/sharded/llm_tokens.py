"""Subprocess script: LLM(model, tensor_parallel_size=N) for several N on 8 CPU devices, greedy
tokens of a small batch and the runner's param/cache shardings, as JSON on stdout.

    python tests/sharded/llm_tokens.py MODEL_DIR [--kv-cache-dtype=int8] 1 2 8
"""

from __future__ import annotations

import json
import sys

import sharded_driver  # noqa: F401  (puts the repo on sys.path)

from jaxserve.engine.sampling_params import SamplingParams  # noqa: E402
from jaxserve.llm import LLM  # noqa: E402

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


def main():
    model_dir, args = sys.argv[1], sys.argv[2:]
    kv_dtype = next((a.split("=", 1)[1] for a in args if a.startswith("--kv-cache-dtype=")),
                    "auto")
    sizes = [int(a) for a in args if not a.startswith("--")]
    ps = sharded_driver.prompts(3, seed=1)
    result = {}
    for n in sizes:
        llm = LLM(model_dir, tensor_parallel_size=n, num_pages=64, page_size=8, max_num_seqs=4,
                  max_num_batched_tokens=64, max_model_len=128, seed=0, warmup=False,
                  kv_cache_dtype=kv_dtype)
        runner = llm.engine.runner
        plan = getattr(runner, "sharding_plan", None)
        if plan is None:
            result = {"integrated": False}
            break
        outs = llm.generate(ps, GREEDY)
        # on one CPU device the matrices are the native matmul's panels (tokens must agree)
        q_proj = runner.params["layers"]["q_proj"]
        q_proj = getattr(q_proj, "panels", q_proj)
        k_cache, expected = runner.kv_cache.k, plan.kv_cache_sharding(kv_dtype != "auto").k
        k_cache, expected = getattr(k_cache, "codes", k_cache), getattr(expected, "codes", expected)
        result[str(n)] = {
            "tokens": [o.outputs[0].token_ids for o in outs],
            "linear_backend": runner.linear_backend,
            "q_proj_spec": str(q_proj.sharding.spec),
            "q_proj_shard": list(q_proj.addressable_shards[0].data.shape),
            "cache_spec": str(k_cache.sharding.spec),
            "cache_expected": str(expected.spec),
            "cache_dtype": str(k_cache.dtype),
            "cache_shard": list(k_cache.addressable_shards[0].data.shape),
            "num_devices": plan.num_devices,
        }
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
