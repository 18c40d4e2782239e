"""Async scheduling in the scheduler: step N+1 is scheduled before step N's tokens are known.

The driver below keeps one step "on the device" like the engine does: schedule N+1, run it on
the fake model (which reads the placeholder token from step N's samples, as the device gathers
it), and only then apply step N. Outputs must equal the one-request-at-a-time reference, pages
must come back whole, and no step may compute past a request's length limits.
"""

from __future__ import annotations

import random

import pytest

from jaxserve.engine.request import RequestStatus
from jaxserve.engine.scheduler import PLACEHOLDER
from test_scheduler import (FakeModel, assert_pool_whole, assert_random_case_done,
                            make_request, make_scheduler, random_case, reference_output)


class PipelinedFakeModel(FakeModel):
    """FakeModel whose placeholder tokens come from the previous step's samples."""

    def __init__(self, num_pages, page_size):
        super().__init__(num_pages, page_size)
        self.previous: dict[str, int] = {}
        self.placeholders_fed = 0

    def step(self, out):
        for seq in out.scheduled:
            if PLACEHOLDER in seq.token_ids:
                # only the newest token can be in flight, and only the step before samples it
                assert seq.token_ids.index(PLACEHOLDER) == len(seq.token_ids) - 1
                seq.token_ids[-1] = self.previous[seq.request_id]
                self.placeholders_fed += 1
        self.previous = super().step(out)
        return self.previous


def run_pipelined(sched, model, arrivals=None, on_step=None, max_steps=20_000):
    """Like run_to_completion, with one step always in flight."""
    finished = {}
    arrivals = dict(arrivals or {})
    in_flight = None  # (SchedulerOutput, sampled ids) of the step the "device" ran last
    for step_index in range(max_steps):
        for request in arrivals.pop(step_index, []):
            sched.add_request(request)
        if not sched.has_unfinished_requests() and not arrivals and in_flight is None:
            return finished
        out = sched.schedule()
        assert out.num_scheduled_tokens <= sched.max_num_batched_tokens
        assert out.num_seqs <= sched.max_num_seqs
        for seq in out.scheduled:  # never compute past what a request may hold
            assert seq.end_pos <= sched.max_kv_tokens(seq.request)
        sampled = model.step(out) if out.scheduled else None
        if out.is_empty and in_flight is None:
            assert not sched.has_unfinished_requests(), "no progress while requests wait"
        if in_flight is not None:
            for request in sched.update_from_output(*in_flight):
                if request.is_finished:
                    finished[request.request_id] = request
        in_flight = (out, sampled) if out.scheduled else None
        sched.block_manager.check_invariants(sched.running)
        if on_step:
            on_step(step_index, out)
    raise AssertionError(f"not done after {max_steps} steps")


def test_decodes_feed_the_token_in_flight():
    sched, _ = make_scheduler(num_pages=64, page_size=4)
    model = PipelinedFakeModel(64, 4)
    requests = [make_request(f"r{i}", range(3 * i, 3 * i + 5 + i), max_tokens=9) for i in range(4)]
    finished = run_pipelined(sched, model, arrivals={0: requests})
    assert set(finished) == {r.request_id for r in requests}
    for r in requests:
        assert (r.output_token_ids, r.finish_reason) == reference_output(r, 256)
        assert r.num_output_placeholders == 0
    # the prefill samples token 1; each of the 8 decodes reads its input from the device
    assert model.placeholders_fed == len(requests) * 8
    assert_pool_whole(sched)


def test_updates_must_come_in_schedule_order():
    sched, _ = make_scheduler()
    model = PipelinedFakeModel(64, 4)
    sched.add_request(make_request("a", range(6), max_tokens=5))
    first = sched.schedule()
    first_ids = model.step(first)
    second = sched.schedule()
    assert second.scheduled[0].token_ids == [PLACEHOLDER]
    with pytest.raises(RuntimeError, match="in the order"):
        sched.update_from_output(second, model.step(second))
    sched.update_from_output(first, first_ids)
    with pytest.raises(RuntimeError, match="in the order"):
        sched.update_from_output(first, first_ids)  # twice


def test_max_tokens_stops_scheduling_before_the_last_token_is_known():
    sched, _ = make_scheduler()
    model = PipelinedFakeModel(64, 4)
    request = make_request("a", range(6), max_tokens=2)
    sched.add_request(request)
    first = sched.schedule()
    ids = model.step(first)
    second = sched.schedule()  # decode for token 2 of 2, fed from the device
    assert [s.num_new_tokens for s in second.scheduled] == [1]
    ids2 = model.step(second)
    assert sched.schedule().is_empty  # both tokens are in flight: nothing left to compute
    sched.update_from_output(first, ids)
    sched.update_from_output(second, ids2)
    assert request.finish_reason == "length" and request.num_output_tokens == 2
    assert_pool_whole(sched)


def test_eos_in_flight_drops_the_next_steps_token():
    """A stop the host sees only after the next step was issued: that step's token is dropped."""
    sched, _ = make_scheduler()
    model = PipelinedFakeModel(64, 4)
    request = make_request("a", range(6), max_tokens=20, ignore_eos=False)
    sched.add_request(request)
    first = sched.schedule()
    model.step(first)
    second = sched.schedule()
    ids2 = model.step(second)
    updated = sched.update_from_output(first, {"a": 0})  # EOS, as if the model sampled it
    assert updated == [request] and request.finish_reason == "stop"
    assert request.page_ids == [] and not sched.running
    assert sched.update_from_output(second, ids2) == []  # finished meanwhile: dropped
    assert request.output_token_ids == [0]
    assert_pool_whole(sched)


def test_preempted_in_flight_request_resamples_its_token():
    sched, _ = make_scheduler(num_pages=6, page_size=2, max_num_seqs=2)
    model = PipelinedFakeModel(6, 2)
    old = make_request("old", range(4), max_tokens=8)
    new = make_request("new", range(10, 14), max_tokens=8)
    finished = run_pipelined(sched, model, arrivals={0: [old], 1: [new]})
    assert sched.num_preemptions > 0 and new.num_preemptions > 0
    for r in (old, new):
        assert finished[r.request_id] is r
        assert (r.output_token_ids, r.finish_reason) == reference_output(r, 256)
    assert_pool_whole(sched)


def test_abort_with_a_step_in_flight():
    sched, _ = make_scheduler(num_pages=32, page_size=4)
    model = PipelinedFakeModel(32, 4)
    a = make_request("a", range(10), max_tokens=50)
    b = make_request("b", range(20, 30), max_tokens=50)

    def abort_a(step_index, out):
        if step_index == 4:
            assert sched.abort_request("a") is a and a.page_ids == []

    finished = run_pipelined(sched, model, arrivals={0: [a, b]}, on_step=abort_a)
    assert a.status == RequestStatus.FINISHED_ABORTED and "a" not in finished
    assert 2 <= a.num_output_tokens <= 4
    assert (b.output_token_ids, b.finish_reason) == reference_output(b, 256)
    assert_pool_whole(sched)


@pytest.mark.parametrize("seed", range(24))
def test_random_workloads_pipelined(seed):
    config, arrivals, requests, aborts = random_case(random.Random(1000 + seed))
    sched, _ = make_scheduler(**config)
    model = PipelinedFakeModel(config["num_pages"], config["page_size"])

    def maybe_abort(step_index, out):
        if step_index in aborts:
            sched.abort_request(aborts[step_index])

    finished = run_pipelined(sched, model, arrivals=arrivals, on_step=maybe_abort)
    assert_random_case_done(sched, requests, finished)
    assert model.placeholders_fed > 0
