"""Incremental detokenizer and stop strings (engine/detokenizer.py) with real tokenizers built
offline: a byte-level BPE (GPT-2 / Llama 3 style) and a Metaspace BPE (SentencePiece style)."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from jaxserve.engine.detokenizer import IncrementalDetokenizer
from jaxserve.engine.sampling_params import SamplingParams

CORPUS = ["Hello world, café naïve résumé.", "日本語のテキストです。日本語!",
          "emoji 😀🎉 party 🎉😀 time", "The quick brown fox jumps over the lazy dog."] * 20
# Characters outside the corpus (中, 文, 🚀, ß) only exist as single-byte tokens: every one of
# them is split over several tokens.
TEXTS = ["Hello world, café!", "日本語 and 中文 mixed 🚀 with emoji 😀🎉.",
         "naïve  spaces\n\nnew lines\tand tabs ß", "🚀🚀🚀 rockets 中文中文"]


def _train(pre_tokenizer, decoder, alphabet, vocab_size):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoder
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def bpe():
    return _train(pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel(),
                  pre_tokenizers.ByteLevel.alphabet(), 300)


@pytest.fixture(scope="module")
def metaspace():
    return _train(pre_tokenizers.Metaspace(), decoders.Metaspace(), [], 200)


def stream(tok, prompt_ids, ids, **params):
    """Feed ids one at a time; returns (deltas, detokenizer) with the flush appended."""
    params.setdefault("max_tokens", None)
    d = IncrementalDetokenizer(tok, prompt_ids, SamplingParams(**params))
    deltas = []
    for t in ids:
        delta, stop = d.add_token(t)
        deltas.append(delta)
        if stop is not None:
            return deltas, d
    deltas.append(d.flush())
    return deltas, d


def test_tokens_split_characters(bpe):
    ids = bpe.encode("中文 🚀")
    assert any("\ufffd" in bpe.decode([i]) for i in ids)  # the tests below really split chars


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_concatenate_to_full_decode(bpe, text):
    prompt = bpe.encode("The prompt: ")
    ids = bpe.encode(text)
    deltas, d = stream(bpe, prompt, ids)
    assert "".join(deltas) == d.text == bpe.decode(ids) == text
    assert not any("\ufffd" in x for x in deltas)  # never a half character on the wire


def test_special_tokens_skipped_or_kept(bpe):
    bos, eos = bpe.convert_tokens_to_ids(["<s>", "</s>"])
    ids = [bos] + bpe.encode("café 中文") + [eos] + bpe.encode(" after")
    for skip in (True, False):
        deltas, d = stream(bpe, [], ids, skip_special_tokens=skip)
        assert "".join(deltas) == bpe.decode(ids, skip_special_tokens=skip)
    assert "<s>" not in stream(bpe, [], ids)[1].text


def test_random_token_sequences(bpe):
    rng = random.Random(0)
    prompt = bpe.encode("context ")
    for _ in range(50):
        ids = [rng.randrange(len(bpe)) for _ in range(rng.randrange(1, 30))]
        for skip in (True, False):
            deltas, d = stream(bpe, prompt, ids, skip_special_tokens=skip)
            assert "".join(deltas) == bpe.decode(ids, skip_special_tokens=skip)


def test_incomplete_character_waits_then_flushes(bpe):
    rocket = bpe.encode("🚀")  # 4 bytes over 3 tokens
    assert len(rocket) >= 3
    d = IncrementalDetokenizer(bpe, [], SamplingParams(max_tokens=None))
    assert [d.add_token(t) for t in rocket[:-1]] == [("", None)] * (len(rocket) - 1)
    # the end of a request shows what a full decode shows
    assert d.flush() == bpe.decode(rocket[:-1]) == "\ufffd"
    d = IncrementalDetokenizer(bpe, [], SamplingParams())
    assert "".join(d.add_token(t)[0] for t in rocket) == "🚀"


def test_sentencepiece_spaces(metaspace):
    prompt = metaspace.encode("Hello world")
    ids = metaspace.encode(" the lazy dog jumps")
    deltas, d = stream(metaspace, prompt, ids)
    full = metaspace.decode(prompt + ids)
    assert d.text == full[len(metaspace.decode(prompt)):]
    assert d.text.startswith(" ") and " lazy dog" in d.text
    assert metaspace.decode(ids[1:2]) != deltas[1]  # a lone decode would lose the space


# ------------------------------------------------------------------------------ stop strings

def _check_stop(tok, text, stops, include, expect_text, expect_stop):
    ids = tok.encode(text)
    d = IncrementalDetokenizer(tok, [], SamplingParams(stop=stops, max_tokens=None,
                                                       include_stop_str_in_output=include))
    streamed, stop = "", None
    for t in ids:
        delta, stop = d.add_token(t)
        streamed += delta
        assert expect_text.startswith(streamed)  # never streamed text that is later cut
        if stop is not None:
            break
    if stop is None:
        streamed += d.flush()
    assert (streamed, stop, d.text) == (expect_text, expect_stop, expect_text)
    return d


@pytest.mark.parametrize("include", [False, True])
@pytest.mark.parametrize("text,stops,cut", [
    ("The quick brown fox jumps", ["brown fox"], "brown fox"),    # spans several tokens
    ("日本語 and 中文 mixed", ["中文"], "中文"),                    # inside split characters
    ("party 🎉🚀 time", ["🚀 t"], "🚀 t"),                          # emoji + space + letter
    ("Hello world, café!", ["é!", "world"], "world"),              # earliest, not first listed
    ("abcabcabd", ["abd"], "abd"),                                   # after partial matches
    ("Hello world", ["zzz", "d"], "d"),                             # at the very end
])
def test_stop_strings(bpe, text, stops, cut, include):
    i = text.index(cut)
    expect = text[:i + len(cut)] if include else text[:i]
    d = _check_stop(bpe, text, stops, include, expect, cut)
    with pytest.raises(RuntimeError):
        d.add_token(0)


def test_no_stop_match_releases_held_text(bpe):
    # "wor" could start "world!" until the text ends: held back, then released by flush
    _check_stop(bpe, "Hello wor", ["world!"], False, "Hello wor", None)
    d = IncrementalDetokenizer(bpe, [], SamplingParams(stop=["world!"]))
    streamed = "".join(d.add_token(t)[0] for t in bpe.encode("Hello wor"))
    assert streamed == "Hello "
    # text that cannot start a stop string is not held back at all
    d = IncrementalDetokenizer(bpe, [], SamplingParams(stop=["xyz"]))
    assert "".join(d.add_token(t)[0] for t in bpe.encode("Hello wor")) == "Hello wor"


def test_stop_strings_wait_for_min_tokens(bpe):
    ids = bpe.encode("ab ab ab")
    d = IncrementalDetokenizer(bpe, [], SamplingParams(stop=["ab"], min_tokens=2, max_tokens=None))
    assert bpe.decode(ids[:2]) == "ab"  # the first match lies within the first min_tokens tokens
    streamed, stop = d.add_tokens(ids)
    assert stop == "ab" and d.text == streamed == "ab "  # vLLM: the next one counts


def test_finishing_tokens(bpe):
    body = bpe.encode("Hello wor")
    eos = bpe.convert_tokens_to_ids("</s>")
    nl = bpe.encode("\n")[0]
    p = dict(stop=["world!"], stop_token_ids=[nl])
    # a length finish releases the held-back "wor"; so does reaching max_tokens unannounced
    d = IncrementalDetokenizer(bpe, [], SamplingParams(**p, max_tokens=None))
    out = "".join(d.add_token(t)[0] for t in body[:-1]) + d.add_token(body[-1], "length")[0]
    assert out == d.text == "Hello wor" and d.finished
    with pytest.raises(RuntimeError):
        d.add_token(body[0])
    d = IncrementalDetokenizer(bpe, [], SamplingParams(**p, max_tokens=len(body)))
    assert "".join(d.add_token(t)[0] for t in body) == d.text == "Hello wor"
    # a stop token id ends the output; its text is left out unless include_stop_str_in_output
    for include, want in ((False, "Hello wor"), (True, "Hello wor\n")):
        d = IncrementalDetokenizer(bpe, [], SamplingParams(**p, max_tokens=None,
                                                           include_stop_str_in_output=include))
        out = "".join(d.add_token(t)[0] for t in body) + d.add_token(nl, "stop")[0]
        assert out == d.text == want
    d = IncrementalDetokenizer(bpe, [], SamplingParams(skip_special_tokens=False, max_tokens=None))
    d.add_tokens(body)
    d.add_token(eos, "stop")
    assert d.text == "Hello wor"  # EOS too, even with skip_special_tokens=False
    assert d.flush() == ""


@pytest.mark.parametrize("name", ["bpe", "metaspace"])
def test_backend_decode_streams_what_the_wrapper_streams(request, name):
    """The Rust decode shortcut gives the same deltas as transformers' decode, token by token."""
    from jaxserve.engine.detokenizer import backend_decoder

    tok = request.getfixturevalue(name)
    assert backend_decoder(tok) is not None  # a fast tokenizer: the shortcut is taken
    rng = random.Random(1)
    for _ in range(30):
        prompt = [rng.randrange(len(tok)) for _ in range(rng.randrange(0, 8))]
        ids = [rng.randrange(len(tok)) for _ in range(rng.randrange(1, 25))]
        for skip in (True, False):
            params = SamplingParams(max_tokens=None, skip_special_tokens=skip)
            fast = IncrementalDetokenizer(tok, prompt, params)
            slow = IncrementalDetokenizer(tok, prompt, params)
            slow._backend_decode = None
            assert [fast.add_token(t) for t in ids] == [slow.add_token(t) for t in ids]
            assert fast.flush() == slow.flush()
    assert backend_decoder(object()) is None  # anything else goes through tokenizer.decode
