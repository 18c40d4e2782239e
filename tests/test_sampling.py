"""Sampler (runner/sampling.py): kept sets, distributions, penalties vs transformers, seeds,
logprobs, and no recompilation when only values change. CPU, no model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import torch
from transformers.generation.logits_process import (MinPLogitsWarper,
                                                    RepetitionPenaltyLogitsProcessor,
                                                    TemperatureLogitsWarper, TopKLogitsWarper,
                                                    TopPLogitsWarper)

from jaxserve.engine.request import Request
from jaxserve.engine.sampling_params import SamplingParams as P
from jaxserve.runner import sampling
from jaxserve.runner.compile_guard import compile_count

SAMPLE = jax.jit(sampling.sample, static_argnames=("num_top_logprobs", "use_penalties"))
FILTER = jax.jit(sampling.filter_logits)
ADJUST = jax.jit(sampling.apply_logit_adjustments, static_argnames=("use_penalties",))
KEY = jax.random.PRNGKey(1234)


def md_for(params, prompts=None, outputs=None, rows=None, **kw):
    """Metadata for one row per SamplingParams (empty prompt/output unless given)."""
    n = len(params)
    prompts = prompts or [[] for _ in range(n)]
    outputs = outputs or [[] for _ in range(n)]
    inputs = [(p, pr, out) for p, pr, out in zip(params, prompts, outputs)]
    return sampling.build_sampling_metadata(inputs, rows or n, **kw)


S_STD, V_STD = 8, 64  # most tests share this shape, so the sampler compiles once for them


def pad_logits(rows, value=-jnp.inf) -> jnp.ndarray:
    """Rows of any width <= V_STD, padded to [S_STD, V_STD] (removed-token value by default)."""
    out = np.full((S_STD, V_STD), value, np.float32)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return jnp.asarray(out)


def run(logits, params, prompts=None, outputs=None, key=KEY):
    """sample() on the standard shape, penalties on, 5 top logprobs."""
    md = md_for(params, prompts, outputs, rows=S_STD, use_penalties=True, penalty_width=16)
    return SAMPLE(logits, md, key, num_top_logprobs=5, use_penalties=True)


def filt(rows, params):
    return np.asarray(FILTER(pad_logits(rows), md_for(params, rows=S_STD)))


def kept(filtered_row) -> set[int]:
    return set(np.flatnonzero(np.isfinite(np.asarray(filtered_row))).tolist())


def hf_filter(logits: np.ndarray, p: P) -> np.ndarray:
    """transformers' warpers in generate()'s order: temperature, top-k, top-p, min-p."""
    x = torch.tensor(logits[None], dtype=torch.float32)
    ids = torch.zeros((1, 1), dtype=torch.long)
    if p.temperature != 1.0:
        x = TemperatureLogitsWarper(p.temperature)(ids, x)
    if p.top_k > 0:
        x = TopKLogitsWarper(p.top_k)(ids, x)
    if p.top_p < 1.0:
        x = TopPLogitsWarper(p.top_p)(ids, x)
    if p.min_p > 0.0:
        x = MinPLogitsWarper(p.min_p)(ids, x)
    return x[0].numpy()


# ------------------------------------------------------------------------------ kept sets

def test_top_k_keeps_ties_with_kth():
    row = [5.0, 3.0, 3.0, 1.0, 0.0, -2.0]
    ks = (1, 2, 4, 100)
    out = filt([row] * 4, [P(top_k=k) for k in ks])
    assert [kept(r) for r in out[:4]] == [{0}, {0, 1, 2}, {0, 1, 2, 3}, set(range(6))]
    for r, k in zip(out, ks):  # transformers keeps ties with the k-th value the same way
        assert kept(r) == kept(hf_filter(np.asarray(row, np.float32), P(top_k=k)))


def test_top_p_min_p_kept_sets():
    row = np.log([0.5, 0.25, 0.125, 0.0625, 0.0625]).astype(np.float32)
    params = [P(top_p=0.3), P(top_p=0.6), P(top_p=0.8), P(top_p=0.99),
              P(min_p=0.3), P(min_p=0.2), P(min_p=0.13, top_p=0.6), P(top_k=2, top_p=0.6)]
    out = filt([row] * len(params), params)
    want = [{0}, {0, 1}, {0, 1, 2}, set(range(5)), {0, 1}, {0, 1, 2}, {0, 1}, {0}]
    assert [kept(r) for r in out] == want
    for r, p in zip(out, params):
        assert kept(r) == kept(hf_filter(row, p))


def test_top_p_keeps_ties_at_the_cut():
    # mass before token 1 is 0.4 < 0.5 so it is kept; token 2 ties with it and stays too,
    # whatever order a sort puts them in. Same for tokens tied at the top-k cut inside top-p.
    out = filt([np.log([0.4, 0.2, 0.2, 0.1, 0.1]), np.log([0.3, 0.3, 0.3, 0.1])],
               [P(top_p=0.5), P(top_k=1, top_p=0.1)])
    assert kept(out[0]) == {0, 1, 2} and kept(out[1]) == {0, 1, 2}


def test_ordered_keys_sort_like_floats():
    # (no denormals: XLA flushes them to zero)
    x = np.array([-np.inf, -3e38, -1.5, -1e-30, -0.0, 0.0, 1e-30, 2.0, 3e38, np.inf], np.float32)
    keys = np.asarray(sampling._ordered_keys(jnp.asarray(x))).astype(np.int64)
    assert (np.diff(keys) > 0).sum() == len(x) - 2 and keys[4] == keys[5]  # -0.0 == 0.0
    y = np.random.default_rng(0).normal(0, 10, 1000).astype(np.float32)
    k = np.asarray(sampling._ordered_keys(jnp.asarray(y)))
    np.testing.assert_array_equal(np.argsort(k, kind="stable"), np.argsort(y, kind="stable"))


def test_combinations_match_transformers():
    """Random settings per row, two vocabulary sizes: kept sets and values as transformers'."""
    rng = np.random.default_rng(0)
    fixed = [(1.0, 0, 1.0, 0.0), (0.7, 10, 1.0, 0.0), (1.3, 0, 0.9, 0.0), (0.5, 0, 1.0, 0.05),
             (1.0, 20, 0.8, 0.0), (0.8, 15, 0.95, 0.02), (1.5, 0, 0.7, 0.1), (2.0, 30, 0.99, 0.01),
             (0.3, 3, 0.5, 0.5)]
    drawn = [(float(rng.uniform(0.2, 2)), int(rng.choice([0, 1, 5, 50, 500])),
              float(rng.choice([1.0, rng.uniform(0.05, 1)])),
              float(rng.choice([0.0, rng.uniform(0, 0.3)]))) for _ in range(23)]
    params = [P(temperature=t, top_k=k, top_p=p, min_p=m) for t, k, p, m in fixed + drawn]
    for V in (64, 3000):
        logits = rng.normal(0, 2, (len(params), V)).astype(np.float32)  # continuous: no ties
        out = np.asarray(FILTER(jnp.asarray(logits), md_for(params)))
        for i, p in enumerate(params):
            ref = hf_filter(logits[i], p)
            assert kept(out[i]) == kept(ref), p
            m = np.isfinite(ref)
            np.testing.assert_allclose(out[i][m], ref[m], rtol=1e-6)


def test_greedy_rows_ignore_filters_and_take_argmax_after_adjustments():
    logits = pad_logits([[1.0, 3.0, 2.0, 0.5]] * 3, value=-5.0)
    params = [P(temperature=0.0, top_k=1, top_p=0.1),
              P(temperature=0.0, logit_bias={3: 5.0}),
              P(temperature=0.0, repetition_penalty=2.0)]
    out = run(logits, params, prompts=[[], [], [1]], outputs=[[], [], [1]])
    # row 2: token 1 is penalised to 1.5 < 2.0, so token 2 wins
    assert out.token_ids[:3].tolist() == [1, 3, 2]


# ------------------------------------------------------------------------- distributions

def _expected(logits: np.ndarray, p: P) -> np.ndarray:
    f = hf_filter(logits, p).astype(np.float64)
    e = np.exp(f - f[np.isfinite(f)].max())
    return e / e.sum()


@pytest.mark.parametrize("p", [P(), P(temperature=0.7, top_k=5), P(temperature=1.3, top_p=0.8),
                               P(temperature=0.9, min_p=0.1), P(top_k=6, top_p=0.9, min_p=0.05),
                               P(seed=7, temperature=1.2)])
def test_sampled_frequencies_chi_square(p):
    n, V = 20000, 12
    logits = np.random.default_rng(3).normal(0, 1.2, V).astype(np.float32)
    expected = _expected(logits, p)
    if p.seed is not None:  # 20k different seeds: the seeded path must be a fair draw too
        params = [P(seed=p.seed + i, temperature=p.temperature) for i in range(n)]
    else:
        params = [p] * n
    md = md_for(params)
    out = SAMPLE(jnp.asarray(np.tile(logits, (n, 1))), md, KEY, num_top_logprobs=0,
                 use_penalties=False)
    counts = np.bincount(np.asarray(out.token_ids), minlength=V)
    support = expected > 0
    assert counts[~support].sum() == 0
    exp_counts = expected[support] / expected[support].sum() * n
    stat = scipy.stats.chisquare(counts[support], exp_counts)
    assert stat.pvalue > 0.001, (counts, expected * n)


# ------------------------------------------------------------------------------ penalties

def test_repetition_penalty_matches_transformers():
    rng = np.random.default_rng(1)
    V = 40
    logits = rng.normal(0, 3, (3, V)).astype(np.float32)
    prompts = [[1, 2, 3, 3], [5, 6], [7]]
    outputs = [[4, 1], [6, 6, 9], []]
    params = [P(repetition_penalty=1.3), P(repetition_penalty=0.7), P(repetition_penalty=2.0)]
    md = md_for(params, prompts, outputs)
    got = np.asarray(ADJUST(jnp.asarray(logits), md, use_penalties=True))
    for i, p in enumerate(params):
        ids = torch.tensor([prompts[i] + outputs[i]], dtype=torch.long)
        ref = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(
            ids, torch.tensor(logits[i:i + 1]))[0].numpy()
        np.testing.assert_allclose(got[i], ref, rtol=1e-6)


def test_presence_frequency_follow_openai_over_outputs_only():
    rng = np.random.default_rng(2)
    V = 30
    logits = rng.normal(0, 2, (2, V)).astype(np.float32)
    prompts, outputs = [[1, 2, 2, 8], [3]], [[2, 5, 5, 5, 7], []]
    params = [P(presence_penalty=0.5, frequency_penalty=0.3),
              P(presence_penalty=-1.0, frequency_penalty=-0.4)]
    got = np.asarray(ADJUST(jnp.asarray(logits), md_for(params, prompts, outputs),
                            use_penalties=True))
    for i, p in enumerate(params):
        c = np.bincount(np.asarray(outputs[i], np.int64), minlength=V)  # prompt not counted
        # OpenAI: mu[j] - c[j] * alpha_frequency - float(c[j] > 0) * alpha_presence
        ref = logits[i] - c * p.frequency_penalty - (c > 0) * p.presence_penalty
        np.testing.assert_allclose(got[i], ref, rtol=1e-6, atol=1e-6)


def test_bias_min_tokens_and_all_penalties_compose_like_vllm():
    V = 20
    logits = np.linspace(-3, 3, V, dtype=np.float32)[None].repeat(3, 0)
    eos = {19}
    p0 = P(logit_bias={0: 10.0, 4: -2.5}, repetition_penalty=1.5, presence_penalty=0.2,
           frequency_penalty=0.1, min_tokens=3, stop_token_ids=[18])
    p1 = P(min_tokens=2, stop_token_ids=[18])  # already has 2 outputs: nothing forbidden
    p2 = P(ignore_eos=True, min_tokens=5)       # vLLM forbids EOS even with ignore_eos
    inputs = [(p0, [4, 10], [10, 12], eos), (p1, [1], [2, 3], eos), (p2, [1], [], eos)]
    md = sampling.build_sampling_metadata(inputs, 4, V)
    got = np.asarray(ADJUST(jnp.asarray(np.vstack([logits, logits[:1]])), md, use_penalties=True))
    ref = logits[0].copy()
    ref[[0, 4]] += [10.0, -2.5]  # bias first
    ref[[18, 19]] = -np.inf      # then min_tokens
    ids = torch.tensor([[4, 10, 10, 12]])
    ref = RepetitionPenaltyLogitsProcessor(1.5)(ids, torch.tensor(ref[None]))[0].numpy()
    c = np.bincount([10, 12], minlength=V)
    ref = ref - 0.1 * c - 0.2 * (c > 0)
    np.testing.assert_allclose(got[0], ref, rtol=1e-6)
    np.testing.assert_array_equal(got[1], logits[1])
    assert np.isneginf(got[2][19]) and np.isfinite(got[2][:19]).all()


# -------------------------------------------------------------------------------- seeds

def _stream(rows, target, n_steps, rng, base_seed):
    """Tokens of row `target` over n_steps decode steps; the other rows change every step.
    Batches of 8 or fewer rows are padded to 8, as the runner pads to a bucket."""
    logits_target = np.random.default_rng(99).normal(0, 1, (n_steps, V_STD)).astype(np.float32)
    padded = rows if rows == 1 or rows > S_STD else S_STD
    toks = []
    for step in range(n_steps):
        inputs, logits = [], rng.normal(0, 1, (padded, V_STD)).astype(np.float32)
        for r in range(rows):
            if r == target:
                inputs.append((P(seed=1234, temperature=0.9, top_p=0.95), [1, 2], toks[:]))
                logits[r] = logits_target[step]
            else:
                p = P(temperature=float(rng.uniform(0.5, 1.5)), top_k=int(rng.integers(0, 5)),
                      seed=int(rng.integers(0, 100)) if rng.random() < 0.5 else None,
                      presence_penalty=float(rng.uniform(-1, 1)))
                inputs.append((p, [3], [0] * int(rng.integers(0, 6)), (), int(rng.integers(2**32))))
        md = sampling.build_sampling_metadata(inputs, padded, use_penalties=True, penalty_width=16)
        key = jax.random.PRNGKey(base_seed + step)
        out = SAMPLE(jnp.asarray(logits), md, key, num_top_logprobs=5, use_penalties=True)
        toks.append(int(out.token_ids[target]))
    return toks


def test_seeded_row_is_independent_of_batch_and_position():
    n_steps = 6
    alone = _stream(1, 0, n_steps, np.random.default_rng(0), 0)
    # 1, 4 and 16 other rows, the seeded one first, in the middle, last
    for rows, target, seed in [(2, 1, 10), (5, 3, 20), (5, 0, 25), (17, 0, 30), (17, 16, 40)]:
        assert _stream(rows, target, n_steps, np.random.default_rng(seed), seed) == alone
    assert len(set(alone)) > 1  # the stream moves with the output index


def test_seeded_key_is_fold_in_of_seed_and_output_index():
    md = md_for([P(seed=5), P(seed=2**33 + 9), P(seed=-3)], outputs=[[0, 0], [], [0]])
    keys = jax.random.key_data(sampling.row_keys(md, KEY))
    np.testing.assert_array_equal(keys[0], jax.random.fold_in(jax.random.PRNGKey(5), 2))
    np.testing.assert_array_equal(md.seed_key[1], [2, 9])            # both 32-bit words used
    np.testing.assert_array_equal(md.seed_key[2], [2**32 - 1, 2**32 - 3])  # two's complement


def test_unseeded_rows_differ_and_same_seed_repeats():
    logits = jnp.zeros((S_STD, V_STD))  # uniform rows
    params = [P()] * 4 + [P(seed=11)] * 4
    a = np.asarray(run(logits, params).token_ids)
    b = np.asarray(run(logits, params, key=jax.random.PRNGKey(5)).token_ids)
    assert len(set(a[:4].tolist())) >= 3    # four unseeded requests: different draws
    assert (a[:4] != b[:4]).sum() >= 3      # a new step key: new draws
    assert len(set(a[4:].tolist()) | set(b[4:].tolist())) == 1  # the seed alone decides
    # the same request at the same row differs with its salt (the engine draws one per request)
    t = [int(SAMPLE(logits, sampling.build_sampling_metadata(
        [(P(), [], [], (), salt)], S_STD, use_penalties=True, penalty_width=16), KEY,
        num_top_logprobs=5, use_penalties=True).token_ids[0]) for salt in range(4)]
    assert len(set(t)) >= 3


# --------------------------------------------------------------------- logprobs, compiles

def test_logprobs_are_raw_log_softmax_and_top_sorted():
    rng = np.random.default_rng(4)
    logits = rng.normal(0, 2, (S_STD, V_STD)).astype(np.float32)
    params = [P(temperature=0.0), P(temperature=0.5, top_k=3, logit_bias={7: 50.0}),
              P(repetition_penalty=1.8, presence_penalty=1.0), P(min_p=0.3, temperature=1.7)]
    out = run(jnp.asarray(logits), params, prompts=[[1, 2]] * 4, outputs=[[3]] * 4)
    ref = torch.log_softmax(torch.tensor(logits), -1).numpy()
    tok = np.asarray(out.token_ids)
    assert tok[1] == 7  # the bias decides the token, not the reported logprob
    np.testing.assert_allclose(out.logprobs, ref[np.arange(S_STD), tok], rtol=1e-5, atol=1e-6)
    order = np.argsort(-ref, axis=-1)[:, :5]
    np.testing.assert_array_equal(out.top_token_ids, order)
    np.testing.assert_allclose(out.top_logprobs, np.take_along_axis(ref, order, -1), rtol=1e-5)
    assert (np.diff(np.asarray(out.top_logprobs), axis=-1) <= 0).all()


def test_new_values_never_recompile():
    S, V = S_STD, V_STD

    def fresh(*args, **kwargs):  # its own jit cache (jit caches are shared per function)
        return sampling.sample(*args, **kwargs)

    f = jax.jit(fresh, static_argnames=("num_top_logprobs", "use_penalties"))
    logits = jnp.asarray(np.random.default_rng(5).normal(0, 1, (S, V)), jnp.float32)
    kw = dict(penalty_width=32, use_penalties=True)
    first = md_for([P()] * 3, rows=S, **kw)
    jax.block_until_ready(f(logits, first, KEY, num_top_logprobs=4, use_penalties=True))
    before = compile_count()
    variants = [
        [P(temperature=0.0), P(top_k=3, seed=1), P(top_p=0.5, min_p=0.2, logit_bias={3: 2.0})],
        [P(repetition_penalty=1.5, frequency_penalty=1.0, min_tokens=4, stop_token_ids=[5])] * 8,
        [P(seed=2**60, temperature=1.9, top_k=1000)],
        [],
    ]
    for i, params in enumerate(variants):
        md = md_for(params, prompts=[[1, 2, 3]] * len(params), outputs=[[4] * i] * len(params),
                    rows=S, **kw)
        jax.block_until_ready(f(logits, md, jax.random.PRNGKey(i), num_top_logprobs=4,
                                use_penalties=True))
    assert compile_count() == before
    assert f._cache_size() == 1


# ------------------------------------------------------------------------------- builder

def test_builder_pads_and_reads_requests():
    req = Request("r1", [1, 2, 3], P(temperature=0.5, seed=3, min_tokens=2, presence_penalty=0.5,
                                     stop_token_ids=[9], logit_bias={"4": 1.5}),
                  eos_token_ids=[0])
    req.append_output_token(5)
    req.sampling_salt = 77
    md = sampling.build_sampling_metadata([req], 4, 100, use_penalties=True, penalty_width=8)
    assert md.temperature.tolist() == [0.5, 0.0, 0.0, 0.0]  # padding rows are greedy
    assert md.output_index.tolist() == [1, 0, 0, 0] and md.salt[0] == 77
    assert md.forbidden_ids[0, :2].tolist() == [0, 9] and (md.forbidden_ids[1:] == -1).all()
    assert md.bias_ids[0, 0] == 4 and md.bias_values[0, 0] == 1.5
    assert md.penalty_token_ids.shape == (4, 8)
    assert md.penalty_token_ids[0].tolist() == [1, 2, 3, 5, -1, -1, -1, -1]
    assert md.num_prompt_tokens.tolist() == [3, 0, 0, 0]
    assert sampling.build_sampling_metadata([req], 4, use_penalties=False
                                            ).penalty_token_ids.shape == (4, 1)
    assert sampling.needs_penalties(req) and not sampling.needs_penalties(P(min_p=0.5))
    with pytest.raises(ValueError, match="penalty_width"):
        sampling.build_sampling_metadata([req], 4, use_penalties=True, penalty_width=2)
    with pytest.raises(ValueError, match="padded rows"):
        sampling.build_sampling_metadata([req] * 5, 4)
