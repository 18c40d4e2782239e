"""Per-row sampling on arrays: the last stage of the jitted step (step.py), one token per sequence.

The host packs every request's settings into `SamplingMetadata` (numpy, `build_sampling_metadata`)
and the device runs `sample` on the step's logits. Every per-request value (temperature, top-k/p,
min-p, penalties, seeds, logit bias, min_tokens) is an array row, so a new value never recompiles;
only the shapes (S rows, V vocab, the sparse widths) and three flags (`use_penalties`,
`num_top_logprobs`, `logprobs`) are static.

Order of operations, as vLLM applies them:
  logit_bias -> min_tokens forbidding -> repetition / frequency / presence penalties
  -> greedy rows: argmax here
  -> temperature -> top-k -> top-p -> min-p -> one Gumbel-max draw per row.
Reported logprobs are those of the raw logits (log_softmax before any of the above), which is what
vLLM returns by default.

Randomness: a seeded row draws from fold_in(key(seed), output_index), so its tokens depend only on
its seed and on how many tokens it has generated, never on its batch position or its neighbours.
Unseeded rows fold the step's base key with a per-request salt and the output index.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxserve.engine.sampling_params import (MAX_LOGIT_BIAS_ENTRIES, MAX_STOP_TOKEN_IDS,
                                             SamplingParams)
from jaxserve.engine.step_plan import SequenceSampling

# Rows with a temperature below this are greedy (vLLM's _SAMPLING_EPS).
GREEDY_EPS = 1e-5
# Sparse widths are fixed so that their shapes never change between steps.
LOGIT_BIAS_WIDTH = MAX_LOGIT_BIAS_ENTRIES
# stop_token_ids plus room for the model's EOS ids (Llama 3 lists several).
FORBID_WIDTH = MAX_STOP_TOKEN_IDS + 16
_U32 = 0xFFFFFFFF


@struct.dataclass
class SamplingMetadata:
    """Everything a step needs to sample its S (padded) rows; padding rows are greedy no-ops."""
    temperature: jnp.ndarray         # f32[S]     < GREEDY_EPS: greedy
    top_k: jnp.ndarray               # i32[S]     0: off
    top_p: jnp.ndarray               # f32[S]     1: off
    min_p: jnp.ndarray               # f32[S]     0: off
    repetition_penalty: jnp.ndarray  # f32[S]     1: off
    presence_penalty: jnp.ndarray    # f32[S]     0: off
    frequency_penalty: jnp.ndarray   # f32[S]     0: off
    seed_key: jnp.ndarray            # u32[S, 2]  threefry key data of the seed (hi, lo words)
    has_seed: jnp.ndarray            # bool[S]
    salt: jnp.ndarray                # u32[S]     per-request randomness for unseeded rows
    output_index: jnp.ndarray        # i32[S]     index of the token being sampled (outputs so far)
    bias_ids: jnp.ndarray            # i32[S, B]  logit_bias token ids, -1 padded
    bias_values: jnp.ndarray         # f32[S, B]
    forbidden_ids: jnp.ndarray       # i32[S, M]  EOS + stop_token_ids while < min_tokens, -1 padded
    penalty_token_ids: jnp.ndarray   # i32[S, W]  prompt then output ids, -1 padded (W=1: unused)
    num_prompt_tokens: jnp.ndarray   # i32[S]     where the outputs start in penalty_token_ids
    # i32[S, M]: structured output, bit v % 32 of word v // 32 set where token v may be sampled;
    # -1 (all set) for unconstrained rows. M = ceil(V/32) with use_bitmask, else 1 (unused).
    token_bitmask: jnp.ndarray
    # i32[S]: speculative decoding with a draft model, the row's index into the step's draft
    # probabilities (runner/spec_sampling.py); -1 where the row verifies no draft
    draft_index: jnp.ndarray
    # i32[S, K]: the rows whose drafts come before this row's token (-1 padded); their drafts,
    # on the device, join the row's penalty history
    draft_rows_before: jnp.ndarray


@struct.dataclass
class SamplerOutput:
    token_ids: jnp.ndarray      # i32[S]     sampled token per row
    logprobs: jnp.ndarray       # f32[S]     its logprob under log_softmax of the raw logits
    top_token_ids: jnp.ndarray  # i32[S, K]  most likely tokens of the raw distribution, best first
    top_logprobs: jnp.ndarray   # f32[S, K]


# ---------------------------------------------------------------------------------- host side

def _as_input(x: Any) -> SequenceSampling:
    """One builder input as SequenceSampling: the engine passes those; tests and tools may pass
    a tuple in its field order or a Request-like object (sampling_params, prompt_token_ids,
    output_token_ids, eos_token_ids, sampling_salt)."""
    if isinstance(x, SequenceSampling):
        return x
    if isinstance(x, tuple):
        return SequenceSampling(*x)
    if hasattr(x, "sampling_params"):  # engine.request.Request, without importing it
        salt = getattr(x, "sampling_salt", None)
        if salt is None:  # a stable per-request number when the engine drew none
            salt = zlib.crc32(str(getattr(x, "request_id", "")).encode())
        return SequenceSampling(x.sampling_params, x.prompt_token_ids, x.output_token_ids,
                                getattr(x, "eos_token_ids", ()) or (), salt)
    raise TypeError(f"cannot read sampling inputs from {type(x).__name__}")


def needs_penalties(x: Any) -> bool:
    """Whether a sequence (SamplingParams, tuple or Request-like) uses any token penalty, which
    makes the step take the `use_penalties` variant."""
    p = x if isinstance(x, SamplingParams) else _as_input(x).params
    return p.uses_penalties


def _next_pow2(n: int, lo: int) -> int:
    b = lo
    while b < n:
        b *= 2
    return b


def build_sampling_metadata(inputs: Sequence[Any], padded_num_seqs: int,
                            vocab_size: int | None = None, *, use_penalties: bool | None = None,
                            penalty_width: int | None = None,
                            logit_bias_width: int = LOGIT_BIAS_WIDTH,
                            forbid_width: int = FORBID_WIDTH,
                            use_bitmask: bool = False) -> SamplingMetadata:
    """Pack per-sequence settings into numpy arrays padded to `padded_num_seqs` rows.

    use_penalties: build the token-history arrays (default: whether any input needs them). It must
      match the `use_penalties` flag passed to `sample`; without it the history is one -1 column.
    penalty_width: width W of the history (prompt + output) array. Pass a fixed value (the engine's
      max_model_len) so every penalty step has one shape; the default rounds the longest history
      up to a power of two, which can compile a new shape.
    vocab_size: when given, logit_bias / stop ids outside the vocabulary are dropped here (the
      device drops them too); the engine is expected to reject them up front
      (SamplingParams.verify_token_ids).
    use_bitmask: build the structured-output bitmask rows (needs vocab_size); it must match
      the `use_bitmask` flag passed to `sample`.
    """
    seqs = [_as_input(x) for x in inputs]
    S, n = padded_num_seqs, len(seqs)
    if n > S:
        raise ValueError(f"{n} sequences do not fit in {S} padded rows")
    if use_penalties is None:
        use_penalties = any(needs_penalties(s) for s in seqs)
    params = [s.params for s in seqs]

    def column(values, dtype, pad):
        out = np.full(S, pad, dtype)
        out[:n] = values
        return out

    seeds = [p.seed for p in params]
    seed_u64 = [(sd & (2**64 - 1)) if sd is not None else 0 for sd in seeds]
    seed_key = np.zeros((S, 2), np.uint32)
    seed_key[:n, 0] = [s >> 32 for s in seed_u64]   # threefry_seed: high word first
    seed_key[:n, 1] = [s & _U32 for s in seed_u64]
    # Unseeded rows need a salt that differs between the rows of a step (the step's base key is
    # shared): the engine draws one per request; without one, the row number stands in.
    salt = column([(i if s.salt is None else s.salt) & _U32 for i, s in enumerate(seqs)],
                  np.uint32, 0)

    bias_ids = np.full((S, logit_bias_width), -1, np.int32)
    bias_values = np.zeros((S, logit_bias_width), np.float32)
    forbidden = np.full((S, forbid_width), -1, np.int32)
    for i, s in enumerate(seqs):
        p = s.params
        if p.logit_bias:
            items = [(t, b) for t, b in p.logit_bias.items()
                     if vocab_size is None or 0 <= t < vocab_size]
            if len(items) > logit_bias_width:
                raise ValueError(f"logit_bias has {len(items)} entries; the sampler holds "
                                 f"{logit_bias_width}")
            if items:
                bias_ids[i, :len(items)] = [t for t, _ in items]
                bias_values[i, :len(items)] = [b for _, b in items]
        if len(s.output_token_ids) + s.num_in_flight < p.min_tokens:
            # vLLM forbids every token that could stop the request, EOS included even with
            # ignore_eos, until min_tokens outputs exist.
            ids = sorted(set(int(t) for t in s.eos_token_ids) | set(p.stop_token_ids))
            if vocab_size is not None:
                ids = [t for t in ids if 0 <= t < vocab_size]
            if len(ids) > forbid_width:
                raise ValueError(f"{len(ids)} stop token ids to forbid; the sampler holds "
                                 f"{forbid_width}")
            forbidden[i, :len(ids)] = ids

    lengths = [len(s.prompt_token_ids) + len(s.output_token_ids) for s in seqs]
    if not use_penalties:
        width = 1
    elif penalty_width is not None:
        width = penalty_width
        if lengths and max(lengths) > width:
            raise ValueError(f"a sequence of {max(lengths)} tokens exceeds penalty_width={width}")
    else:
        width = _next_pow2(max(lengths, default=1), 16)
    history = np.full((S, width), -1, np.int32)
    if use_penalties:
        for i, s in enumerate(seqs):
            if needs_penalties(s):  # rows without penalties need no history
                if s.num_in_flight > s.num_device_drafts:
                    raise ValueError("penalties need every output token on the host; schedule "
                                     "penalty steps without tokens in flight")
                n_p = len(s.prompt_token_ids)
                history[i, :n_p] = s.prompt_token_ids
                history[i, n_p:lengths[i]] = s.output_token_ids

    if use_bitmask:
        if vocab_size is None:
            raise ValueError("use_bitmask needs vocab_size")
        bitmask = np.full((S, (vocab_size + 31) // 32), -1, np.int32)
        for i, s in enumerate(seqs):
            if s.token_bitmask is not None:
                bitmask[i] = s.token_bitmask
    else:
        if any(s.token_bitmask is not None for s in seqs):
            raise ValueError("a sequence has a token bitmask: build with use_bitmask=True")
        bitmask = np.full((S, 1), -1, np.int32)

    return SamplingMetadata(
        token_bitmask=bitmask, draft_index=np.full(S, -1, np.int32),
        draft_rows_before=np.full((S, 1), -1, np.int32),
        # t > 0 never turns greedy on the device, however small (0 is the only greedy value).
        temperature=column([p.temperature and max(p.temperature, GREEDY_EPS) for p in params],
                           np.float32, 0.0),
        top_k=column([min(p.top_k, 2**31 - 1) for p in params], np.int32, 0),
        top_p=column([p.top_p for p in params], np.float32, 1.0),
        min_p=column([p.min_p for p in params], np.float32, 0.0),
        repetition_penalty=column([p.repetition_penalty for p in params], np.float32, 1.0),
        presence_penalty=column([p.presence_penalty for p in params], np.float32, 0.0),
        frequency_penalty=column([p.frequency_penalty for p in params], np.float32, 0.0),
        seed_key=seed_key,
        has_seed=column([sd is not None for sd in seeds], np.bool_, False),
        salt=salt,
        output_index=column([len(s.output_token_ids) + s.num_in_flight for s in seqs],
                            np.int32, 0),
        bias_ids=bias_ids, bias_values=bias_values, forbidden_ids=forbidden,
        penalty_token_ids=history,
        num_prompt_tokens=column([len(s.prompt_token_ids) for s in seqs], np.int32, 0))


# -------------------------------------------------------------------------------- device side

def _scatter_ids(ids: jnp.ndarray, vocab: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(rows, cols) for a scatter into [S, V]. -1 padding maps to V, which mode='drop' skips
    (a negative index would wrap around to the last token instead)."""
    rows = jnp.broadcast_to(jnp.arange(ids.shape[0])[:, None], ids.shape)  # i32[S, X]
    cols = jnp.where(ids >= 0, ids, vocab)                                  # i32[S, X]
    return rows, cols


def apply_logit_adjustments(logits: jnp.ndarray, md: SamplingMetadata, *,
                            use_penalties: bool) -> jnp.ndarray:
    """logit_bias, min_tokens forbidding, then (if use_penalties) repetition, frequency and
    presence penalties. f32[S, V] -> f32[S, V]. Greedy rows take the argmax of this."""
    S, V = logits.shape
    rows, cols = _scatter_ids(md.bias_ids, V)
    logits = logits.at[rows, cols].add(md.bias_values, mode="drop")
    rows, cols = _scatter_ids(md.forbidden_ids, V)
    logits = logits.at[rows, cols].set(-jnp.inf, mode="drop")
    if not use_penalties:
        return logits

    ids = md.penalty_token_ids                                              # i32[S, W]
    rows, cols = _scatter_ids(ids, V)
    positions = jnp.arange(ids.shape[1])[None, :]                           # i32[1, W]
    is_output = (ids >= 0) & (positions >= md.num_prompt_tokens[:, None])   # bool[S, W]
    seen = jnp.zeros((S, V), jnp.bool_).at[rows, cols].set(True, mode="drop")  # prompt or output
    out_counts = jnp.zeros((S, V), jnp.float32).at[rows, cols].add(
        is_output.astype(jnp.float32), mode="drop")                         # f32[S, V]

    # Repetition (transformers / vLLM): shrink towards zero from either side, over prompt+output.
    rep = md.repetition_penalty[:, None]                                    # f32[S, 1]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    # Frequency / presence (OpenAI): subtractive, over the generated tokens only.
    logits = (logits - md.frequency_penalty[:, None] * out_counts
              - md.presence_penalty[:, None] * (out_counts > 0).astype(jnp.float32))
    return logits


# top-k and top-p thresholds are found by bisection on the bits of the logits instead of a sort:
# 32 halvings of the uint32 range pin the exact threshold value, each one a fused compare-and-
# reduce over [S, V]. On CPU this is ~10x faster than sorting [64, 49152]; on GPU it avoids a
# full-vocabulary sort per step. Thresholds, not sorted positions, decide what is kept, so tokens
# tied with the last kept one are all kept and no sort order can split a tie.
_BISECT_STEPS = 32


def _ordered_keys(x: jnp.ndarray) -> jnp.ndarray:
    """f32 -> u32 keys with the same order (-inf lowest, +inf highest); equal floats, equal keys."""
    i = jax.lax.bitcast_convert_type(x + 0.0, jnp.int32)  # + 0.0 turns -0.0 into +0.0
    i = i ^ ((i >> 31) & 0x7FFFFFFF)                      # negatives: reverse their order
    return jax.lax.bitcast_convert_type(i, jnp.uint32) ^ jnp.uint32(0x80000000)


def _top_k_key(keys: jnp.ndarray, top_k: jnp.ndarray) -> jnp.ndarray:
    """Key of the k-th largest logit per row (the lowest key where top_k is off). u32[S].
    Keeping keys >= it keeps the k largest and their ties, as transformers' TopKLogitsWarper."""
    V = keys.shape[-1]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)                  # i32[S]
    lowest, highest = keys.min(axis=-1), keys.max(axis=-1)              # u32[S]

    def halve(_, bounds):  # invariant: >= k keys are >= lo; the answer is <= hi
        lo, hi = bounds
        mid = lo + (hi - lo + 1) // 2
        ok = (keys >= mid[:, None]).sum(axis=-1) >= k
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)

    kth, _ = jax.lax.fori_loop(0, _BISECT_STEPS, halve, (lowest, highest))
    return jnp.where(top_k > 0, kth, lowest)


def _top_p_key(keys: jnp.ndarray, scaled: jnp.ndarray, floor: jnp.ndarray,
               top_p: jnp.ndarray) -> jnp.ndarray:
    """Lowest key t, among the tokens >= floor (what top-k left), whose strictly more likely
    tokens hold less than top_p of the renormalised mass. u32[S]; 0 where top_p is off.
    Keeping keys >= t keeps exactly the tokens whose more likely predecessors hold less than
    top_p, as transformers' TopPLogitsWarper (plus ties of the last one)."""
    inside = keys >= floor[:, None]                                     # bool[S, V]
    row_max = jnp.max(jnp.where(inside, scaled, -jnp.inf), axis=-1, keepdims=True)
    e = jnp.where(inside, jnp.exp(scaled - row_max), 0.0)               # f32[S, V]
    probs = e / e.sum(axis=-1, keepdims=True)
    lowest, highest = floor, keys.max(axis=-1)

    def halve(_, bounds):  # invariant: mass above hi < top_p; the answer is >= lo
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        ok = jnp.where(keys > mid[:, None], probs, 0.0).sum(axis=-1) < top_p
        return jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)

    _, t = jax.lax.fori_loop(0, _BISECT_STEPS, halve, (lowest, highest))
    return jnp.where(top_p < 1.0, t, jnp.uint32(0))


def filter_logits(logits: jnp.ndarray, md: SamplingMetadata) -> jnp.ndarray:
    """Temperature, then top-k, top-p, min-p: f32[S, V] -> f32[S, V] with removed tokens at -inf.
    The result's softmax is the distribution a random row samples from."""
    random_rows = md.temperature >= GREEDY_EPS                         # bool[S]
    t = jnp.where(random_rows, md.temperature, 1.0)                     # greedy rows: any finite t
    scaled = logits / t[:, None]                                        # f32[S, V]
    keys = _ordered_keys(scaled)                                        # u32[S, V]
    lowest = keys.min(axis=-1)                                          # u32[S]
    # Each search costs 32 passes over [S, V]: skip it when no sampled row of the batch uses it.
    k_key = jax.lax.cond(jnp.any(random_rows & (md.top_k > 0)), _top_k_key,
                         lambda keys, top_k: lowest, keys, md.top_k)
    p_key = jax.lax.cond(jnp.any(random_rows & (md.top_p < 1.0)), _top_p_key,
                         lambda keys, scaled, floor, top_p: jnp.zeros_like(floor),
                         keys, scaled, k_key, md.top_p)
    keep = keys >= jnp.maximum(k_key, p_key)[:, None]                   # bool[S, V]
    # min-p compares p_i with min_p * p_max; renormalising after top-k/p scales both alike, so
    # exp(logit - max) >= min_p is the same test on whatever distribution remains.
    row_max = jnp.max(scaled, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    keep &= jnp.exp(scaled - row_max) >= md.min_p[:, None]
    return jnp.where(keep, scaled, -jnp.inf)


def _as_key_data(key: jnp.ndarray) -> jnp.ndarray:
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(key)
    return key


def row_keys(md: SamplingMetadata, base_key: jnp.ndarray) -> jnp.ndarray:
    """One threefry key per row (typed key[S]): seeded rows fold_in(key(seed), output_index),
    which depends on nothing else; unseeded rows fold_in(fold_in(base_key, salt), output_index)."""
    wrap = lambda d: jax.random.wrap_key_data(d, impl="threefry2x32")  # noqa: E731
    base = wrap(_as_key_data(base_key).astype(jnp.uint32))

    def one(seed_key, has_seed, salt, idx):
        unseeded = jax.random.key_data(jax.random.fold_in(base, salt))       # u32[2]
        start = jnp.where(has_seed, seed_key, unseeded)
        return jax.random.key_data(jax.random.fold_in(wrap(start), idx))

    data = jax.vmap(one)(md.seed_key, md.has_seed, md.salt, md.output_index)  # u32[S, 2]
    return wrap(data)


def apply_token_bitmask(logits: jnp.ndarray, bitmask: jnp.ndarray) -> jnp.ndarray:
    """Disallowed tokens to -inf: logits f32[S, V], bitmask i32[S, ceil(V/32)]."""
    V = logits.shape[-1]
    vocab = jnp.arange(V, dtype=jnp.int32)                                # i32[V]
    words = bitmask[:, vocab // 32]                                       # i32[S, V]
    allowed = ((words >> (vocab % 32)) & 1).astype(jnp.bool_)             # bool[S, V]
    return jnp.where(allowed, logits, -jnp.inf)


def sample(logits: jnp.ndarray, md: SamplingMetadata, base_key: jnp.ndarray, *,
           num_top_logprobs: int, use_penalties: bool, logprobs: bool = True,
           use_bitmask: bool = False, drafts: tuple | None = None) -> SamplerOutput:
    """Sample one token per row of logits f32[S, V]. Static: num_top_logprobs, use_penalties,
    logprobs (False: no log_softmax and no top-k at all; logprobs come back as zeros and the
    top arrays with K = 0, for steps in which no request asked for them), use_bitmask
    (structured output: md.token_bitmask masks the logits before anything else, so greedy rows,
    draws and the reported logprobs all see only the allowed tokens, as in vLLM).
    drafts: (row_drafts i32[>= S], draft_probs f32[Q, V]) of a draft model's proposals, which
    random rows with md.draft_index >= 0 verify by rejection sampling (spec_sampling.py).

    base_key: the step's PRNG key (raw u32[2] or a typed threefry key); only unseeded rows use it.
    """
    logits = logits.astype(jnp.float32)                                   # f32[S, V]
    S, V = logits.shape
    if drafts is not None and use_penalties:  # a draft model's drafts join the history
        before = md.draft_rows_before                                     # i32[S, K]
        drafted = jnp.where(before >= 0, drafts[0][jnp.maximum(before, 0)], -1)
        md = md.replace(penalty_token_ids=jnp.concatenate([md.penalty_token_ids, drafted], 1))
    if use_bitmask:
        logits = apply_token_bitmask(logits, md.token_bitmask)
    adjusted = apply_logit_adjustments(logits, md, use_penalties=use_penalties)
    greedy_ids = jnp.argmax(adjusted, axis=-1).astype(jnp.int32)          # i32[S]
    is_greedy = md.temperature < GREEDY_EPS                               # bool[S]

    def draw(adjusted):
        filtered = filter_logits(adjusted, md)                            # f32[S, V]
        keys = row_keys(md, base_key)                                     # key[S]
        gumbel = jax.vmap(lambda k: jax.random.gumbel(k, (V,), jnp.float32))(keys)  # f32[S, V]
        # Gumbel-max: argmax(logit + Gumbel noise) is an exact draw from softmax(logit).
        ids = jnp.argmax(filtered + gumbel, axis=-1).astype(jnp.int32)
        if drafts is not None:
            from jaxserve.runner.spec_sampling import verify_drafts
            ids = verify_drafts(filtered, keys, ids, md.draft_index, *drafts)
        return ids

    # An all-greedy batch (the common benchmark case) skips filtering and noise entirely.
    random_ids = jax.lax.cond(jnp.all(is_greedy), lambda a: greedy_ids, draw, adjusted)
    token_ids = jnp.where(is_greedy, greedy_ids, random_ids)              # i32[S]
    if not logprobs:
        return SamplerOutput(token_ids=token_ids, logprobs=jnp.zeros((S,), jnp.float32),
                             top_token_ids=jnp.zeros((S, 0), jnp.int32),
                             top_logprobs=jnp.zeros((S, 0), jnp.float32))
    raw_logprobs = jax.nn.log_softmax(logits, axis=-1)                    # f32[S, V]
    token_lp = jnp.take_along_axis(raw_logprobs, token_ids[:, None], axis=-1)[:, 0]
    if num_top_logprobs > 0:
        top_lp, top_ids = jax.lax.top_k(raw_logprobs, num_top_logprobs)  # f32/i32[S, K]
    else:
        top_lp = jnp.zeros((S, 0), jnp.float32)
        top_ids = jnp.zeros((S, 0), jnp.int32)
    return SamplerOutput(token_ids=token_ids, logprobs=token_lp,
                         top_token_ids=top_ids.astype(jnp.int32), top_logprobs=top_lp)
