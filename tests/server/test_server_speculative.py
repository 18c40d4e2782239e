"""serve.py --speculative-config with the tiny model: the same greedy text as the offline engine
without speculation, and vLLM's spec-decode metrics on /metrics."""

from __future__ import annotations

import json
import subprocess
import sys

import openai
import pytest
from test_server_real_engine import ROOT, ServeProcess

SPEC = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3}


@pytest.fixture(scope="module")
def served(tiny_model_dir):
    proc = ServeProcess(tiny_model_dir("llama-gqa"), "--speculative-config", json.dumps(SPEC))
    yield proc
    proc.stop()


def test_speculative_server_matches_plain_offline(served, tiny_model_dir):
    from jaxserve.engine.sampling_params import SamplingParams
    from jaxserve.llm import LLM

    client = openai.OpenAI(base_url=served.url + "/v1", api_key="none")
    name = client.models.list().data[0].id
    prompts = ["one two three one two three one two", "abc abc abc abc"]
    before = served.metrics()
    resp = client.completions.create(model=name, prompt=prompts, max_tokens=24, temperature=0,
                                     extra_body={"ignore_eos": True})
    llm = LLM(tiny_model_dir("llama-gqa"), num_pages=128, page_size=8, max_num_seqs=8,
              max_num_batched_tokens=64, max_model_len=256, warmup=False)
    offline = llm.generate(prompts, SamplingParams(max_tokens=24, temperature=0,
                                                   ignore_eos=True))
    assert [c.text for c in sorted(resp.choices, key=lambda c: c.index)] == [
        o.outputs[0].text for o in offline]
    after = served.metrics()
    drafts = "vllm:spec_decode_num_draft_tokens_total"
    assert after[drafts] > before.get(drafts, 0)
    assert 0 <= after["vllm:spec_decode_num_accepted_tokens_total"] <= after[drafts]
    assert after["jaxserve:num_free_pages"] == after["jaxserve:num_pages"]


def test_bad_speculative_config_exits_with_the_flag_named(tiny_model_dir):
    proc = subprocess.run([sys.executable, "serve.py", "--model", tiny_model_dir("llama-gqa"),
                           "--speculative-config",
                           '{"method": "draft_model", "model": "/nonexistent/draft"}'],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "--speculative-config" in proc.stderr
    assert "cannot load the draft model '/nonexistent/draft'" in proc.stderr
    assert "Traceback" not in proc.stderr
