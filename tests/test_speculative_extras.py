"""Speculative decoding for requests with logprobs, penalties and structured output: every row
that verifies a draft samples as plain decoding would once the drafts before it are accepted
(penalty history and min_tokens count them, the grammar mask is the one after them) and each
kept token reports its own row's logprobs. So outputs equal plain decoding's, token for token,
with logprobs within float noise; an oracle proposing plain decoding's own continuation has
every draft accepted (a wrong history or mask would reject some). Drafts are cut to what the
grammar accepts, short of finishing it; a draft model gives constrained requests no drafts
while the others keep speculating; it speculates for penalised ones, whose rows
add the drafts before them to their history on the device."""

from __future__ import annotations

import dataclasses
import re

import pytest
from test_speculative import SPEC, OracleProposer

from jaxserve.engine.grammar import GrammarCompiler, draft_prefix
from jaxserve.engine.sampling_params import SamplingParams, StructuredOutputsParams as S

ARGS = dict(num_pages=256, page_size=8, max_num_seqs=8, max_num_batched_tokens=64)
PROMPTS = [[5, 6, 7, 8, 5, 6, 7, 8, 5, 6], [40, 41, 42, 43, 44], [100, 9, 100, 9, 100],
           [300, 301, 302, 303, 300, 301]]
REGEX = r"[a-c]{2,6}-\d{1,3}"


@pytest.fixture(scope="module")
def tiny_path(tiny_model_dir):
    return tiny_model_dir("llama-gqa")


@pytest.fixture(scope="module")
def plain(tiny_path):
    from jaxserve.llm import LLM
    return LLM(tiny_path, **ARGS)


@pytest.fixture(scope="module")
def ngram(tiny_path):
    from jaxserve.llm import LLM
    return LLM(tiny_path, speculative_config=SPEC, **ARGS)


@pytest.fixture(scope="module")
def self_draft(tiny_path):
    """A draft model equal to the target: its greedy drafts are all accepted."""
    from jaxserve.llm import LLM
    spec = {"method": "draft_model", "model": tiny_path, "num_speculative_tokens": 3}
    return LLM(tiny_path, speculative_config=spec, **ARGS)


def _outputs(llm, prompts, params):
    return [out.outputs for out in llm.generate(prompts, params)]


def _counters(llm):
    e = llm.engine
    return e.spec_num_draft_tokens, e.spec_num_accepted_tokens


def _pool_whole(llm):
    bm = llm.engine.block_manager
    assert not llm.engine.has_unfinished_requests()
    assert bm.num_free_pages == bm.num_pages


def _assert_same(got, want, logprobs: bool):
    for g_seqs, w_seqs in zip(got, want, strict=True):
        for g, w in zip(g_seqs, w_seqs, strict=True):
            assert g.token_ids == w.token_ids and g.finish_reason == w.finish_reason
            if not logprobs or w.logprobs is None:
                assert g.logprobs is None or not logprobs
                continue
            assert len(g.logprobs) == len(w.logprobs) == len(w.token_ids)
            for token, g_entry, w_entry in zip(w.token_ids, g.logprobs, w.logprobs):
                assert set(g_entry) == set(w_entry) and token in g_entry
                for t in w_entry:
                    assert g_entry[t] == pytest.approx(w_entry[t], abs=1e-4)
            assert g.cumulative_logprob == pytest.approx(w.cumulative_logprob, abs=1e-3)


def _oracle_run(llm, prompts, params, reference) -> tuple[int, int]:
    """Generate again with a proposer of the reference continuations (k = SPEC's) and check
    the outputs equal the reference; returns (drafted, accepted) tokens of that run."""
    engine, saved = llm.engine, llm.engine.proposer
    engine.proposer = OracleProposer(3, {tuple(p): list(r[0].token_ids)
                                         for p, r in zip(prompts, reference)})
    try:
        before = _counters(llm)
        _assert_same(_outputs(llm, prompts, params), reference, logprobs=True)
        drafted, accepted = (a - b for a, b in zip(_counters(llm), before))
    finally:
        engine.proposer = saved
    return drafted, accepted


# -- the grammar's share: which drafts a constrained sequence verifies, and its masks ---------

@pytest.fixture(scope="module")
def compiler(tiny_path):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_path)
    return GrammarCompiler(tok, len(tok), [tok.eos_token_id]), tok


def test_drafts_stop_short_of_finishing_the_grammar(compiler):
    grammar, tok = compiler
    eos = tok.eos_token_id
    green = tok.encode("green", add_special_tokens=False)
    m = grammar.new_matcher(S(choice=["red", "green"]))
    # the token completing "green" ends the grammar: it is left for the step to sample
    assert draft_prefix(m, green + [eos]) == green[:-1]
    assert m.validate_tokens(green) == len(green)  # the matcher is where it was
    abcd = tok.encode("abcd", add_special_tokens=False)
    m = grammar.new_matcher(S(regex="ab(cd)*"))
    assert draft_prefix(m, abcd + [eos, eos]) == abcd  # accepting, not finished; EOS finishes
    bad = next(t for t in range(len(tok)) if m.validate_tokens([t]) == 0)
    assert draft_prefix(m, [bad] + abcd) == []
    assert draft_prefix(m, abcd[:1] + [bad]) == abcd[:1]
    for t in abcd:
        assert m.consume_token(t)
    assert not m.is_stopped()
    assert m.consume_token(eos) and m.is_stopped()
    assert draft_prefix(m, [eos]) == []  # finished: nothing to draft, nothing consumed
    m.rollback(1)
    assert not m.is_stopped()


def test_masks_along_drafts_are_the_masks_after_each_draft(compiler):
    grammar, tok = compiler
    abcd = tok.encode("abcdcd", add_special_tokens=False)
    spec = S(regex="ab(cd)*")
    m, other = grammar.new_matcher(spec), grammar.new_matcher(S(choice=["red", "green"]))
    masks = grammar.fill_bitmasks_along([m, other], [abcd, []])
    assert masks[0].shape[0] == len(abcd) + 1 and masks[1].shape[0] == 1
    fresh = grammar.new_matcher(spec)
    for depth in range(len(abcd) + 1):
        assert (masks[0][depth] == grammar.fill_bitmasks([fresh])[0]).all(), depth
        if depth < len(abcd):
            fresh.consume_token(abcd[depth])
    assert (masks[1][0] == grammar.fill_bitmasks([grammar.new_matcher(
        S(choice=["red", "green"]))])[0]).all()
    assert m.validate_tokens(abcd) == len(abcd)  # rolled back


# -- n-gram speculation with extras ---------------------------------------------------------------

LOGPROBS = [SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=3),
            SamplingParams(max_tokens=24, temperature=1.0, top_k=30, seed=7, ignore_eos=True,
                           logprobs=2),
            SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True),
            SamplingParams(max_tokens=24, temperature=0.8, seed=1, ignore_eos=True, logprobs=0)]


def test_logprobs_requests_speculate_and_report_each_kept_token(plain, ngram):
    want = _outputs(plain, PROMPTS, LOGPROBS)
    before = _counters(ngram)
    _assert_same(_outputs(ngram, PROMPTS, LOGPROBS), want, logprobs=True)
    assert _counters(ngram)[0] > before[0]  # drafts were verified (the oracle's are kept)
    only_logprobs = [LOGPROBS[0]] * len(PROMPTS)
    want = _outputs(plain, PROMPTS, only_logprobs)
    drafted, accepted = _oracle_run(ngram, PROMPTS, only_logprobs, want)
    assert drafted > 0 and accepted == drafted
    assert ngram.engine.runner.compiles_since_warmup() == 0
    _pool_whole(ngram)


PENALTIES = [
    SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, repetition_penalty=1.6,
                   presence_penalty=0.8, frequency_penalty=0.6),
    SamplingParams(max_tokens=24, temperature=1.0, seed=5, ignore_eos=True,
                   frequency_penalty=1.5, min_tokens=6),
    SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, presence_penalty=2.0),
    SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True),
]


def test_penalised_requests_count_the_drafts_before_each_row(plain, ngram):
    """With the oracle every draft is accepted only if each row's penalty history holds the
    drafts before it: a row that missed them would sample another token there."""
    want = _outputs(plain, PROMPTS, PENALTIES)
    _assert_same(_outputs(ngram, PROMPTS, PENALTIES), want, logprobs=False)
    drafted, accepted = _oracle_run(ngram, PROMPTS, PENALTIES, want)
    assert drafted >= 3 * len(PROMPTS) and accepted == drafted
    _pool_whole(ngram)


CONSTRAINED = [
    SamplingParams(max_tokens=24, temperature=0.0, structured_outputs=S(regex=REGEX)),
    SamplingParams(max_tokens=24, temperature=1.0, seed=3, structured_outputs=S(regex=REGEX)),
    SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True,
                   structured_outputs=S(choice=["red", "green", "dark green", "blue"])),
    SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True,
                   structured_outputs=S(json={"type": "object", "properties": {
                       "ok": {"type": "boolean"}, "n": {"enum": [1, 2, 3]}},
                       "required": ["ok", "n"], "additionalProperties": False},
                       disable_any_whitespace=True), logprobs=1),
]


def test_constrained_requests_verify_drafts_under_their_masks(plain, ngram):
    """Oracle drafts run to the grammar's end (and EOS after it): those that would finish it
    are cut, every other is accepted, and the outputs are plain decoding's."""
    want = _outputs(plain, PROMPTS, CONSTRAINED)
    assert re.fullmatch(REGEX, want[0][0].text) and want[0][0].finish_reason == "stop"
    _assert_same(_outputs(ngram, PROMPTS, CONSTRAINED), want, logprobs=True)
    drafted, accepted = _oracle_run(ngram, PROMPTS, CONSTRAINED, want)
    assert drafted > len(PROMPTS) and accepted == drafted
    assert ngram.engine.runner.compiles_since_warmup() == 0
    _pool_whole(ngram)


# -- a draft model --------------------------------------------------------------------------------

def test_a_draft_model_speculates_for_logprobs_and_penalties_but_not_grammars(plain,
                                                                              self_draft):
    greedy = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    with_logprobs = dataclasses.replace(greedy, logprobs=2)
    want = _outputs(plain, PROMPTS, with_logprobs)
    before = _counters(self_draft)
    _assert_same(_outputs(self_draft, PROMPTS, with_logprobs), want, logprobs=True)
    drafted, accepted = (a - b for a, b in zip(_counters(self_draft), before))
    assert drafted > 0 and accepted == drafted  # the draft is the target: all accepted
    # greedy penalised requests: the draft proposes without penalties, the target's rows add
    # the drafts before them (on the device) to their history, so outputs stay plain's
    penalised = [PENALTIES[0], PENALTIES[2], PENALTIES[0], dataclasses.replace(
        PENALTIES[0], repetition_penalty=1.0, frequency_penalty=2.0)]
    want = _outputs(plain, PROMPTS, penalised)
    before = _counters(self_draft)
    _assert_same(_outputs(self_draft, PROMPTS, penalised), want, logprobs=False)
    drafted, accepted = (a - b for a, b in zip(_counters(self_draft), before))
    assert 0 < accepted < drafted
    constrained = [CONSTRAINED[0], CONSTRAINED[2], CONSTRAINED[0], CONSTRAINED[2]]
    want = _outputs(plain, PROMPTS, constrained)
    before = _counters(self_draft)
    _assert_same(_outputs(self_draft, PROMPTS, constrained), want, logprobs=False)
    assert _counters(self_draft) == before  # no drafts for grammars
    mixed = [PENALTIES[0], greedy, CONSTRAINED[0], with_logprobs]  # the others still draft
    want = _outputs(plain, PROMPTS, mixed)
    before = _counters(self_draft)
    _assert_same(_outputs(self_draft, PROMPTS, mixed), want, logprobs=True)
    assert _counters(self_draft)[1] > before[1]
    assert self_draft.engine.runner.compiles_since_warmup() == 0
    _pool_whole(self_draft)
