"""Sampling through the whole engine: seeds independent of the batch, logprobs and prompt
logprobs equal to transformers' log_softmax, n > 1, stop strings."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from jaxserve.engine.sampling_params import SamplingParams
from jaxserve.llm import LLM


@pytest.fixture(scope="module")
def path(tiny_model_dir):
    return tiny_model_dir("llama-gqa")


@pytest.fixture(scope="module")
def llm(path):
    return LLM(path, num_pages=128, page_size=8, max_num_seqs=16, max_num_batched_tokens=64)


@pytest.fixture(scope="module")
def hf(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _random_prompt(rng):
    return [rng.randrange(3, 384) for _ in range(rng.randrange(2, 30))]


def test_seeded_request_is_independent_of_its_batch(llm):
    rng = random.Random(0)
    prompt = _random_prompt(rng)
    seeded = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    alone = llm.generate([prompt], seeded)[0].outputs[0].token_ids
    for others in (1, 4, 15):
        batch = [_random_prompt(rng) for _ in range(others)]
        params = [SamplingParams(max_tokens=rng.randrange(4, 20), temperature=0.8,
                                 ignore_eos=True) for _ in batch]
        pos = rng.randrange(others + 1)
        batch.insert(pos, prompt)
        params.insert(pos, seeded)
        assert llm.generate(batch, params)[pos].outputs[0].token_ids == alone
    unseeded = SamplingParams(max_tokens=16, temperature=1.0, ignore_eos=True)
    a, b = llm.generate([prompt, prompt], unseeded)
    assert a.outputs[0].token_ids != b.outputs[0].token_ids


def test_logprobs_match_transformers(llm, hf):
    prompt = [5, 17, 99, 3, 250, 31, 7, 120]
    out = llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0.0, logprobs=5,
                                                prompt_logprobs=3, ignore_eos=True))[0]
    tokens = out.outputs[0].token_ids
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + tokens])).logits[0]
    ref = torch.log_softmax(logits, -1).numpy()  # [n, V]
    for i, (tok, entry) in enumerate(zip(tokens, out.outputs[0].logprobs)):
        row = ref[len(prompt) - 1 + i]
        assert tok == int(row.argmax())
        assert abs(entry[tok] - row[tok]) < 1e-4
        top5 = np.argsort(-row)[:5]
        assert set(top5) <= set(entry)
        for t in top5:
            assert abs(entry[int(t)] - row[t]) < 1e-4
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for pos in range(1, len(prompt)):
        entry = out.prompt_logprobs[pos]
        assert abs(entry[prompt[pos]] - ref[pos - 1][prompt[pos]]) < 1e-4
        assert len(entry) >= 3


def test_n_samples_share_prompt_and_finish(llm):
    out = llm.generate([[9, 8, 7, 6, 5, 4, 3, 2, 1] * 3],
                       SamplingParams(n=3, max_tokens=10, temperature=1.0, seed=7,
                                      ignore_eos=True))[0]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    seqs = [tuple(o.token_ids) for o in out.outputs]
    assert len(set(seqs)) > 1 and all(len(s) == 10 for s in seqs)
    bm = llm.engine.block_manager
    bm.check_invariants([])
    assert bm.num_free_pages == bm.num_pages


def test_stop_string_ends_output_before_it(llm):
    prompt = "The quick brown fox"
    free = llm.generate([prompt], SamplingParams(max_tokens=20, temperature=0.0,
                                                 ignore_eos=True))[0].outputs[0].text
    assert len(free) > 6
    stop = free[3:6]
    out = llm.generate([prompt], SamplingParams(max_tokens=20, temperature=0.0, stop=[stop],
                                                ignore_eos=True))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == free[:free.index(stop)]
    kept = llm.generate([prompt], SamplingParams(max_tokens=20, temperature=0.0, stop=[stop],
                                                 include_stop_str_in_output=True,
                                                 ignore_eos=True))[0].outputs[0]
    assert kept.text == free[:free.index(stop) + len(stop)]
