"""Speculative decoding with a draft model, device side: drawing the drafts, and verifying them
by rejection sampling in the target's sampler.

The draft model samples each draft d from its own distribution q (the draft's logits through
the request's logit_bias, min_tokens, temperature, top-k, top-p and min-p, exactly as the target
filters p). The target's row that verifies d keeps it with probability min(1, p(d) / q(d)); on
rejection it draws from normalise(max(p - q, 0)), which never yields d (p(d) < q(d) there). The
emitted token is then distributed as p, whatever q is (Leviathan et al. 2023, Chen et al.
2023), so a sequence's outputs follow non-speculative sampling. Greedy rows need no q: p is
one-hot, so a draft is kept iff it is the argmax, and the argmax is what is emitted otherwise.

Randomness: the draft draw, the acceptance test and the recovery draw each fold their own
constant into the row's key (sampling.row_keys: seed or salt, and the output index), so a
seeded request's speculative outputs are reproducible and the three never share noise.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxserve.runner import sampling

_DRAFT, _ACCEPT, _RECOVER = 1, 2, 3  # folded into a row's key, one stream per use


def _fold(keys: jnp.ndarray, value: int) -> jnp.ndarray:
    return jax.vmap(lambda k: jax.random.fold_in(k, value))(keys)


def _gumbel(keys: jnp.ndarray, vocab: int) -> jnp.ndarray:
    return jax.vmap(lambda k: jax.random.gumbel(k, (vocab,), jnp.float32))(keys)  # f32[S, V]


def draft_sample(logits: jnp.ndarray, md: sampling.SamplingMetadata,
                 base_key: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """One draft per row of the draft model's logits f32[S, V]: (ids i32[S], q f32[S, V], the
    distribution each random row's draft was drawn from; zeros on greedy rows, whose drafts
    are the argmax). Penalties do not shape q (the target's rows apply them, and rejection
    sampling is exact for any q); grammars never reach here (their requests do not speculate
    with a draft model)."""
    logits = logits.astype(jnp.float32)
    S, V = logits.shape
    adjusted = sampling.apply_logit_adjustments(logits, md, use_penalties=False)
    greedy_ids = jnp.argmax(adjusted, axis=-1).astype(jnp.int32)
    is_greedy = md.temperature < sampling.GREEDY_EPS

    def draw(adjusted):
        filtered = sampling.filter_logits(adjusted, md)
        keys = _fold(sampling.row_keys(md, base_key), _DRAFT)
        ids = jnp.argmax(filtered + _gumbel(keys, V), axis=-1).astype(jnp.int32)
        return ids, jax.nn.softmax(filtered, axis=-1)

    ids, q = jax.lax.cond(jnp.all(is_greedy),
                          lambda a: (greedy_ids, jnp.zeros((S, V), jnp.float32)), draw, adjusted)
    return jnp.where(is_greedy, greedy_ids, ids), q


def verify_drafts(filtered: jnp.ndarray, keys: jnp.ndarray, drawn: jnp.ndarray,
                  draft_index: jnp.ndarray, row_drafts: jnp.ndarray,
                  draft_probs: jnp.ndarray) -> jnp.ndarray:
    """The tokens of a step's random rows, drafts verified.

    filtered f32[S, V]: the target's filtered logits (softmax = p); keys key[S]: row keys;
    drawn i32[S]: the plain draw from p (rows without a draft keep it); draft_index i32[S]:
    the row's index into draft_probs, -1 for rows that verify no draft; row_drafts i32[>= S]:
    the draft each row verifies; draft_probs f32[Q, V]: q of every draft of the step.
    Returns i32[S]: the draft where it is accepted, else a draw from normalise(max(p - q, 0))."""
    S, V = filtered.shape
    p = jax.nn.softmax(filtered, axis=-1)                                  # f32[S, V]
    drafts = row_drafts[:S]
    has_draft = draft_index >= 0
    q = draft_probs[jnp.maximum(draft_index, 0)]                           # f32[S, V]
    safe = jnp.clip(drafts, 0, V - 1)[:, None]
    p_d = jnp.take_along_axis(p, safe, axis=-1)[:, 0]
    q_d = jnp.take_along_axis(q, safe, axis=-1)[:, 0]
    u = jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(_fold(keys, _ACCEPT))
    accept = u * q_d < p_d                                  # probability min(1, p(d) / q(d))
    residual = jnp.maximum(p - q, 0.0)
    # p == q up to rounding leaves no residual mass; then p itself is the exact fallback
    residual = jnp.where(residual.sum(axis=-1, keepdims=True) > 0, residual, p)
    noisy = jnp.log(residual) + _gumbel(_fold(keys, _RECOVER), V)
    recovered = jnp.argmax(noisy, axis=-1).astype(jnp.int32)
    return jnp.where(has_draft, jnp.where(accept, drafts, recovered), drawn)
