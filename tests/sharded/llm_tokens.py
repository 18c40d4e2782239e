"""Subprocess script: LLM(model, tensor_parallel_size=N) for several N on 8 CPU devices, greedy
tokens of a small batch and the runner's param/cache shardings, as JSON on stdout.

    python tests/sharded/llm_tokens.py MODEL_DIR 1 2 8
"""

from __future__ import annotations

import json
import sys

import sharded_driver  # noqa: F401  (puts the repo on sys.path)

from jaxserve.engine.sampling_params import SamplingParams  # noqa: E402
from jaxserve.llm import LLM  # noqa: E402

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


def main():
    model_dir, sizes = sys.argv[1], [int(x) for x in sys.argv[2:]]
    ps = sharded_driver.prompts(3, seed=1)
    result = {}
    for n in sizes:
        llm = LLM(model_dir, tensor_parallel_size=n, num_pages=64, page_size=8, max_num_seqs=4,
                  max_num_batched_tokens=64, max_model_len=128, seed=0, warmup=False)
        runner = llm.engine.runner
        plan = getattr(runner, "sharding_plan", None)
        if plan is None:
            result = {"integrated": False}
            break
        outs = llm.generate(ps, GREEDY)
        # on one CPU device the matrices are the native matmul's panels (tokens must agree)
        q_proj = runner.params["layers"]["q_proj"]
        q_proj = getattr(q_proj, "panels", q_proj)
        result[str(n)] = {
            "tokens": [o.outputs[0].token_ids for o in outs],
            "linear_backend": runner.linear_backend,
            "q_proj_spec": str(q_proj.sharding.spec),
            "q_proj_shard": list(q_proj.addressable_shards[0].data.shape),
            "cache_spec": str(runner.kv_cache.k.sharding.spec),
            "cache_expected": str(plan.kv_cache_sharding().k.spec),
            "num_devices": plan.num_devices,
        }
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
