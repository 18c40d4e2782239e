"""Subprocess script: LLM(tensor_parallel_size=8) served by a 2-process job (4 CPU devices
each). Process 0 owns the engine and broadcasts every device step; process 1
builds the same runner and mirrors the steps in follower_loop. The leader then runs the same
prompts through a single-device LLM and prints both token lists as the last stdout line.

    python tests/sharded/multihost_llm_worker.py PROCESS_ID PORT MODEL_DIR
"""

from __future__ import annotations

import json
import sys

import sharded_driver

from jaxserve.parallel import follower_loop, initialize_distributed, stop_followers  # noqa: E402

ENGINE = dict(num_pages=64, page_size=8, max_num_seqs=2, max_num_batched_tokens=16,
              max_model_len=128, seed=0)


def main():
    pid, port, model_dir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    initialize_distributed(f"127.0.0.1:{port}", 2, pid, initialization_timeout=60)
    from jaxserve.engine.sampling_params import SamplingParams
    from jaxserve.llm import LLM

    if pid != 0:
        # Same engine config, no warm-up of its own: the leader's warm-up steps arrive as calls.
        llm = LLM(model_dir, tensor_parallel_size=8, warmup=False, **ENGINE)
        follower_loop(llm.engine.runner)
        return
    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    ps = sharded_driver.prompts(2, seed=2)
    # warmup=False only to keep the test short: warm-up steps go through the same _run path
    llm = LLM(model_dir, tensor_parallel_size=8, warmup=False, **ENGINE)
    tokens = [o.outputs[0].token_ids for o in llm.generate(ps, greedy)]
    stop_followers()
    # a tp1 engine on process 0 alone: its mesh is local, so the runner must not broadcast
    single = LLM(model_dir, tensor_parallel_size=1, warmup=False, **ENGINE)
    plain = [o.outputs[0].token_ids for o in single.generate(ps, greedy)]
    print()
    print(json.dumps({"tokens": tokens, "plain": plain}))


if __name__ == "__main__":
    main()
