"""GGUF tokenizers built by jaxserve.loading.gguf_tokenizer vs transformers' own GGUF tokenizer.

Tiny GGUF files (a byte-level "gpt2" vocabulary and a SentencePiece "llama" one, trained here
with `tokenizers`) and the real SmolLM2 file are loaded through `load_gguf` and through
`AutoTokenizer.from_pretrained(empty_dir, gguf_file=...)` (which needs torch, a test-only
dependency): token ids, decoding, special ids and chat templates must be identical. A subprocess
with torch blocked checks that loading a GGUF tokenizer never imports torch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from gguf import GGUFWriter

from jaxserve.loading.gguf import GGUFError, load_gguf

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
          "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|im_start|>assistant\n' }}{% endif %}")
CORPUS = ["The capital of France is Paris.", "def f(x):\n    return x ** 2  # square",
          "In 2024, 12,345 people paid $3.50 each!", "naïve café, Ünïcödé, 日本語 テキスト",
          "hello world, hello there, the theory of everything", "   spaces\t\ttabs\n\nlines"] * 4
TEXTS = ["The capital of France is", "", " ", "  leading spaces\tand\ttabs\n\nnew lines   ",
         "In 2024, 12,345 people paid $3.50 each.", "Ünïcödé, 日本語, emoji 🙂🚀 and ZWJ 👩‍👩‍👧",
         "<|im_start|>user\nHi<|im_end|>\n", "a<|im_end|>b <|im_start|> c",
         "def f(x):\n    return x ** 2", "x" * 40 + "  \n\t \r\n", "0123456789 000 1.5e-3",
         "<s>hello</s> <think>why</think>", "never seen: ☃ ∮ 𝔘", "The theory of everything."]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _write(path, meta_fn, vocab_size, arch="llama"):
    """A GGUF whose model part is just big enough for load_gguf; the tokenizer is the point."""
    w = GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_vocab_size(vocab_size)
    meta_fn(w)
    w.add_tensor("token_embd.weight", np.zeros((vocab_size, 8), np.float32))
    w.add_tensor("output_norm.weight", np.ones(8, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def _gpt2_gguf(path, arch="llama", pre="smollm", add_bos=None):
    from tokenizers import ByteLevelBPETokenizer

    trainer = ByteLevelBPETokenizer()
    trainer.train_from_iterator(CORPUS, vocab_size=420, min_frequency=1,
                                special_tokens=SPECIALS, show_progress=False)
    model = json.loads(trainer._tokenizer.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    types = [3 if t in SPECIALS else 1 for t in tokens]
    # a user-defined token, and a control token the converter stored as text outside the
    # byte alphabet (transformers keeps it out of the special tokens)
    tokens += ["<think>", "</think>", "<｜end▁of▁text｜>"]
    types += [4, 4, 3]

    def meta(w):
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)
        w.add_pad_token_id(2)
        if add_bos is not None:
            w.add_add_bos_token(add_bos)
        w.add_add_space_prefix(False)
        w.add_chat_template(CHATML)
    return _write(path, meta, len(tokens), arch)


def _llama_gguf(path, with_merges=False, add_eos=None):
    from tokenizers import SentencePieceBPETokenizer

    trainer = SentencePieceBPETokenizer()
    trainer.train_from_iterator(CORPUS, vocab_size=300, min_frequency=1, show_progress=False)
    model = json.loads(trainer._tokenizer.to_str())["model"]
    learned = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    # SentencePiece layout as llama.cpp writes it: <unk>, <s>, </s>, 256 byte tokens, pieces
    # scored best-first (score = -rank), then chat specials as control tokens.
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    scores = [0.0] * len(tokens)
    for i, t in enumerate(learned):
        tokens.append(t)
        types.append(1)
        scores.append(-float(i))
    tokens += ["<|im_start|>", "<|im_end|>", "<think>"]
    types += [3, 3, 4]
    scores += [0.0, 0.0, 0.0]

    def meta(w):
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_scores(scores)
        if with_merges:
            w.add_token_merges([m if isinstance(m, str) else " ".join(m)
                                for m in model["merges"]])
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)
        if add_eos is not None:
            w.add_add_eos_token(add_eos)
        w.add_chat_template(CHATML)
    return _write(path, meta, len(tokens))


def _reference(path, tmp_path):
    pytest.importorskip("torch")   # transformers' GGUF reader needs it
    from transformers import AutoTokenizer

    empty = tmp_path / "empty"     # next to other HF files transformers would mix them in
    empty.mkdir(exist_ok=True)
    return AutoTokenizer.from_pretrained(str(empty), gguf_file=os.path.abspath(path))


def assert_same_tokenizer(ours, ref, texts=TEXTS, flags=True):
    """Same ids, tokens, decoding, special tokens, Rust tokenizer and chat template.

    `flags=False` for a tokenizer reloaded from a folder: transformers 5 does not save
    add_bos_token/add_eos_token (the BOS/EOS template lives in tokenizer.json's post-processor,
    which is compared, so the ids still are).
    """
    for text in texts:
        ids = ours(text).input_ids
        assert ids == ref(text).input_ids, text
        assert ours.encode(text, add_special_tokens=False) == ref.encode(
            text, add_special_tokens=False), text
        assert ours.convert_ids_to_tokens(ids) == ref.convert_ids_to_tokens(ids), text
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(
                ids, skip_special_tokens=skip), (text, skip)
    names = ["bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "all_special_ids",
             "special_tokens_map"] + ["add_bos_token", "add_eos_token"] * flags
    for name in names:
        assert getattr(ours, name) == getattr(ref, name), name
    assert len(ours) == len(ref)
    assert ({i: str(t) for i, t in ours.added_tokens_decoder.items()}
            == {i: str(t) for i, t in ref.added_tokens_decoder.items()})
    # the whole Rust tokenizer (model, pre-tokenizer, decoder, post-processor, added tokens)
    assert json.loads(ours.backend_tokenizer.to_str()) == json.loads(ref.backend_tokenizer.to_str())
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is the capital of France? 🙂"},
            {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And Italy?"}]
    for gen in (False, True):
        text = ours.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
        assert text == ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
        assert ours(text, add_special_tokens=False).input_ids == ref(
            text, add_special_tokens=False).input_ids


TINY = {
    "gpt2": lambda p: _gpt2_gguf(p),
    "gpt2-add-bos": lambda p: _gpt2_gguf(p, add_bos=True),
    "gpt2-llama-bpe": lambda p: _gpt2_gguf(p, pre="llama-bpe", add_bos=True),
    "gpt2-qwen2": lambda p: _gpt2_gguf(p, arch="qwen2", pre="qwen2", add_bos=False),
    "llama-scores": lambda p: _llama_gguf(p),
    "llama-merges-add-eos": lambda p: _llama_gguf(p, with_merges=True, add_eos=True),
}


@pytest.mark.parametrize("case", list(TINY))
def test_tiny_gguf_tokenizer_matches_transformers(tmp_path, case):
    path = TINY[case](tmp_path / f"{case}.gguf")
    ours = load_gguf(path).tokenizer
    assert_same_tokenizer(ours, _reference(path, tmp_path))
    assert ours.encode("<|im_start|>", add_special_tokens=False) == [
        ours.convert_tokens_to_ids("<|im_start|>")]
    if case.startswith("llama"):   # byte fallback: a character no piece covers
        assert ours.convert_ids_to_tokens(ours.encode("☃", add_special_tokens=False))[-3:] == [
            "<0xE2>", "<0x98>", "<0x83>"]
        assert ours.decode(ours.encode("a ☃ b", add_special_tokens=False)) == "a ☃ b"


def test_tiny_gguf_tokenizer_round_trips_through_save_pretrained(tmp_path):
    from transformers import AutoTokenizer

    for case in ("gpt2", "llama-scores"):
        ours = load_gguf(TINY[case](tmp_path / f"{case}.gguf")).tokenizer
        ours.save_pretrained(tmp_path / case, save_jinja_files=False)
        assert_same_tokenizer(AutoTokenizer.from_pretrained(str(tmp_path / case)), ours,
                              flags=False)


def test_unsupported_or_broken_tokenizer_metadata_is_a_gguf_error(tmp_path):
    def bert(w):
        w.add_tokenizer_model("bert")
        w.add_token_list(["[PAD]", "[UNK]", "a"])
    with pytest.raises(GGUFError, match=r"bert\.gguf.*tokenizer\.ggml\.model = 'bert' is not "
                                        r"supported \(supported: gpt2, llama\)"):
        load_gguf(_write(tmp_path / "bert.gguf", bert, 3))

    def bad_merge(w):
        w.add_tokenizer_model("gpt2")
        w.add_token_list(["a", "b", "ab"])
        w.add_token_merges(["a b", "a c"])
    with pytest.raises(GGUFError, match="do not form a BPE model"):
        load_gguf(_write(tmp_path / "merge.gguf", bad_merge, 3))

    def bad_id(w):
        w.add_tokenizer_model("llama")
        w.add_token_list(["<unk>", "a"])
        w.add_token_scores([0.0, -1.0])
        w.add_bos_token_id(7)
    with pytest.raises(GGUFError, match="'tokenizer.ggml.bos_token_id' = 7 is not a token id"):
        load_gguf(_write(tmp_path / "id.gguf", bad_id, 2))


def test_missing_default_special_tokens_are_not_invented(tmp_path):
    # A byte-level vocabulary without "<|endoftext|>" (Llama 3 has none): transformers appends
    # it past the vocabulary; we keep exactly the file's tokens, so every id has an embedding row.
    def meta(w):
        w.add_tokenizer_model("gpt2")
        w.add_token_list(["a", "b", "ab", "<|end|>"])
        w.add_token_types([1, 1, 1, 3])
        w.add_token_merges(["a b"])
        w.add_eos_token_id(3)
    tok = load_gguf(_write(tmp_path / "m.gguf", meta, 4)).tokenizer
    assert len(tok) == 4 and tok("ab<|end|>").input_ids == [2, 3] and tok.bos_token is None


# torch as absent as in a fresh venv: None in sys.modules makes `import torch` raise
# ImportError and importlib.util.find_spec("torch") (transformers' availability probe) say None.
_NO_TORCH = """
import sys
sys.modules["torch"] = None
from jaxserve.loading.gguf import load_gguf
tok = load_gguf(sys.argv[1], tokenizer=True).tokenizer
print(tok("<|im_start|>user\\nThe capital of France is<|im_end|>").input_ids)
loaded = [m for m, v in sys.modules.items() if m.split(".")[0] == "torch" and v is not None]
assert not loaded, loaded
"""


def test_loading_a_gguf_tokenizer_never_imports_torch(tmp_path):
    path = _gpt2_gguf(tmp_path / "m.gguf")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", _NO_TORCH, path], cwd=root, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": root})
    assert proc.returncode == 0, proc.stderr[-3000:]
    ids = json.loads(proc.stdout.strip().splitlines()[-1])
    assert ids == load_gguf(path).tokenizer(
        "<|im_start|>user\nThe capital of France is<|im_end|>").input_ids


# ---- the real default model: SmolLM2-135M-Instruct's GGUF ---------------------------------------

def _smollm2_gguf():
    from checkpoints.default_model import GGUF_NAME, default_model_dir

    path = os.path.join(default_model_dir(), GGUF_NAME)
    if not os.path.isfile(path):
        pytest.skip(f"{path} not built (python checkpoints/default_model.py)")
    return path


@pytest.mark.slow
def test_smollm2_tokenizer_matches_transformers_and_the_saved_folder(tmp_path):
    from transformers import AutoTokenizer

    path = _smollm2_gguf()
    ours = load_gguf(path).tokenizer
    ref = _reference(path, tmp_path)
    texts = TEXTS + ["<|endoftext|><jupyter_code>print(1)<empty_output>", "A" * 300,
                     "Österreich's 3rd-largest city; it's 100% true!!! ...", "\u00a0\u3000x"]
    assert_same_tokenizer(ours, ref, texts)
    assert ours("The capital of France is").input_ids == [504, 3575, 282, 4649, 314]
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (1, 2, 2)
    # what checkpoints/default_model.py writes now, reloaded as any HF consumer would, and the
    # folder transformers' GGUF path wrote before (when present) give the same ids
    ours.save_pretrained(tmp_path / "saved", save_jinja_files=False)
    assert_same_tokenizer(AutoTokenizer.from_pretrained(str(tmp_path / "saved")), ref, texts,
                          flags=False)
    folder = os.path.dirname(path)
    if os.path.isfile(os.path.join(folder, "tokenizer.json")):
        assert_same_tokenizer(AutoTokenizer.from_pretrained(folder), ref, texts, flags=False)
