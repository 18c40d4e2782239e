"""The Llama-family decoder as pure functions over a parameter pytree and an explicit KV cache.

Llama, Mistral, Qwen2 (q/k/v bias) and Qwen3 (per-head q/k RMSNorm) differ only in flags of
ModelConfig, so one forward serves them all. Layers are stacked on a leading axis and run with
`lax.scan`: one compiled layer body instead of L copies keeps compile time flat in depth.

Parameter pytree (HF [out, in] matrices stored transposed as [in, out]):
    embed        [V, H]
    final_norm   [H]
    lm_head      [H, V]             (absent when embeddings are tied)
    layers/      every leaf has a leading [L] axis:
      input_norm [L, H]    post_norm [L, H]
      q_proj [L, H, Hq*D]  k_proj [L, H, Hkv*D]  v_proj [L, H, Hkv*D]  o_proj [L, Hq*D, H]
      q_bias [L, Hq*D]  k_bias/v_bias [L, Hkv*D]            (Qwen2)
      q_norm [L, D]  k_norm [L, D]                           (Qwen3)
      gate_proj [L, H, F]  up_proj [L, H, F]  down_proj [L, F, H]
The seven matrix stacks may instead be linear.PackedStack (the native CPU matmul's panels):
those are read in place by the layer scan instead of being sliced, see linear.py.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from jaxserve.models.batch import ForwardBatch, KVCache
from jaxserve.models.config import ModelConfig
from jaxserve.models.linear import LayerWeights, PackedQuantizedStack, split_layers
from jaxserve.models.quant import QuantizedStack
from pallas_kernels import kv_quant
from jaxserve.models.rope import apply_rope, inverse_frequencies, rope_cos_sin

# attention_fn(q, k_cache, v_cache, layer, kv_lens, page_indices, cu_q_lens, num_seqs,
#              *, sm_scale, soft_cap, sliding_window) -> [T, Hq, D]; see pallas_kernels.reference
AttentionFn = Callable[..., jnp.ndarray]


def rms_norm(x, weight, eps):
    """HF's LlamaRMSNorm: normalize in f32, cast back, then scale."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * x32.astype(x.dtype)


def param_shapes(cfg: ModelConfig) -> dict:
    """The pytree of parameter shapes (same structure as the params)."""
    H, L, V, F, D = cfg.hidden_size, cfg.num_layers, cfg.vocab_size, cfg.intermediate_size, cfg.head_dim
    q_out, kv_out = cfg.num_heads * D, cfg.num_kv_heads * D
    layers = {
        "input_norm": (L, H), "post_norm": (L, H),
        "q_proj": (L, H, q_out), "k_proj": (L, H, kv_out), "v_proj": (L, H, kv_out),
        "o_proj": (L, q_out, H),
        "gate_proj": (L, H, F), "up_proj": (L, H, F), "down_proj": (L, F, H),
    }
    if cfg.attention_bias:
        layers.update(q_bias=(L, q_out), k_bias=(L, kv_out), v_bias=(L, kv_out))
    if cfg.qk_norm:
        layers.update(q_norm=(L, D), k_norm=(L, D))
    shapes = {"embed": (V, H), "final_norm": (H,), "layers": layers}
    if not cfg.tie_word_embeddings:
        shapes["lm_head"] = (H, V)
    return shapes


def _attention_block(cfg, attention_fn, lp, h, cos, sin, k_cache, v_cache, layer, batch):
    T = h.shape[0]
    D = cfg.head_dim
    x = rms_norm(h, lp["input_norm"], cfg.rms_norm_eps)
    q = lp.matmul(x, "q_proj")  # [T, Hq*D]
    k = lp.matmul(x, "k_proj")  # [T, Hkv*D]
    v = lp.matmul(x, "v_proj")
    if cfg.attention_bias:
        q, k, v = q + lp["q_bias"], k + lp["k_bias"], v + lp["v_bias"]
    q = q.reshape(T, cfg.num_heads, D)
    k = k.reshape(T, cfg.num_kv_heads, D)
    v = v.reshape(T, cfg.num_kv_heads, D)
    if cfg.qk_norm:
        q = rms_norm(q, lp["q_norm"], cfg.rms_norm_eps)
        k = rms_norm(k, lp["k_norm"], cfg.rms_norm_eps)
    q = apply_rope(q, cos, sin)
    k = apply_rope(k, cos, sin)
    # Write this step's K/V into their pages first: attention then reads one uniform paged
    # context. Padding rows carry page == num_pages and are dropped by the scatter.
    # A quantized cache (pallas_kernels.kv_quant) stores codes and per-token scales.
    k_cache = kv_quant.write(k_cache, layer, batch.slot_pages, batch.slot_offsets, k)
    v_cache = kv_quant.write(v_cache, layer, batch.slot_pages, batch.slot_offsets, v)
    o = attention_fn(q, k_cache, v_cache, layer, batch.kv_lens, batch.page_indices,
                     batch.cu_q_lens, batch.num_seqs, sm_scale=D ** -0.5, soft_cap=None,
                     sliding_window=cfg.sliding_window)  # [T, Hq, D]
    return h + lp.matmul(o.reshape(T, -1), "o_proj"), k_cache, v_cache


def _mlp_block(cfg, lp, h):
    x = rms_norm(h, lp["post_norm"], cfg.rms_norm_eps)
    gated = jax.nn.silu(lp.matmul(x, "gate_proj")) * lp.matmul(x, "up_proj")  # [T, F]
    return h + lp.matmul(gated, "down_proj")


def forward(params: dict, kv_cache: KVCache, batch: ForwardBatch, *, cfg: ModelConfig,
            attention_fn: AttentionFn):
    """One model step over a ragged batch.

    Returns (new kv_cache, logits f32[N, V]) for the rows in batch.logits_indices.
    """
    dtype = params["final_norm"].dtype
    # [V, H], or a QuantizedStack [1, H, V] (a packed GGUF table, --quantize-embeddings), or
    # that stack in the native matmul's panels (linear.PackedQuantizedStack)
    embed = params["embed"]
    if isinstance(embed, (QuantizedStack, PackedQuantizedStack)):
        h = embed.gather_columns(batch.token_ids, dtype)  # [T, H]
    else:
        h = embed[batch.token_ids]  # [T, H]
    cos, sin = rope_cos_sin(batch.positions, inverse_frequencies(cfg), dtype)

    # packed matrix stacks (see linear.py) are read in place, not sliced per layer
    sliced, packed = split_layers(params["layers"])
    # token rows past the real ones are bucket padding (ForwardBatch: at or beyond
    # cu_q_lens[num_seqs]); the native matmul leaves them uncomputed
    num_rows = batch.cu_q_lens[batch.num_seqs[0]]  # i32[]

    def layer_step(carry, xs):
        h, k_cache, v_cache = carry
        layer_slice, layer = xs
        lp = LayerWeights(layer_slice, packed, layer, num_rows)
        h, k_cache, v_cache = _attention_block(cfg, attention_fn, lp, h, cos, sin,
                                               k_cache, v_cache, layer, batch)
        h = _mlp_block(cfg, lp, h)
        return (h, k_cache, v_cache), None

    layer_ids = jnp.arange(cfg.num_layers, dtype=jnp.int32)
    (h, k_cache, v_cache), _ = jax.lax.scan(
        layer_step, (h, kv_cache.k, kv_cache.v), (sliced, layer_ids))
    h = h[batch.logits_indices]  # [N, H]
    h = rms_norm(h, params["final_norm"], cfg.rms_norm_eps)
    head = embed if cfg.tie_word_embeddings else params["lm_head"]
    if isinstance(head, (QuantizedStack, PackedQuantizedStack)):  # dequantized in the dot
        return KVCache(k=k_cache, v=v_cache), head.matmul(h, 0).astype(jnp.float32)
    lm_head = head.T if cfg.tie_word_embeddings else head
    logits = jnp.dot(h, lm_head, preferred_element_type=jnp.float32)  # [N, V]
    return KVCache(k=k_cache, v=v_cache), logits
