"""HF folder -> orbax checkpoint -> engine gives the tokens of loading the HF folder."""

from __future__ import annotations

from checkpoints.convert_to_orbax import convert
from jaxserve.engine.sampling_params import SamplingParams
from jaxserve.llm import LLM


def test_orbax_round_trip_through_the_engine(tiny_model_dir, tmp_path):
    hf_dir = tiny_model_dir("qwen2")
    orbax_dir = convert(hf_dir, str(tmp_path / "orbax"))
    prompts = [[5, 17, 99, 3], [42] * 11]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    kw = dict(num_pages=32, page_size=8, max_num_seqs=4, max_num_batched_tokens=32, warmup=False)
    from_hf = LLM(hf_dir, **kw).generate(prompts, params)
    from_orbax = LLM(orbax_dir, **kw).generate(prompts, params)
    assert [o.outputs[0].token_ids for o in from_orbax] == [o.outputs[0].token_ids for o in from_hf]
