"""The engine/runner step contract (engine/step_plan.py): in-flight references, the features a
plan asks for, and a plan packed by the runner's batch packer."""

from __future__ import annotations

import numpy as np
import pytest

from jaxserve.engine.sampling_params import SamplingParams
from jaxserve.engine.step_plan import (PLACEHOLDER, SequenceSampling, StepFeatures, StepPlan,
                                       StepSequence, in_flight_ref, in_flight_slot)


def _seq(tokens, start=0, params=SamplingParams(), targets=None):
    return StepSequence(list(tokens), start, [0, 1, 2, 3],
                        SequenceSampling(params, [1, 2], [], salt=7), targets)


def test_in_flight_refs_round_trip_and_never_look_like_the_placeholder():
    for slot in (0, 1, 31, 2 ** 20 - 1):
        ref = in_flight_ref(slot)
        assert ref < 0 and ref != PLACEHOLDER and in_flight_slot(ref) == slot
    assert in_flight_slot(PLACEHOLDER) is None  # not slot 0, not any slot
    assert in_flight_slot(0) is None and in_flight_slot(12345) is None
    with pytest.raises(ValueError):
        in_flight_ref(-1)


def test_an_unresolved_placeholder_cannot_reach_the_device():
    with pytest.raises(ValueError, match="placeholder"):
        _seq([5, PLACEHOLDER])
    with pytest.raises(ValueError, match="one entry per token row"):
        _seq([5, 6], targets=[1])


def test_features_follow_the_sequences():
    assert StepPlan().features == StepFeatures() and not StepPlan().features.any
    plain = _seq([5])
    assert StepPlan((plain,)).features == StepFeatures()
    pen = _seq([5], params=SamplingParams(presence_penalty=0.5))
    lp = _seq([5], params=SamplingParams(logprobs=2))
    prompt = _seq([5, 6], targets=[6, -1])
    assert StepPlan((plain, pen)).features == StepFeatures(penalties=True)
    assert StepPlan((lp, plain)).features == StepFeatures(logprobs=True)
    assert StepPlan((plain, prompt)).features == StepFeatures(prompt_logprobs=True)
    plan = StepPlan((plain, prompt, lp))
    assert plan.num_tokens == 4 and plan.num_seqs == 3 and plan.features.any


def test_runner_packs_a_plan_with_in_flight_refs():
    from jaxserve.runner.batch import pack_batch

    plan = StepPlan((_seq([7], start=3), _seq([in_flight_ref(0)], start=5)))
    batch = pack_batch(plan.sequences, 4, 2, pages_per_seq=4, page_size=4, num_pages=8)
    assert batch.token_ids.tolist() == [7, -1, 0, 0]  # -1: read slot 0 of the last step
    assert batch.positions[:2].tolist() == [3, 5]
    assert batch.kv_lens.tolist() == [4, 6]
    assert np.asarray(batch.cu_q_lens).tolist() == [0, 1, 2]
