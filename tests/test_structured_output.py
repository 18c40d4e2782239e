"""Structured output (engine/grammar.py, SamplingParams.structured_outputs): constraints are
validated, compiled once and cached, the sampler's mask keeps exactly the allowed tokens, and
every output of the engine satisfies its constraint under sampling (tiny model) while greedy
output that already satisfies it is unchanged."""

from __future__ import annotations

import dataclasses
import json
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.engine.grammar import GrammarCompiler, bitmask_words
from jaxserve.engine.input_limits import RequestRejectedError
from jaxserve.engine.sampling_params import (MAX_STRUCTURED_OUTPUT_CHARS, SamplingParams,
                                             SamplingParamsError, StructuredOutputsParams as S)
from jaxserve.runner import sampling


# -- the constraint ---------------------------------------------------------------------------

@pytest.mark.parametrize("fields,param", [
    ({}, "structured_outputs"),
    ({"regex": "a", "choice": ["a"]}, "structured_outputs"),
    ({"json": "{not json"}, "structured_outputs.json"),
    ({"json": 3}, "structured_outputs.json"),
    ({"choice": "ab"}, "structured_outputs.choice"),
    ({"choice": []}, "structured_outputs.choice"),
    ({"choice": ["a", 1]}, "structured_outputs.choice"),
    ({"regex": ""}, "structured_outputs.regex"),
    ({"grammar": "x" * (MAX_STRUCTURED_OUTPUT_CHARS + 1)}, "structured_outputs.grammar"),
    ({"json_object": False, "regex": "a", "disable_any_whitespace": "yes"},
     "structured_outputs.disable_any_whitespace"),
    ({"json_object": "yes"}, "structured_outputs.json_object"),
])
def test_bad_constraints_name_their_field(fields, param):
    with pytest.raises(SamplingParamsError) as err:
        SamplingParams(structured_outputs=fields)
    assert err.value.param == param


def test_equal_constraints_share_a_key():
    assert S(json={"b": 1, "a": {"type": "string"}}).key == S(json='{"a":{"type":"string"},"b":1}').key
    assert S(json={"type": "object"}).key != S(json={"type": "object"},
                                               disable_any_whitespace=True).key
    assert S(choice=["x", "y"]).key != S(choice=["y", "x"]).key


@pytest.fixture(scope="module")
def tiny_path(tiny_model_dir):
    return tiny_model_dir("llama-gqa")


@pytest.fixture(scope="module")
def compiler(tiny_path):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_path)
    return GrammarCompiler(tok, len(tok), [tok.eos_token_id]), tok


def _allowed(mask_row: np.ndarray, vocab: int) -> set[int]:
    bits = np.unpackbits(np.asarray(mask_row, np.int32).view(np.uint8), bitorder="little")
    return set(np.flatnonzero(bits[:vocab]).tolist())


def test_compiles_once_and_caches_errors(compiler):
    g, tok = compiler
    before = g.num_compiles
    g.compile(S(regex="[ab]+"))
    g.compile(S(regex="[ab]+"))
    assert g.num_compiles == before + 1 and g.num_cache_hits >= 1
    for _ in range(2):
        with pytest.raises(RequestRejectedError) as err:
            g.compile(S(regex="a(b"), param="guided_regex")
        assert err.value.param == "guided_regex" and "unclosed group" in str(err.value)
    assert g.num_compiles == before + 2  # the failure is cached too
    with pytest.raises(RequestRejectedError) as err:
        g.compile(S(grammar="start: undefined_rule"))
    assert err.value.param == "structured_outputs.grammar"


def test_the_tokenizer_can_be_built_ahead(compiler):
    _, tok = compiler
    fresh = GrammarCompiler(tok, len(tok), [tok.eos_token_id])
    fresh.prepare_in_background()
    fresh._pool.shutdown(wait=True)  # the build is the pool's only job
    assert fresh._llg_tokenizer is not None and fresh._llg_tokenizer.vocab_size == len(tok)


def test_a_slow_compile_times_out_as_a_bad_request(compiler, monkeypatch):
    g, tok = compiler
    slow = GrammarCompiler(tok, len(tok), [tok.eos_token_id], timeout_s=0.05)
    build = slow._build
    monkeypatch.setattr(slow, "_build", lambda spec: (time.sleep(0.5), build(spec))[1])
    with pytest.raises(RequestRejectedError, match="did not compile within") as err:
        slow.compile(S(regex="abc"))
    assert err.value.param == "structured_outputs.regex"


def test_masks_allow_what_the_grammar_allows(compiler):
    g, tok = compiler
    V = len(tok)
    choice, free = g.new_matcher(S(choice=["red", "blue"])), g.new_matcher(S(regex=".*"))
    masks = g.fill_bitmasks([choice, free])
    assert masks.shape == (2, bitmask_words(V)) and masks.dtype == np.int32
    first = {tok.decode([t]) for t in _allowed(masks[0], V)}
    assert first and all("red".startswith(t) or "blue".startswith(t) for t in first)
    assert len(_allowed(masks[1], V)) > V // 2
    # completed: only EOS is left
    assert choice.consume_tokens(tok.encode("red", add_special_tokens=False))
    assert _allowed(g.fill_bitmasks([choice])[0], V) == {tok.eos_token_id}


# -- the sampler --------------------------------------------------------------------------------

def test_sampler_bitmask_keeps_exactly_the_allowed_tokens():
    S_, V = 4, 70
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(S_, V)), jnp.float32)
    allowed = [{3, 64, 69}, set(range(V)), {0}, {5, 6}]
    masks = np.zeros((S_, bitmask_words(V)), np.int32)
    for i, keep in enumerate(allowed):
        bits = np.zeros(bitmask_words(V) * 32, np.uint8)
        bits[list(keep)] = 1
        masks[i] = np.packbits(bits, bitorder="little").view(np.int32)
    masked = np.asarray(jax.jit(sampling.apply_token_bitmask)(logits, jnp.asarray(masks)))
    for i, keep in enumerate(allowed):
        assert set(np.flatnonzero(np.isfinite(masked[i])).tolist()) == keep
        assert np.array_equal(masked[i][list(keep)], np.asarray(logits)[i][list(keep)])
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, seed=i)]
    inputs = [sampling.SequenceSampling(params[i % 2], [1], [], token_bitmask=masks[i])
              for i in range(S_)]
    md = sampling.build_sampling_metadata(inputs, S_, V, use_bitmask=True)
    out = jax.jit(sampling.sample, static_argnames=("num_top_logprobs", "use_penalties",
                                                    "logprobs", "use_bitmask"))(
        logits, md, jax.random.PRNGKey(0), num_top_logprobs=2, use_penalties=False,
        logprobs=True, use_bitmask=True)
    for i, keep in enumerate(allowed):
        assert int(out.token_ids[i]) in keep
    assert int(out.token_ids[0]) == max(allowed[0], key=lambda t: float(logits[0, t]))
    assert float(out.logprobs[2]) == pytest.approx(0.0, abs=1e-6)  # one allowed token: p = 1


# -- the engine ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llm(tiny_path):
    from jaxserve.llm import LLM
    return LLM(tiny_path, num_pages=256, page_size=8, max_num_seqs=8, max_num_batched_tokens=64)


PROMPTS = ["Once upon a time", "The quick brown fox", "hello", "1 2 3"]
GRAMMAR = 'start: sum\nsum: NUM ("+" NUM)*\nNUM: /[1-9][0-9]?/'


@pytest.mark.parametrize("spec,valid", [
    (S(regex=r"[a-c]{2,4}-\d{1,3}"), lambda t: re.fullmatch(r"[a-c]{2,4}-\d{1,3}", t)),
    (S(choice=["red", "green", "blue", "dark green"]),
     lambda t: t in ("red", "green", "blue", "dark green")),
    (S(grammar=GRAMMAR), lambda t: re.fullmatch(r"[1-9][0-9]?(\+[1-9][0-9]?)*", t)),
    (S(json={"type": "object", "properties": {"ok": {"type": "boolean"},
                                              "n": {"enum": [1, 2, 3]}},
              "required": ["ok", "n"], "additionalProperties": False},
       disable_any_whitespace=True),
     lambda t: set(json.loads(t)) == {"ok", "n"} and json.loads(t)["n"] in (1, 2, 3)),
])
def test_sampled_outputs_always_satisfy_the_constraint(llm, spec, valid):
    params = SamplingParams(max_tokens=48, temperature=1.0, n=2, structured_outputs=spec)
    outs = []
    for seed in range(6):
        outs += llm.generate(PROMPTS, dataclasses.replace(params, seed=seed))
    texts = [o.text for out in outs for o in out.outputs]
    assert len(texts) == 6 * len(PROMPTS) * 2
    for out in outs:
        for o in out.outputs:
            if o.finish_reason == "stop":  # completed: must match in full
                assert valid(o.text), o.text
            else:  # cut by max_tokens: never more text than 48 tokens allow
                assert o.finish_reason == "length" and len(o.token_ids) == 48
    assert sum(o.finish_reason == "stop" for out in outs for o in out.outputs) >= len(texts) // 2
    assert len(set(texts)) > 1  # sampling varies; the mask does not fix the output
    assert llm.engine.runner.compiles_since_warmup() == 0


def test_greedy_output_that_satisfies_the_constraint_is_unchanged(llm):
    """The mask removes only disallowed tokens: constraining greedy decoding to exactly what
    it produced anyway (as a choice, and as an escaped regex) changes no token."""
    plain = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    for prompt in PROMPTS:
        out = llm.generate([prompt], plain)[0].outputs[0]
        ids = out.token_ids
        text = llm.get_tokenizer().decode(ids)
        if "\ufffd" in text:
            continue  # a byte split across tokens has no text form to constrain to
        for spec in (S(choice=[text]), S(regex=re.escape(text))):
            constrained = llm.generate([prompt], dataclasses.replace(
                plain, structured_outputs=spec))[0].outputs[0]
            assert constrained.token_ids == ids, (prompt, spec.kind)


def test_grammar_errors_reject_the_request_and_engine_keeps_serving(llm):
    with pytest.raises(RequestRejectedError) as err:
        llm.engine.add_request("bad-grammar", [5, 6, 7],
                               SamplingParams(structured_outputs=S(regex="(")))
    assert err.value.param == "structured_outputs.regex"
    assert not llm.engine.has_unfinished_requests()
    out = llm.generate(["hello"], SamplingParams(max_tokens=4, temperature=0.0,
                                                 structured_outputs=S(choice=["yes", "no"])))
    assert out[0].outputs[0].text in ("yes", "no")
    assert llm.engine.block_manager.num_free_pages == llm.engine.block_manager.num_pages


@pytest.mark.slow
def test_real_model_json_schema_outputs_validate_at_temperature_one(default_model_dir):
    """SmolLM2 asked for JSON, at temperature 1 with n = 2: every completed output parses and
    matches the schema (nested object, array, enum, required fields)."""
    jsonschema = pytest.importorskip("jsonschema")
    from jaxserve.llm import LLM
    schema = {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "role": {"enum": ["chef", "pilot", "doctor"]},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                    "required": ["city"], "additionalProperties": False},
        "skills": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3}},
        "required": ["name", "age", "role", "address", "skills"], "additionalProperties": False}
    llm = LLM(default_model_dir, max_num_seqs=8, max_model_len=512)
    tok = llm.get_tokenizer()
    prompts = [tok.apply_chat_template([{"role": "user", "content": f"Describe {who} as JSON."}],
                                       add_generation_prompt=True, tokenize=False)
               for who in ("a chef", "a pilot", "a doctor", "someone")]
    done = 0
    for seed in range(2):
        outs = llm.generate(prompts, SamplingParams(
            max_tokens=128, temperature=1.0, n=2, seed=seed,
            structured_outputs=S(json=schema)))
        for out in outs:
            for o in out.outputs:
                if o.finish_reason == "stop":
                    jsonschema.validate(json.loads(o.text), schema)
                    done += 1
    assert done >= 8  # of 16
    objects = llm.generate(prompts, SamplingParams(max_tokens=128, temperature=1.0, n=2, seed=5,
                                                   structured_outputs=S(json_object=True)))
    finished = [o.text for out in objects for o in out.outputs if o.finish_reason == "stop"]
    assert len(finished) >= 4 and all(isinstance(json.loads(t), dict) for t in finished)
