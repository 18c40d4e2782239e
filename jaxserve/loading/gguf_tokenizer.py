"""Build the tokenizer a GGUF file describes, from its metadata, with the `tokenizers` library.

Data flow: `jaxserve.loading.gguf.load_gguf` reads the header; its `tokenizer.*` metadata
(vocabulary, merges or scores, token types, special ids, flags, chat template) comes here and
leaves as a transformers `PreTrainedTokenizerFast`, the same object an HF folder's tokenizer.json
gives, so the server (chat template), the detokenizer (decode) and `checkpoints/default_model.py`
(save_pretrained) need not know the model came from a GGUF.

Why not `AutoTokenizer.from_pretrained(dir, gguf_file=...)`: transformers' GGUF reader imports
torch, and jaxserve must run without it. The result here is meant to be the one transformers
builds (tests/test_gguf_tokenizer.py checks token ids, decode and chat template against it):
  * "gpt2" (byte-level BPE): GPT-2's byte alphabet, the file's merges, a ByteLevel pre-tokenizer
    (or, for the `tokenizer.ggml.pre` names listed in _SPLITS, that model's split regex);
  * "llama" (SentencePiece BPE): the vocabulary as spelled in the file, merges from the file or
    derived from the scores, byte fallback through the `<0xXX>` tokens, a "first"-only `▁` prefix.
Control tokens (token_type 3) become special added tokens, user-defined ones (4) plain added
tokens, so `<|im_start|>` and the like are never cut into pieces.

One deliberate difference: transformers' GGUF path also registers its tokenizer classes' default
special tokens ("<|endoftext|>" for gpt2, "<unk>"/"<s>"/"</s>" for llama) and appends them as new
ids past the model's vocabulary when the file lacks them (e.g. Llama 3 has no "<|endoftext|>").
Such an id has no embedding row; we never add a token the file does not have.
"""

from __future__ import annotations

import numpy as np

from jaxserve.byte_level import byte_to_unicode

# llama.cpp's token types (gguf.TokenType): NORMAL 1, UNKNOWN 2, CONTROL 3, USER_DEFINED 4,
# UNUSED 5, BYTE 6.
_CONTROL, _USER_DEFINED = 3, 4

# `tokenizer.ggml.pre` -> the split regex of the model family (the published patterns of the
# Llama 3 and Qwen2 tokenizers), as transformers maps them. Other names (e.g. SmolLM2's
# "smollm", "gpt-2", "default") keep the ByteLevel pre-tokenizer's own GPT-2 regex.
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral", "dbrx",
                     "smaug-bpe"), _LLAMA3),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), _QWEN2),
}

SUPPORTED_MODELS = ("gpt2", "llama")


class GGUFTokenizerError(ValueError):
    """The tokenizer metadata cannot be built; gguf.py re-raises it as a GGUFError with the path."""


def _merges(meta: dict) -> list[tuple[str, str]] | None:
    merges = meta.get("tokenizer.ggml.merges")
    if merges is None:
        return None
    pairs = []
    for i, m in enumerate(merges):
        parts = m.split(" ") if isinstance(m, str) else ()
        if len(parts) != 2:
            raise GGUFTokenizerError(f"metadata 'tokenizer.ggml.merges' entry #{i} is {m!r}, "
                                     "expected two tokens separated by one space")
        pairs.append((parts[0], parts[1]))
    return pairs


def _merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    # SentencePiece files list no merges: every token that splits into two vocabulary tokens is
    # their merge, ranked by the merged token's score (best first); ties keep the longer left
    # part first, then vocabulary order. This is the order transformers derives, so BPE picks
    # the same merges; sorted() is stable, which keeps the per-token order on equal keys.
    found = []
    for token, score in scores.items():
        local = [(token[:i], token[i:], score) for i in range(1, len(token))
                 if token[:i] in vocab and token[i:] in vocab]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        found.extend(local)
    found.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in found]


def _bpe(**kwargs):
    from tokenizers import Tokenizer
    from tokenizers.models import BPE

    try:
        return Tokenizer(BPE(**kwargs))
    except Exception as e:  # noqa: BLE001 - the Rust side raises a bare Exception
        # e.g. a merge naming a token that is not in the vocabulary
        raise GGUFTokenizerError(f"the vocabulary and merges do not form a BPE model: {e}") from None


def _byte_level_backend(meta: dict, tokens: list[str]):
    from tokenizers import Regex, decoders, pre_tokenizers

    spell = byte_to_unicode()
    alphabet = set(spell.values())
    # A token outside the byte alphabet is stored as its text; BPE needs its byte spelling.
    vocab = {t if set(t) <= alphabet else "".join(spell[b] for b in t.encode("utf-8")): i
             for i, t in enumerate(tokens)}
    merges = _merges(meta)
    if merges is None:
        raise GGUFTokenizerError("a 'gpt2' tokenizer needs 'tokenizer.ggml.merges'")
    tk = _bpe(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
              end_of_word_suffix="", fuse_unk=False)
    split = _SPLITS.get(meta.get("tokenizer.ggml.pre"))
    if split is None:
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    # A control token using characters outside the byte alphabet is a converter mislabel (its
    # byte spelling is the real vocabulary entry); making it special would add a new id.
    return tk, vocab, (lambda t: set(t) <= alphabet)


def _sentencepiece_backend(meta: dict, tokens: list[str]):
    from tokenizers import decoders, pre_tokenizers

    vocab = {t: i for i, t in enumerate(tokens)}
    merges = _merges(meta)
    if merges is None:
        scores = meta.get("tokenizer.ggml.scores")
        if scores is None or len(scores) != len(tokens):
            raise GGUFTokenizerError("a 'llama' tokenizer without 'tokenizer.ggml.merges' needs "
                                     "one 'tokenizer.ggml.scores' entry per token")
        merges = _merges_from_scores(vocab, dict(zip(tokens, np.asarray(scores).tolist())))
    tk = _bpe(vocab=vocab, merges=merges, dropout=None, fuse_unk=True, byte_fallback=True)
    tk.normalizer = None
    # "first": only the start of the text gets the "▁" word prefix, not each special-token
    # split, which is what SentencePiece does (and transformers' non-legacy Llama tokenizer).
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first",
                                                split=False)
    tk.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                    decoders.Fuse(), decoders.Strip(content=" ", left=1)])
    return tk, vocab, (lambda t: True)


def build_tokenizer(meta: dict):
    """GGUF metadata dict (as gguf.py reads it) -> transformers PreTrainedTokenizerFast.

    Raises GGUFTokenizerError for a tokenizer model we do not build or inconsistent fields.
    """
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise GGUFTokenizerError("metadata 'tokenizer.ggml.tokens' is not a list of strings")
    if kind == "gpt2":
        tk, vocab, may_be_special = _byte_level_backend(meta, tokens)
    elif kind == "llama":
        tk, vocab, may_be_special = _sentencepiece_backend(meta, tokens)
    else:
        raise GGUFTokenizerError(f"tokenizer.ggml.model = {kind!r} is not supported (supported: "
                                 f"{', '.join(SUPPORTED_MODELS)})")

    types = meta.get("tokenizer.ggml.token_type")
    types = [] if types is None else np.asarray(types).tolist()
    if types and len(types) != len(tokens):
        raise GGUFTokenizerError(f"metadata 'tokenizer.ggml.token_type' has {len(types)} entries "
                                 f"for {len(tokens)} tokens")
    control = [AddedToken(t, normalized=False, special=True)
               for t, ty in zip(tokens, types) if ty == _CONTROL and may_be_special(t)]
    user = [AddedToken(t, normalized=False, special=False)
            for t, ty in zip(tokens, types) if ty == _USER_DEFINED and t in vocab]
    if control:
        tk.add_special_tokens(control)
    if user:
        tk.add_tokens(user)

    def token(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}")
        if i is None:
            return None
        i = int(i)
        if not 0 <= i < len(tokens):
            raise GGUFTokenizerError(f"metadata 'tokenizer.ggml.{key}' = {i} is not a token id "
                                     f"(the vocabulary has {len(tokens)} tokens)")
        return tokens[i]

    kwargs = {"bos_token": token("bos_token_id"), "eos_token": token("eos_token_id"),
              "unk_token": token("unknown_token_id"), "pad_token": token("padding_token_id")}
    # The flags are passed only when the file states them, as transformers does: a stated flag
    # is saved into tokenizer_config.json. SentencePiece files without it get a BOS, which is
    # what llama.cpp does for them.
    for flag in ("add_bos_token", "add_eos_token"):
        if f"tokenizer.ggml.{flag}" in meta:
            kwargs[flag] = bool(meta[f"tokenizer.ggml.{flag}"])
    if kind == "llama":
        kwargs.setdefault("add_bos_token", True)
    if "tokenizer.chat_template" in meta:
        kwargs["chat_template"] = meta["tokenizer.chat_template"]
    # The wrapper's post-processor (BOS/EOS template) is rebuilt from these flags and tokens.
    return PreTrainedTokenizerFast(tokenizer_object=tk, **kwargs)
