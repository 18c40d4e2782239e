"""Scheduler: continuous batching under a token budget, chunked prefill, prefix hits, preemption.

Each step the engine calls schedule(), hands the SchedulerOutput to the runner (which packs it
into padded arrays and runs the model), then calls update_from_output() with the sampled ids.
schedule() already counts the step as done (num_computed_tokens advances, and each sampled
token becomes a placeholder), so with async scheduling the engine may schedule step N+1 while
step N still runs: N+1 feeds N's sampled token from the device (PLACEHOLDER in token_ids) and
page hashing and stop checks wait for update_from_output(N). Updates come in schedule order.

One mechanism covers every case (vLLM v1): a request needs `num_tokens - num_computed_tokens`
new tokens. A decode needs 1; a fresh prompt needs all of it, minus what the prefix cache
already holds; a preempted request needs everything again (recompute). When a request's need
exceeds the remaining budget it gets a chunk (chunked prefill), and the step samples a token
only for sequences whose chunk reaches the end of their known tokens.

Policy, per step:
  1. Running requests, decodes first (they are one token each and latency-bound), then the
     running ones still in prefill, each in arrival order.
  2. If nothing was preempted, waiting requests in arrival order (strict FCFS: if the head does
     not fit, nobody behind it jumps the queue, so nobody starves), while the token budget,
     max_num_seqs and the page pool allow. Admitting behind a preemption would only thrash.
When a running request cannot get a page, the most recently arrived running request is
preempted (its pages freed, num_computed_tokens = 0) and goes back to the waiting queue ahead
of every request that arrived after it. If that is the request itself, it waits. The oldest
running request can always grow, because add_request rejects any request whose largest K/V
footprint exceeds the whole pool: so the scheduler never fails and never deadlocks.

Aborts free pages immediately. That is safe while steps are in flight: shared pages are never
written by a new owner (see block_manager), and device steps run in order, so a page reused by a
later step is written only after the in-flight steps are done with it; a page hashed while its
last K/V is still being written is read only by later steps too. update_from_output skips
requests that finished, or were preempted, after the step was scheduled: their in-flight token
is dropped (a preempted request samples it again when it catches up).
"""

from __future__ import annotations

import bisect
import collections
import dataclasses

from jaxserve.engine.block_manager import BlockManager
from jaxserve.engine.input_limits import RequestRejectedError
from jaxserve.engine.request import Request, RequestStatus
# in ScheduledSequence.token_ids: the token an in-flight step is sampling
from jaxserve.engine.step_plan import PLACEHOLDER

__all__ = ["PLACEHOLDER", "RequestRejectedError", "ScheduledSequence", "Scheduler",
           "SchedulerOutput"]


@dataclasses.dataclass
class ScheduledSequence:
    """One request's slice of a step: feed token_ids at positions start_pos.. end_pos - 1."""

    request: Request
    num_new_tokens: int
    start_pos: int  # = request.num_computed_tokens before the step
    token_ids: list[int]  # len num_new_tokens; PLACEHOLDER where the previous step samples it
    page_ids: list[int]  # the request's page table, covering positions [0, end_pos)
    sample: bool  # the chunk reaches the last token: the step samples one for it
    num_preemptions: int = 0  # the request's count when scheduled: a later one voids the step
    # Tokens this request generated before this step's sample (known plus in flight): a seeded
    # sampler draws with this index.
    output_index: int = 0
    # Speculative decoding: the drafts fed after the last known token (token_ids ends with
    # them); the step samples len + 1 tokens for this sequence and keeps a verified prefix.
    draft_token_ids: list[int] = dataclasses.field(default_factory=list)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def end_pos(self) -> int:
        """Context length after the step (the kv length attention sees)."""
        return self.start_pos + self.num_new_tokens

    @property
    def is_prefill(self) -> bool:
        """The chunk starts inside the prompt (a recompute after preemption may go past it)."""
        return self.start_pos < self.request.num_prompt_tokens


@dataclasses.dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSequence]  # decodes, then running prefills, then new admissions
    num_scheduled_tokens: int  # sum of num_new_tokens
    preempted_ids: list[str]  # requests whose pages were freed this step (recomputed later)
    finished_ids: list[str]  # finished or aborted since the last schedule(): drop their state

    @property
    def num_seqs(self) -> int:
        return len(self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int,
                 max_num_batched_tokens: int, max_model_len: int):
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be at least 1, got {max_num_seqs}")
        if max_num_batched_tokens < max_num_seqs:
            # Otherwise running decodes alone could use the whole budget forever.
            raise ValueError(f"max_num_batched_tokens ({max_num_batched_tokens}) must be at "
                             f"least max_num_seqs ({max_num_seqs})")
        if max_model_len < 1:
            raise ValueError(f"max_model_len must be at least 1, got {max_model_len}")
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len

        self.requests: dict[str, Request] = {}  # every unfinished request, by id
        # Both queues are kept sorted by arrival order (the order add_request saw them).
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self._arrival: dict[str, int] = {}
        self._next_arrival = 0
        self._finished_ids: list[str] = []
        self._in_flight: collections.deque[SchedulerOutput] = collections.deque()

        self.num_preemptions = 0  # total over the scheduler's life (Prometheus counter)
        # prompt positions whose K/V steps computed (prefix hits and forks skip theirs)
        self.num_prompt_tokens_computed = 0

    # ------------------------------------------------------------------ queue state

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def _insert_by_arrival(self, queue: list[Request], request: Request) -> None:
        order = self._arrival
        index = bisect.bisect_right(queue, order[request.request_id],
                                    key=lambda r: order[r.request_id])
        queue.insert(index, request)

    # ------------------------------------------------------------------ admission and abort

    def max_kv_tokens(self, request: Request) -> int:
        """The most tokens whose K/V this request can ever hold (its last token never needs K/V)."""
        limit = self.max_model_len
        if request.max_tokens is not None:
            limit = min(limit, request.num_tokens + request.max_tokens)
        return max(request.num_tokens, limit - 1)

    def add_request(self, request: Request, arrived_with: Request | None = None) -> None:
        """Queue a request; raise RequestRejectedError if it could never be served.
        arrived_with: a request whose place in arrival order this one shares (the engine's
        later samples of an n > 1 request, queued once the first one's prompt is computed)."""
        if request.request_id in self.requests:
            raise RequestRejectedError("request_id", f"request id {request.request_id!r} is already in use")
        if request.num_tokens == 0:
            raise RequestRejectedError("prompt", "the prompt is empty; at least one token is needed")
        if request.num_tokens > self.max_model_len:
            raise RequestRejectedError(
                "prompt", f"this model's maximum context length is {self.max_model_len} tokens, "
                f"but the prompt has {request.num_tokens} tokens")
        pool = self.block_manager
        needed = pool.pages_for(self.max_kv_tokens(request))
        if needed > pool.num_pages:
            raise RequestRejectedError(
                "max_tokens", f"the request may need {self.max_kv_tokens(request)} tokens of KV cache "
                f"({needed} pages of {pool.page_size}) but the whole cache holds "
                f"{pool.num_pages * pool.page_size}; lower max_tokens or shorten the prompt")
        request.status = RequestStatus.WAITING
        self.requests[request.request_id] = request
        if arrived_with is not None:
            self._arrival[request.request_id] = self._arrival[arrived_with.request_id]
            self._insert_by_arrival(self.waiting, request)
            return
        self._arrival[request.request_id] = self._next_arrival
        self._next_arrival += 1
        self.waiting.append(request)  # the newest arrival sorts last

    def abort_request(self, request_id: str) -> Request | None:
        """Finish a request as aborted and free its pages now; None if unknown or already done."""
        return self.finish_request(request_id, RequestStatus.FINISHED_ABORTED)

    def finish_request(self, request_id: str, status: RequestStatus,
                       stop_reason: int | str | None = None) -> Request | None:
        """Finish a request from outside the step (abort, or a stop string the engine matched
        after detokenizing) and free its pages now; None if unknown or already done."""
        request = self.requests.get(request_id)
        if request is None:
            return None
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        request.finish(status, stop_reason)
        self._retire(request)
        return request

    def _retire(self, request: Request) -> None:
        self.block_manager.free(request)
        del self.requests[request.request_id]
        del self._arrival[request.request_id]
        self._finished_ids.append(request.request_id)

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.block_manager.free(request)
        request.num_computed_tokens = 0
        request.num_output_placeholders = 0  # its in-flight token is dropped, sampled again later
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self.num_preemptions += 1
        self._insert_by_arrival(self.waiting, request)

    # ------------------------------------------------------------------ scheduling

    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        pool = self.block_manager
        chosen: dict[str, int] = {}  # request id -> num_new_tokens, in batch order
        preempted: list[str] = []

        decodes, prefills = [], []
        for request in self.running:
            if self._ends_in_flight(request):
                continue  # its last token is being sampled: nothing more to compute
            remaining = request.num_tokens_with_placeholders - request.num_computed_tokens
            if remaining == 1:
                decodes.append((request, remaining))
            elif remaining > 1:
                prefills.append((request, remaining))
        for request, remaining in decodes + prefills:
            if budget == 0:
                break
            if request.status != RequestStatus.RUNNING:
                continue  # preempted earlier in this pass
            if remaining == 1 and request.spec_token_ids:
                remaining += len(self._drafts_that_fit(request, budget - 1))
            num_new = min(remaining, budget)
            while not pool.allocate_slots(request, num_new):
                victim = self.running[-1]  # the most recently arrived
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is request:
                    break
                budget += chosen.pop(victim.request_id, 0)  # it may have been scheduled already
            else:
                chosen[request.request_id] = num_new
                budget -= num_new

        if not preempted:
            while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
                request = self.waiting[0]
                forked = self._fork_prompt(request)
                if forked:  # holds computed pages now
                    cached_pages, num_cached = None, 0
                else:
                    cached_pages, num_cached = pool.get_computed_pages(request)
                num_computed = request.num_computed_tokens + num_cached
                num_new = min(request.num_tokens - num_computed, budget)
                if not pool.allocate_slots(request, num_new, cached_pages=cached_pages):
                    if forked:  # waiting requests hold no pages
                        pool.free(request)
                        request.num_computed_tokens = 0
                    break  # strict FCFS: the head waits for pages, and so does everyone behind it
                self.waiting.pop(0)
                if request.num_preemptions == 0:
                    request.num_cached_tokens = num_computed
                request.num_computed_tokens = num_computed
                request.status = RequestStatus.RUNNING
                self._insert_by_arrival(self.running, request)
                chosen[request.request_id] = num_new
                budget -= num_new

        # Built last: a preemption above may have dropped a sequence chosen earlier.
        scheduled = [self._commit(self.requests[request_id], num_new)
                     for request_id, num_new in chosen.items()]
        finished_ids, self._finished_ids = self._finished_ids, []
        out = SchedulerOutput(
            scheduled=scheduled,
            num_scheduled_tokens=self.max_num_batched_tokens - budget,
            preempted_ids=preempted,
            finished_ids=finished_ids)
        if scheduled:
            self._in_flight.append(out)
        return out

    def _fork_prompt(self, request: Request) -> bool:
        """At admission, share the full computed pages of request.shares_prompt_with (another
        sample of the same prompt, see Request); False when it holds none to share."""
        source = request.shares_prompt_with
        if source is None or not source.page_ids:
            return False
        self.block_manager.fork(source, request)
        return bool(request.page_ids)

    def _ends_in_flight(self, request: Request) -> bool:
        """A token in flight will reach max_tokens or max_model_len: the request ends with it."""
        if not request.num_output_placeholders:
            return False
        max_tokens = request.max_tokens
        return ((max_tokens is not None
                 and request.num_output_tokens_with_placeholders >= max_tokens)
                or request.num_tokens_with_placeholders >= self.max_model_len)

    def _drafts_that_fit(self, request: Request, room: int) -> list[int]:
        """The request's drafts, cut so that the tokens a verified step can emit (accepted
        drafts + 1) stay within max_tokens, max_model_len and the token budget left."""
        limit = min(room, self.max_model_len - request.num_tokens - 1)
        if request.max_tokens is not None:
            limit = min(limit, request.max_tokens - request.num_output_tokens - 1)
        return request.spec_token_ids[:max(limit, 0)]

    def _commit(self, request: Request, num_new: int) -> ScheduledSequence:
        """Count the step as done for `request`: its K/V is being computed from now on."""
        start = request.num_computed_tokens
        known = request.all_token_ids[start:start + num_new]
        drafts = []
        if request.spec_token_ids and request.num_output_placeholders == 0 \
                and start + 1 == request.num_tokens and num_new > 1:
            drafts = request.spec_token_ids[:num_new - 1]  # a decode carrying its drafts
        request.spec_token_ids = []
        sample = start + num_new - len(drafts) == request.num_tokens_with_placeholders
        seq = ScheduledSequence(
            request=request, num_new_tokens=num_new, start_pos=start,
            token_ids=known + drafts + [PLACEHOLDER] * (num_new - len(known) - len(drafts)),
            page_ids=list(request.page_ids), sample=sample,
            num_preemptions=request.num_preemptions,
            output_index=request.num_output_tokens_with_placeholders,
            draft_token_ids=drafts)
        request.num_computed_tokens = start + num_new
        self.num_prompt_tokens_computed += max(
            0, min(start + num_new, request.num_prompt_tokens) - start)
        if sample:
            request.num_output_placeholders += 1
        return seq

    def update_from_output(self, scheduler_output: SchedulerOutput,
                           sampled_token_ids: dict[str, int | list[int]]) -> list[Request]:
        """Apply a step's sampled tokens; steps come in the order schedule() made them. A
        sequence that carried drafts gets the list of tokens its verification kept (accepted
        drafts, then one more): the K/V of the rejected drafts is not counted.

        Returns the requests that got new tokens, in batch order; those that finished have
        their finish_reason set and their pages already released (full pages stay cached).
        """
        if not scheduler_output.scheduled:
            return []
        if not self._in_flight or self._in_flight[0] is not scheduler_output:
            raise RuntimeError("update_from_output must take each scheduled step once, in the "
                               "order schedule() made them")
        live = [s for s in scheduler_output.scheduled
                if s.request.status == RequestStatus.RUNNING
                and s.request.num_preemptions == s.num_preemptions]
        # Checked before anything changes, so a bad call leaves the scheduler as it was.
        missing = [s.request_id for s in live
                   if s.sample and s.request_id not in sampled_token_ids]
        if missing:
            raise KeyError(f"no sampled token for {missing}, whose chunks reached the end of "
                           "their tokens")
        self._in_flight.popleft()
        pool = self.block_manager
        updated = []
        for seq in live:
            request = seq.request
            if not seq.sample:
                pool.cache_full_pages(request)
                continue
            request.num_output_placeholders -= 1
            tokens = sampled_token_ids[request.request_id]
            if isinstance(tokens, int):
                tokens = [tokens]
            if not 1 <= len(tokens) <= len(seq.draft_token_ids) + 1:
                raise ValueError(f"{request.request_id}: {len(tokens)} tokens for a step with "
                                 f"{len(seq.draft_token_ids)} drafts")
            # K/V is valid up to the last accepted draft: the rest is recomputed if needed
            request.num_computed_tokens -= len(seq.draft_token_ids) - (len(tokens) - 1)
            finished = False
            for token in tokens:
                finished = request.append_output_token(token, self.max_model_len)
                if finished:
                    break
            pool.cache_full_pages(request)  # pages whose tokens are all known now
            updated.append(request)
            if finished:
                self.running.remove(request)
                self._retire(request)
        return updated
