"""Speculative decoding, host side: the configuration (vLLM's `speculative_config`), the n-gram
proposer, and the verification rule.

A sequence's drafts ride along its next decode step: the step feeds its last token plus the k
drafts (k+1 query tokens over its pages; the runner verifies them as k+1 one-token sequences
sharing the page table, so the step stays decode-shaped) and samples a token at each of the k+1
positions, each exactly as non-speculative decoding would sample the token at that output index
(same filters, same seeded key). Drafts are accepted while they equal what was sampled; the
first sampled token that differs (or the one after the last draft) is kept too. For the n-gram
proposer, whose proposal distribution is one-hot, this is rejection sampling exactly: a draft d
is kept with probability p(d) = min(1, p(d)/q(d)), and on rejection the kept token is a draw from
p without d, i.e. from normalise(max(p - q, 0)); so the outputs are the tokens non-speculative
sampling gives, seeded or greedy (up to floating-point differences between batch shapes).
Rejected drafts' K/V is left in the pages and simply not counted (the scheduler rolls
num_computed_tokens back to the accepted length).

With a draft model (method "draft_model"), the drafts come from the draft model on the
device and the same verification is rejection sampling against the draft's distribution
(runner/spec_sampling.py); greedy rows are verified exactly as above.

Speculative engines run every step synchronously (drafts are proposed from every known token).
Requests with penalties, logprobs or structured output speculate too: the row verifying a draft
samples with the drafts before it counted as outputs (penalty history, min_tokens, the seeded
index), with the grammar's mask after them (the n-gram proposer's drafts are cut to the prefix
the grammar accepts), and each kept token reports its own row's logprobs. A draft model's
drafts exist only on the device: the sampler adds them to the penalty history there, but no
grammar runs there, so with a draft model constrained requests do not speculate.
"""

from __future__ import annotations

import numpy as np

from jaxserve.config import SpeculativeConfig
from jaxserve.engine.step_plan import DRAFT_PENDING

class NgramProposer:
    """Prompt lookup: find the longest suffix of the sequence (prompt_lookup_max tokens down
    to prompt_lookup_min) that occurred earlier, most recent occurrence first, and propose the
    tokens that followed it. One vectorised pass over the sequence per n."""

    def __init__(self, config: SpeculativeConfig):
        self.k = config.num_speculative_tokens
        self.min_n, self.max_n = config.prompt_lookup_min, config.prompt_lookup_max

    def propose(self, token_ids: list[int], max_drafts: int | None = None) -> list[int]:
        k = self.k if max_drafts is None else min(self.k, max_drafts)
        if k <= 0 or len(token_ids) < self.min_n + 1:
            return []
        tokens = np.asarray(token_ids, np.int64)
        for n in range(min(self.max_n, len(tokens) - 1), self.min_n - 1, -1):
            suffix = tokens[-n:]
            # windows of the sequence without its last token, so a match has a successor
            windows = np.lib.stride_tricks.sliding_window_view(tokens[:-1], n)
            hits = np.flatnonzero((windows == suffix).all(axis=1))
            if hits.size:
                start = int(hits[-1]) + n  # the most recent earlier occurrence
                return tokens[start:start + k].tolist()
        return []


class DraftModelProposer:
    """The draft model's drafts are made on the device, in the step that verifies them
    (runner/draft.py): on the host a sequence is only marked for k drafts (DRAFT_PENDING), so
    that the scheduler counts them in its budget and allocates their pages."""

    def __init__(self, config: SpeculativeConfig):
        self.k = config.num_speculative_tokens

    def propose(self, token_ids: list[int], max_drafts: int | None = None) -> list[int]:
        k = self.k if max_drafts is None else min(self.k, max_drafts)
        return [DRAFT_PENDING] * max(k, 0)


def make_proposer(config: SpeculativeConfig | None):
    if config is None:
        return None
    return DraftModelProposer(config) if config.method == "draft_model" else NgramProposer(config)


def accepted_prefix(drafts: list[int], sampled: list[int]) -> list[int]:
    """The tokens a verified step emits: drafts while they equal what was sampled at their
    position, then the sampled token at the first mismatch (or after the last draft).
    sampled: len(drafts) + 1 tokens."""
    out = []
    for draft, token in zip(drafts, sampled):
        out.append(token)
        if token != draft:
            return out
    out.append(sampled[len(drafts)])
    return out
