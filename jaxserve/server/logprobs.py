"""Logprobs in the two OpenAI shapes, built from the engine's per-token {token_id: logprob} dicts.

Completions: {"tokens", "token_logprobs", "top_logprobs" (dicts), "text_offset"}.
Chat: {"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}.

Token strings come from the vocabulary entry rather than `decode([id])`, so that a token holding
half of a UTF-8 character still reports its exact `bytes` (byte-level BPE vocabularies such as
Llama-3's, Qwen2's and SmolLM2's, and SentencePiece `<0xNN>` byte-fallback pieces).
"""

from __future__ import annotations

import math
import re

from jaxserve.byte_level import byte_to_unicode

# vLLM clamps -inf to this so that the JSON stays valid (json.dumps would write -Infinity).
_MIN_LOGPROB = -9999.0
_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


# inverse of the byte-level alphabet: printable character -> byte
_BYTE_DECODER = {ch: b for b, ch in byte_to_unicode().items()}


def clamp(lp: float | None) -> float | None:
    if lp is None or math.isnan(lp):
        return None
    return max(float(lp), _MIN_LOGPROB)


class TokenRenderer:
    """token id -> (display text, exact bytes), cached per id (vocabularies are fixed)."""

    def __init__(self, tokenizer):
        self._tok = tokenizer
        self._cache: dict[int, tuple[str, bytes]] = {}

    def render(self, token_id: int) -> tuple[str, bytes]:
        hit = self._cache.get(token_id)
        if hit is None:
            hit = self._cache[token_id] = self._render(token_id)
        return hit

    def text(self, token_id: int) -> str:
        return self.render(token_id)[0]

    def _render(self, token_id: int) -> tuple[str, bytes]:
        piece = self._tok.convert_ids_to_tokens(int(token_id))
        if piece is None:  # id past the vocabulary (padded embedding rows)
            return "", b""
        m = _BYTE_PIECE.match(piece)
        if m:
            raw = bytes([int(m.group(1), 16)])
        elif all(ch in _BYTE_DECODER for ch in piece):
            raw = bytes(_BYTE_DECODER[ch] for ch in piece)
        elif "▁" in piece:  # SentencePiece word boundary
            raw = piece.replace("▁", " ").encode()
        else:
            raw = self._tok.decode([int(token_id)]).encode()
        return raw.decode("utf-8", errors="replace"), raw


def _top(lps: dict[int, float], k: int) -> list[tuple[int, float]]:
    if k <= 0:
        return []
    return sorted(lps.items(), key=lambda kv: kv[1], reverse=True)[:k]


def completion_logprobs(renderer: TokenRenderer, token_ids: list[int],
                        logprobs: list[dict[int, float] | None], num_top: int,
                        text_offset: int = 0) -> dict:
    """Legacy completions logprobs; a None entry (the first prompt token) stays None.

    `text_offset` is where the first token starts in the choice's text, so that streamed
    chunks continue the offsets of the previous ones."""
    tokens, token_lps, tops, offsets = [], [], [], []
    for tid, lps in zip(token_ids, logprobs):
        text = renderer.text(tid)
        tokens.append(text)
        offsets.append(text_offset)
        text_offset += len(text)
        if lps is None:
            token_lps.append(None)
            tops.append(None)
            continue
        token_lps.append(clamp(lps.get(tid)))
        # OpenAI's shape: the k most likely plus the sampled token (up to k+1 entries).
        top = {renderer.text(t): clamp(lp) for t, lp in _top(lps, num_top)}
        if tid in lps:
            top.setdefault(text, clamp(lps[tid]))
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops,
            "text_offset": offsets}


def chat_logprobs(renderer: TokenRenderer, token_ids: list[int],
                  logprobs: list[dict[int, float] | None], num_top: int) -> dict:
    """Chat logprobs: {"content": [...]} with `bytes` as lists of ints, as OpenAI returns."""
    content = []
    for tid, lps in zip(token_ids, logprobs):
        text, raw = renderer.render(tid)
        lps = lps or {}
        top = []
        for t, lp in _top(lps, num_top):
            t_text, t_raw = renderer.render(t)
            top.append({"token": t_text, "logprob": clamp(lp), "bytes": list(t_raw)})
        lp = clamp(lps.get(tid))
        content.append({"token": text, "logprob": _MIN_LOGPROB if lp is None else lp,
                        "bytes": list(raw), "top_logprobs": top})
    return {"content": content}
