"""Incremental detokenization and stop strings, one generated token at a time (host side, no jax).

The engine feeds each sampled id to `IncrementalDetokenizer.add_token` and streams the returned
delta; `text` is the output text streamed so far, which is what the server diffs against.

Why a window: decoding one token alone is wrong in two ways. A byte-level BPE token may hold only
part of a UTF-8 character (decode gives U+FFFD until the rest arrives), and SentencePiece drops the
leading space of the first token of any decode. So each step decodes a short window of preceding
tokens with and without the new ones and emits the difference, and waits while the text ends in
an incomplete character (the idea of vLLM's detokenize_incrementally, on ids).

Stop strings: the earliest occurrence of any stop string in the new text, including one that
started in earlier tokens, ends the output; the text is cut before it (or after it with
include_stop_str_in_output); as in vLLM, a stop string must end after the text of the first
min_tokens tokens. Text that could still turn out to be the start of a stop string is held back
from the stream until the next tokens settle it, or until the output ends (finish_reason, the
max_tokens-th token, or flush()), when everything left is released.
"""

from __future__ import annotations

from collections.abc import Sequence

from jaxserve.engine.sampling_params import SamplingParams

_REPLACEMENT = "\ufffd"
# Prompt tokens decoded in front of the first output token, so its leading space and any
# merge with the prompt's tail come out as they would in a full decode (vLLM uses 5 too).
_PROMPT_CONTEXT = 5


def backend_decoder(tokenizer):
    """The Rust `tokenizers` decode under a Hugging Face fast tokenizer, when the wrapper adds
    nothing to it for our arguments (no clean-up; no _decode override in a subclass): it is
    the same text for ~1/6 of the cost, which matters at two decodes per token per request.
    None otherwise (slow tokenizers, test doubles)."""
    try:
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:
        return None
    if not isinstance(tokenizer, TokenizersBackend):
        return None
    if type(tokenizer)._decode is not TokenizersBackend._decode:
        return None
    backend = getattr(tokenizer, "_tokenizer", None)
    return None if backend is None else backend.decode


class IncrementalDetokenizer:
    """Turns one request's generated ids into streamed text deltas, watching for stop strings.

    add_token(id, finish_reason=None) -> (delta, stop): the text newly safe to stream, and the
    stop string that ended the output (None otherwise). The engine passes the request's
    finish_reason when this token ended it ("stop" for EOS / a stop token id, "length", "abort"):
    the held-back text is then released, and, as in vLLM, the text of a stopping EOS or stop
    token id is left out unless include_stop_str_in_output. The max_tokens-th token ends the
    output even without a finish_reason. flush() ends it from outside (e.g. an abort).
    Once the output has ended, add_token raises.
    """

    def __init__(self, tokenizer, prompt_token_ids: Sequence[int], params: SamplingParams):
        self.tokenizer = tokenizer
        self._backend_decode = backend_decoder(tokenizer)
        self.skip_special_tokens = params.skip_special_tokens
        self.stops = list(params.stop or [])
        self.include_stop = params.include_stop_str_in_output
        self.min_tokens = params.min_tokens
        self.max_tokens = params.max_tokens
        self._max_stop = max((len(s) for s in self.stops), default=0)
        # Only the tail of the prompt matters for decoding; the window grows with the outputs.
        self._ids: list[int] = list(prompt_token_ids[-_PROMPT_CONTEXT:])
        self._read = len(self._ids)  # ids before this are already in the text
        self._prefix = 0             # start of the decode window (context for the next ids)
        self._text = ""              # decoded output text (complete characters only)
        self._emitted = 0            # characters of _text already streamed
        self._stop_floor = 0         # stop strings must end after this (text of min_tokens)
        self._ended = False
        self.stop_reason: str | None = None
        self.num_output_tokens = 0

    @property
    def text(self) -> str:
        """The output text streamed so far (the whole output once it has ended)."""
        return self._text[:self._emitted]

    @property
    def finished(self) -> bool:
        return self._ended

    # -- decoding -----------------------------------------------------------------------------
    def _decode(self, ids: list[int]) -> str:
        if self._backend_decode is not None:
            return self._backend_decode(ids, skip_special_tokens=self.skip_special_tokens)
        # No clean-up of spaces: "a ." -> "a." would change text already streamed.
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens,
                                     clean_up_tokenization_spaces=False)

    def _new_text(self, force: bool) -> str:
        """Text of the ids after _read, given the window before it; '' while incomplete."""
        if self._read == len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        full_text = self._decode(self._ids[self._prefix:])
        if len(full_text) <= len(prefix_text):
            return ""  # e.g. a skipped special token: nothing new, keep the window as it is
        if full_text.endswith(_REPLACEMENT) and not force:
            return ""  # part of a multi-byte character; wait for the rest
        self._prefix, self._read = self._read, len(self._ids)
        return full_text[len(prefix_text):]

    # -- stop strings -------------------------------------------------------------------------
    def _find_stop(self, check_from: int) -> tuple[int, str] | None:
        """Earliest stop string ending after text[:check_from]; ties go to the first listed."""
        best = None
        for s in self.stops:
            i = self._text.find(s, max(0, check_from - len(s) + 1))
            if i != -1 and (best is None or i < best[0]):
                best = (i, s)
        return best

    def _held_back(self) -> int:
        """Length of the longest text suffix that is a proper prefix of some stop string: the
        characters that must not be streamed yet because a stop string may start there."""
        if self.include_stop or not self.stops:
            return 0  # a stop string is part of the output then, so nothing can be taken back
        tail = self._text[-(self._max_stop - 1):] if self._max_stop > 1 else ""
        for n in range(len(tail), 0, -1):
            suffix = tail[-n:]
            if any(len(s) > n and s.startswith(suffix) for s in self.stops):
                return n
        return 0

    def _advance(self, new: str, release: bool) -> tuple[str, str | None]:
        new_from = len(self._text)
        self._text += new
        if self.num_output_tokens <= self.min_tokens:
            # vLLM: text of the first min_tokens tokens cannot complete a stop string.
            self._stop_floor = len(self._text)
        check_from = max(new_from, self._stop_floor)
        if self.stops and len(self._text) > check_from:
            hit = self._find_stop(check_from)
            if hit is not None:
                i, s = hit
                self._text = self._text[:i + len(s) if self.include_stop else i]
                self.stop_reason, self._ended = s, True
                delta = self._text[self._emitted:]
                self._emitted = len(self._text)
                return delta, s
        upto = len(self._text) if release else len(self._text) - self._held_back()
        delta = self._text[self._emitted:upto]
        self._emitted = max(self._emitted, upto)
        return delta, None

    # -- public -------------------------------------------------------------------------------
    def add_token(self, token_id: int, finish_reason: str | None = None) -> tuple[str, str | None]:
        """Append one generated id; return (text delta to stream, stop string or None).
        finish_reason: the request's, when this token ended it (see the class docstring)."""
        if self._ended:
            raise RuntimeError("the output already ended"
                               + (f" at stop string {self.stop_reason!r}" if self.stop_reason
                                  else ""))
        self.num_output_tokens += 1
        ends = finish_reason is not None or self.num_output_tokens == self.max_tokens
        if finish_reason == "stop" and not self.include_stop:
            new = ""  # a stopping EOS / stop token id is not part of the text
        else:
            self._ids.append(int(token_id))
            new = self._new_text(force=False)
        delta, stop = self._advance(new, release=False)
        if stop is None and ends:
            delta += self.flush()
        return delta, stop

    def add_tokens(self, token_ids: Sequence[int]) -> tuple[str, str | None]:
        """add_token over several ids (none of them a finishing one); stops at a stop string."""
        out = []
        for t in token_ids:
            delta, stop = self.add_token(t)
            out.append(delta)
            if stop is not None or self._ended:
                return "".join(out), stop
        return "".join(out), None

    def flush(self) -> str:
        """End the output: return whatever was held back (an incomplete trailing character
        included, as U+FFFD, as a full decode shows it). Idempotent."""
        if self._ended:
            return ""
        delta, _ = self._advance(self._new_text(force=True), release=True)
        self._ended = True
        return delta
