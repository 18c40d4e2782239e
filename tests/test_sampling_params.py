"""SamplingParams validation: every bad value raises SamplingParamsError naming its parameter,
with vLLM's message where vLLM has one."""

from __future__ import annotations

import math

import pytest

from jaxserve.engine.sampling_params import (MAX_LOGIT_BIAS_ENTRIES, MAX_STOP_TOKEN_IDS,
                                             SamplingParams, SamplingParamsError)

BAD = [
    # (kwargs, param, message fragment)
    (dict(n=0), "n", "n must be at least 1, got 0."),
    (dict(n=1.5), "n", "n must be an integer"),
    (dict(max_tokens=0), "max_tokens", "max_tokens must be at least 1, got 0."),
    (dict(max_tokens=2.0), "max_tokens", "max_tokens must be an integer"),
    (dict(temperature=-0.1), "temperature", "temperature must be in [0, 2], got -0.1."),
    (dict(temperature=2.5), "temperature", "temperature must be in [0, 2], got 2.5."),
    (dict(temperature=math.nan), "temperature", "temperature must be a finite number"),
    (dict(temperature="1"), "temperature", "temperature must be a number"),
    (dict(top_p=0.0), "top_p", "top_p must be in (0, 1], got 0.0."),
    (dict(top_p=1.1), "top_p", "top_p must be in (0, 1], got 1.1."),
    (dict(top_k=-2), "top_k", "top_k must be 0 or -1 (disable), or at least 1, got -2."),
    (dict(top_k=2.5), "top_k", "top_k must be an integer"),
    (dict(min_p=-0.1), "min_p", "min_p must be in [0, 1], got -0.1."),
    (dict(min_p=1.5), "min_p", "min_p must be in [0, 1], got 1.5."),
    (dict(presence_penalty=2.1), "presence_penalty", "presence_penalty must be in [-2, 2], got 2.1."),
    (dict(presence_penalty=-2.1), "presence_penalty", "presence_penalty must be in [-2, 2]"),
    (dict(frequency_penalty=-3.0), "frequency_penalty", "frequency_penalty must be in [-2, 2], got -3.0."),
    (dict(repetition_penalty=0.0), "repetition_penalty",
     "repetition_penalty must be greater than zero, got 0.0."),
    (dict(repetition_penalty=math.inf), "repetition_penalty", "must be a finite number"),
    (dict(min_tokens=-1), "min_tokens", "min_tokens must be greater than or equal to 0, got -1."),
    (dict(min_tokens=20, max_tokens=10), "min_tokens",
     "min_tokens must be less than or equal to max_tokens=10, got 20."),
    (dict(logprobs=21), "logprobs", "logprobs must be in [0, 20], got 21."),
    (dict(logprobs=-1), "logprobs", "logprobs must be in [0, 20], got -1."),
    (dict(prompt_logprobs=30), "prompt_logprobs", "prompt_logprobs must be in [0, 20], got 30."),
    (dict(seed=2**63), "seed", "seed must be a 64-bit signed integer"),
    (dict(seed=1.5), "seed", "seed must be an integer"),
    (dict(stop=[""]), "stop", "stop cannot contain an empty string."),
    (dict(stop=["ok", ""]), "stop", "stop cannot contain an empty string."),
    (dict(stop=[3]), "stop", "stop must be a string or a list of strings."),
    (dict(stop_token_ids=[-1]), "stop_token_ids", "stop_token_ids must be non-negative"),
    (dict(stop_token_ids=["a"]), "stop_token_ids", "stop_token_ids must contain only integers"),
    (dict(stop_token_ids=5), "stop_token_ids", "stop_token_ids must be a list of integers."),
    (dict(stop_token_ids=list(range(MAX_STOP_TOKEN_IDS + 1))), "stop_token_ids",
     f"at most {MAX_STOP_TOKEN_IDS} ids"),
    (dict(logit_bias={1: 100.5}), "logit_bias", "logit_bias values must be in [-100, 100], got 100.5"),
    (dict(logit_bias={1: -101}), "logit_bias", "logit_bias values must be in [-100, 100]"),
    (dict(logit_bias={1: math.nan}), "logit_bias", "logit_bias values must be in [-100, 100]"),
    (dict(logit_bias={"x": 1.0}), "logit_bias", "not an integer token id: 'x'"),
    (dict(logit_bias={-3: 1.0}), "logit_bias", "logit_bias token ids must be non-negative, got -3."),
    (dict(logit_bias={1: "big"}), "logit_bias", "logit_bias values must be numbers"),
    (dict(logit_bias=[1, 2]), "logit_bias", "logit_bias must be an object"),
    (dict(logit_bias={i: 1.0 for i in range(MAX_LOGIT_BIAS_ENTRIES + 1)}), "logit_bias",
     f"at most {MAX_LOGIT_BIAS_ENTRIES} entries"),
]


@pytest.mark.parametrize("kwargs,param,message", BAD, ids=[f"{b[1]}-{i}" for i, b in enumerate(BAD)])
def test_bad_values_name_the_parameter(kwargs, param, message):
    with pytest.raises(SamplingParamsError) as e:
        SamplingParams(**kwargs)
    assert e.value.param == param
    assert message in str(e.value)
    assert isinstance(e.value, ValueError)


GOOD = [
    dict(), dict(temperature=0.0), dict(temperature=2.0), dict(top_p=1.0), dict(top_p=1e-6),
    dict(top_k=-1), dict(top_k=1), dict(min_p=0.0), dict(min_p=1.0),
    dict(presence_penalty=-2.0, frequency_penalty=2.0), dict(repetition_penalty=0.01),
    dict(min_tokens=5, max_tokens=5), dict(max_tokens=None, min_tokens=100),
    dict(logprobs=0), dict(logprobs=20), dict(seed=0), dict(seed=-2**63), dict(seed=2**63 - 1),
    dict(stop="x"), dict(logit_bias={0: -100, 5: 100.0}), dict(n=4, temperature=0.0),
]


@pytest.mark.parametrize("kwargs", GOOD)
def test_good_values_pass(kwargs):
    SamplingParams(**kwargs)


def test_normalisation():
    p = SamplingParams(stop="end", top_k=-1, seed=-1, stop_token_ids=[5, 3, 5],
                       logit_bias={"7": 2, 8: -1.5})
    assert p.stop == ["end"] and p.top_k == 0 and p.seed is None
    assert p.stop_token_ids == [5, 3]  # deduplicated, order kept (as vLLM)
    assert p.logit_bias == {7: 2.0, 8: -1.5}  # JSON object keys are strings
    assert SamplingParams(temperature=0).greedy and not SamplingParams().greedy


def test_verify_token_ids_against_vocab():
    SamplingParams(logit_bias={9: 1.0}, stop_token_ids=[9]).verify_token_ids(10)
    with pytest.raises(SamplingParamsError) as e:
        SamplingParams(logit_bias={10: 1.0, 3: 0.0}).verify_token_ids(10)
    assert e.value.param == "logit_bias" and "[10]" in str(e.value) and "Vocabulary size: 10" in str(e.value)
    with pytest.raises(SamplingParamsError) as e:
        SamplingParams(stop_token_ids=[12]).verify_token_ids(10)
    assert e.value.param == "stop_token_ids"
