"""Constrained decoding with llguidance: compile a request's StructuredOutputsParams into a
matcher, and fill the packed token bitmasks the sampler applies (runner/sampling.py).

Host side, no jax. llguidance builds its tokenizer from the model tokenizer's tokenizer.json
text (once per engine) and compiles a grammar into a matcher; every sequence gets its own copy
(`deep_copy`, microseconds), advanced by each token it samples. A bitmask row is i32[ceil(V/32)]:
bit v % 32 of word v // 32 set means token v is allowed; llguidance allows EOS only where the
grammar accepts, and only EOS once the grammar is complete.

Compiles run on a small thread pool (llguidance releases the GIL) and are cached by the
constraint's canonical text, failures included, so a repeated bad grammar costs nothing and a
slow one costs one timeout. A compile error or timeout is a RequestRejectedError naming the
parameter; the engine never sees a broken matcher.
"""

from __future__ import annotations

import collections
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

import numpy as np

from jaxserve.engine.input_limits import RequestRejectedError
from jaxserve.engine.sampling_params import StructuredOutputsParams

COMPILE_TIMEOUT_S = 10.0
CACHE_SIZE = 256


def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def tokenizer_json(tokenizer) -> str:
    """The tokenizer.json text of a transformers fast tokenizer (or a `tokenizers` one)."""
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    if not hasattr(backend, "to_str"):
        raise RequestRejectedError("structured_outputs", "structured output needs a fast "
                                   "(tokenizers-backed) tokenizer")
    import copy
    backend = copy.copy(backend)
    backend.no_padding()
    backend.no_truncation()
    return backend.to_str()


class _Entry:
    """A cached compile: the template matcher, or the error message."""

    def __init__(self, template=None, error: str | None = None):
        self.template, self.error = template, error


class GrammarCompiler:
    def __init__(self, tokenizer, vocab_size: int, eos_token_ids, *, workers: int = 2,
                 cache_size: int = CACHE_SIZE, timeout_s: float = COMPILE_TIMEOUT_S):
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._eos = sorted(int(t) for t in eos_token_ids)
        self._timeout_s = timeout_s
        self._cache_size = cache_size
        self._cache: collections.OrderedDict[tuple, _Entry] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="jaxserve-grammar")
        self._llg_tokenizer = None
        self._executor = None
        # for metrics: compiles done (hits excluded) and their total time
        self.num_compiles = 0
        self.compile_seconds = 0.0
        self.num_cache_hits = 0

    def prepare_in_background(self) -> None:
        """Build llguidance's tokenizer on the pool now (~0.5 s for a 49k vocabulary), so the
        first constrained request does not wait for it; without llguidance installed (it is
        only needed for structured output) nothing happens."""
        def build():
            try:
                self._tokenizer_for_llg()
            except Exception:  # noqa: BLE001 - the first constrained request reports it
                pass
        self._pool.submit(build)

    # -- compile -------------------------------------------------------------------------------
    def _tokenizer_for_llg(self):
        with self._lock:
            if self._llg_tokenizer is None:
                import llguidance
                self._llg_tokenizer = llguidance.LLTokenizer(
                    tokenizer_json(self._tokenizer), n_vocab=self.vocab_size,
                    eos_token=self._eos or None)
            return self._llg_tokenizer

    @staticmethod
    def _grammar_text(spec: StructuredOutputsParams) -> str:
        import llguidance
        kind, text, compact = spec.key
        if kind in ("json", "json_object"):
            return llguidance.LLMatcher.grammar_from_json_schema(
                text, overrides={"whitespace_flexible": False} if compact else None)
        if kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(text)
        if kind == "choice":
            return llguidance.grammar_from("choice", text)
        return llguidance.grammar_from("grammar", text)  # Lark, or GBNF converted to Lark

    def _build(self, spec: StructuredOutputsParams) -> _Entry:
        import llguidance
        start = time.perf_counter()
        try:
            grammar = self._grammar_text(spec)
            matcher = llguidance.LLMatcher(self._tokenizer_for_llg(), grammar, log_level=0)
            entry = _Entry(error=matcher.get_error()) if matcher.is_error() else _Entry(matcher)
        except (ValueError, TypeError, RuntimeError) as e:  # grammar conversion errors
            entry = _Entry(error=str(e))
        with self._lock:
            self.num_compiles += 1
            self.compile_seconds += time.perf_counter() - start
        return entry

    def compile(self, spec: StructuredOutputsParams, param: str | None = None):
        """The template matcher of `spec` (cached); RequestRejectedError on `param` (default:
        spec.param) when it does not compile within the timeout."""
        param = param or spec.param
        key = spec.key
        with self._lock:
            entry = self._cache.get(key)
            if entry is not None:
                self._cache.move_to_end(key)
                self.num_cache_hits += 1
        if entry is None:
            future = self._pool.submit(self._build, spec)
            try:
                entry = future.result(timeout=self._timeout_s)
            except FutureTimeout:
                entry = _Entry(error=f"it did not compile within {self._timeout_s:g} s")
            with self._lock:
                self._cache[key] = entry
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        if entry.error is not None:
            message = " ".join(entry.error.split())[:2000]  # one line, bounded
            raise RequestRejectedError(param, f"Invalid {spec.kind} constraint: {message}")
        return entry.template

    def new_matcher(self, spec: StructuredOutputsParams):
        """A fresh matcher for one sequence."""
        return self.compile(spec).deep_copy()

    # -- masks ---------------------------------------------------------------------------------
    def fill_bitmasks(self, matchers: list) -> np.ndarray:
        """i32[len(matchers), ceil(V/32)]: each matcher's allowed next tokens, filled in
        parallel by llguidance's executor."""
        from llguidance.numpy import fill_next_token_bitmask_par

        import llguidance
        if self._executor is None:
            self._executor = llguidance.LLExecutor()
        masks = np.full((len(matchers), bitmask_words(self.vocab_size)), -1, np.int32)
        if matchers:
            fill_next_token_bitmask_par(self._executor, [(m, i) for i, m in enumerate(matchers)],
                                        masks)
        return masks

    def fill_bitmasks_along(self, matchers: list, drafts: list[list[int]]) -> list[np.ndarray]:
        """Per matcher, i32[1 + len(its drafts), ceil(V/32)]: the allowed next tokens now and
        after each of its drafts (which draft_prefix has checked), for the rows of a step that
        verifies them. One parallel fill per draft depth; every matcher is rolled back after."""
        out = [[row] for row in self.fill_bitmasks(matchers)]
        for depth in range(max((len(d) for d in drafts), default=0)):
            live = [i for i, d in enumerate(drafts) if len(d) > depth]
            for i in live:
                if not matchers[i].consume_token(drafts[i][depth]):
                    raise RuntimeError(f"a draft outside its grammar: {matchers[i].get_error()}")
            for i, row in zip(live, self.fill_bitmasks([matchers[i] for i in live])):
                out[i].append(row)
        for matcher, d in zip(matchers, drafts):
            if d:
                matcher.rollback(len(d))
        return [np.stack(rows) for rows in out]

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def draft_prefix(matcher, drafts: list[int]) -> list[int]:
    """The drafts a constrained sequence verifies: the longest prefix its grammar accepts that
    leaves the grammar unfinished after every draft. A draft that would finish it is left for
    the step to sample, so the token that ends a grammar is always a sequence's last new token
    of its step, where the engine ends the request, as without speculation."""
    if matcher.is_stopped():  # only EOS may follow; and tokens fed now would not roll back
        return []
    kept = drafts[:matcher.validate_tokens(drafts)]
    for i, token in enumerate(kept):
        matcher.consume_token(token)
        if matcher.is_stopped():
            matcher.rollback(i + 1)
            return kept[:i]
    if kept:
        matcher.rollback(len(kept))
    return kept
