"""ShardingPlan: everything the runner needs to run one model on a mesh, built once.

    plan = ShardingPlan.build(cfg, tensor_parallel_size=4)            # or sharding_config="dp2-tp4"
    params = plan.place_params(host_params)                            # sharded global arrays
    cache = plan.zeros_kv_cache(num_pages, page_size, dtype)           # sharded KV cache
    attention_fn = plan.wrap_attention(attention_fn)                   # shard_map over heads
    step = jax.jit(step_fn, donate_argnums=(1,), out_shardings=plan.step_out_shardings())
    batch = plan.put_batch(numpy_batch)                                # tokens split per rules

Pinning the cache's out sharding to its in sharding matters twice: the donated buffer can be
reused in place, and the next step sees the same input sharding, so nothing recompiles.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxserve.models.batch import KVCache
from jaxserve.models.config import ModelConfig
from jaxserve.parallel import attention, placement, rules as rules_lib
from jaxserve.parallel.sharding_config import ShardingConfig, resolve_sharding_config


@dataclasses.dataclass(frozen=True)
class ShardingPlan:
    config: ShardingConfig
    model: ModelConfig
    mesh: object                 # jax.sharding.Mesh over (data, model)
    rules: rules_lib.AxisRules   # resolved for this model (KV heads possibly replicated)

    @classmethod
    def build(cls, model: ModelConfig, tensor_parallel_size: int = 1,
              sharding_config: str | ShardingConfig | None = None, devices=None) -> "ShardingPlan":
        """Validate the parallel settings against the model and the devices, then make the mesh.
        Raises ShardingError (naming both numbers) when they do not fit."""
        config = resolve_sharding_config(tensor_parallel_size, sharding_config)
        # Check the model before the machine: a model that cannot split is the error to fix first.
        rules_lib.resolve_rules(model, config.parallel.mesh_shape, config.rules)
        mesh = config.parallel.make_mesh(devices)
        return cls(config=config, model=model, mesh=mesh,
                   rules=rules_lib.resolve_rules(model, mesh, config.rules))

    # -- layouts ----------------------------------------------------------------------------
    @property
    def num_devices(self) -> int:
        return self.mesh.size

    @property
    def multi_process(self) -> bool:
        """Whether the mesh spans devices of several processes: then every device call must be
        made by every process (distributed.lead_call / follower_loop). A single-process mesh
        inside a multi-process job (say a tp1 engine on process 0) needs no broadcast."""
        return len({d.process_index for d in self.mesh.devices.flat}) > 1

    @property
    def kv_cache_shards(self) -> int:
        """Ways the KV cache is split (1 when KV heads are replicated)."""
        return rules_lib.kv_cache_shards(self.model, self.mesh, self.rules)

    def param_shardings(self, params: dict | None = None) -> dict:
        """See rules.param_shardings; `params` (host or placed) says which layer matrices are
        quantized."""
        return rules_lib.param_shardings(self.model, self.mesh, self.rules, params)

    def kv_cache_sharding(self, quantized: bool = False) -> KVCache:
        return rules_lib.kv_cache_sharding(self.model, self.mesh, self.rules, quantized)

    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    def step_out_shardings(self, quantized_cache: bool = False):
        """out_shardings for step(...) -> (kv_cache, StepOutput, sampled): the cache keeps its
        layout, the (small) step outputs are replicated so any process can read them."""
        return (self.kv_cache_sharding(quantized_cache), self.replicated(), self.replicated())

    # -- placement --------------------------------------------------------------------------
    def place_params(self, host_params):
        return placement.place_params(host_params, self.param_shardings(host_params))

    def zeros_kv_cache(self, num_pages: int, page_size: int, dtype,
                       code_dtype=None) -> KVCache:
        """code_dtype: int8 / float8_e4m3fn for a quantized cache (kv_quant), None: dtype."""
        m = self.model
        return placement.zeros_kv_cache(m.num_layers, num_pages, m.num_kv_heads, page_size,
                                        m.head_dim, dtype,
                                        self.kv_cache_sharding(code_dtype is not None),
                                        code_dtype)

    def put_batch(self, batch):
        """A numpy ForwardBatch -> global arrays; token fields split per the `tokens` rule.
        On one device the numpy arrays go to jit as they are: its C++ path copies them in a
        fraction of what device_put costs in Python (~0.1 vs ~1 ms for a step's inputs)."""
        if self.mesh.size == 1:
            return batch
        return placement.put_with(batch, rules_lib.batch_shardings(batch, self.mesh, self.rules))

    def put_replicated(self, tree):
        """Small host inputs (sampling metadata, targets) -> replicated arrays (or, on one
        device, the numpy arrays themselves, as put_batch)."""
        if self.mesh.size == 1:
            return tree
        return placement.put_replicated(tree, self.mesh)

    def wrap_attention(self, attention_fn):
        return attention.shard_attention(attention_fn, self.mesh, self.model, self.rules)

    # -- reporting --------------------------------------------------------------------------
    def per_device_bytes(self, host_params) -> int:
        """Bytes of params one device holds under this plan."""
        total = 0
        shardings = self.param_shardings(host_params)
        for x, s in zip(jax.tree.leaves(host_params), jax.tree.leaves(shardings)):
            shard = s.shard_shape(x.shape)
            total += int(np.prod(shard)) * np.dtype(x.dtype).itemsize
        return total

    def describe(self) -> str:
        if self.kv_cache_shards > 1:
            kv = f"split over {self.kv_cache_shards} devices"
        else:
            kv = "on one device" if self.num_devices == 1 else "replicated on every device"
        why = ""
        if self.rules.kv_heads is None and self.config.rules.kv_heads is not None:
            why = (f" ({self.model.num_kv_heads} KV heads do not split over "
                   f"{self.mesh.shape[self.config.rules.kv_heads]} devices)")
        return (f"sharding {self.config.name}: mesh {dict(self.mesh.shape)} over "
                f"{self.num_devices} {self.mesh.devices.flat[0].platform} device(s); "
                f"KV cache {kv}{why}")

