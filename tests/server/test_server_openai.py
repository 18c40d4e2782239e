"""The server as the official `openai` client sees it (FakeEngine behind a real uvicorn)."""

from __future__ import annotations

import openai
import pytest
from fake_engine import COUNT_TEXT

MODEL = "fake-model"


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                         timeout=20)


def test_models_list(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].max_model_len == server.engine.max_model_len


def test_completion_greedy_and_usage(client, server):
    prompt = "Hello world"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0)
    assert r.object == "text_completion" and r.id.startswith("cmpl-") and r.model == MODEL
    (choice,) = r.choices
    assert choice.index == 0 and choice.finish_reason == "length"
    # the fake counts from " one"; 4 tokens of that text
    assert COUNT_TEXT.startswith(choice.text) and choice.text
    n_prompt = len(server.engine.tokenizer.encode(prompt))
    assert r.usage.prompt_tokens == n_prompt
    assert r.usage.completion_tokens == 4
    assert r.usage.total_tokens == n_prompt + 4
    params = server.engine.requests[r.id][1]
    assert params.max_tokens == 4 and params.temperature == 0.0


def test_completion_sampling_params_reach_engine(client, server):
    r = client.completions.create(
        model=MODEL, prompt="x", max_tokens=3, temperature=0.7, top_p=0.9, seed=5,
        presence_penalty=0.5, frequency_penalty=-0.5, stop=["zzz"], logit_bias={"5": 2.0},
        extra_body={"top_k": 7, "min_p": 0.1, "repetition_penalty": 1.2, "min_tokens": 1,
                    "ignore_eos": True, "stop_token_ids": [3],
                    "include_stop_str_in_output": True, "skip_special_tokens": False},
        user="someone")
    p = server.engine.requests[r.id][1]
    assert (p.temperature, p.top_p, p.seed, p.top_k, p.min_p) == (0.7, 0.9, 5, 7, 0.1)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.5, -0.5, 1.2)
    assert p.stop == ["zzz"] and p.stop_token_ids == [3] and p.logit_bias == {5: 2.0}
    assert p.min_tokens == 1 and p.ignore_eos and p.include_stop_str_in_output
    assert not p.skip_special_tokens


def test_completion_n2_and_multiple_prompts(client):
    r = client.completions.create(model=MODEL, prompt=["a", "b"], n=2, max_tokens=3,
                                  temperature=0)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    # choices of one prompt differ (the fake offsets them), prompts agree choice-wise
    assert r.choices[0].text != r.choices[1].text
    assert r.choices[0].text == r.choices[2].text
    assert r.usage.completion_tokens == 12


def test_completion_token_prompts(client, server):
    ids = server.engine.tokenizer.encode("Hello world")
    r1 = client.completions.create(model=MODEL, prompt=ids, max_tokens=2, temperature=0)
    r2 = client.completions.create(model=MODEL, prompt=[ids, ids], max_tokens=2, temperature=0)
    assert r1.usage.prompt_tokens == len(ids) and len(r2.choices) == 2
    assert server.engine.requests[r1.id][0] == ids


def test_stop_string(client):
    r = client.completions.create(model=MODEL, prompt="x", max_tokens=20, temperature=0,
                                  stop=[" four"])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == " one two three"
    r = client.completions.create(model=MODEL, prompt="x", max_tokens=20, temperature=0,
                                  stop=" four", extra_body={"include_stop_str_in_output": True})
    assert r.choices[0].text == " one two three four"


def test_seed_reproducible(client):
    def run(seed):
        return client.completions.create(model=MODEL, prompt="x", max_tokens=5,
                                         temperature=1.0, seed=seed).choices[0].text

    assert run(3) == run(3)
    assert run(3) != run(4)


def test_completion_logprobs_and_echo(client, server):
    r = client.completions.create(model=MODEL, prompt="x", max_tokens=3, temperature=0,
                                  logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 3
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.token_logprobs == [-0.5] * 3
    assert all(len(t) == 2 for t in lp.top_logprobs)
    assert lp.text_offset == [0, len(lp.tokens[0]), len(lp.tokens[0]) + len(lp.tokens[1])]

    prompt = "Hello world"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0,
                                  echo=True, logprobs=1)
    c = r.choices[0]
    n_prompt = len(server.engine.tokenizer.encode(prompt))
    assert c.text.startswith(prompt)
    assert len(c.logprobs.tokens) == n_prompt + 2
    assert c.logprobs.token_logprobs[0] is None and c.logprobs.top_logprobs[0] is None
    assert server.engine.requests[r.id][1].prompt_logprobs == 1


def test_completion_stream(client):
    chunks = list(client.completions.create(model=MODEL, prompt="x", max_tokens=5,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == client.completions.create(model=MODEL, prompt="x", max_tokens=5,
                                             temperature=0).choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    assert all(c.usage is None for c in chunks[:-1])


def test_completion_stream_n2_logprobs(client):
    chunks = list(client.completions.create(model=MODEL, prompt="x", max_tokens=4, n=2,
                                            temperature=0, stream=True, logprobs=1))
    texts = {0: "", 1: ""}
    offsets = {0: [], 1: []}
    for c in chunks:
        ch = c.choices[0]
        texts[ch.index] += ch.text
        offsets[ch.index] += ch.logprobs.text_offset
    assert texts[0] != texts[1]
    for i in (0, 1):
        assert offsets[i][0] == 0 and offsets[i] == sorted(offsets[i]) and len(offsets[i]) == 4


def test_chat(client, server):
    r = client.chat.completions.create(model=MODEL, max_tokens=4, temperature=0,
                                       messages=[{"role": "system", "content": "Be brief."},
                                                 {"role": "user", "content": "Count!"}])
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    msg = r.choices[0].message
    assert msg.role == "assistant" and COUNT_TEXT.startswith(msg.content)
    prompt_ids = server.engine.requests[r.id][0]
    rendered = server.engine.tokenizer.decode(prompt_ids)
    assert rendered.endswith("<|im_start|>assistant\n") and "Count!" in rendered
    assert r.usage.prompt_tokens == len(prompt_ids) and r.usage.completion_tokens == 4


def test_chat_max_tokens_default_and_completion_tokens(client, server):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                       max_completion_tokens=3, temperature=0)
    assert r.usage.completion_tokens == 3
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                       temperature=0, stop=[" three"])
    prompt_len = len(server.engine.requests[r.id][0])
    # no max_tokens: whatever fits in the context, as vLLM does
    assert server.engine.requests[r.id][1].max_tokens == server.engine.max_model_len - prompt_len


def test_chat_text_parts(client, server):
    r = client.chat.completions.create(
        model=MODEL, max_tokens=1,
        messages=[{"role": "user", "content": [{"type": "text", "text": "part one"},
                                               {"type": "text", "text": "part two"}]}])
    assert "part one\npart two" in server.engine.tokenizer.decode(server.engine.requests[r.id][0])


def test_chat_n2_logprobs(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=3, n=2, temperature=0, logprobs=True,
                                       top_logprobs=2)
    assert [c.index for c in r.choices] == [0, 1]
    for c in r.choices:
        content = c.logprobs.content
        assert "".join(t.token for t in content) == c.message.content
        for t in content:
            assert t.logprob == -0.5 and bytes(t.bytes).decode() == t.token
            assert len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob == -0.5


def test_chat_stream(client):
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4, n=2,
        temperature=0, stream=True, stream_options={"include_usage": True}))
    by_choice: dict[int, list] = {0: [], 1: []}
    for c in chunks[:-1]:
        by_choice[c.choices[0].index].append(c.choices[0])
    for i, cs in by_choice.items():
        assert cs[0].delta.role == "assistant"
        assert cs[-1].finish_reason == "length"
        assert "".join(c.delta.content or "" for c in cs)
    assert chunks[-1].usage.completion_tokens == 8 and chunks[-1].usage.prompt_tokens > 0


def test_client_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt="x")
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="x", temperature=3)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                       tools=[{"type": "function", "function": {"name": "f"}}])
    assert e.value.body["param"] == "tools"


def test_completion_stream_echo_matches_whole(client):
    kw = dict(model=MODEL, prompt="Hello world", max_tokens=3, temperature=0, echo=True,
              logprobs=1)
    whole = client.completions.create(**kw).choices[0]
    chunks = [c.choices[0] for c in client.completions.create(stream=True, **kw)]
    assert "".join(c.text for c in chunks) == whole.text
    assert sum((c.logprobs.tokens for c in chunks), []) == whole.logprobs.tokens
    assert sum((c.logprobs.text_offset for c in chunks), []) == whole.logprobs.text_offset


def test_default_model_and_served_names(fresh_server):
    s = fresh_server(served_model_name=("alias-a", "alias-b"))
    c = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=20)
    assert [m.id for m in c.models.list().data] == ["alias-a", "alias-b"]
    r = c.completions.create(model="alias-b", prompt="x", max_tokens=1)
    assert r.model == "alias-b"
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model=MODEL, prompt="x", max_tokens=1)
