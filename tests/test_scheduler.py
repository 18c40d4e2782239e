"""Scheduler and Request stop rules, driven by a fake paged "model" (no jax, no weights).

FakeModel stores each fed token in the slot its page table names, as the real step stores K/V,
and "samples" a hash of the context it reads back through the page table. A wrong page table,
a stale prefix-cache hit or a bad recompute after preemption therefore changes the tokens,
which are checked against a one-request-at-a-time reference.
"""

from __future__ import annotations

import random
import subprocess
import sys

import pytest

from jaxserve.engine.block_manager import BlockManager
from jaxserve.engine.request import Request, RequestStatus
from jaxserve.engine.sampling_params import SamplingParams
from jaxserve.engine.scheduler import RequestRejectedError, Scheduler

VOCAB = 64
EOS = 0


def next_token(context):
    h = 17
    for token in context:
        h = (h * 1_000_003 + token + 1) % (2**61 - 1)
    return h % VOCAB


class FakeModel:
    def __init__(self, num_pages, page_size):
        self.page_size = page_size
        self.slots = [[None] * page_size for _ in range(num_pages)]

    def step(self, out):
        ps = self.page_size
        sampled = {}
        for seq in out.scheduled:
            assert len(seq.token_ids) == seq.num_new_tokens >= 1
            assert len(seq.page_ids) * ps >= seq.end_pos
            for i, token in enumerate(seq.token_ids):
                pos = seq.start_pos + i
                self.slots[seq.page_ids[pos // ps]][pos % ps] = token
        for seq in out.scheduled:  # read after every write, like one fused step
            if seq.sample:
                context = [self.slots[seq.page_ids[p // ps]][p % ps] for p in range(seq.end_pos)]
                sampled[seq.request_id] = next_token(context)
        return sampled


def make_request(request_id, prompt, max_tokens=8, **params):
    params.setdefault("ignore_eos", True)
    return Request(request_id, list(prompt), SamplingParams(max_tokens=max_tokens, **params),
                   eos_token_ids=EOS)


def reference_output(request, max_model_len):
    """The same request generated alone, straight from next_token."""
    alone = Request("ref", request.prompt_token_ids, request.sampling_params,
                    eos_token_ids=request.eos_token_ids)
    while not alone.append_output_token(next_token(alone.all_token_ids), max_model_len):
        pass
    return alone.output_token_ids, alone.finish_reason


def make_scheduler(num_pages=64, page_size=4, max_num_seqs=8, max_num_batched_tokens=64,
                   max_model_len=256, enable_prefix_caching=True):
    bm = BlockManager(num_pages, page_size, enable_prefix_caching)
    sched = Scheduler(bm, max_num_seqs, max_num_batched_tokens, max_model_len)
    return sched, FakeModel(num_pages, page_size)


def step(sched, model):
    out = sched.schedule()
    return out, sched.update_from_output(out, model.step(out))


def run_to_completion(sched, model, max_steps=20_000, arrivals=None, on_step=None):
    """Step until every request finished; check the budget, limits and pool after every step."""
    finished = {}
    arrivals = dict(arrivals or {})  # step -> requests to add then
    for step_index in range(max_steps):
        for request in arrivals.pop(step_index, []):
            sched.add_request(request)
        if not sched.has_unfinished_requests() and not arrivals:
            return finished
        out = sched.schedule()
        assert out.num_scheduled_tokens == sum(s.num_new_tokens for s in out.scheduled)
        assert out.num_scheduled_tokens <= sched.max_num_batched_tokens
        assert out.num_seqs <= sched.max_num_seqs and sched.num_running <= sched.max_num_seqs
        assert len({s.request_id for s in out.scheduled}) == out.num_seqs
        if sched.has_unfinished_requests():
            assert not out.is_empty, "no progress while requests wait: deadlock"
        for request in sched.update_from_output(out, model.step(out)):
            if request.is_finished:
                finished[request.request_id] = request
        sched.block_manager.check_invariants(sched.running)
        if on_step:
            on_step(step_index, out)
    raise AssertionError(f"not done after {max_steps} steps")


def assert_pool_whole(sched):
    bm = sched.block_manager
    bm.check_invariants([])
    assert bm.num_free_pages == bm.num_pages and bm.usage == 0.0


def test_stop_tokens_eos_and_min_tokens():
    r = make_request("a", [1, 2], max_tokens=10, ignore_eos=False)
    assert not r.append_output_token(5) and r.append_output_token(EOS)
    assert r.finish_reason == "stop" and r.stop_reason is None and r.status == RequestStatus.FINISHED_STOPPED
    r = make_request("b", [1, 2], max_tokens=10, ignore_eos=True)
    assert not r.append_output_token(EOS)
    r = make_request("c", [1], max_tokens=10, stop_token_ids=[7], min_tokens=2)
    assert not r.append_output_token(7)  # below min_tokens: kept as an ordinary token
    assert r.append_output_token(7)
    assert r.finish_reason == "stop" and r.stop_reason == 7
    r = make_request("d", [1], max_tokens=10, min_tokens=3, ignore_eos=False)
    assert not r.append_output_token(EOS) and not r.append_output_token(EOS)
    assert r.append_output_token(EOS)


def test_length_caps():
    r = make_request("a", [1, 2, 3], max_tokens=2)
    assert not r.append_output_token(5)
    assert r.append_output_token(5) and r.finish_reason == "length" and r.stop_reason is None
    r = make_request("b", [1, 2, 3], max_tokens=None)
    assert not r.append_output_token(5, max_model_len=5)
    assert r.append_output_token(5, max_model_len=5) and r.finish_reason == "length"
    assert r.num_tokens == 5 and r.all_token_ids == [1, 2, 3, 5, 5]
    # A stop token sampled as the last allowed token reports what happened: "stop".
    r = make_request("c", [1], max_tokens=1, stop_token_ids=[9])
    assert r.append_output_token(9) and r.finish_reason == "stop" and r.stop_reason == 9


def test_rejects_requests_that_can_never_run():
    sched, _ = make_scheduler(num_pages=4, page_size=4, max_model_len=64)
    with pytest.raises(RequestRejectedError, match="maximum context length") as err:
        sched.add_request(make_request("long", range(65)))
    assert err.value.param == "prompt"
    with pytest.raises(RequestRejectedError, match="whole cache holds 16") as err:
        sched.add_request(make_request("big", range(10), max_tokens=20))
    assert err.value.param == "max_tokens"
    with pytest.raises(RequestRejectedError, match="empty"):
        sched.add_request(make_request("empty", []))
    sched.add_request(make_request("fits", range(10), max_tokens=7))  # 16 KV tokens at most
    with pytest.raises(RequestRejectedError, match="already in use"):
        sched.add_request(make_request("fits", range(3)))
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        Scheduler(BlockManager(8, 4), max_num_seqs=16, max_num_batched_tokens=8, max_model_len=32)


def test_engine_modules_do_not_import_jax():
    code = ("import sys; import jaxserve.engine.scheduler, jaxserve.engine.request, "
            "jaxserve.engine.block_manager; assert 'jax' not in sys.modules, 'jax imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_chunked_prefill_then_decode():
    sched, model = make_scheduler(num_pages=64, page_size=16, max_num_batched_tokens=32)
    request = make_request("a", range(100), max_tokens=3)
    sched.add_request(request)
    chunks = []
    for _ in range(4):
        out, _ = step(sched, model)
        (seq,) = out.scheduled
        chunks.append((seq.start_pos, seq.num_new_tokens, seq.sample, seq.is_prefill))
        assert seq.token_ids == list(range(seq.start_pos, seq.end_pos))
    assert chunks == [(0, 32, False, True), (32, 32, False, True), (64, 32, False, True),
                      (96, 4, True, True)]
    assert request.num_output_tokens == 1 and request.num_computed_tokens == 100
    out, _ = step(sched, model)
    (seq,) = out.scheduled
    assert (seq.start_pos, seq.num_new_tokens, seq.sample, seq.is_prefill) == (100, 1, True, False)
    assert seq.token_ids == [request.output_token_ids[0]]
    step(sched, model)
    assert request.finish_reason == "length"
    assert request.output_token_ids == reference_output(request, 256)[0]
    assert_pool_whole(sched)


def test_decodes_before_prefills():
    sched, model = make_scheduler(num_pages=64, page_size=4, max_num_batched_tokens=16)
    long = make_request("long", range(40), max_tokens=2)  # older, still in chunked prefill
    short = make_request("short", range(100, 103), max_tokens=5)
    sched.add_request(long)
    sched.add_request(short)
    for _ in range(2):
        out, _ = step(sched, model)
        assert [(s.request_id, s.num_new_tokens) for s in out.scheduled] == [("long", 16)]  # FCFS
    out, _ = step(sched, model)
    assert [(s.request_id, s.num_new_tokens) for s in out.scheduled] == [("long", 8), ("short", 3)]
    late = make_request("late", range(200, 220), max_tokens=2)
    sched.add_request(late)
    out, _ = step(sched, model)
    # Decodes (both now have a sampled token pending) first, then the waiting prompt.
    assert [(s.request_id, s.num_new_tokens) for s in out.scheduled] == [
        ("long", 1), ("short", 1), ("late", 14)]


def test_token_budget_respected_with_many_prompts():
    sched, model = make_scheduler(num_pages=256, page_size=4, max_num_seqs=16,
                                  max_num_batched_tokens=24)
    requests = [make_request(f"r{i}", range(i, i + 5 + 7 * i), max_tokens=4) for i in range(12)]
    budgets = []
    finished = run_to_completion(sched, model, arrivals={0: requests},
                                 on_step=lambda i, out: budgets.append(out.num_scheduled_tokens))
    assert max(budgets) == 24  # run_to_completion checks it is never exceeded
    for r in requests:
        assert finished[r.request_id].output_token_ids == reference_output(r, 256)[0]
    assert_pool_whole(sched)


def test_max_num_seqs_respected():
    sched, model = make_scheduler(num_pages=256, max_num_seqs=3, max_num_batched_tokens=64)
    requests = [make_request(f"r{i}", range(i, i + 6), max_tokens=5) for i in range(10)]
    counts = []
    finished = run_to_completion(sched, model, arrivals={0: requests},
                                 on_step=lambda i, out: counts.append(out.num_seqs))
    assert max(counts) == 3 and len(finished) == 10


def test_prefix_hit_skips_cached_pages():
    sched, model = make_scheduler(num_pages=64, page_size=4, max_num_batched_tokens=64)
    shared = list(range(30, 42))  # 3 full pages
    first = make_request("first", shared + [1, 2], max_tokens=2)
    run_to_completion(sched, model, arrivals={0: [first]})
    second = make_request("second", shared + [5, 6, 7], max_tokens=3)
    sched.add_request(second)
    out, _ = step(sched, model)
    (seq,) = out.scheduled
    assert seq.start_pos == 12 and seq.num_new_tokens == 3 and seq.token_ids == [5, 6, 7]
    assert second.num_cached_tokens == 12
    bm = sched.block_manager
    assert bm.prefix_hits == 12 and bm.prefix_queries == first.num_prompt_tokens + second.num_prompt_tokens
    run_to_completion(sched, model)
    assert second.output_token_ids == reference_output(second, 256)[0]
    assert_pool_whole(sched)


def test_preemption_under_tiny_pool_matches_unpressured_run():
    shared = [5, 9, 2, 33, 17, 8, 41, 12, 3]

    def workload():  # prompts share prefixes of various lengths, so cached pages get evicted
        return [make_request(f"r{i}", shared[:cut] + [(7 * i + j) % VOCAB for j in range(4 + i)],
                             max_tokens=12 + i) for i, cut in enumerate([3, 8, 0, 5, 9, 1, 4, 8])]

    relaxed, relaxed_model = make_scheduler(num_pages=512, page_size=4, max_num_seqs=8)
    baseline = run_to_completion(relaxed, relaxed_model, arrivals={0: workload()})
    assert relaxed.num_preemptions == 0

    tight, tight_model = make_scheduler(num_pages=12, page_size=4, max_num_seqs=8,
                                        max_num_batched_tokens=16)
    requests = workload()
    finished = run_to_completion(tight, tight_model, arrivals={0: requests})
    assert tight.num_preemptions > 0
    assert any(r.num_preemptions for r in requests)
    assert set(finished) == set(baseline)
    for request_id, request in finished.items():
        assert request.output_token_ids == baseline[request_id].output_token_ids
        assert request.output_token_ids == reference_output(request, 256)[0]
    assert tight.num_running == tight.num_waiting == 0
    assert_pool_whole(tight)


def test_preempted_request_goes_back_ahead_of_later_arrivals():
    sched, model = make_scheduler(num_pages=6, page_size=4, max_num_seqs=4,
                                  max_num_batched_tokens=32)
    a = make_request("a", range(8), max_tokens=14)   # grows to 6 pages
    b = make_request("b", range(50, 58), max_tokens=8)  # grows to 4 pages
    sched.add_request(a)
    sched.add_request(b)
    preempted = []
    for _ in range(10):  # both hold 3 pages after 5 steps; the 6th step needs 2 more
        out, _ = step(sched, model)
        preempted = out.preempted_ids
        if preempted:
            break
    assert preempted == ["b"]  # the most recent arrival, never the older one
    assert b.status == RequestStatus.PREEMPTED and b.page_ids == [] and b.num_computed_tokens == 0
    c = make_request("c", range(90, 92), max_tokens=1)
    sched.add_request(c)
    assert [r.request_id for r in sched.waiting] == ["b", "c"]
    run_to_completion(sched, model)
    assert b.output_token_ids == reference_output(b, 256)[0]
    assert_pool_whole(sched)


def test_abort_mid_decode_frees_pages():
    sched, model = make_scheduler(num_pages=32, page_size=4)
    a = make_request("a", range(10), max_tokens=50)
    b = make_request("b", range(20, 30), max_tokens=50)
    sched.add_request(a)
    sched.add_request(b)
    for _ in range(3):
        step(sched, model)
    assert a.num_output_tokens == 3 and a.page_ids
    out = sched.schedule()  # a step in flight when the abort arrives
    assert sched.abort_request("a") is a
    assert a.finish_reason == "abort" and a.page_ids == [] and a.is_finished
    sched.block_manager.check_invariants(sched.running)
    updated = sched.update_from_output(out, model.step(out))
    assert [r.request_id for r in updated] == ["b"] and a.num_output_tokens == 3
    assert sched.abort_request("a") is None  # already gone
    out = sched.schedule()
    assert out.finished_ids == ["a"] and [s.request_id for s in out.scheduled] == ["b"]
    sched.update_from_output(out, model.step(out))
    sched.finish_request("b", RequestStatus.FINISHED_STOPPED, stop_reason="END")  # a stop string
    assert (b.finish_reason, b.stop_reason) == ("stop", "END") and not sched.requests
    assert_pool_whole(sched)


def test_aborted_waiting_request_never_runs():
    sched, model = make_scheduler(max_num_seqs=1)
    first = make_request("first", range(5), max_tokens=3)
    doomed = make_request("doomed", range(5, 9), max_tokens=3)
    sched.add_request(first)
    sched.add_request(doomed)
    seen = set()
    step(sched, model)
    assert sched.abort_request("doomed") is doomed and doomed.finish_reason == "abort"
    run_to_completion(sched, model, on_step=lambda i, out: seen.update(
        s.request_id for s in out.scheduled))
    assert "doomed" not in seen and doomed.num_output_tokens == 0
    assert first.finish_reason == "length"


def test_forked_request_starts_after_shared_pages():
    """n > 1 samples: admission forks a prefilled parent's pages; the child skips them."""
    sched, model = make_scheduler(num_pages=32, page_size=4)
    parent = make_request("p", range(10), max_tokens=4)
    sched.add_request(parent)
    step(sched, model)  # prefill; parent.num_computed_tokens == 10
    child = make_request("c", range(10), max_tokens=4)
    child.shares_prompt_with = parent
    sched.add_request(child, arrived_with=parent)
    sched.block_manager.check_invariants([parent, child])
    out, _ = step(sched, model)
    assert [(s.request_id, s.start_pos, s.num_new_tokens) for s in out.scheduled] == [
        ("p", 10, 1), ("c", 8, 2)]
    assert out.scheduled[1].page_ids[:2] == parent.page_ids[:2]
    run_to_completion(sched, model)
    assert child.output_token_ids == reference_output(child, 256)[0]
    assert_pool_whole(sched)


def test_eos_finishes_and_max_model_len_caps():
    sched, model = make_scheduler(max_model_len=20)
    prompts = [[i, i + 1, i + 2] for i in range(1, 40, 3)]
    requests = [make_request(f"r{i}", p, max_tokens=None, ignore_eos=False)
                for i, p in enumerate(prompts)]
    finished = run_to_completion(sched, model, arrivals={0: requests})
    for r in requests:
        assert (finished[r.request_id].output_token_ids, r.finish_reason) == reference_output(r, 20)
        assert r.num_tokens <= 20
    assert {r.finish_reason for r in requests} == {"stop", "length"}  # both paths are exercised


def random_case(rng):
    """A random scheduler configuration and workload: pools from barely one request up to
    roomy, budgets from max_num_seqs up, prompts sharing prefixes, arrivals over 40 steps and
    three aborts. Returns (make_scheduler kwargs, arrivals by step, requests, aborts by step)."""
    page_size = rng.choice([1, 2, 4, 8, 16])
    max_model_len = rng.choice([32, 64, 128])
    max_num_seqs = rng.randint(1, 8)
    min_pages = -(-max_model_len // page_size)
    config = dict(num_pages=rng.randint(min_pages, 4 * min_pages), page_size=page_size,
                  max_num_seqs=max_num_seqs, max_num_batched_tokens=rng.randint(max_num_seqs, 80),
                  max_model_len=max_model_len, enable_prefix_caching=rng.random() < 0.75)
    prefixes = [[rng.randrange(1, VOCAB) for _ in range(rng.randint(1, 24))] for _ in range(3)]
    arrivals, requests = {}, []
    for i in range(rng.randint(5, 30)):
        prompt = rng.choice(prefixes)[:rng.randint(0, 24)] + [rng.randrange(VOCAB)
                                                            for _ in range(rng.randint(1, 20))]
        prompt = prompt[:max_model_len - 1]
        request = make_request(f"r{i}", prompt, max_tokens=rng.choice([None, 1, 5, 20, 60]),
                               ignore_eos=rng.random() < 0.5, min_tokens=rng.choice([0, 0, 1]))
        arrivals.setdefault(rng.randrange(40), []).append(request)
        requests.append(request)
    aborts = {rng.randrange(60): rng.choice(requests).request_id for _ in range(3)}
    return config, arrivals, requests, aborts


def assert_random_case_done(sched, requests, finished):
    """Every request ended; the unaborted ones as if alone; the pool whole and queues empty."""
    for r in requests:
        assert r.is_finished
        if r.finish_reason == "abort":
            assert r.request_id not in finished
            continue
        out, reason = reference_output(r, sched.max_model_len)
        assert (r.output_token_ids, r.finish_reason) == (out, reason), r
    assert_pool_whole(sched)
    assert sched.num_running == sched.num_waiting == 0 and not sched.requests


@pytest.mark.parametrize("seed", range(24))
def test_random_workloads_always_finish(seed):
    config, arrivals, requests, aborts = random_case(random.Random(seed))
    sched, model = make_scheduler(**config)

    def maybe_abort(step_index, out):
        if step_index in aborts:
            sched.abort_request(aborts[step_index])

    finished = run_to_completion(sched, model, arrivals=arrivals, on_step=maybe_abort)
    assert_random_case_done(sched, requests, finished)
