"""Speculative decoding (engine/speculative.py): the config, the n-gram proposer, verification
in the scheduler (drafts trimmed to the limits, rejected K/V rolled back, the pool whole), and
the engine on the tiny model: the same tokens with and without speculation, greedy and seeded,
across chunked prefill, prefix hits, preemption, stop strings and max_tokens inside an accepted
run; unseeded sampling keeps its distribution (chi-square); nothing compiles after warm-up."""

from __future__ import annotations

import collections
import dataclasses
import random

import pytest
import scipy.stats
from test_scheduler import (FakeModel, assert_pool_whole, make_request, make_scheduler,
                            next_token, reference_output)

from jaxserve.config import ConfigError, SpeculativeConfig
from jaxserve.engine.sampling_params import SamplingParams
from jaxserve.engine.speculative import NgramProposer, accepted_prefix

SPEC = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3}


# -- config and proposer ------------------------------------------------------------------------

@pytest.mark.parametrize("value,match", [
    ('{"method": "eagle3", "model": "x", "num_speculative_tokens": 2}', "not implemented"),
    ('{"method": "medusa"}', "not implemented"),
    ('{"method": "nope"}', "unknown method"),
    ('{"num_speculative_tokens": 2}', "needs a method"),
    ('{"method": "ngram", "num_speculative_tokens": 0}', "positive"),
    ('{"method": "ngram", "prompt_lookup_min": 3, "prompt_lookup_max": 2}', "must not exceed"),
    ('{"method": "ngram", "typo": 1}', "unknown keys"),
    ("not json", "JSON"),
])
def test_bad_speculative_configs_name_the_flag(value, match):
    with pytest.raises(ConfigError, match=match) as err:
        SpeculativeConfig.parse(value)
    assert "--speculative-config" in str(err.value)


def test_ngram_proposer_takes_the_longest_most_recent_match():
    p = NgramProposer(SpeculativeConfig(num_speculative_tokens=3, prompt_lookup_min=1,
                                        prompt_lookup_max=3))
    assert p.propose([1, 2, 3, 4, 5, 1, 2, 3]) == [4, 5, 1]
    # the 2-gram (8, 9) occurs twice: the most recent occurrence wins
    assert p.propose([8, 9, 1, 8, 9, 2, 7, 8, 9]) == [2, 7, 8]
    assert p.propose([1, 2, 3, 4, 5, 6]) == []  # no earlier occurrence of any suffix
    assert p.propose([1, 2, 3, 4, 5, 1, 2, 3], max_drafts=1) == [4]
    longest_first = NgramProposer(SpeculativeConfig(num_speculative_tokens=2,
                                                    prompt_lookup_min=1, prompt_lookup_max=2))
    # suffix (5, 6) matched at the start beats the more recent 1-gram (6)
    assert longest_first.propose([5, 6, 1, 6, 2, 5, 6]) == [1, 6]
    assert accepted_prefix([4, 5, 1], [4, 5, 2, 9]) == [4, 5, 2]
    assert accepted_prefix([4, 5], [4, 5, 6]) == [4, 5, 6]
    assert accepted_prefix([4], [3, 1]) == [3]


# -- the scheduler, with the deterministic fake model ------------------------------------------

class VerifyingModel(FakeModel):
    """FakeModel that also samples at every draft position, as the verify step does."""

    def step(self, out):
        ps = self.page_size
        for seq in out.scheduled:
            for i, token in enumerate(seq.token_ids):
                pos = seq.start_pos + i
                self.slots[seq.page_ids[pos // ps]][pos % ps] = token
        sampled = {}
        for seq in out.scheduled:
            if not seq.sample:
                continue
            ctx = [self.slots[seq.page_ids[p // ps]][p % ps] for p in range(seq.end_pos)]
            k = len(seq.draft_token_ids)
            targets = [next_token(ctx[:len(ctx) - k + j]) for j in range(k + 1)]
            sampled[seq.request_id] = (accepted_prefix(seq.draft_token_ids, targets) if k
                                       else targets[0])
        return sampled


@pytest.mark.parametrize("quality", ["perfect", "wrong", "mixed"])
def test_scheduler_verifies_drafts_and_rolls_back(quality):
    sched, _ = make_scheduler(num_pages=48, page_size=4, max_num_batched_tokens=20,
                              max_model_len=64)
    model = VerifyingModel(48, 4)
    rng = random.Random(0)
    reqs = [make_request(f"r{i}", [rng.randrange(1, 60) for _ in range(rng.randrange(2, 9))],
                         max_tokens=rng.choice([5, 11, 40])) for i in range(6)]
    expected = {r.request_id: reference_output(r, 64)[0] for r in reqs}
    for r in reqs:
        sched.add_request(r)
    drafted = accepted = 0
    for _ in range(500):
        if not sched.has_unfinished_requests():
            break
        for r in sched.running:  # propose what the reference says, or something else
            done = r.num_output_tokens
            truth = expected[r.request_id][done:done + 3]
            wrong = [(t + 1) % 64 for t in truth]
            r.spec_token_ids = {"perfect": truth, "wrong": wrong,
                                "mixed": truth[:1] + wrong[1:]}[quality]
        out = sched.schedule()
        assert out.num_scheduled_tokens <= sched.max_num_batched_tokens
        for s in out.scheduled:
            r = s.request
            if s.draft_token_ids:  # never a draft past max_tokens or the context
                assert r.num_output_tokens + len(s.draft_token_ids) + 1 <= r.max_tokens
                assert r.num_tokens + len(s.draft_token_ids) + 1 <= 64
                drafted += len(s.draft_token_ids)
        before = {s.request_id: s.request.num_output_tokens for s in out.scheduled}
        updated = sched.update_from_output(out, model.step(out))
        for r in updated:
            accepted += r.num_output_tokens - before[r.request_id] - 1
            assert r.is_finished or r.num_computed_tokens == r.num_tokens - 1
        sched.block_manager.check_invariants(list(sched.requests.values()))
    for r in reqs:
        assert r.output_token_ids == expected[r.request_id], r.request_id
    assert drafted > 0
    assert (accepted == drafted) if quality == "perfect" else (accepted < drafted)
    if quality == "wrong":
        assert accepted == 0
    assert_pool_whole(sched)


# -- the engine on the tiny model ----------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_path(tiny_model_dir):
    return tiny_model_dir("llama-gqa")


def _llm(path, speculative=True, **kw):
    from jaxserve.llm import LLM
    args = dict(num_pages=256, page_size=8, max_num_seqs=8, max_num_batched_tokens=64)
    args.update(kw)
    return LLM(path, speculative_config=SPEC if speculative else None, **args)


@pytest.fixture(scope="module")
def plain(tiny_path):
    return _llm(tiny_path, speculative=False)


@pytest.fixture(scope="module")
def spec(tiny_path):
    return _llm(tiny_path)


def _prompts(n, seed):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        base = [rng.randrange(3, 384) for _ in range(rng.randrange(2, 12))]
        out.append(base * rng.randrange(1, 4))  # repeats give the n-gram proposer matches
    return out


def _tokens(llm, prompts, params):
    return [[list(o.token_ids) for o in out.outputs] for out in llm.generate(prompts, params)]


class OracleProposer:
    """Proposes the true continuation (from a plain run): every draft is accepted."""

    def __init__(self, k, continuations: dict[tuple, list[int]]):
        self.k, self.continuations = k, continuations

    def propose(self, token_ids, max_drafts=None):
        for prompt, out in self.continuations.items():
            n = len(prompt)
            if tuple(token_ids[:n]) == prompt and token_ids[n:] == out[:len(token_ids) - n]:
                return out[len(token_ids) - n:len(token_ids) - n + self.k]
        return []


def _pool_whole(llm):
    bm = llm.engine.block_manager
    assert not llm.engine.has_unfinished_requests()
    bm.check_invariants([])
    assert bm.num_free_pages == bm.num_pages


@pytest.mark.parametrize("params", [
    SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True),
    SamplingParams(max_tokens=40, temperature=1.0, top_k=20, seed=11, ignore_eos=True),
    SamplingParams(max_tokens=24, temperature=0.8, top_p=0.9, seed=3, n=2, ignore_eos=True),
], ids=["greedy", "seeded", "seeded-n2"])
def test_same_tokens_with_and_without_speculation(plain, spec, params):
    prompts = _prompts(10, seed=1)
    drafts0 = spec.engine.spec_num_draft_tokens
    assert _tokens(spec, prompts, params) == _tokens(plain, prompts, params)
    assert spec.engine.spec_num_draft_tokens > drafts0
    assert spec.engine.runner.compiles_since_warmup() == 0
    _pool_whole(spec)


def test_every_oracle_draft_is_accepted_and_limits_hold(plain, spec):
    """Accepted runs that cross max_tokens and stop strings still stop exactly there."""
    prompts = _prompts(6, seed=2)
    greedy = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    ref = _tokens(plain, prompts, greedy)
    engine = spec.engine
    saved = engine.proposer
    engine.proposer = OracleProposer(3, {tuple(p): r[0] for p, r in zip(prompts, ref)})
    try:
        before = (engine.spec_num_draft_tokens, engine.spec_num_accepted_tokens)
        for max_tokens in (30, 7, 2):  # 7 and 2 land inside a run of 1 + 3 tokens
            out = _tokens(spec, prompts, dataclasses.replace(greedy, max_tokens=max_tokens))
            assert out == [[r[0][:max_tokens]] for r in ref]
        drafted = engine.spec_num_draft_tokens - before[0]
        assert drafted > 0 and engine.spec_num_accepted_tokens - before[1] == drafted
        # a stop string matched inside an accepted run: nothing after it is returned
        tok = spec.get_tokenizer()
        text = tok.decode(ref[0][0])
        stop = next(text[i:i + 2] for i in range(len(text) // 3, len(text))
                    if text[i:i + 2].strip() and "\ufffd" not in text[i:i + 2])
        a = plain.generate([prompts[0]], dataclasses.replace(greedy, stop=[stop]))[0].outputs[0]
        b = spec.generate([prompts[0]], dataclasses.replace(greedy, stop=[stop]))[0].outputs[0]
        assert a.finish_reason == "stop" and a.stop_reason == stop
        assert (b.text, b.token_ids, b.finish_reason) == (a.text, a.token_ids, a.finish_reason)
    finally:
        engine.proposer = saved
    _pool_whole(spec)


@pytest.mark.parametrize("kw", [dict(max_num_batched_tokens=16, max_num_seqs=4),
                                dict(num_pages=24, enable_prefix_caching=False),
                                dict(enable_prefix_caching=True)],
                         ids=["chunked-prefill", "preemption", "prefix-hits"])
def test_scheduling_paths_keep_the_tokens(tiny_path, plain, kw):
    llm = _llm(tiny_path, **kw)
    shared = [7, 8, 9, 10] * 6
    prompts = [shared + p for p in _prompts(6, seed=4)]
    params = SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True)
    assert _tokens(llm, prompts, params) == _tokens(plain, prompts, params)
    if "num_pages" in kw:
        assert llm.engine.scheduler.num_preemptions > 0
    _pool_whole(llm)


def test_unseeded_sampling_keeps_its_distribution(plain, spec, tiny_path):
    """The first two tokens of unseeded requests, drafts proposed by an oracle of the most
    likely continuation: the same joint distribution as without speculation (chi-square)."""
    prompt = [30, 31, 32, 33]
    params = SamplingParams(max_tokens=2, temperature=1.0, top_k=3, ignore_eos=True)
    greedy = _tokens(plain, [prompt], SamplingParams(max_tokens=2, temperature=0.0,
                                                     ignore_eos=True))[0][0]
    engine = spec.engine
    saved = engine.proposer
    engine.proposer = OracleProposer(1, {tuple(prompt): greedy})
    try:
        counts = []
        for llm in (plain, spec):
            outs = _tokens(llm, [prompt] * 600, params)
            counts.append(collections.Counter(tuple(o[0]) for o in outs))
        assert engine.spec_num_accepted_tokens > 0
    finally:
        engine.proposer = saved
    cells = sorted(set(counts[0]) | set(counts[1]))
    table = [[c.get(cell, 0) for cell in cells] for c in counts]
    table = [[a, b] for a, b in zip(*table) if a + b >= 10]  # chi-square needs filled cells
    _, p_value, _, _ = scipy.stats.chi2_contingency(list(zip(*table)))
    assert p_value > 0.001, (p_value, cells, counts)


def test_metrics_count_drafts(spec):
    e = spec.engine
    assert e.spec_num_drafts > 0 and e.spec_num_draft_tokens >= e.spec_num_drafts
    assert 0 <= e.spec_num_accepted_tokens <= e.spec_num_draft_tokens
    assert sum(e.spec_accepted_per_pos) == e.spec_num_accepted_tokens
    assert all(a >= b for a, b in zip(e.spec_accepted_per_pos, e.spec_accepted_per_pos[1:]))


def test_disable_by_batch_size(tiny_path, plain):
    """No drafts while that many requests run; the tokens stay the same either way."""
    prompts = _prompts(4, seed=5)
    lens = [6, 12, 24, 48]
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in lens]
    want = [[list(o.token_ids) for o in out.outputs] for out in plain.generate(prompts, params)]
    from jaxserve.llm import LLM
    for limit, drafts_expected in ((1, False), (3, True)):
        llm = LLM(tiny_path, num_pages=256, page_size=8, max_num_seqs=8,
                  max_num_batched_tokens=64,
                  speculative_config={**SPEC, "disable_by_batch_size": limit})
        got = [[list(o.token_ids) for o in out.outputs] for out in llm.generate(prompts, params)]
        assert got == want
        assert (llm.engine.spec_num_draft_tokens > 0) == drafts_expected



def test_a_logprobs_request_joining_drafted_requests_keeps_the_tokens(tiny_path, plain):
    """A request with logprobs arrives while drafted requests wait for the budget (16 tokens
    for 6 decodes of 1 + 3 rows leaves some unscheduled every step, and their drafts are
    dropped, never carried to a later step): the engine keeps serving, the extras steps verify
    drafts too, and the tokens stay the same."""
    spec = _llm(tiny_path, max_num_batched_tokens=16)
    engine = spec.engine
    prompts = [[40 + i, 41 + i, 42 + i] for i in range(6)]  # all decoding after one step
    greedy = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    want = _tokens(plain, prompts, greedy)
    # every decode gets 3 drafts: 6 x 4 rows > 16, so some wait a step holding drafts
    engine.proposer = OracleProposer(3, {tuple(p): w[0] for p, w in zip(prompts, want)})
    for i, p in enumerate(prompts):
        engine.add_request(f"pause-{i}", p, greedy)
    done, joined = {}, False
    for _ in range(400):
        if not joined and any(r.spec_token_ids for r in engine.scheduler.running):
            engine.add_request("with-logprobs", prompts[0], dataclasses.replace(greedy, logprobs=2))
            joined = True
        for out in engine.step():
            if out.finished:
                done[out.request_id] = [list(o.token_ids) for o in out.outputs]
        if not engine.has_unfinished_requests():
            break
    assert joined
    assert [done[f"pause-{i}"] for i in range(6)] == want
    assert done["with-logprobs"] == want[0]
    _pool_whole(spec)
