"""LLMEngine: add_request / abort_request / step. The loop fits on one screen:
schedule -> runner.dispatch -> runner.fetch -> scheduler.update_from_output -> detokenize, stop
strings, outputs.

Async scheduling (on by default): one step is kept in flight. step() schedules and dispatches
step N+1 first, then waits for step N and processes its tokens, so the host's scheduling,
packing, detokenizing and output building run while the device computes. Step N+1 reads the
tokens step N sampled straight from the device. The price is at most one wasted row for a
request that step N ends (EOS, stop string), dropped on arrival. Steps with penalty requests
in the system run synchronously: penalties need every output token on the host.

Host-side only: the runner (device side) is handed in, so this module never imports jax.
A request with n > 1 becomes n child sequences in the scheduler (ids "<id>#<i>"); they share the
prompt's full pages through the prefix cache, and their outputs are reassembled here.
"""

from __future__ import annotations

import dataclasses
import random
import time

from jaxserve.engine.block_manager import BlockManager
from jaxserve.engine.detokenizer import IncrementalDetokenizer
from jaxserve.engine.outputs import CompletionOutput, RequestOutput
from jaxserve.engine.request import Request, RequestStatus
from jaxserve.engine.sampling_params import SamplingParams
from jaxserve.engine.scheduler import (PLACEHOLDER, RequestRejectedError, Scheduler,
                                       SchedulerOutput)


@dataclasses.dataclass
class _Sample:
    """One of the n sequences of a request, with its detokenizer and logprobs."""
    request: Request
    detok: IncrementalDetokenizer
    logprobs: list[dict[int, float]] | None
    # as in vLLM, only for requests that ask for logprobs: other steps do not compute them
    cumulative_logprob: float | None = None


@dataclasses.dataclass
class _RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    samples: list[_Sample]
    prompt_logprobs: list[dict[int, float] | None] | None = None
    arrival_time: float = 0.0
    first_scheduled_time: float | None = None


@dataclasses.dataclass
class _DeviceStep:
    """A step dispatched to the device whose results the host has not processed yet."""
    sched: SchedulerOutput
    pending: object  # the runner's pending StepOutput
    slot_of: dict[str, int]  # request id -> its sequence slot in the step
    wants_prompt_logprobs: bool


@dataclasses.dataclass
class _FedSequence:
    """A scheduled sequence as the runner sees it, with in-flight tokens as device refs."""
    token_ids: list[int]  # -(slot + 1): the token the previous step sampled for that slot
    start_pos: int
    page_ids: list[int]


class LLMEngine:
    def __init__(self, runner, tokenizer, *, eos_token_ids, max_num_seqs: int,
                 max_num_batched_tokens: int, max_model_len: int, page_size: int,
                 enable_prefix_caching: bool = True, vocab_size: int, seed: int = 0,
                 async_scheduling: bool = True):
        self.runner = runner
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.block_manager = BlockManager(runner.num_pages, page_size, enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, max_num_seqs, max_num_batched_tokens,
                                   max_model_len)
        self._states: dict[str, _RequestState] = {}
        self._parent_of: dict[str, tuple[str, int]] = {}  # child id -> (request id, index)
        self._rng = random.Random(seed)
        self.async_scheduling = async_scheduling
        self._in_flight: _DeviceStep | None = None
        self.num_steps = 0
        self.num_overlapped_steps = 0  # dispatched while the previous step still ran

    # -- requests ---------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    arrival_time: float | None = None) -> None:
        """Queue a request; raises RequestRejectedError (with .param) for bad input."""
        if request_id in self._states:
            raise RequestRejectedError("request_id", f"request id {request_id!r} is already in use")
        if isinstance(prompt, str):
            text, ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, ids = None, [int(t) for t in prompt]
        self._validate_prompt(ids, params)
        params.verify_token_ids(self.vocab_size)  # logit_bias / stop_token_ids in vocabulary
        state = _RequestState(request_id, text, ids, params, samples=[],
                              arrival_time=arrival_time or time.monotonic())
        if params.prompt_logprobs is not None:
            state.prompt_logprobs = [None]
        children = []
        for i in range(params.n):
            child_params = params
            if params.n > 1 and params.seed is not None:
                child_params = dataclasses.replace(params, seed=params.seed + i, n=1)
            req = Request(f"{request_id}#{i}" if params.n > 1 else request_id, ids, child_params,
                          arrival_time=state.arrival_time, eos_token_ids=self.eos_token_ids)
            req.sampling_salt = self._rng.getrandbits(32)  # unseeded streams differ per sample
            req.skip_prefix_cache = params.prompt_logprobs is not None and i == 0
            detok = IncrementalDetokenizer(self.tokenizer, ids, child_params)
            wants = params.logprobs is not None
            state.samples.append(_Sample(req, detok, [] if wants else None,
                                         0.0 if wants else None))
            children.append(req)
        for i, req in enumerate(children):
            try:
                self.scheduler.add_request(req)
            except RequestRejectedError:
                for added in children[:i]:
                    self.scheduler.abort_request(added.request_id)
                    self._parent_of.pop(added.request_id, None)
                raise
            self._parent_of[req.request_id] = (request_id, i)
        self._states[request_id] = state

    def _validate_prompt(self, ids: list[int], params: SamplingParams) -> None:
        if not ids:
            raise RequestRejectedError("prompt", "the prompt is empty; at least one token is needed")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise RequestRejectedError("prompt", f"token id {bad[0]} is out of vocabulary "
                                       f"(the model has {self.vocab_size} tokens)")
        limit = self.max_model_len
        if len(ids) >= limit:
            raise RequestRejectedError(
                "input_tokens", f"This model's maximum context length is {limit} tokens. However, "
                f"your prompt contains {len(ids)} input tokens, which leaves no room for output.")
        if params.max_tokens is not None and len(ids) + params.max_tokens > limit:
            raise RequestRejectedError(
                "max_tokens", f"This model's maximum context length is {limit} tokens. However, "
                f"you requested {len(ids) + params.max_tokens} tokens ({len(ids)} in the prompt, "
                f"{params.max_tokens} in the completion). Please reduce the length of the prompt "
                "or max_tokens.")

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Abort every sample of a request, freeing its pages now; returns its final output
        (finish_reason "abort" for the samples still running), or None if it is unknown."""
        state = self._states.get(request_id)
        if state is None:
            return None
        for sample in state.samples:
            self.scheduler.abort_request(sample.request.request_id)
            sample.detok.flush()  # release text held back for a stop string that never came
        return self._output(state)

    def has_unfinished_requests(self) -> bool:
        return bool(self._states)

    # -- the loop -----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Process one step's results; return outputs of requests that progressed (or finished).

        With async scheduling the next step is already on the device when this returns."""
        current = self._in_flight or self._dispatch(self.scheduler.schedule(), previous=None)
        self._in_flight = None
        if current is None:
            return []
        if self.async_scheduling and not self._needs_sync():
            self._in_flight = self._dispatch(self.scheduler.schedule(), previous=current)
            self.num_overlapped_steps += self._in_flight is not None
        return self._process(current)

    def _needs_sync(self) -> bool:
        return any(s.params.uses_penalties for s in self._states.values())

    def _dispatch(self, sched: SchedulerOutput, previous: _DeviceStep | None) -> _DeviceStep | None:
        if sched.is_empty:
            return None
        now = time.monotonic()
        seqs, sampling_inputs = [], []
        wants_prompt_logprobs = False
        for s in sched.scheduled:
            req = s.request
            state = self._state_of(req)
            if state is not None and state.first_scheduled_time is None:
                state.first_scheduled_time = now
            if state is not None and state.prompt_logprobs is not None and s.is_prefill:
                wants_prompt_logprobs = True
            if PLACEHOLDER in s.token_ids:  # sampled by `previous`, still on the device
                ref = -(previous.slot_of[s.request_id] + 1)
                seqs.append(_FedSequence([ref if t == PLACEHOLDER else t for t in s.token_ids],
                                         s.start_pos, s.page_ids))
            else:
                seqs.append(s)
            sampling_inputs.append((req.sampling_params, req.prompt_token_ids,
                                    req.output_token_ids, req.eos_token_ids,
                                    getattr(req, "sampling_salt", None),
                                    s.output_index - req.num_output_tokens))
        prompt_targets = None
        if wants_prompt_logprobs:
            prompt_targets = [self._next_tokens(s) for s in sched.scheduled]
        pending = self.runner.dispatch(seqs, sampling_inputs, prompt_targets=prompt_targets)
        self.num_steps += 1
        slot_of = {s.request_id: i for i, s in enumerate(sched.scheduled)}
        return _DeviceStep(sched, pending, slot_of, wants_prompt_logprobs)

    def _process(self, step: _DeviceStep) -> list[RequestOutput]:
        """Wait for a dispatched step and apply its tokens."""
        out = self.runner.fetch(step.pending)
        if step.wants_prompt_logprobs:
            self._record_prompt_logprobs(step.sched.scheduled, out)
        sampled = {s.request_id: int(out.token_ids[i])
                   for i, s in enumerate(step.sched.scheduled) if s.sample}
        # requests that finished or were preempted since the step was scheduled are left out
        updated = self.scheduler.update_from_output(step.sched, sampled)
        touched = {}
        for req in updated:
            state = self._state_of(req)
            if state is None:
                continue
            self._record_logprobs(req, out, step.slot_of[req.request_id])
            sample = state.samples[self._index_of(req)]
            _, stop_str = sample.detok.add_token(req.output_token_ids[-1],
                                                 finish_reason=req.finish_reason)
            if stop_str is not None and not req.is_finished:
                self.scheduler.finish_request(req.request_id, RequestStatus.FINISHED_STOPPED,
                                              stop_reason=stop_str)  # frees its pages now
            touched[state.request_id] = state
        return [self._output(state) for state in touched.values()]

    # -- helpers ------------------------------------------------------------------------------
    def _state_of(self, req: Request) -> _RequestState | None:
        parent = self._parent_of.get(req.request_id)
        return None if parent is None else self._states.get(parent[0])

    def _index_of(self, req: Request) -> int:
        return self._parent_of[req.request_id][1]

    def _next_tokens(self, s) -> list[int]:
        toks = s.request.all_token_ids
        return [toks[p + 1] if p + 1 < len(toks) else -1
                for p in range(s.start_pos, s.start_pos + s.num_new_tokens)]

    def _record_prompt_logprobs(self, scheduled, out) -> None:
        row = 0
        for s in scheduled:
            state = self._state_of(s.request)
            n = s.num_new_tokens
            if state is not None and state.prompt_logprobs is not None and s.is_prefill \
                    and self._index_of(s.request) == 0:
                k = state.params.prompt_logprobs
                for r in range(row, row + n):
                    pos = s.start_pos + (r - row) + 1  # the prompt token this row predicts
                    if pos >= len(state.prompt_token_ids):
                        break
                    if pos != len(state.prompt_logprobs):
                        continue  # recorded before a preemption made us recompute it
                    entry = {state.prompt_token_ids[pos]: float(out.prompt_logprobs[r])}
                    for j in range(k):
                        entry.setdefault(int(out.prompt_top_token_ids[r, j]),
                                         float(out.prompt_top_logprobs[r, j]))
                    state.prompt_logprobs.append(entry)
            row += n

    def _record_logprobs(self, req: Request, out, i: int) -> None:
        state = self._state_of(req)
        if state is None:
            return
        sample = state.samples[self._index_of(req)]
        if sample.logprobs is not None:
            lp = float(out.logprobs[i])
            sample.cumulative_logprob += lp
            entry = {int(out.token_ids[i]): lp}
            for j in range(state.params.logprobs):
                entry.setdefault(int(out.top_token_ids[i, j]), float(out.top_logprobs[i, j]))
            sample.logprobs.append(entry)

    def _output(self, state: _RequestState) -> RequestOutput:
        outs = []
        for i, sample in enumerate(state.samples):
            req = sample.request
            outs.append(CompletionOutput(
                index=i, text=sample.detok.text, token_ids=list(req.output_token_ids),
                finish_reason=req.finish_reason, stop_reason=req.stop_reason,
                logprobs=None if sample.logprobs is None else list(sample.logprobs),
                cumulative_logprob=sample.cumulative_logprob))
        finished = all(o.finish_reason is not None for o in outs)
        if finished:
            self._states.pop(state.request_id, None)
            for sample in state.samples:
                self._parent_of.pop(sample.request.request_id, None)
        queue_time = (None if state.first_scheduled_time is None
                      else state.first_scheduled_time - state.arrival_time)
        return RequestOutput(state.request_id, state.prompt, state.prompt_token_ids, outs,
                             finished=finished, prompt_logprobs=state.prompt_logprobs,
                             num_cached_tokens=state.samples[0].request.num_cached_tokens,
                             queue_time=queue_time)
