"""Attention under `jax.shard_map`: each device runs the attention function on its own heads.

Pallas kernels are not auto-partitioned by GSPMD, and even the pure-jnp reference would be
partitioned poorly (its gathers over pages), so the attention call is a manual region: query
heads split on the heads' mesh axis, the batch metadata (kv_lens, page_indices, cu_q_lens,
num_seqs, layer) replicated, and the output [T, Hq, D] split like q. Everything around it (the
projections, the cache writes) stays with GSPMD.

Two layouts of the KV cache (rules.resolve_rules decides):
  * KV heads sharded like the query heads (tp divides num_kv_heads): shard i holds query heads
    [i*Hq/tp, (i+1)*Hq/tp) and KV heads [i*Hkv/tp, (i+1)*Hkv/tp), and query head j of the shard
    belongs to local KV head j // (Hq/Hkv), exactly the grouping the attention function assumes.
    The function is called unchanged.
  * KV heads replicated (tp > num_kv_heads, or tp does not divide it): every shard holds all KV
    heads but only Hq/tp query heads, so the function's own grouping (local head j -> KV head
    j // group) would pair them wrongly. Each shard therefore cuts out of the current layer the
    KV heads its query heads belong to and calls the function on that one-layer cache:
      - when the shard's query heads lie inside one KV group (tp a multiple of num_kv_heads, the
        common case, e.g. 8 devices and 2 KV heads), that is one KV head: a [1, P, 1, ps, D] slice;
      - otherwise (e.g. 12 heads / 3 KV heads on 2 devices: 6 query heads spanning KV heads 0-1
        unevenly) one KV head per query head, gathered: [1, P, Hq/tp, ps, D].
    The slice copies one layer of the cache per call; a cache layout that stores a copy of the
    needed KV head per shard would avoid it but needs the model's cache write to know about it.

A quantized cache (pallas_kernels.kv_quant.QuantizedKV) is a pytree of codes [L, P, Hkv, ps, D]
and scales [L, P, Hkv, ps]: both split (or are cut) on the KV-head axis alike, so every shard
holds the scales of exactly the codes it holds.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxserve.models.config import ModelConfig
from jaxserve.parallel.rules import DEFAULT_RULES, AxisRules, resolve_rules


def _kv_heads_for_shard(cache, layer, shard, q_heads_local: int, group: int):
    """The KV heads the shard's query heads use, cut from the current layer of one cache (an
    array or a QuantizedKV, cut leaf by leaf): [1, P, n, page_size, (D)] with n == 1 (one
    shared KV head) or n == q_heads_local."""
    first_q = shard * q_heads_local

    def cut(x):  # x [L, P, Hkv, ps, D] codes or floats, or [L, P, Hkv, ps] scales
        rest = x.shape[3:]
        if group % q_heads_local == 0:
            # All of this shard's query heads belong to the KV head first_q // group.
            starts = (layer, 0, first_q // group) + (0,) * len(rest)
            return jax.lax.dynamic_slice(x, starts, (1, x.shape[1], 1, *rest))
        # Uneven: give every query head its own KV head (plain multi-head attention locally).
        kv_of_q = (first_q + jnp.arange(q_heads_local, dtype=jnp.int32)) // group  # [Hq/tp]
        layer_x = jax.lax.dynamic_slice(x, (layer,) + (0,) * (x.ndim - 1), (1, *x.shape[1:]))
        return jnp.take(layer_x, kv_of_q, axis=2)

    return jax.tree.map(cut, cache)


def _local_attention(q, k_cache, v_cache, layer, kv_lens, page_indices, cu_q_lens, num_seqs, *,
                     attention_fn, kv_replicated: bool, heads_axis: str, num_heads: int,
                     num_kv_heads: int, kwargs):
    # q: [T, Hq/tp, D] on this shard; caches: [L, P, Hkv/tp or Hkv, ps, D]
    if kv_replicated:
        shard = jax.lax.axis_index(heads_axis)
        k_cache, v_cache = (_kv_heads_for_shard(c, layer, shard, q.shape[1],
                                                num_heads // num_kv_heads)
                            for c in (k_cache, v_cache))
        layer = jnp.zeros((), jnp.int32)  # the slice holds just the current layer
    return attention_fn(q, k_cache, v_cache, layer, kv_lens, page_indices, cu_q_lens, num_seqs,
                        **kwargs)


@functools.lru_cache(maxsize=32)
def shard_attention(attention_fn, mesh, cfg: ModelConfig, rules: AxisRules = DEFAULT_RULES):
    """Wrap an attention function (pallas_kernels.reference signature) so that it runs per shard
    of the heads' mesh axis. Cached per (fn, mesh, cfg, rules) so that the step functions built
    from it (keyed on the attention function) share compiles across engines."""
    rules = resolve_rules(cfg, mesh, rules)
    if mesh.size == 1:
        return attention_fn  # one device: no manual region needed
    heads_axis = rules.heads
    if heads_axis is not None and mesh.shape[heads_axis] == 1:
        heads_axis = None  # e.g. a data-only mesh: every shard runs all heads
    # Even with nothing split (heads_axis None) the call stays manual: a Pallas kernel must not
    # meet GSPMD, and its operands may arrive split over the data axis.
    kv_replicated = heads_axis is not None and rules.kv_heads is None
    q_spec = P(None, heads_axis, None)                          # [T, Hq, D]
    kv_axis = heads_axis if rules.kv_heads else None
    meta = P()  # layer, kv_lens, page_indices, cu_q_lens, num_seqs: same on every shard

    def sharded(q, k_cache, v_cache, layer, kv_lens, page_indices, cu_q_lens, num_seqs,
                **kwargs):
        body = functools.partial(
            _local_attention, attention_fn=attention_fn, kv_replicated=kv_replicated,
            heads_axis=heads_axis, num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
            kwargs=kwargs)
        # per leaf: [L, P, Hkv, ps, D] (codes or floats) or [L, P, Hkv, ps] (scales)
        cache_spec = jax.tree.map(lambda x: P(None, None, kv_axis, *(None,) * (x.ndim - 3)),
                                  k_cache)
        # check_vma=False: Pallas calls inside do not carry varying-axis types in every jax
        # version we support; the specs above state the (true) per-shard layout instead.
        return jax.shard_map(body, mesh=mesh,
                             in_specs=(q_spec, cache_spec, cache_spec, meta, meta, meta, meta, meta),
                             out_specs=q_spec, check_vma=False)(
            q, k_cache, v_cache, layer, kv_lens, page_indices, cu_q_lens, num_seqs)

    sharded.__name__ = f"sharded_{getattr(attention_fn, '__name__', 'attention')}"
    return sharded
