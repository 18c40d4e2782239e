"""Async scheduling end to end on a tiny model: with step N+1 dispatched before step N's tokens
reach the host, every request still gets what one-step-at-a-time scheduling gives it (tokens,
text, finish and stop reasons, logprobs), nothing compiles, and the pool comes back whole."""

from __future__ import annotations

import pytest

from jaxserve.engine.sampling_params import SamplingParams
from jaxserve.llm import LLM
from jaxserve.runner.compile_guard import compile_count
from test_engine import _assert_pool_whole, _prompts


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(tiny_model_dir("llama-gqa"), num_pages=128, page_size=8, max_num_seqs=8,
               max_num_batched_tokens=64, seed=0)


def _run(llm, prompts, params, *, async_scheduling):
    engine = llm.engine
    engine.async_scheduling = async_scheduling
    before = engine.num_overlapped_steps
    outs = llm.generate(prompts, params)
    _assert_pool_whole(llm)
    return outs, engine.num_overlapped_steps - before


def _mixed_params(greedy_tokens):
    """Requests that end in every way while a step is in flight, and seeded sampling."""
    stop_id = greedy_tokens[4]  # the 5th greedy token of prompt 0: a stop token id mid-stream
    return [
        SamplingParams(max_tokens=16, temperature=0.0, stop_token_ids=[stop_id]),
        SamplingParams(max_tokens=12, temperature=0.9, seed=7, logprobs=3),
        SamplingParams(max_tokens=9, temperature=0.7, top_k=20, seed=3, n=2),
        SamplingParams(max_tokens=1, temperature=0.0),
        SamplingParams(max_tokens=10, temperature=0.0, prompt_logprobs=2),
        SamplingParams(max_tokens=14, temperature=1.0, top_p=0.8, seed=11, min_tokens=6,
                       stop_token_ids=[stop_id]),
        SamplingParams(max_tokens=20, temperature=0.0, stop=["a", "e"]),
        SamplingParams(max_tokens=11, temperature=0.0, ignore_eos=True),
    ]


def _assert_same(a, b):
    assert a.prompt_token_ids == b.prompt_token_ids
    assert (a.prompt_logprobs is None) == (b.prompt_logprobs is None)
    if a.prompt_logprobs is not None:
        assert len(a.prompt_logprobs) == len(b.prompt_logprobs)
        for x, y in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:]):
            assert x.keys() == y.keys()
            assert all(abs(x[t] - y[t]) < 1e-4 for t in x)
    assert len(a.outputs) == len(b.outputs)
    for x, y in zip(a.outputs, b.outputs):
        assert (x.token_ids, x.text, x.finish_reason, x.stop_reason) == \
            (y.token_ids, y.text, y.finish_reason, y.stop_reason)
        # computed only for requests that ask for logprobs (as vLLM does)
        assert (x.cumulative_logprob is None) == (x.logprobs is None)
        assert (y.cumulative_logprob is None) == (y.logprobs is None)
        if x.logprobs is not None:
            assert abs(x.cumulative_logprob - y.cumulative_logprob) < 1e-3
            assert [e.keys() for e in x.logprobs] == [e.keys() for e in y.logprobs]


def test_async_equals_sync_on_a_mixed_workload(llm):
    prompts = _prompts(8, seed=21)
    greedy = llm.generate(prompts[:1], SamplingParams(max_tokens=8, temperature=0.0,
                                                      ignore_eos=True))[0].outputs[0].token_ids
    params = _mixed_params(greedy)
    before = compile_count()
    sync_outs, sync_overlaps = _run(llm, prompts, params, async_scheduling=False)
    async_outs, async_overlaps = _run(llm, prompts, params, async_scheduling=True)
    assert compile_count() == before
    assert sync_overlaps == 0 and async_overlaps > 0
    for a, b in zip(async_outs, sync_outs):
        _assert_same(a, b)
    # the workload really ends requests while a step is in flight
    first = async_outs[0].outputs[0]
    assert first.finish_reason == "stop" and first.stop_reason == greedy[4]
    assert len(async_outs[3].outputs[0].token_ids) == 1
    assert len(async_outs[5].outputs[0].token_ids) >= 6


def test_penalties_run_one_step_at_a_time(llm):
    prompts = _prompts(3, seed=22)
    params = SamplingParams(max_tokens=10, temperature=0.0, repetition_penalty=1.3,
                            ignore_eos=True)
    sync_outs, _ = _run(llm, prompts, params, async_scheduling=False)
    async_outs, overlaps = _run(llm, prompts, params, async_scheduling=True)
    assert overlaps == 0  # penalties read every output token on the host
    for a, b in zip(async_outs, sync_outs):
        _assert_same(a, b)


def test_abort_with_the_next_step_in_flight(llm):
    engine = llm.engine
    engine.async_scheduling = True
    keep, gone = _prompts(2, seed=23)
    engine.add_request("keep", keep, SamplingParams(max_tokens=12, temperature=0.0,
                                                    ignore_eos=True))
    engine.add_request("gone", gone, SamplingParams(max_tokens=100, ignore_eos=True))
    for _ in range(3):
        engine.step()
    assert engine._in_flight is not None  # the next step is already on the device
    final = engine.abort_request("gone")
    assert final.finished and final.outputs[0].finish_reason == "abort"
    assert "gone" not in engine.scheduler.requests
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            done[out.request_id] = out
    assert "gone" not in done  # its in-flight token was dropped, not reported
    alone, _ = _run(llm, [keep], SamplingParams(max_tokens=12, temperature=0.0,
                                                ignore_eos=True), async_scheduling=False)
    assert done["keep"].outputs[0].token_ids == alone[0].outputs[0].token_ids
    _assert_pool_whole(llm)
