"""What the engine hands back per request: vLLM-shaped RequestOutput / CompletionOutput."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it
    # per generated token: {token_id: logprob} holding the sampled token and the top ones
    logprobs: list[dict[int, float]] | None = None
    cumulative_logprob: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclasses.dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    # per prompt token: None for the first, then {token_id: logprob}
    prompt_logprobs: list[dict[int, float] | None] | None = None
    num_cached_tokens: int = 0
    queue_time: float | None = None  # seconds from arrival to first being scheduled
