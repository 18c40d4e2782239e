"""The pure jitted step: forward over the ragged batch, then sample one token per sequence.

step(params, kv_cache, batch, sampling_md, base_key, step_index, prompt_targets, prev_sampled)
    -> (kv_cache, StepOutput, sampled); the cache is donated. It runs as two programs (see
StepFunctions): the forward (or, for prompt logprobs, the forward that also computes them),
then the sampler on one logits row per sequence, both queued without a host wait.
The step's randomness is fold_in(base_key, step_index), derived on the device: no host-side key
split per step.
Only shapes and four flags are static; everything a request sets is an array. The flags are
the step's variant: `use_penalties` (token-history penalties), `logprobs` (log_softmax and the
top-20 of the sampled rows; off, a step computes no logprob at all), `use_bitmask` (structured
output: per-row allowed-token bitmasks) and `all_logits` (prompt logprobs: logits, log_softmax
and top-20 for every row).

Async scheduling: the host packs step N+1 before it knows step N's tokens. A row whose token id
is negative, in_flight_ref(i) = -(i + 1) (engine/step_plan.py), takes the token step N sampled
for its sequence slot i from `prev_sampled` (step N's `sampled`, still on the device), so no
round trip to the host sits between two steps. `sampled` has a fixed length (the largest
sequence bucket) so that feeding it back never adds a compiled shape.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import struct

from jaxserve.models import build_model
from jaxserve.models.config import ModelConfig
from jaxserve.runner import sampling

MAX_TOP_LOGPROBS = 20  # OpenAI's cap; computed whole so a request's choice never recompiles


@struct.dataclass
class StepOutput:
    token_ids: jnp.ndarray            # i32[S]  sampled next token per sequence slot
    logprobs: jnp.ndarray             # f32[S]  its logprob under the model (0: not computed)
    top_token_ids: jnp.ndarray        # i32[S, K]  K = 0 in steps without logprobs
    top_logprobs: jnp.ndarray         # f32[S, K]
    prompt_logprobs: jnp.ndarray | None = None      # f32[T]  logprob of the next prompt token
    prompt_top_token_ids: jnp.ndarray | None = None  # i32[T, K]
    prompt_top_logprobs: jnp.ndarray | None = None   # f32[T, K]
    draft_token_ids: jnp.ndarray | None = None       # i32[S]  draft model: the draft per row


def _forward(params, kv_cache, batch, prev_sampled, *, forward):
    """The model part of a step: (kv_cache, logits f32[N, V]) for the rows batch.logits_indices."""
    ids = batch.token_ids  # i32[T]
    # ids < 0 are in_flight_refs (engine/step_plan.py); prev_sampled: i32[S_max]
    from_device = prev_sampled[jnp.maximum(-ids - 1, 0)]
    batch = batch.replace(token_ids=jnp.where(ids < 0, from_device, ids))
    return forward(params, kv_cache, batch)


def _forward_prompt_logprobs(params, kv_cache, batch, prev_sampled, prompt_targets, *, forward):
    """The forward of a prompt-logprob step, whose logits rows are all T token rows:
    (kv_cache, logits f32[S, V] of each sequence's last row (the sampled one), prompt outputs:
    each row's logprob of prompt_targets i32[T] and its top-20). Computing them here, in the
    program that is per token bucket anyway, lets these steps share the extras sampler."""
    kv_cache, logits = _forward(params, kv_cache, batch, prev_sampled, forward=forward)  # [T, V]
    logprobs_all = jax.nn.log_softmax(logits, axis=-1)  # [T, V]
    top_lp, top_ids = jax.lax.top_k(logprobs_all, MAX_TOP_LOGPROBS)
    target_lp = jnp.take_along_axis(logprobs_all, prompt_targets[:, None], axis=-1)[:, 0]
    prompt = dict(prompt_logprobs=target_lp, prompt_top_token_ids=top_ids,
                  prompt_top_logprobs=top_lp)
    last_rows = jnp.maximum(batch.cu_q_lens[1:] - 1, 0)  # [S]
    return kv_cache, logits[last_rows], prompt


def _sample(logits, sampling_md, base_key, step_index, prev_sampled, draft_probs=None, *,
            use_penalties: bool, logprobs: bool, use_bitmask: bool = False,
            verify_drafts: bool = False):
    """The sampling part: (StepOutput, sampled i32[S_max]) from logits f32[S, V].
    verify_drafts (a draft-model engine's plain steps): prev_sampled holds the draft each row
    verifies (runner/draft.py) and draft_probs f32[Q, V] their draft distributions."""
    key = jax.random.fold_in(base_key, step_index)
    drafts = (prev_sampled, draft_probs) if verify_drafts else None
    out = sampling.sample(logits, sampling_md, key, num_top_logprobs=MAX_TOP_LOGPROBS,
                          use_penalties=use_penalties, logprobs=logprobs,
                          use_bitmask=use_bitmask, drafts=drafts)
    S = out.token_ids.shape[0]
    sampled = jnp.zeros_like(prev_sampled).at[:S].set(out.token_ids)
    return StepOutput(token_ids=out.token_ids, logprobs=out.logprobs,
                      top_token_ids=out.top_token_ids, top_logprobs=out.top_logprobs,
                      draft_token_ids=prev_sampled[:S] if verify_drafts else None), sampled


SAMPLE_STATICS = ("use_penalties", "logprobs", "use_bitmask", "verify_drafts")


class StepFunctions(NamedTuple):
    """A step as two jitted programs. The forward's shape is the bucket (T, S, N) and its
    sampler's only (N, S) and the variant's flags, so plain and extras variants of one bucket
    share a compiled forward, and every bucket with S slots shares one plain sampler: at
    warm-up that is about half the compile time of one program per variant (the sampler's
    filters and Gumbel noise compile in ~1.4 s on CPU, as long as a forward)."""
    forward: Callable  # (params, kv_cache, batch, prev_sampled) -> (kv_cache, logits f32[S, V])
    # (params, kv_cache, batch, prev_sampled, prompt_targets)
    #   -> (kv_cache, logits f32[S, V], prompt outputs dict); batch.logits_indices = all T rows
    forward_prompt_logprobs: Callable
    sample: Callable   # (logits, md, base_key, step_index, prev_sampled, [draft_probs], *,
    #                     use_penalties, logprobs, use_bitmask, verify_drafts)
    #                     -> (StepOutput, sampled i32[S_max])
    # what the three compute, hashable (programs.shapes_key's identity): (cfg, attention_fn,
    # out_shardings), the arguments they were built from
    identity: tuple

    def __call__(self, params, kv_cache, batch, sampling_md, base_key, step_index,
                 prompt_targets, prev_sampled, *, all_logits: bool = False, **statics):
        """The whole step: -> (kv_cache, StepOutput, sampled); the cache is donated."""
        prompt = {}
        if all_logits:
            kv_cache, logits, prompt = self.forward_prompt_logprobs(
                params, kv_cache, batch, prev_sampled, prompt_targets)
        else:
            kv_cache, logits = self.forward(params, kv_cache, batch, prev_sampled)
        out, sampled = self.sample(logits, sampling_md, base_key, step_index, prev_sampled,
                                   **statics)
        return kv_cache, out.replace(**prompt), sampled


def step_functions(cfg: ModelConfig, attention_fn, out_shardings=None) -> StepFunctions:
    """The jitted step of one runner. Fresh jitted functions per runner, so jax's caches behind
    them go with it; runners share compiled executables through runner/programs.py instead,
    keyed by the identity. out_shardings = (kv_cache's, replicated, replicated): pinning the
    cache's keeps donation in place on a mesh; logits and outputs are replicated."""
    model = build_model(cfg, attention_fn)
    fwd_extra, prompt_extra, sample_extra = {}, {}, {}
    if out_shardings is not None:
        cache_sharding, replicated, _ = out_shardings
        fwd_extra = {"out_shardings": (cache_sharding, replicated)}
        prompt_extra = {"out_shardings": (cache_sharding, replicated, replicated)}
        sample_extra = {"out_shardings": (replicated, replicated)}
    forward = jax.jit(functools.partial(_forward, forward=model.forward), donate_argnums=(1,),
                      **fwd_extra)
    forward_prompt = jax.jit(functools.partial(_forward_prompt_logprobs, forward=model.forward),
                             donate_argnums=(1,), **prompt_extra)
    sample = jax.jit(_sample, static_argnames=SAMPLE_STATICS, **sample_extra)
    return StepFunctions(forward, forward_prompt, sample, (cfg, attention_fn, out_shardings))
