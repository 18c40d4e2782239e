"""A FakeEngine with AsyncEngine's interface, so that the server is tested without jax or a model.

It uses a real byte-level BPE tokenizer (trained here, offline, in well under a second) with a
ChatML template, and "generates" a fixed counting text: choice i of a request starts i words in;
a sampled (temperature > 0) request with a seed shifts by the seed, so equal seeds give equal
text. Logprobs are fixed numbers (sampled token -0.5, alternatives -1, -2, ...).

Prompts can steer it: "engine-reject" -> ValueError before any output (an invalid request as
the engine sees it); "engine-crash" -> RuntimeError after two tokens (an engine fault).
Everything it was asked to do is recorded (requests, aborts) for the tests to inspect.
"""

from __future__ import annotations

import asyncio
import itertools
import time

from jaxserve.engine.input_limits import InputLimits
from jaxserve.engine.outputs import CompletionOutput, RequestOutput

CORPUS = ("one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
          "fifteen sixteen seventeen eighteen nineteen twenty. The quick brown fox jumps over "
          "the lazy dog. Hello world! Bonjour, ça va? 日本語 🙂 0123456789 def main(): return 42")
COUNT_TEXT = (" one two three four five six seven eight nine ten eleven twelve thirteen fourteen"
              " fifteen sixteen seventeen eighteen nineteen twenty")
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_TOKENIZER = None


def build_tokenizer():
    """A transformers PreTrainedTokenizerFast over a freshly trained byte-level BPE (cached)."""
    global _TOKENIZER
    if _TOKENIZER is None:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        from transformers import PreTrainedTokenizerFast

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator([CORPUS, COUNT_TEXT] * 8, trainer=trainer)
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                       pad_token="<|endoftext|>")
        fast.chat_template = CHAT_TEMPLATE
        _TOKENIZER = fast
    return _TOKENIZER


class FakeEngine:
    def __init__(self, model_name: str = "fake-model", max_model_len: int = 128,
                 token_delay: float = 0.002, max_num_seqs: int = 256):
        self.tokenizer = build_tokenizer()
        self.model_name = model_name
        self.max_model_len = max_model_len
        # the real engine's rules, as AsyncEngine exposes them to the server
        self.input_limits = InputLimits(max_model_len, len(self.tokenizer))
        self._grammar = None
        self.max_num_seqs = max_num_seqs  # the server's capacity reads it, as from AsyncEngine
        self.token_delay = token_delay  # seconds per generated token
        self.requests: dict[str, tuple[list[int], object]] = {}
        self.aborted: list[str] = []
        self.abort_times: dict[str, float] = {}
        self.generated_at_abort: dict[str, int] = {}  # tokens a request had when it was aborted
        self._generated: dict[str, int] = {}  # tokens generated so far, per request
        self.active: set[str] = set()
        self.stale = False  # tests flip this to make the heartbeat look stuck
        self.started = self.stopped = False
        self.shutdown_timeout: float | None = None
        self._abort_events: dict[str, asyncio.Event] = {}
        self._seq = self.tokenizer.encode(COUNT_TEXT, add_special_tokens=False)
        self._unseeded = itertools.count(7)
        self._prefix_queries = self._prefix_hits = 0

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        self.started = True

    async def shutdown(self, timeout: float) -> None:
        self.shutdown_timeout = timeout
        for ev in self._abort_events.values():
            ev.set()
        self.stopped = True

    def is_running(self) -> bool:
        return self.started and not self.stopped

    def heartbeat_age(self) -> float:
        return 1e6 if self.stale else 0.01

    def stats(self) -> dict:
        n = len(self.active)
        return {"num_running": n, "num_waiting": 0, "kv_cache_usage": min(1.0, n / 10),
                "prefix_cache_queries": self._prefix_queries,
                "prefix_cache_hits": self._prefix_hits, "num_preemptions": 0,
                "num_free_pages": 100 - n, "num_pages": 100}

    async def compile_grammar(self, spec, param=None) -> None:
        """The real compiler over this engine's tokenizer: constraint errors are real; the
        fake's outputs ignore the constraint."""
        if self._grammar is None:
            from jaxserve.engine.grammar import GrammarCompiler
            self._grammar = GrammarCompiler(self.tokenizer, len(self.tokenizer),
                                            [self.tokenizer.eos_token_id or 0])
        self._grammar.compile(spec, param)

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        self.generated_at_abort[request_id] = self._generated.get(request_id, 0)
        self.abort_times[request_id] = time.monotonic()
        ev = self._abort_events.get(request_id)
        if ev is not None:
            ev.set()

    # -- generation -------------------------------------------------------------------------

    def _next_token(self, start: int, step: int) -> int:
        return self._seq[(start + step) % len(self._seq)]

    def _logprobs(self, tok: int, k: int) -> dict[int, float]:
        vocab = len(self.tokenizer)
        out = {tok: -0.5}
        for j in range(k):
            out.setdefault((tok + 1 + j) % vocab, -1.0 - j)
        return out

    async def generate(self, request_id, prompt_token_ids, params, prompt=None):
        if not self.is_running():
            raise RuntimeError("engine is not running")
        self.input_limits.check(prompt_token_ids, params)  # as LLMEngine.add_request does
        text = prompt if prompt is not None else self.tokenizer.decode(prompt_token_ids)
        if "engine-reject" in text:
            raise ValueError("the fake engine rejects this prompt")
        self.requests[request_id] = (list(prompt_token_ids), params)
        self._prefix_queries += len(prompt_token_ids)
        self._prefix_hits += len(prompt_token_ids) // 2
        aborted = self._abort_events[request_id] = asyncio.Event()
        self.active.add(request_id)
        shift = 0
        if params.temperature > 0:
            shift = params.seed if params.seed is not None else next(self._unseeded)
        eos = self.tokenizer.eos_token_id
        choices = [CompletionOutput(index=i, text="", token_ids=[],
                                    logprobs=[] if params.logprobs is not None else None)
                   for i in range(params.n)]
        prompt_lps = None
        if params.prompt_logprobs is not None:
            prompt_lps = [None] + [self._logprobs(t, params.prompt_logprobs)
                                   for t in prompt_token_ids[1:]]
        max_tokens = params.max_tokens or (self.max_model_len - len(prompt_token_ids))
        try:
            for step in itertools.count():
                try:
                    await asyncio.wait_for(aborted.wait(), self.token_delay)
                    return  # aborted: the request just ends
                except asyncio.TimeoutError:
                    pass
                if "engine-crash" in text and step == 2:
                    raise RuntimeError("fake engine fault")
                for i, c in enumerate(choices):
                    if c.finished:
                        continue
                    tok = self._next_token(i * 2 + shift, step)
                    c.token_ids.append(tok)
                    if c.logprobs is not None:
                        c.logprobs.append(self._logprobs(tok, params.logprobs))
                    full = self.tokenizer.decode(c.token_ids,
                                                 skip_special_tokens=params.skip_special_tokens)
                    c.text = full
                    for s in params.stop:
                        at = full.find(s)
                        if at >= 0:
                            keep = len(s) if params.include_stop_str_in_output else 0
                            c.text, c.finish_reason, c.stop_reason = full[:at + keep], "stop", s
                            break
                    if c.finished:
                        continue
                    if tok in params.stop_token_ids or (tok == eos and not params.ignore_eos):
                        c.finish_reason, c.stop_reason = "stop", tok
                    elif len(c.token_ids) >= max_tokens:
                        c.finish_reason = "length"
                done = all(c.finished for c in choices)
                self._generated[request_id] = max(len(c.token_ids) for c in choices)
                yield RequestOutput(
                    request_id=request_id, prompt=prompt, prompt_token_ids=list(prompt_token_ids),
                    outputs=[CompletionOutput(c.index, c.text, list(c.token_ids), c.finish_reason,
                                              c.stop_reason,
                                              list(c.logprobs) if c.logprobs is not None else None)
                             for c in choices],
                    finished=done, prompt_logprobs=prompt_lps)
                if done:
                    return
        finally:
            self.active.discard(request_id)
            self._abort_events.pop(request_id, None)
