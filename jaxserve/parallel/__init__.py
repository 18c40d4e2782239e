"""Multi-device execution: meshes, logical-axis sharding rules, sharded attention, multi-host.

    mesh.py            ParallelConfig -> Mesh over ("data", "model"); ShardingError
    rules.py           AxisRules (logical axis -> mesh axis), per-leaf logical axes, shardings
    sharding_config.py the YAML/JSON file users write, presets tp1/tp2/tp4/tp8/dp2-tp4
    attention.py       shard_attention: the attention call under jax.shard_map, heads split
    placement.py       host arrays -> sharded global arrays without a full copy per device
    plan.py            ShardingPlan: the above bundled for the runner
    distributed.py     jax.distributed start-up, leader -> follower step broadcast
"""

from jaxserve.parallel.attention import shard_attention
from jaxserve.parallel.distributed import (broadcast_step_inputs, follower_loop,
                                           initialize_distributed, lead_call, stop_followers)
from jaxserve.parallel.mesh import DATA_AXIS, MODEL_AXIS, ParallelConfig, ShardingError
from jaxserve.parallel.placement import place_params, zeros_kv_cache
from jaxserve.parallel.plan import ShardingPlan
from jaxserve.parallel.rules import (DEFAULT_RULES, AxisRules, batch_shardings, kv_cache_sharding,
                                     param_logical_axes, param_shardings)
from jaxserve.parallel.sharding_config import (PRESETS, ShardingConfig, load_sharding_config,
                                               resolve_sharding_config)

__all__ = [
    "AxisRules", "DATA_AXIS", "DEFAULT_RULES", "MODEL_AXIS", "PRESETS", "ParallelConfig",
    "ShardingConfig", "ShardingError", "ShardingPlan", "batch_shardings", "broadcast_step_inputs",
    "follower_loop", "initialize_distributed", "kv_cache_sharding", "lead_call",
    "load_sharding_config", "param_logical_axes", "param_shardings", "place_params",
    "resolve_sharding_config", "shard_attention", "stop_followers", "zeros_kv_cache",
]
