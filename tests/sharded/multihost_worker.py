"""Subprocess script: one process of a 2-process jax.distributed job on 127.0.0.1 (4 CPU devices
each, one tp8 mesh over all 8). Process 0 leads: it decides every step and broadcasts it;
process 1 mirrors the steps in follower_loop. The leader prints JSON: the greedy tokens of the
distributed run and of an unsharded single-device run in the same process.

    python tests/sharded/multihost_worker.py PROCESS_ID NUM_PROCESSES PORT MODEL_DIR CONFIG
"""

from __future__ import annotations

import json
import sys

from sharded_driver import PAD_TO, ShardedDriver, load_host_model, prompts

import jax  # noqa: E402

from jaxserve.parallel import (ShardingPlan, follower_loop, initialize_distributed,  # noqa: E402
                               lead_call, stop_followers)

MAX_NEW = 8


class MirroredModel:
    """The state every process keeps in step (params, cache), changed only through methods the
    leader announces with lead_call; the shape of the runner's multi-host integration."""

    def __init__(self, driver):
        self.driver, self.cache = driver, None

    def reset(self, num_seqs: int):
        self.cache = self.driver.new_cache(num_seqs)

    def run(self, batch):  # batch: numpy ForwardBatch, identical on every process
        self.cache, next_tokens = self.driver.step(self.cache, batch)
        return next_tokens


def lead(model: MirroredModel, ps):
    lead_call(model, "reset", len(ps))
    d = model.driver
    out = [[t] for t in lead_call(model, "run", d.batch(ps, [0] * len(ps), PAD_TO))]
    starts = [len(p) for p in ps]
    while len(out[0]) < MAX_NEW:
        nxt = lead_call(model, "run", d.batch([[o[-1]] for o in out], starts, PAD_TO))
        for o, t in zip(out, nxt):
            o.append(t)
        starts = [s + 1 for s in starts]
    return out


def main():
    pid, nproc, port, model_dir, config = sys.argv[1:6]
    pid, nproc = int(pid), int(nproc)
    initialize_distributed(f"127.0.0.1:{port}", nproc, pid, initialization_timeout=60)
    cfg, host_params = load_host_model(model_dir)
    plan = ShardingPlan.build(cfg, sharding_config=config)  # spans both processes' devices
    model = MirroredModel(ShardedDriver(cfg, host_params, plan))
    if pid != 0:
        follower_loop(model)
        return
    ps = prompts()
    tokens = lead(model, ps)
    stop_followers()
    # single-device reference, on the leader's first local device only
    plain = ShardedDriver(cfg, host_params).greedy(ps, MAX_NEW)
    # gloo prints connection lines to stdout: the result goes on a line of its own, last
    print()
    json.dump({"process_count": jax.process_count(), "device_count": jax.device_count(),
               "local_device_count": jax.local_device_count(), "mesh": dict(plan.mesh.shape),
               "tokens": tokens, "plain": plain}, sys.stdout)


if __name__ == "__main__":
    main()
