"""The engine end to end on a tiny model: batching, chunked prefill, prefix hits and preemption
all give the tokens of one-request-at-a-time decoding, and the page pool is whole afterwards."""

from __future__ import annotations

import dataclasses
import random

import pytest

from jaxserve.engine.sampling_params import SamplingParams
from jaxserve.engine.scheduler import RequestRejectedError
from jaxserve.llm import LLM
from jaxserve.runner.compile_guard import compile_count
from jaxserve.loading import load_model
from model_driver import SingleSequenceDriver

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def _prompts(n, seed=0, shared_prefix=None):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ids = [rng.randrange(3, 384) for _ in range(rng.randrange(1, 40))]
        out.append((shared_prefix or []) + ids)
    return out


@pytest.fixture(scope="module")
def model_path(tiny_model_dir):
    return tiny_model_dir("llama-gqa")


@pytest.fixture(scope="module")
def expected(model_path):
    """Greedy continuations computed one request at a time by the bare model."""
    driver = SingleSequenceDriver(load_model(model_path), max_len=512)
    cache = {}

    def get(prompt, n=GREEDY.max_tokens):
        key = (tuple(prompt), n)
        if key not in cache:
            cache[key] = driver.greedy(prompt, n)
        return cache[key]

    return get


def _llm(model_path, **kw):
    args = dict(num_pages=128, page_size=8, max_num_seqs=8, max_num_batched_tokens=64, seed=0)
    args.update(kw)
    return LLM(model_path, **args)


def _assert_pool_whole(llm):
    engine = llm.engine
    assert not engine.has_unfinished_requests()
    engine.block_manager.check_invariants([])
    bm = engine.block_manager
    assert bm.num_free_pages == bm.num_pages  # cached pages count as free (evictable)


@pytest.fixture(scope="module")
def llm(model_path):
    return _llm(model_path)


def test_batched_equals_one_at_a_time_and_no_compiles(llm, expected):
    prompts = _prompts(16, seed=1)
    before = compile_count()
    outs = llm.generate(prompts, GREEDY)
    assert compile_count() == before  # every shape was compiled at warm-up
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == expected(prompt)
        assert out.outputs[0].finish_reason == "length"
    _assert_pool_whole(llm)


def test_staggered_arrivals(llm, expected):
    """Requests join while others decode (continuous batching)."""
    engine = llm.engine
    prompts = _prompts(16, seed=2)
    before = compile_count()
    pending = list(enumerate(prompts))
    done = {}
    while pending or engine.has_unfinished_requests():
        for _ in range(2):
            if pending:
                i, p = pending.pop(0)
                engine.add_request(f"stagger-{i}", p, GREEDY)
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    assert compile_count() == before
    for i, p in enumerate(prompts):
        assert done[f"stagger-{i}"].outputs[0].token_ids == expected(p)
    _assert_pool_whole(llm)


def test_shared_prefixes_hit_the_cache(llm, expected):
    bm = llm.engine.block_manager
    prefix = _prompts(1, seed=3)[0][:5] * 6  # 30 tokens: 3 full pages of 8
    prompts = _prompts(6, seed=4, shared_prefix=prefix)
    hits_before = bm.prefix_hits
    first = llm.generate(prompts[:1], GREEDY)
    rest = llm.generate(prompts[1:], GREEDY)
    assert bm.prefix_hits - hits_before >= 5 * 24
    for prompt, out in zip(prompts, first + rest):
        assert out.outputs[0].token_ids == expected(prompt)
    _assert_pool_whole(llm)


def test_small_budget_forces_chunked_prefill(model_path, expected):
    llm = _llm(model_path, max_num_batched_tokens=16, max_num_seqs=4)
    prompts = [p + p for p in _prompts(6, seed=5)]  # up to 78 tokens, budget 16
    outs = llm.generate(prompts, GREEDY)
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == expected(prompt)
    _assert_pool_whole(llm)


def test_tiny_pool_forces_preemption(model_path, expected):
    # 128 pages of 8 hold 1024 tokens; 8 running requests growing to ~220 tokens cannot all fit
    llm = _llm(model_path, enable_prefix_caching=False)
    prompts = _prompts(10, seed=6)
    params = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
    outs = llm.generate(prompts, params)
    assert llm.engine.scheduler.num_preemptions > 0
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == expected(prompt, 200)
    _assert_pool_whole(llm)


def test_abort_mid_decode_frees_pages(llm):
    engine = llm.engine
    engine.add_request("to-abort", _prompts(1, seed=7)[0], SamplingParams(max_tokens=100,
                                                                          ignore_eos=True))
    engine.add_request("to-keep", _prompts(1, seed=8)[0], GREEDY)
    for _ in range(3):
        engine.step()
    engine.abort_request("to-abort")
    assert "to-abort" not in engine.scheduler.requests
    while engine.has_unfinished_requests():
        engine.step()
    _assert_pool_whole(llm)


@pytest.mark.parametrize("prompt,params,param", [
    ([], GREEDY, "prompt"),
    ([1] * 600, GREEDY, "input_tokens"),
    ([1] * 10, SamplingParams(max_tokens=505), "max_tokens"),
    ([1, 2, 9999], GREEDY, "prompt"),
])
def test_bad_requests_are_rejected_and_engine_keeps_serving(llm, expected, prompt, params, param):
    with pytest.raises(RequestRejectedError) as err:
        llm.engine.add_request("bad", prompt, params)
    assert err.value.param == param
    ok = _prompts(1, seed=9)[0]
    assert llm.generate([ok], GREEDY)[0].outputs[0].token_ids == expected(ok)
    _assert_pool_whole(llm)


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_n_samples_prefill_the_prompt_once(model_path, prefix_caching):
    """n = 4 computes the prompt's K/V once: the other samples fork its full pages and compute
    only the partial last page (21 tokens, pages of 8: 16 shared, 5 each)."""
    llm = _llm(model_path, enable_prefix_caching=prefix_caching)
    prompt = [3 + (7 * i) % 300 for i in range(21)]
    scheduler = llm.engine.scheduler
    params = SamplingParams(max_tokens=6, temperature=1.0, seed=3, ignore_eos=True)

    before = scheduler.num_prompt_tokens_computed
    (one,) = llm.generate([prompt], params)
    computed_one = scheduler.num_prompt_tokens_computed - before
    llm.engine.block_manager.reset_prefix_cache()  # n = 4 must not reuse the n = 1 pages

    before = scheduler.num_prompt_tokens_computed
    (four,) = llm.generate([prompt], dataclasses.replace(params, n=4))
    computed_four = scheduler.num_prompt_tokens_computed - before

    assert computed_one == 21
    assert computed_four == 21 + 3 * 5
    # the shared pages hold the right K/V: sample i equals a lone request seeded seed + i
    assert four.outputs[0].token_ids == one.outputs[0].token_ids
    for i, out in enumerate(four.outputs):
        (alone,) = llm.generate([prompt], dataclasses.replace(params, seed=3 + i))
        assert out.token_ids == alone.outputs[0].token_ids
    _assert_pool_whole(llm)


def test_abort_n_samples_before_they_are_scheduled(llm):
    """Aborting an n > 1 request while only sample 0 is in the scheduler finishes them all."""
    engine = llm.engine
    engine.add_request("n-abort", _prompts(1, seed=11)[0] * 3,
                       SamplingParams(n=3, max_tokens=50, ignore_eos=True))
    final = engine.abort_request("n-abort")
    assert final.finished and [o.finish_reason for o in final.outputs] == ["abort"] * 3
    assert not engine.has_unfinished_requests()
    _assert_pool_whole(llm)
