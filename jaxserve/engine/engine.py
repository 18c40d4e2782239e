"""LLMEngine: add_request / abort_request / step. The loop fits on one screen:
schedule -> StepPlan -> runner.dispatch -> runner.fetch -> scheduler.update_from_output ->
detokenize, stop strings, outputs (output_assembly.py).

Async scheduling (on by default): one step is kept in flight. step() schedules and dispatches
step N+1 first, then waits for step N and processes its tokens, so the host's scheduling,
packing, detokenizing and output building run while the device computes. Step N+1 reads the
tokens step N sampled straight from the device (step_plan.in_flight_ref). The price is at most
one wasted row for a request that step N ends (EOS, stop string), dropped on arrival. Steps
run synchronously while a request with penalties or structured output is in the system: both
need every output token on the host, penalties for the history, structured output to advance
its grammar before the next step's mask (engine/grammar.py) is filled.

Host-side only: the runner (device side) is handed in, so this module never imports jax.
"""

from __future__ import annotations

import logging
import random
import time

from jaxserve.config import EngineConfig
from jaxserve.engine.block_manager import BlockManager
from jaxserve.engine.grammar import GrammarCompiler, draft_prefix
from jaxserve.engine.input_limits import InputLimits, RequestRejectedError
from jaxserve.engine.output_assembly import RequestState
from jaxserve.engine.outputs import RequestOutput
from jaxserve.engine.request import Request, RequestStatus
from jaxserve.engine.sampling_params import SamplingParams
from jaxserve.engine.scheduler import PLACEHOLDER, Scheduler, SchedulerOutput
from jaxserve.engine.speculative import accepted_prefix, make_proposer
from jaxserve.engine.step_plan import (DRAFT_PENDING, SequenceSampling, StepPlan, StepSequence,
                                       in_flight_ref)


log = logging.getLogger("jaxserve.engine")


class _DeviceStep:
    """A step dispatched to the device whose results the host has not processed yet."""

    def __init__(self, sched: SchedulerOutput, pending, wants_prompt_logprobs: bool):
        self.sched = sched
        self.pending = pending  # the runner's pending StepOutput
        # request id -> its first sampled row (= its slot, unless drafts add rows)
        self.slot_of, row = {}, 0
        for s in sched.scheduled:
            self.slot_of[s.request_id] = row
            row += 1 + len(s.draft_token_ids)
        self.wants_prompt_logprobs = wants_prompt_logprobs


class LLMEngine:
    def __init__(self, runner, tokenizer, config: EngineConfig, *, eos_token_ids):
        """config: resolved (EngineConfig.resolved); the runner was built from it."""
        if not config.scheduler.is_resolved:
            raise ValueError("LLMEngine needs a resolved EngineConfig (EngineConfig.resolved)")
        sched = config.scheduler
        self.config = config
        self.runner = runner
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_model_len = sched.max_model_len
        self.vocab_size = runner.vocab_size
        self.input_limits = InputLimits(sched.max_model_len, runner.vocab_size)
        self.block_manager = BlockManager(runner.num_pages, config.cache.page_size,
                                          config.cache.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, sched.max_num_seqs,
                                   sched.max_num_batched_tokens, sched.max_model_len)
        self._states: dict[str, RequestState] = {}
        self._parent_of: dict[str, tuple[str, int]] = {}  # child id -> (request id, index)
        self._rng = random.Random(config.seed)
        self.async_scheduling = sched.async_scheduling
        self._in_flight: _DeviceStep | None = None
        self.grammar = GrammarCompiler(tokenizer, runner.vocab_size, self.eos_token_ids)
        self.num_structured_requests = 0
        spec = config.speculative
        self.proposer = make_proposer(spec)
        # a draft model mirrors every step into its own cache (runner/draft.py)
        self.has_draft_model = spec is not None and spec.method == "draft_model"
        # vLLM's spec-decode counters: sequences that carried drafts, drafts, accepted ones
        self.spec_num_drafts = self.spec_num_draft_tokens = self.spec_num_accepted_tokens = 0
        self.spec_accepted_per_pos = [0] * (spec.num_speculative_tokens if spec else 0)
        self.mask_seconds = 0.0  # host time filling structured-output masks
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
        self.input_limits.check(ids, params)
        state = RequestState.fan_out(request_id, text, ids, params, self.tokenizer,
                                     self.eos_token_ids, self._rng,
                                     arrival_time or time.monotonic())
        if params.structured_outputs is not None:  # a bad grammar raises here, a 400
            for sample in state.samples:
                sample.matcher = self.grammar.new_matcher(params.structured_outputs)
        self.scheduler.add_request(state.samples[0].request)  # may reject: nothing to undo
        self.num_structured_requests += params.structured_outputs is not None
        for i, sample in enumerate(state.samples):
            self._parent_of[sample.request.request_id] = (request_id, i)
        self._states[request_id] = state

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Abort every sample of a request, freeing its pages now; returns its final output
        (finish_reason "abort" for the samples still running), or None if it is unknown."""
        state = self._states.get(request_id)
        if state is None:
            return None
        for req in state.unscheduled:
            req.finish(RequestStatus.FINISHED_ABORTED)
        state.unscheduled = []
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
        if self._in_flight is None and self.proposer is not None:
            self._propose()
        current = self._in_flight or self._dispatch(self.scheduler.schedule(), previous=None)
        self._in_flight = None
        if current is None:
            return []
        if self.async_scheduling and not self._needs_sync():
            self._in_flight = self._dispatch(self.scheduler.schedule(), previous=current)
            self.num_overlapped_steps += self._in_flight is not None
        return self._process(current)

    def _needs_sync(self) -> bool:
        # drafts are proposed from every known token, so speculative engines run in step
        return self.proposer is not None or any(
            s.params.uses_penalties or s.params.structured_outputs is not None
            for s in self._states.values())

    def _propose(self) -> None:
        """Drafts for every running decode. Each row verifying a draft samples as plain
        decoding would once the drafts before it are accepted, extras included: penalties count
        those drafts in the history, the grammar mask is the one after them, logprobs are
        reported per kept token. A draft model makes its drafts on the device, where the
        sampler adds them to the penalty history but no grammar is: there constrained requests
        do not speculate (the others still do)."""
        for req in self.scheduler.running:  # drafts never outlive the step they were made for
            req.spec_token_ids = []
        limit = self.config.speculative.disable_by_batch_size
        if limit is not None and self.scheduler.num_running >= limit:
            return
        for req in self.scheduler.running:
            if req.num_computed_tokens == req.num_tokens - 1 and not req.num_output_placeholders:
                req.spec_token_ids = self._drafts_for(req)

    def _drafts_for(self, req: Request) -> list[int]:
        if self.has_draft_model and req.sampling_params.structured_outputs is not None:
            return []
        drafts = self.proposer.propose(req.all_token_ids)
        matcher = self._matcher_of(req)
        return draft_prefix(matcher, drafts) if matcher is not None and drafts else drafts

    def _verify(self, s, out, row: int) -> list[int]:
        """The tokens a sequence that carried drafts keeps, and the acceptance counters."""
        drafts = s.draft_token_ids
        if self.has_draft_model:  # made on the device by the step itself
            drafts = [int(t) for t in out.draft_token_ids[row:row + len(drafts)]]
        sampled = [int(t) for t in out.token_ids[row:row + len(drafts) + 1]]
        kept = accepted_prefix(drafts, sampled)
        accepted = len(kept) - 1
        # the draft model fed every draft but the last: if all were kept, it lags by one
        s.request.draft_lag = int(accepted == len(drafts))
        self.spec_num_drafts += 1
        self.spec_num_draft_tokens += len(drafts)
        self.spec_num_accepted_tokens += accepted
        for pos in range(accepted):
            self.spec_accepted_per_pos[pos] += 1
        return kept

    def _token_bitmasks(self, sched: SchedulerOutput) -> dict[int, object]:
        """slot -> allowed-token mask of a sampled constrained sequence: i32[ceil(V/32)], or
        i32[1 + n, ceil(V/32)] for one carrying n drafts (one per row that verifies them)."""
        slots, matchers, drafts = [], [], []
        for slot, s in enumerate(sched.scheduled):
            matcher = self._matcher_of(s.request) if s.sample else None
            if matcher is not None:
                if s.output_index != s.request.num_output_tokens:
                    raise RuntimeError("a constrained row was scheduled with a token in flight")
                slots.append(slot)
                matchers.append(matcher)
                drafts.append(s.draft_token_ids)
        if not slots:
            return {}
        start = time.perf_counter()
        masks = self.grammar.fill_bitmasks_along(matchers, drafts)
        self.mask_seconds += time.perf_counter() - start
        return {slot: m if d else m[0] for slot, m, d in zip(slots, masks, drafts)}

    def _dispatch(self, sched: SchedulerOutput, previous: _DeviceStep | None) -> _DeviceStep | None:
        if sched.is_empty:
            return None
        now = time.monotonic()
        sequences = []
        wants_prompt_logprobs = False
        bitmasks = self._token_bitmasks(sched)
        for slot, s in enumerate(sched.scheduled):
            req = s.request
            state = self._state_of(req)
            targets = None
            if state is not None:
                if state.first_scheduled_time is None:
                    state.first_scheduled_time = now
                if s.sample and state.unscheduled:
                    self._schedule_siblings(state)  # sample 0's prompt is computed by this step
                if state.prompt_logprobs is not None and s.is_prefill and self._index_of(req) == 0:
                    wants_prompt_logprobs = True
                    targets = state.prompt_targets(s.start_pos, s.num_new_tokens)
            token_ids = s.token_ids
            if PLACEHOLDER in token_ids:  # sampled by `previous`, still on the device
                ref = in_flight_ref(previous.slot_of[s.request_id])
                token_ids = [ref if t == PLACEHOLDER else t for t in token_ids]
            drafts, model_drafts, catch_up = s.draft_token_ids, 0, ()
            if self.has_draft_model:
                if drafts:  # DRAFT_PENDING: the draft model proposes them in this step
                    if any(t != DRAFT_PENDING for t in drafts):
                        raise RuntimeError("a draft-model engine scheduled host-made drafts")
                    token_ids, drafts, model_drafts = token_ids[:-len(drafts)], [], len(drafts)
                lag = min(req.draft_lag, s.start_pos)
                catch_up = tuple(req.all_token_ids[s.start_pos - lag:s.start_pos])
                req.draft_lag = 0  # this step's mirror pass feeds them (_verify may set it)
            sampling = SequenceSampling(req.sampling_params, req.prompt_token_ids,
                                        req.output_token_ids, req.eos_token_ids,
                                        req.sampling_salt,
                                        num_in_flight=s.output_index - req.num_output_tokens,
                                        token_bitmask=bitmasks.get(slot))
            sequences.append(StepSequence(token_ids, s.start_pos, s.page_ids, sampling, targets,
                                          draft_token_ids=drafts, num_model_drafts=model_drafts,
                                          draft_catch_up=catch_up))
        pending = self.runner.dispatch(StepPlan(tuple(sequences)))
        self.num_steps += 1
        return _DeviceStep(sched, pending, wants_prompt_logprobs)

    def _schedule_siblings(self, state: RequestState) -> None:
        """Samples 1..n-1 enter the scheduler once the step computing sample 0's last prompt
        token is dispatched; admitted by a later step, they fork its prompt pages (the device
        runs steps in order, so those pages are written before anything reads them)."""
        first = state.samples[0].request
        for req in state.unscheduled:
            # same prompt and limits as sample 0, so accepted; queued in its arrival place
            self.scheduler.add_request(req, arrived_with=first)
        state.unscheduled = []

    def _process(self, step: _DeviceStep) -> list[RequestOutput]:
        """Wait for a dispatched step and apply its tokens."""
        out = self.runner.fetch(step.pending)
        if step.wants_prompt_logprobs:
            self._record_prompt_logprobs(step.sched, out)
        sampled, known = {}, {}
        for s in step.sched.scheduled:
            if s.sample:
                row = step.slot_of[s.request_id]
                sampled[s.request_id] = (self._verify(s, out, row) if s.draft_token_ids
                                         else int(out.token_ids[row]))
                known[s.request_id] = s.request.num_output_tokens
        # requests that finished or were preempted since the step was scheduled are left out
        updated = self.scheduler.update_from_output(step.sched, sampled)
        touched = {}
        for req in updated:
            state = self._state_of(req)
            if state is None:
                continue
            sample = state.samples[self._index_of(req)]
            new = req.output_token_ids[known[req.request_id]:]  # several after a verified step
            if sample.matcher is not None:
                self._advance_grammar(req, sample.matcher, new)
            row = step.slot_of[req.request_id]  # new[i] was sampled by row + i
            for i, token in enumerate(new):
                sample.record_logprobs(out, row + i, state.params.logprobs or 0)
                last = i == len(new) - 1
                _, stop_str = sample.detok.add_token(
                    token, finish_reason=req.finish_reason if last else None)
                if stop_str is not None and not req.is_finished:
                    req.truncate_output(known[req.request_id] + i + 1)  # nothing past the stop
                    self.scheduler.finish_request(req.request_id, RequestStatus.FINISHED_STOPPED,
                                                  stop_reason=stop_str)  # frees its pages now
                    sample.detok.flush()
                    break
            touched[state.request_id] = state
        return [self._output(state) for state in touched.values()]

    def _advance_grammar(self, req: Request, matcher, new: list[int]) -> None:
        """Feed the step's new tokens to the request's grammar. Accepted drafts never finish
        it (grammar.draft_prefix), so only the last token can. Once the grammar is complete its
        mask allows only EOS, which ends the request as "stop"; a request that ignores EOS (or
        a token the grammar refuses, which the mask makes impossible) is finished here."""
        for draft in new[:-1]:
            if not matcher.consume_token(draft):
                raise RuntimeError(f"an accepted draft outside its grammar: {matcher.get_error()}")
        token = new[-1]
        if req.is_finished and token in req.eos_token_ids:
            return
        if not matcher.consume_token(token):
            log.error("request %s: sampled token %d outside its grammar (%s); finishing it",
                      req.request_id, token, matcher.get_error())
        if not req.is_finished and (matcher.is_error() or (
                matcher.is_stopped() and req.sampling_params.ignore_eos)):
            self.scheduler.finish_request(req.request_id, RequestStatus.FINISHED_STOPPED)

    # -- helpers ------------------------------------------------------------------------------
    def _state_of(self, req: Request) -> RequestState | None:
        parent = self._parent_of.get(req.request_id)
        return None if parent is None else self._states.get(parent[0])

    def _index_of(self, req: Request) -> int:
        return self._parent_of[req.request_id][1]

    def _matcher_of(self, req: Request):
        """The grammar matcher of a constrained request's sample, else None."""
        state = self._state_of(req)
        return None if state is None else state.samples[self._index_of(req)].matcher

    def _record_prompt_logprobs(self, sched: SchedulerOutput, out) -> None:
        row = 0
        for s in sched.scheduled:
            state = self._state_of(s.request)
            if state is not None and state.prompt_logprobs is not None and s.is_prefill \
                    and self._index_of(s.request) == 0:
                state.record_prompt_logprobs(s.start_pos, row, s.num_new_tokens, out)
            row += s.num_new_tokens

    def _output(self, state: RequestState) -> RequestOutput:
        output = state.output()
        if output.finished:  # forget it: its last output is this one
            self._states.pop(state.request_id, None)
            for sample in state.samples:
                self._parent_of.pop(sample.request.request_id, None)
        return output
