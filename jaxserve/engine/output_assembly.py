"""A request's outputs as the engine builds them: n samples with their detokenizers and
logprobs, prompt logprobs, and the RequestOutput snapshots handed to callers.

A request with n > 1 fans out into n scheduler requests ("<id>#<i>"), which this module
reassembles into one RequestOutput. Sample 0 enters the scheduler first; the others wait in
`unscheduled` until the step that computes sample 0's last prompt token is dispatched, and at
admission fork its full prompt pages (Request.shares_prompt_with, BlockManager.fork), so the
prompt is prefilled once, not n times, prefix cache or not.
"""

from __future__ import annotations

import dataclasses
import random

from jaxserve.engine.detokenizer import IncrementalDetokenizer
from jaxserve.engine.outputs import CompletionOutput, RequestOutput
from jaxserve.engine.request import Request
from jaxserve.engine.sampling_params import SamplingParams


@dataclasses.dataclass
class SampleState:
    """One of the n sequences of a request, with its detokenizer and logprobs."""
    request: Request
    detok: IncrementalDetokenizer
    # as in vLLM, only for requests that ask for logprobs: other steps do not compute them
    logprobs: list[dict[int, float]] | None
    cumulative_logprob: float | None = None
    matcher: object = None  # structured output: its llguidance matcher (engine/grammar.py)

    def record_logprobs(self, out, slot: int, num_top: int) -> None:
        """Append the logprobs of the token step output `out` sampled in `slot`."""
        if self.logprobs is None:
            return
        lp = float(out.logprobs[slot])
        self.cumulative_logprob += lp
        entry = {int(out.token_ids[slot]): lp}
        for j in range(num_top):
            entry.setdefault(int(out.top_token_ids[slot, j]), float(out.top_logprobs[slot, j]))
        self.logprobs.append(entry)


@dataclasses.dataclass
class RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    samples: list[SampleState]
    arrival_time: float
    # entry i: logprobs of prompt token i (None for the first), filled as prefill steps return
    prompt_logprobs: list[dict[int, float] | None] | None = None
    first_scheduled_time: float | None = None
    # samples 1..n-1 until sample 0's prompt is computed (see the module docstring)
    unscheduled: list[Request] = dataclasses.field(default_factory=list)

    @classmethod
    def fan_out(cls, request_id: str, prompt: str | None, ids: list[int], params: SamplingParams,
                tokenizer, eos_token_ids: frozenset[int], rng: random.Random,
                arrival_time: float) -> "RequestState":
        """The request's n samples, each a scheduler Request with its own detokenizer."""
        samples = []
        for i in range(params.n):
            child_params = params
            if params.n > 1 and params.seed is not None:
                child_params = dataclasses.replace(params, seed=params.seed + i, n=1)
            req = Request(f"{request_id}#{i}" if params.n > 1 else request_id, ids, child_params,
                          arrival_time=arrival_time, eos_token_ids=eos_token_ids,
                          sampling_salt=rng.getrandbits(32),  # unseeded streams differ
                          # prompt logprobs need every prompt row computed, by sample 0
                          skip_prefix_cache=params.prompt_logprobs is not None and i == 0)
            wants = params.logprobs is not None
            if samples:
                req.shares_prompt_with = samples[0].request
            samples.append(SampleState(req, IncrementalDetokenizer(tokenizer, ids, child_params),
                                       [] if wants else None, 0.0 if wants else None))
        return cls(request_id, prompt, ids, params, samples, arrival_time,
                   prompt_logprobs=None if params.prompt_logprobs is None else [None],
                   unscheduled=[s.request for s in samples[1:]])

    def record_prompt_logprobs(self, start_pos: int, first_row: int, num_rows: int,
                               out) -> None:
        """Prompt logprobs of sample 0's prefill chunk at `start_pos`, whose rows in the step
        output `out` start at first_row."""
        k = self.params.prompt_logprobs
        for r in range(first_row, first_row + num_rows):
            pos = start_pos + (r - first_row) + 1  # the prompt token this row predicts
            if pos >= len(self.prompt_token_ids):
                break
            if pos != len(self.prompt_logprobs):
                continue  # recorded before a preemption made us recompute it
            entry = {self.prompt_token_ids[pos]: float(out.prompt_logprobs[r])}
            for j in range(k):
                entry.setdefault(int(out.prompt_top_token_ids[r, j]),
                                 float(out.prompt_top_logprobs[r, j]))
            self.prompt_logprobs.append(entry)

    def prompt_targets(self, start_pos: int, num_rows: int) -> list[int]:
        """Per row of a prefill chunk, the prompt token it predicts (-1 past the prompt)."""
        ids = self.prompt_token_ids
        return [ids[p + 1] if p + 1 < len(ids) else -1
                for p in range(start_pos, start_pos + num_rows)]

    @property
    def finished(self) -> bool:
        return all(s.request.finish_reason is not None for s in self.samples)

    def output(self) -> RequestOutput:
        """A snapshot of the request: every sample's text and tokens so far."""
        outs = []
        for i, sample in enumerate(self.samples):
            req = sample.request
            outs.append(CompletionOutput(
                index=i, text=sample.detok.text, token_ids=list(req.output_token_ids),
                finish_reason=req.finish_reason, stop_reason=req.stop_reason,
                logprobs=None if sample.logprobs is None else list(sample.logprobs),
                cumulative_logprob=sample.cumulative_logprob))
        queue_time = (None if self.first_scheduled_time is None
                      else self.first_scheduled_time - self.arrival_time)
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, outs,
                             finished=self.finished, prompt_logprobs=self.prompt_logprobs,
                             num_cached_tokens=self.samples[0].request.num_cached_tokens,
                             queue_time=queue_time)
