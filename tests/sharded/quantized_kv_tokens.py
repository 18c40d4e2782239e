"""Subprocess script: greedy tokens with a quantized KV cache (int8 and fp8 codes with their
per-token scales) unsharded and on the given meshes, plus the per-shard shapes of the first
layer's K codes and scales, as JSON on stdout.

    python tests/sharded/quantized_kv_tokens.py MODEL_DIR [--attention=VARIANT] tp2 tp4
"""

from __future__ import annotations

import functools
import json
import sys

from sharded_driver import ShardedDriver, load_host_model, prompts

import jax.numpy as jnp  # noqa: E402

from jaxserve.parallel import ShardingPlan  # noqa: E402
from pallas_kernels import registry  # noqa: E402


def main():
    model_dir, args = sys.argv[1], sys.argv[2:]
    variant = [a.split("=", 1)[1] for a in args if a.startswith("--attention=")]
    names = [a for a in args if not a.startswith("--")]
    kwargs = ({"attention_fn": functools.partial(registry.get_attention_fn(variant[0]),
                                                 interpret=True)} if variant else {})
    cfg, params = load_host_model(model_dir)
    ps = prompts()
    result = {}
    for label, code_dtype in (("int8", jnp.int8), ("fp8", jnp.float8_e4m3fn)):
        out = {"plain": ShardedDriver(cfg, params, kv_code_dtype=code_dtype,
                                      **kwargs).greedy(ps, 8)}
        for name in names:
            driver = ShardedDriver(cfg, params, ShardingPlan.build(cfg, sharding_config=name),
                                   kv_code_dtype=code_dtype, **kwargs)
            tokens = driver.greedy(ps, 8)
            k = driver.last_cache.k
            out[name] = {"tokens": tokens, "codes_dtype": str(k.codes.dtype),
                         "codes_shard": list(k.codes.addressable_shards[0].data.shape),
                         "scale_shard": list(k.scale.addressable_shards[0].data.shape)}
        result[label] = out
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
