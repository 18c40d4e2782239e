"""The engine's rules for a request's tokens: vocabulary, context length, max_tokens.

One owner: LLMEngine.add_request applies them to every request, and the HTTP server asks the
same object (AsyncEngine.input_limits) before it starts a multi-prompt request or fills in a
default max_tokens, so a client sees one message per rule, with `param` naming the field.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from jaxserve.engine.sampling_params import SamplingParams


class RequestRejectedError(ValueError):
    """The request can never be served with this configuration; `param` names the culprit."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


@dataclasses.dataclass(frozen=True)
class InputLimits:
    max_model_len: int  # prompt plus output tokens
    vocab_size: int     # the model's: token ids are in [0, vocab_size)

    def check_token_ids(self, ids: Sequence[int], param: str = "prompt") -> None:
        for t in ids:
            if not 0 <= t < self.vocab_size:
                raise RequestRejectedError(
                    param, f"Token id {t} is out of vocabulary (size {self.vocab_size}).")

    def check_prompt(self, ids: Sequence[int]) -> None:
        """A prompt the model can take: not empty, in the vocabulary, room for one token."""
        if not ids:
            raise RequestRejectedError("prompt", "The prompt is empty; at least one token is "
                                       "needed.")
        self.check_token_ids(ids, "prompt")
        if len(ids) >= self.max_model_len:
            raise RequestRejectedError(
                "input_tokens", f"This model's maximum context length is {self.max_model_len} "
                f"tokens. However, your prompt contains {len(ids)} input tokens, which leaves "
                "no room for output. Please reduce the length of the input.")

    def max_tokens(self, num_prompt: int, max_tokens: int | None, *, explicit: bool = True,
                   param: str = "max_tokens") -> int:
        """The output budget: an explicit max_tokens must fit beside the prompt; a default one
        (or None) is clamped to what fits, as vLLM does. param: the name the client used."""
        room = self.max_model_len - num_prompt
        if max_tokens is None or (max_tokens > room and not explicit):
            return room
        if max_tokens > room:
            raise RequestRejectedError(
                param, f"'{param}' is too large: {max_tokens}. This model's maximum "
                f"context length is {self.max_model_len} tokens and your request has "
                f"{num_prompt} input tokens ({max_tokens} > {self.max_model_len} - "
                f"{num_prompt}).")
        return max_tokens

    def check(self, ids: Sequence[int], params: SamplingParams) -> None:
        """Everything the engine requires of a request before it queues it."""
        self.check_prompt(ids)
        if params.max_tokens is not None:
            self.max_tokens(len(ids), params.max_tokens)
        params.verify_token_ids(self.vocab_size)  # logit_bias / stop_token_ids
