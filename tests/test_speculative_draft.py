"""Speculative decoding with a draft model (runner/draft.py, runner/spec_sampling.py).

- Rejection sampling on arrays: the emitted token is distributed as the target's p whatever the
  draft's q, for accepted and recovered tokens alike (chi-square against p itself).
- The engine on tiny models: a draft equal to the target has every draft accepted; a random
  draft (another architecture) few; greedy tokens equal plain decoding's either way, across
  chunked prefill, prefix hits and preemption under a small page pool, with max_tokens and
  stop strings landing inside accepted runs; seeded sampling is reproducible; unseeded
  sampling keeps its distribution (chi-square); the page pool is whole and nothing compiles
  after warm-up; a draft with another vocabulary is refused.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import random
import shutil

import numpy as np
import pytest
import scipy.stats

from jaxserve.config import ConfigError, EngineConfig, SpeculativeConfig
from jaxserve.engine.sampling_params import SamplingParams

ARGS = dict(num_pages=128, page_size=8, max_num_seqs=4, max_num_batched_tokens=32)


# -- rejection sampling on arrays -----------------------------------------------------------------

def _verify_many(p_logits, q, draws: int, seed: int = 0):
    """Emitted tokens of `draws` independent rows that verify a draft drawn from q."""
    import jax
    import jax.numpy as jnp
    from jaxserve.runner.spec_sampling import verify_drafts

    rng = np.random.default_rng(seed)
    V = len(q)
    drafts = rng.choice(V, size=draws, p=q).astype(np.int32)
    filtered = jnp.broadcast_to(jnp.asarray(p_logits, jnp.float32), (draws, V))
    keys = jax.random.split(jax.random.key(seed), draws)
    out = jax.jit(verify_drafts)(filtered, keys, jnp.full((draws,), -7, jnp.int32),
                                 jnp.zeros((draws,), jnp.int32), jnp.asarray(drafts),
                                 jnp.asarray(q, jnp.float32)[None])
    return np.asarray(out), drafts


@pytest.mark.parametrize("case", ["overlapping", "disjoint-support", "equal"])
def test_rejection_sampling_emits_the_target_distribution(case):
    p = np.array([0.5, 0.2, 0.15, 0.1, 0.05, 0.0])
    q = {"overlapping": np.array([0.1, 0.5, 0.1, 0.1, 0.1, 0.1]),
         "disjoint-support": np.array([0.0, 0.0, 0.0, 0.0, 0.5, 0.5]),
         "equal": p}[case]
    with np.errstate(divide="ignore"):
        logits = np.log(p)  # -inf where p is 0, as filter_logits leaves removed tokens
    draws = 20000
    out, drafts = _verify_many(logits, q, draws)
    assert (out >= 0).all() and (out != -7).all()
    counts = np.bincount(out, minlength=len(p))
    assert counts[p == 0].sum() == 0  # never a token the target cannot sample
    support = p > 0
    _, p_value = scipy.stats.chisquare(counts[support], p[support] * draws)
    assert p_value > 0.001, (case, counts)
    accepted = (out == drafts).mean()  # the acceptance rate is sum(min(p, q))
    assert abs(accepted - np.minimum(p, q).sum()) < 0.02


# -- the engine on tiny models ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def target_path(tiny_model_dir):
    return tiny_model_dir("llama-gqa")


@pytest.fixture(scope="module")
def random_draft_path(tmp_path_factory):
    """Another architecture and other weights over the same tokenizer: drafts rarely match."""
    from checkpoints.make_tiny_model import make_tiny_model
    return make_tiny_model(str(tmp_path_factory.mktemp("draft")), "llama-mqa-tied", seed=1)


@pytest.fixture(scope="module")
def noisy_draft_path(target_path, tmp_path_factory):
    """The target's weights plus noise: its q is near p but not p, so a sampled step both
    accepts and rejects drafts."""
    from safetensors.numpy import load_file, save_file
    out = str(tmp_path_factory.mktemp("noisy-draft"))
    shutil.copytree(target_path, out, dirs_exist_ok=True)
    rng = np.random.default_rng(5)
    for name in os.listdir(out):
        if name.endswith(".safetensors"):
            tensors = load_file(os.path.join(out, name))
            noisy = {k: (v + 0.1 * v.std() * rng.standard_normal(v.shape)).astype(v.dtype)
                     for k, v in tensors.items()}
            save_file(noisy, os.path.join(out, name), metadata={"format": "pt"})
    return out


def _draft_llm(target, draft, k=3, **kw):
    from jaxserve.llm import LLM
    spec = {"method": "draft_model", "model": draft, "num_speculative_tokens": k}
    return LLM(target, speculative_config=spec, **{**ARGS, **kw})


@pytest.fixture(scope="module")
def plain(target_path):
    from jaxserve.llm import LLM
    return LLM(target_path, **ARGS)


@pytest.fixture(scope="module")
def self_draft(target_path):
    return _draft_llm(target_path, target_path)


@pytest.fixture(scope="module")
def random_draft(target_path, random_draft_path):
    return _draft_llm(target_path, random_draft_path, k=2)


def _prompts(n, seed):
    rng = random.Random(seed)
    return [[rng.randrange(3, 384) for _ in range(rng.randrange(2, 14))] for _ in range(n)]


def _tokens(llm, prompts, params):
    return [[list(o.token_ids) for o in out.outputs] for out in llm.generate(prompts, params)]


def _counters(engine):
    return engine.spec_num_draft_tokens, engine.spec_num_accepted_tokens


def _pool_whole(llm):
    bm = llm.engine.block_manager
    assert not llm.engine.has_unfinished_requests()
    bm.check_invariants([])
    assert bm.num_free_pages == bm.num_pages


@pytest.fixture
def no_compiles():
    """Nothing compiles during the test (after its engines' warm-up, which fixtures do)."""
    from jaxserve.runner.compile_guard import compile_count
    before = compile_count()
    yield
    assert compile_count() == before


GREEDY = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)


def test_a_draft_equal_to_the_target_has_every_draft_accepted(plain, self_draft, no_compiles):
    prompts = _prompts(7, seed=1)
    want = _tokens(plain, prompts, GREEDY)
    before = _counters(self_draft.engine)
    for max_tokens in (32, 6, 2):  # 6 and 2 end inside a run of 1 + 3 tokens
        got = _tokens(self_draft, prompts, dataclasses.replace(GREEDY, max_tokens=max_tokens))
        assert got == [[w[0][:max_tokens]] for w in want]
    drafted, accepted = (a - b for a, b in zip(_counters(self_draft.engine), before))
    assert drafted > 0 and accepted == drafted
    # a stop string matched inside an accepted run: nothing after it comes back
    text = self_draft.get_tokenizer().decode(want[0][0])
    stop = next(text[i:i + 2] for i in range(len(text) // 3, len(text))
                if text[i:i + 2].strip() and "\ufffd" not in text[i:i + 2])
    a = plain.generate([prompts[0]], dataclasses.replace(GREEDY, stop=[stop]))[0].outputs[0]
    b = self_draft.generate([prompts[0]], dataclasses.replace(GREEDY, stop=[stop]))[0].outputs[0]
    assert a.finish_reason == "stop" and a.stop_reason == stop
    assert (b.text, b.token_ids, b.finish_reason) == (a.text, a.token_ids, a.finish_reason)
    _pool_whole(self_draft)


def test_the_mirror_pass_feeds_decoding_sequences_as_one_token_rows(self_draft):
    """A decoding sequence's catch-up and known token go in as one-token rows (a decode-shaped
    batch, T == S, so attention takes its decode path), a prefill chunk stays whole, and logits
    row i is sequence i's last token, with the proposal's page table row i its pages."""
    from jaxserve.engine.step_plan import SequenceSampling, StepPlan, StepSequence
    draft = self_draft.engine.runner.draft
    sampling = SequenceSampling(GREEDY, [1, 2], [])

    def seq(tokens, start, pages, catch_up=()):
        return StepSequence(tokens, start, pages, sampling, num_model_drafts=3,
                            draft_catch_up=catch_up)

    decoding = StepPlan((seq([7], 10, [3, 4], catch_up=(6,)), seq([9], 5, [5])))
    batch, slot_pages = draft._mirror_batch(decoding)
    T, S = batch.token_ids.shape[0], batch.kv_lens.shape[0]
    assert T == S  # decode-shaped
    assert list(batch.token_ids[:3]) == [6, 7, 9] and list(batch.positions[:3]) == [9, 10, 5]
    assert list(batch.kv_lens[:3]) == [10, 11, 6] and list(batch.cu_q_lens[:4]) == [0, 1, 2, 3]
    assert list(batch.logits_indices[:2]) == [1, 2]
    assert slot_pages.shape[0] == S and list(slot_pages[0, :2]) == [3, 4]
    assert slot_pages[1, 0] == 5 and not slot_pages[2:].any()

    mixed = StepPlan((StepSequence([11, 12, 13], 0, [8], sampling), seq([7], 10, [3, 4], (6,))))
    batch, slot_pages = draft._mirror_batch(mixed)
    assert list(batch.cu_q_lens[:4]) == [0, 3, 4, 5]  # the chunk whole, then two rows
    assert list(batch.logits_indices[:2]) == [2, 4]
    assert slot_pages[0, 0] == 8 and list(slot_pages[1, :2]) == [3, 4]


def test_a_random_draft_changes_no_greedy_token(plain, random_draft, no_compiles):
    prompts = _prompts(7, seed=2)
    before = _counters(random_draft.engine)
    assert _tokens(random_draft, prompts, GREEDY) == _tokens(plain, prompts, GREEDY)
    drafted, accepted = (a - b for a, b in zip(_counters(random_draft.engine), before))
    assert drafted > 0 and accepted < drafted / 2
    _pool_whole(random_draft)


def test_scheduling_paths_keep_the_tokens(target_path, plain):
    """Chunked prefill (16-token budget), prefix hits (a shared prefix) and preemption (a
    pool of 20 pages for 4 sequences of up to 80 tokens) in one engine."""
    llm = _draft_llm(target_path, target_path, num_pages=20, max_num_batched_tokens=16)
    shared = [7, 8, 9, 10] * 5
    prompts = [shared + p for p in _prompts(6, seed=4)]
    params = dataclasses.replace(GREEDY, max_tokens=48)
    assert _tokens(llm, prompts, params) == _tokens(plain, prompts, params)
    assert llm.engine.runner.compiles_since_warmup() == 0
    assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.block_manager.prefix_hits > 0
    drafted, accepted = _counters(llm.engine)
    assert drafted > 0 and accepted == drafted  # the draft's cache kept up through all of it
    _pool_whole(llm)


def test_seeded_sampling_is_reproducible(random_draft, no_compiles):
    prompts = _prompts(4, seed=3)
    params = SamplingParams(max_tokens=24, temperature=1.0, top_k=5, seed=7, ignore_eos=True)
    first = _tokens(random_draft, prompts, params)
    assert _tokens(random_draft, prompts, params) == first
    assert _tokens(random_draft, prompts[:1], params) == first[:1]  # alone as in a batch
    other = _tokens(random_draft, prompts, dataclasses.replace(params, seed=8))
    assert other != first
    _pool_whole(random_draft)


@pytest.fixture(scope="module")
def noisy_draft(target_path, noisy_draft_path):
    return _draft_llm(target_path, noisy_draft_path, k=2)


@pytest.mark.parametrize("which", ["self", "noisy", "random"])
def test_unseeded_sampling_keeps_its_distribution(plain, which, request):
    """The first three tokens of unseeded requests (top-k 3 over the tiny vocabulary): the same
    joint distribution with a draft model as without (chi-square). The equal draft's drafts
    are all accepted; the noisy draft's q is near p, so steps accept some and recover from
    others; the random draft's q shares little with p, so recovery draws decide."""
    from jaxserve.runner.compile_guard import compile_count
    spec = request.getfixturevalue(f"{which}_draft")
    compiles = compile_count()
    prompt = [30, 31, 32, 33]
    params = SamplingParams(max_tokens=3, temperature=1.0, top_k=3, ignore_eos=True)
    before = _counters(spec.engine)
    counts = [collections.Counter(tuple(o[0]) for o in _tokens(llm, [prompt] * 700, params))
              for llm in (plain, spec)]
    drafted, accepted = (a - b for a, b in zip(_counters(spec.engine), before))
    assert drafted > 0
    assert {"self": accepted > 0.9 * drafted, "noisy": 0.1 * drafted < accepted < 0.9 * drafted,
            "random": accepted < 0.5 * drafted}[which], (accepted, drafted)
    cells = sorted(set(counts[0]) | set(counts[1]))
    table = [[c.get(cell, 0) for c in counts] for cell in cells]
    table = [row for row in table if sum(row) >= 10]  # chi-square needs filled cells
    _, p_value, _, _ = scipy.stats.chi2_contingency(table)
    assert p_value > 0.001, (p_value, cells, counts)
    _pool_whole(spec)
    assert compile_count() == compiles


# -- configuration ----------------------------------------------------------------------------------

@pytest.mark.parametrize("value,match", [
    ({"method": "draft_model"}, "needs a model"),
    ({"method": "draft_model", "model": " "}, "needs a model"),
    ({"method": "ngram", "model": "x"}, "takes no model"),
    ({"method": "eagle", "model": "x"}, "not implemented"),
])
def test_bad_draft_configs_name_the_flag(value, match):
    with pytest.raises(ConfigError, match=match) as err:
        SpeculativeConfig.parse(json.dumps(value))
    assert "--speculative-config" in str(err.value)


def test_a_draft_with_another_vocabulary_is_refused(target_path, tmp_path):
    from checkpoints.make_tiny_model import train_tokenizer
    from jaxserve.llm import LLM

    other = str(tmp_path / "other-vocab")
    shutil.copytree(target_path, other)
    for name in os.listdir(other):
        if name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            os.remove(os.path.join(other, name))
    train_tokenizer(vocab_size=300).save_pretrained(other)
    with pytest.raises(ConfigError, match="another vocabulary"):
        LLM(target_path, speculative_config={"method": "draft_model", "model": other},
            warmup=False, **ARGS)
    with pytest.raises(ConfigError, match="cannot load the draft model"):
        LLM(target_path, speculative_config={"method": "draft_model",
                                             "model": str(tmp_path / "missing")},
            warmup=False, **ARGS)


def test_a_layer_cut_draft_loads_with_the_target_vocabulary(target_path, tmp_path):
    """checkpoints/make_layer_draft.py: the first layer of the tiny target, same embeddings and
    tokenizer; accepted as a draft, and its layer equals the target's first."""
    from checkpoints.make_layer_draft import make_layer_draft
    from jaxserve.llm import _load_draft_model
    from jaxserve.loading import load_model

    out = make_layer_draft(target_path, str(tmp_path / "cut"), 1)
    target = load_model(target_path)
    config = EngineConfig(model=target_path,
                          speculative={"method": "draft_model", "model": out})
    draft = _load_draft_model(config, target, log=lambda msg: None)
    assert draft.config.num_layers == 1 and target.config.num_layers == 2
    for name, w in draft.params["layers"].items():
        np.testing.assert_array_equal(w[0], target.params["layers"][name][0])
    np.testing.assert_array_equal(draft.params["embed"], target.params["embed"])
    with pytest.raises(ValueError, match="--layers"):
        make_layer_draft(target_path, str(tmp_path / "bad"), 3)
