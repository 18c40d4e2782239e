"""Bounds on the sizes of a request's shape, checked right after the body is parsed, before any
tokenizing or engine work: no request may cost more than its own 400.

One owner per bound: what a SamplingParams holds is bounded there, for the offline API too
(n <= 128, stop <= 64 strings of <= 1024 characters, logit_bias <= 300 entries,
stop_token_ids <= 64, logprobs / top_logprobs / prompt_logprobs <= 20; best_of must equal n).
Here is only what exists in the HTTP request alone. The body itself is capped by
--max-request-body-bytes (16 MiB by default), prompt and output lengths by the context length,
and the sequences one request adds (n x prompts) by the admission check against the queue.
"""

from __future__ import annotations

from jaxserve.server.errors import bad_request

MAX_PROMPTS = 1024             # prompts in one /v1/completions call
MAX_MESSAGES = 4096            # chat messages in one request
MAX_MESSAGE_CHARS = 4_000_000  # characters of one message's content
MAX_TOOLS = 128                # tools in one chat request (OpenAI's limit)


def at_most(param: str, count: int, limit: int, what: str) -> None:
    """400 naming `param` when count > limit."""
    if count > limit:
        raise bad_request(f"{param} can hold at most {limit} {what}, got {count}.", param)


def check_messages(messages) -> None:
    at_most("messages", len(messages), MAX_MESSAGES, "messages")
    for m in messages:
        at_most("messages", len(m.content or ""), MAX_MESSAGE_CHARS, "characters per message")
