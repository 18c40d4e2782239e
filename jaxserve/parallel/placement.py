"""Putting host data onto a mesh without ever holding a whole model on one device.

`place_params` builds each parameter as a global jax.Array from its host numpy array with
`jax.make_array_from_callback`: every device receives only its own slice (numpy slicing of a
memory-mapped or stacked host array), so an 8-way split model needs 1/8 of its bytes per device,
and in a multi-process run each process transfers only to its own devices. `zeros_kv_cache`
allocates the cache already sharded, inside a jit with out_shardings, for the same reason.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxserve.models.batch import KVCache


def place_array(host: np.ndarray, sharding) -> jax.Array:
    """One global array from a host array every process holds in full (or memory-maps).
    A jax.Array (e.g. restored from orbax) is kept when already laid out so, else resharded
    on device."""
    if isinstance(host, jax.Array):
        return host if host.sharding == sharding else jax.device_put(host, sharding)
    host = np.asarray(host)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index],
                                        dtype=host.dtype)


def place_params(host_params, shardings):
    """Host (numpy) param pytree + matching pytree of shardings -> pytree of global arrays."""
    return jax.tree.map(place_array, host_params, shardings)


def zeros_kv_cache(num_layers: int, num_pages: int, num_kv_heads: int, page_size: int,
                   head_dim: int, dtype, sharding: KVCache, code_dtype=None) -> KVCache:
    """KVCache.zeros, created directly in its sharded layout (`sharding` from
    rules.kv_cache_sharding); code_dtype: a quantized cache's codes (kv_quant.QuantizedKV)."""
    from pallas_kernels.kv_quant import QuantizedKV

    shape = (num_layers, num_pages, num_kv_heads, page_size, head_dim)

    def one():
        if code_dtype is None:
            return jnp.zeros(shape, dtype)
        return QuantizedKV.zeros(shape, code_dtype)
    make = jax.jit(lambda: KVCache(k=one(), v=one()), out_shardings=sharding)
    return make()


def put_replicated(tree, mesh):
    """Host pytree -> arrays replicated over the mesh (small step inputs: sampling metadata,
    keys). In a multi-process run every process must pass identical values."""
    return jax.device_put(tree, NamedSharding(mesh, P()))


def put_with(tree, shardings):
    """Host pytree -> global arrays with the given matching pytree of shardings. One batched
    device_put (per-step inputs are small; it also works across processes for numpy inputs
    that are the same everywhere)."""
    return jax.device_put(tree, shardings)
