"""Subprocess script: greedy tokens of a model under several sharding configs, plus the
shardings the compiled forward actually used, as JSON on stdout.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \
        python tests/sharded/forward_tokens.py MODEL_DIR [--attention=VARIANT] tp1 tp2 ...

--attention picks a pallas_kernels registry variant for the sharded runs (interpret mode on
CPU); the unsharded baseline always uses the pure-jnp reference.
"""

from __future__ import annotations

import functools
import json
import sys

from sharded_driver import ShardedDriver, load_host_model, prompts

import jax  # noqa: E402  (after sharded_driver put the repo on sys.path)

from jaxserve.parallel import ShardingError, ShardingPlan  # noqa: E402

MAX_NEW = 8
BIG = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def sharding_facts(plan, driver) -> dict:
    """What the placed params and the cache that came out of the jitted steps look like."""
    layers = driver.params["layers"]
    cache = driver.last_cache

    def facts(x):
        return {"spec": str(x.sharding.spec), "shard_shape": list(x.addressable_shards[0].data.shape),
                "shape": list(x.shape), "replicated": bool(x.sharding.is_fully_replicated)}

    out = {name: facts(layers[name]) for name in BIG}
    out["embed"] = facts(driver.params["embed"])
    out["kv_cache_k"] = facts(cache.k)
    out["kv_cache_expected_spec"] = str(plan.kv_cache_sharding().k.spec)
    out["kv_cache_shards"] = plan.kv_cache_shards
    out["describe"] = plan.describe()
    placed = plan.put_batch(driver.batch([[1, 2, 3]], [0], 32))
    # on a one-device mesh the host arrays go to jit as they are (plan.put_batch)
    sharding = getattr(placed.token_ids, "sharding", None)
    out["token_ids_spec"] = "numpy" if sharding is None else str(sharding.spec)
    return out


def main():
    model_dir, names = sys.argv[1], sys.argv[2:]
    attention = {}
    if names and names[0].startswith("--attention="):
        from pallas_kernels import registry

        variant = names.pop(0).split("=", 1)[1]
        attention["attention_fn"] = functools.partial(registry.get_attention_fn(variant),
                                                      interpret=True)
    cfg, host_params = load_host_model(model_dir)
    ps = prompts()
    result = {"devices": jax.device_count(), "prompts": ps,
              "plain": ShardedDriver(cfg, host_params).greedy(ps, MAX_NEW)}
    for name in names:
        try:
            plan = ShardingPlan.build(cfg, sharding_config=name)
        except ShardingError as e:
            result[name] = {"error": str(e)}
            continue
        driver = ShardedDriver(cfg, host_params, plan, **attention)
        tokens = driver.greedy(ps, MAX_NEW)
        result[name] = {"tokens": tokens, "shardings": sharding_facts(plan, driver)}
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
