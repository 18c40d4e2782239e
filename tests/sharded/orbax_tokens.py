"""Subprocess script: restore an orbax checkpoint straight into a sharded layout and compare
it (values, shardings, greedy tokens) with the HF folder it was converted from. JSON on stdout.

    python tests/sharded/orbax_tokens.py ORBAX_DIR HF_DIR tp4
"""

from __future__ import annotations

import json
import sys

from sharded_driver import ShardedDriver, load_host_model, prompts

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxserve.loading.orbax import load_orbax  # noqa: E402
from jaxserve.models.config import ModelConfig  # noqa: E402
from jaxserve.parallel import ShardingPlan  # noqa: E402


def main():
    orbax_dir, hf_dir, config_name = sys.argv[1:4]
    cfg, host_params = load_host_model(hf_dir)
    assert ModelConfig.from_folder(orbax_dir) == cfg  # config.json travelled with the params
    plan = ShardingPlan.build(cfg, sharding_config=config_name)
    expected = plan.param_shardings()
    restored = load_orbax(orbax_dir, expected)
    same_values = all(np.array_equal(np.asarray(r), h) for r, h in
                      zip(jax.tree.leaves(restored), jax.tree.leaves(host_params)))
    same_shardings = all(r.sharding == s for r, s in
                         zip(jax.tree.leaves(restored), jax.tree.leaves(expected)))
    q = restored["layers"]["q_proj"]
    ps = prompts()
    unsharded = load_orbax(orbax_dir)  # no shardings: everything on the default device
    json.dump({
        "same_values": same_values, "same_shardings": same_shardings,
        "q_proj_shard_shape": list(q.addressable_shards[0].data.shape),
        "q_proj_shape": list(q.shape),
        "unsharded_devices": sorted({str(d) for x in jax.tree.leaves(unsharded)
                                     for d in x.devices()}),
        "hf_tokens": ShardedDriver(cfg, host_params).greedy(ps, 8),
        "orbax_tokens": ShardedDriver(cfg, None, plan, params=restored).greedy(ps, 8),
    }, sys.stdout)


if __name__ == "__main__":
    main()
