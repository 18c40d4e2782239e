"""The engine on the Pallas kernels (interpret mode on CPU) gives the reference backend's tokens."""

from __future__ import annotations

import pytest

from jaxserve.engine.sampling_params import SamplingParams
from jaxserve.llm import LLM

PROMPTS = [[5, 17, 99, 3, 250, 31, 7], [42] * 19, [300, 12, 8]]


def _tokens(model_path, backend):
    llm = LLM(model_path, attention_backend=backend, num_pages=32, page_size=8, max_num_seqs=4,
              max_num_batched_tokens=16, warmup=False)
    # budget 16 < 19-token prompt: chunked prefill mixes with decodes in the kernel's batches
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("backend", ["pallas_ragged", "pallas_splitk_decode"])
def test_pallas_backend_matches_reference(tiny_model_dir, backend):
    path = tiny_model_dir("llama-headdim")  # head_dim 32: a power of two the kernels take
    assert _tokens(path, backend) == _tokens(path, "reference")
