"""Request: one sequence's host-side state as it moves through the scheduler.

The scheduler (scheduler.py) owns the lifecycle WAITING -> RUNNING (-> PREEMPTED -> RUNNING ...)
-> FINISHED_*; the block manager (block_manager.py) owns `page_ids` and `page_hashes`. The one
number that drives everything is `num_computed_tokens`: the tokens whose K/V already sit in the
cache. Each step the scheduler lets it catch up with `num_tokens` (prompt + generated) under a
token budget, which makes a prefill, a prefill chunk, a prefix-cache hit, a decode and a
recompute after preemption the same thing (vLLM v1's model).

Pure Python, no jax: the engine appends sampled ids here and this module decides when to stop.
A request generates one sequence; the engine fans out n > 1 into n requests (the later ones fork
the first one's prompt pages: engine/output_assembly.py).
"""

from __future__ import annotations

import dataclasses
import enum
import time
from collections.abc import Iterable

from jaxserve.engine.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # back in the waiting queue, pages freed, to be recomputed
    FINISHED_STOPPED = "finished_stopped"  # EOS or a stop token
    FINISHED_LENGTH_CAPPED = "finished_length_capped"  # max_tokens or max_model_len
    FINISHED_ABORTED = "finished_aborted"

    @property
    def is_finished(self) -> bool:
        return self in _FINISH_REASONS


# OpenAI's finish_reason strings, which the server reports as they are.
_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH_CAPPED: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}


def _as_id_set(ids: int | Iterable[int] | None) -> frozenset[int]:
    # Tokenizers report one EOS id, generation configs often a list (Llama 3 has several).
    if ids is None:
        return frozenset()
    if isinstance(ids, int):
        return frozenset((ids,))
    return frozenset(int(i) for i in ids)


@dataclasses.dataclass(eq=False)  # identity equality: two requests are never "the same" by value
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams = dataclasses.field(default_factory=SamplingParams)
    arrival_time: float = dataclasses.field(default_factory=time.monotonic)
    eos_token_ids: frozenset[int] | int | Iterable[int] | None = None
    # Randomness of an unseeded request's draws (the engine draws one per sample, so the n
    # samples of a request differ); None: the sampler derives one from request_id.
    sampling_salt: int | None = None
    # Never take prompt pages from the prefix cache: prompt logprobs need every row computed.
    skip_prefix_cache: bool = False
    # Another sample of the same prompt (n > 1) whose full prompt pages this one forks when the
    # scheduler admits it (BlockManager.fork), if that one still holds them.
    shares_prompt_with: "Request | None" = None

    output_token_ids: list[int] = dataclasses.field(default_factory=list, init=False)
    # Tokens (prompt first, then output) whose K/V are written in this request's pages.
    num_computed_tokens: int = dataclasses.field(default=0, init=False)
    status: RequestStatus = dataclasses.field(default=RequestStatus.WAITING, init=False)
    finish_reason: str | None = dataclasses.field(default=None, init=False)
    # The stop token id that ended the request (None for EOS and for length), as vLLM reports it;
    # the async engine puts a matched stop *string* here.
    stop_reason: int | str | None = dataclasses.field(default=None, init=False)
    # Page table: page_ids[i] holds the K/V of positions [i * page_size, (i + 1) * page_size).
    page_ids: list[int] = dataclasses.field(default_factory=list, init=False)
    # Hash chain over this request's full pages of tokens; tokens only ever get appended, so a
    # hash stays valid for the request's whole life and is computed once (block manager).
    page_hashes: list[bytes] = dataclasses.field(default_factory=list, init=False)
    # Prompt tokens found in the prefix cache at first admission (OpenAI usage "cached_tokens").
    num_cached_tokens: int = dataclasses.field(default=0, init=False)
    num_preemptions: int = dataclasses.field(default=0, init=False)
    # Tokens sampled by steps still running on the device, not yet known here (async
    # scheduling). The scheduler already counts them as tokens: the next step feeds the newest
    # one straight from the device. They sit after all_token_ids, in order.
    num_output_placeholders: int = dataclasses.field(default=0, init=False)
    # Speculative decoding: draft tokens the engine proposes for this request's next decode
    # step (engine/speculative.py); the scheduler takes (and trims) them when it schedules.
    spec_token_ids: list[int] = dataclasses.field(default_factory=list, init=False)
    # Draft model: tokens before num_computed_tokens whose draft-model K/V is missing (1 after
    # a step that accepted every draft: the last one was never fed to the draft model)
    draft_lag: int = dataclasses.field(default=0, init=False)

    def __post_init__(self):
        self.prompt_token_ids = list(self.prompt_token_ids)
        self.eos_token_ids = _as_id_set(self.eos_token_ids)
        # One growing list so that the scheduler slices token ids to feed without concatenating.
        self._all_token_ids: list[int] = list(self.prompt_token_ids)

    # ------------------------------------------------------------------ sizes

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self._all_token_ids)

    @property
    def num_tokens_with_placeholders(self) -> int:
        """Known tokens plus those sampled in flight: what num_computed_tokens catches up with."""
        return len(self._all_token_ids) + self.num_output_placeholders

    @property
    def num_output_tokens_with_placeholders(self) -> int:
        return len(self.output_token_ids) + self.num_output_placeholders

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt followed by output ids. The live list: read it, never mutate it."""
        return self._all_token_ids

    @property
    def max_tokens(self) -> int | None:
        return self.sampling_params.max_tokens

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    # ------------------------------------------------------------------ transitions

    def finish(self, status: RequestStatus, stop_reason: int | str | None = None) -> None:
        if not status.is_finished:
            raise ValueError(f"{status} is not a finished status")
        self.status = status
        self.finish_reason = _FINISH_REASONS[status]
        self.stop_reason = stop_reason

    def append_output_token(self, token_id: int, max_model_len: int | None = None) -> bool:
        """Append one sampled token; return True (and set the finish status) if it ends the request.

        A stop token (EOS unless ignore_eos, or one of stop_token_ids) ends the request once at
        least min_tokens were generated; it is checked before the length caps, so a stop token
        sampled as the last allowed token reports "stop", which is what happened. The sampler is
        expected to mask stop tokens while min_tokens is not reached; if one slips through, it is
        kept as an ordinary token.
        """
        token_id = int(token_id)
        self.output_token_ids.append(token_id)
        self._all_token_ids.append(token_id)
        params = self.sampling_params

        if self.num_output_tokens >= params.min_tokens:
            if not params.ignore_eos and token_id in self.eos_token_ids:
                self.finish(RequestStatus.FINISHED_STOPPED)  # vLLM reports stop_reason None for EOS
                return True
            if token_id in params.stop_token_ids:
                self.finish(RequestStatus.FINISHED_STOPPED, stop_reason=token_id)
                return True

        if params.max_tokens is not None and self.num_output_tokens >= params.max_tokens:
            self.finish(RequestStatus.FINISHED_LENGTH_CAPPED)
            return True
        if max_model_len is not None and self.num_tokens >= max_model_len:
            self.finish(RequestStatus.FINISHED_LENGTH_CAPPED)
            return True
        return False

    def truncate_output(self, num_output_tokens: int) -> None:
        """Drop output tokens past the first num_output_tokens: a stop string matched inside
        a run of several tokens that one verified speculative step appended; the request
        finishes right after, so no K/V bookkeeping needs to follow."""
        extra = self.num_output_tokens - num_output_tokens
        if extra > 0:
            del self.output_token_ids[num_output_tokens:]
            del self._all_token_ids[len(self._all_token_ids) - extra:]

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, status={self.status.name}, "
                f"prompt={self.num_prompt_tokens}, output={self.num_output_tokens}, "
                f"computed={self.num_computed_tokens}, in_flight={self.num_output_placeholders}, "
                f"pages={len(self.page_ids)})")
