"""A step pays only for what its requests ask, and a second start compiles nothing.

- Steps without logprob requests take the plain variant, whose sampler has no log_softmax and
  no top-k in its program; logprob requests take the `extras` variant and get the same numbers
  as the model's own log_softmax (checked against the logits of a forward pass).
- Prompt-logprob steps are not padded to the largest token bucket.
- The persistent compilation cache: a second process with the same model and settings loads
  every step variant from the cache (zero misses), and gives the same tokens.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.engine.sampling_params import SamplingParams
from jaxserve.llm import LLM
from jaxserve.runner import sampling

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(tiny_model_dir("llama-gqa"), num_pages=128, page_size=8, max_num_seqs=16,
               max_num_batched_tokens=64, compilation_cache_dir=None)


def _primitives(fn, *args) -> list[str]:
    """Primitive names in fn's program, with repeats, inside loops and cond branches too."""
    from jax.extend.core import jaxprs_in_params
    names = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            names.append(eqn.primitive.name)
            for sub in jaxprs_in_params(eqn.params):
                walk(sub)
    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return names


def test_sampler_without_logprobs_computes_none():
    S, V = 4, 64
    md = jax.tree.map(jnp.asarray, sampling.build_sampling_metadata(
        [(SamplingParams(temperature=0.0), [1, 2], [])], S, V, use_penalties=False))
    logits = jnp.zeros((S, V))
    key = jnp.zeros(2, jnp.uint32)

    def plain(x):
        return sampling.sample(x, md, key, num_top_logprobs=20, use_penalties=False,
                               logprobs=False)

    def with_lp(x):
        return sampling.sample(x, md, key, num_top_logprobs=20, use_penalties=False,
                               logprobs=True)
    assert "top_k" not in _primitives(plain, logits)
    assert "top_k" in _primitives(with_lp, logits)
    # no log_softmax either: only the random rows' Gumbel noise takes logs (in a cond branch)
    assert _primitives(plain, logits).count("log") < _primitives(with_lp, logits).count("log")
    assert "top_k" in _primitives(with_lp, logits)
    out = plain(logits)
    assert out.top_token_ids.shape == (S, 0)


def test_plain_requests_take_the_plain_variant(llm):
    runner = llm.engine.runner
    llm.generate([[5, 6, 7]], SamplingParams(max_tokens=3, temperature=0.0))
    assert runner.last_variant.extras is False
    llm.generate([[5, 6, 7]], SamplingParams(max_tokens=3, temperature=0.0, logprobs=2))
    assert runner.last_variant.extras is True
    # one decoding sequence with logprobs pads to the one-row bucket, as a plain one does,
    # not to the largest (the extras share every shape's forward program)
    assert runner.buckets.seq_buckets[-1] > 1
    assert (runner.last_variant.num_tokens, runner.last_variant.num_seqs) == (1, 1)
    assert runner.compiles_since_warmup() == 0


def test_logprobs_equal_the_models_log_softmax(llm, tiny_model_dir):
    from model_driver import SingleSequenceDriver

    from jaxserve.loading import load_model

    prompt = [11, 12, 13, 14, 15]
    out = llm.generate([prompt], SamplingParams(max_tokens=4, temperature=0.0, logprobs=3,
                                                ignore_eos=True))[0].outputs[0]
    driver = SingleSequenceDriver(load_model(tiny_model_dir("llama-gqa")))
    tokens = list(prompt)
    for tok, entry in zip(out.token_ids, out.logprobs):
        logits = driver.prompt_logits(tokens)[-1]
        ref = np.asarray(jax.nn.log_softmax(jnp.asarray(logits)))
        assert tok == int(np.argmax(ref))
        assert len(entry) == 3  # the sampled token is also the most likely one
        for t, lp in entry.items():
            assert abs(lp - ref[t]) < 1e-4
        tokens.append(tok)
    assert abs(out.cumulative_logprob - sum(e[t] for e, t in zip(out.logprobs, out.token_ids))) \
        < 1e-4


def test_prompt_logprob_steps_use_a_small_bucket(llm):
    runner = llm.engine.runner
    out = llm.generate([[5, 6, 7, 8]], SamplingParams(max_tokens=1, prompt_logprobs=1))[0]
    assert len(out.prompt_logprobs) == 4
    # the largest sequence bucket is 16: a 4-token prompt-logprob step takes the 16-token
    # bucket, not the largest (64)
    assert max(runner.buckets.token_buckets) == 64
    seen = []
    inner = runner._run

    def spy(seqs, variant, *a, **k):
        seen.append(variant)
        return inner(seqs, variant, *a, **k)
    runner._run = spy
    try:
        llm.generate([[5, 6, 7, 8]], SamplingParams(max_tokens=1, prompt_logprobs=1))
    finally:
        runner._run = inner
    prompt_steps = [v for v in seen if v.all_logits]
    assert prompt_steps and all(v.num_tokens == 16 for v in prompt_steps)


_START = r"""
import json, sys
sys.path.insert(0, {root!r})
from jaxserve.llm import LLM
from jaxserve.engine.sampling_params import SamplingParams
llm = LLM({path!r}, num_pages=64, page_size=8, max_num_seqs=2, max_num_batched_tokens=16,
          compilation_cache_dir={cache!r})
out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
print("RESULT", json.dumps(dict(llm.engine.runner.warmup_stats,
                                tokens=out[0].outputs[0].token_ids)))
"""


def test_second_start_loads_every_variant_from_the_cache(tiny_model_dir, tmp_path):
    code = _START.format(root=ROOT, path=tiny_model_dir("llama-gqa"), cache=str(tmp_path / "xla"))
    env = dict(os.environ, JAX_PLATFORMS="cpu")

    def start():
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
        return json.loads(line[len("RESULT "):]), proc.stderr

    cold, _ = start()
    warm, log = start()
    assert cold["cache_misses"] >= cold["programs"] > 0
    assert warm["cache_misses"] == 0, log[-2000:]
    assert warm["cache_hits"] >= warm["programs"]
    assert warm["tokens"] == cold["tokens"]
    assert "loaded from the compilation cache" in log
