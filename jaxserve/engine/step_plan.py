"""The step contract: what the engine asks the runner to compute in one step, as one value.

The engine (host, no jax) turns a SchedulerOutput into a StepPlan; the runner pads it to a
compiled bucket, picks the compiled variant from `plan.features`, and runs it. Everything the
device needs to know about a step is in here, so a new per-step input (a grammar mask, draft
tokens) is one new field, not a new positional argument threaded through dispatch, the packing,
the multi-host broadcast and warm-up.

In-flight tokens (async scheduling): the scheduler marks a token that the step still running on
the device is sampling with PLACEHOLDER. The engine knows which sequence slot of that step
samples it and writes `in_flight_ref(slot)` instead; the step reads the token on the device
(step.py: prev_sampled[-ref - 1]). PLACEHOLDER is far below every reference (slots are < 2**20),
so a placeholder that was never resolved is caught, not read as slot 0.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

from jaxserve.engine.sampling_params import SamplingParams

PLACEHOLDER = -(2 ** 31)  # int32 min: a token the in-flight step samples, not yet resolved
# speculative decoding with a draft model: a draft the step itself proposes (the runner's draft
# model, on the device) before verifying it; never fed as a token
DRAFT_PENDING = PLACEHOLDER + 1
_MAX_SLOTS = 2 ** 20


def in_flight_ref(slot: int) -> int:
    """The token id that makes the step read what the previous step sampled for `slot`."""
    if not 0 <= slot < _MAX_SLOTS:
        raise ValueError(f"sequence slot {slot} is out of range")
    return -(slot + 1)


def in_flight_slot(token_id: int) -> int | None:
    """The slot an in_flight_ref names, or None for an ordinary token id."""
    return -token_id - 1 if -_MAX_SLOTS <= token_id < 0 else None


@dataclasses.dataclass(frozen=True)
class StepFeatures:
    """What a step computes beyond the plain forward and sample: each is a static flag of the
    compiled step (runner.StepVariant), so a step without them never pays for them."""
    penalties: bool = False        # repetition / frequency / presence: needs the token history
    logprobs: bool = False         # logprobs (and top-20) of the sampled tokens
    prompt_logprobs: bool = False  # logits of every token row, not only the sampled ones
    token_bitmask: bool = False    # structured output: some rows may sample only some tokens
    draft_tokens: bool = False     # speculative decoding: some sequences sample several rows

    @property
    def any(self) -> bool:
        """Any of the extras (the features the extras sampler variant computes)."""
        return self.penalties or self.logprobs or self.prompt_logprobs or self.token_bitmask


@dataclasses.dataclass(frozen=True)
class SequenceSampling:
    """One sequence's sampling inputs (runner/sampling.py packs them into array rows)."""
    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]  # known on the host
    eos_token_ids: frozenset[int] | Sequence[int] = frozenset()
    # per-request randomness of unseeded rows (seeded rows use their seed); None: the row
    # number stands in
    salt: int | None = None
    # Outputs sampled by steps still in flight, after output_token_ids: they count toward
    # min_tokens and the seeded draw index. Steps with penalties have none in flight, except
    # a draft model's drafts, which the sampler reads on the device (num_device_drafts of them)
    num_in_flight: int = 0
    # structured output: i32[ceil(V/32)], bit v % 32 of word v // 32 set where token v is
    # allowed (engine/grammar.py); None: every token is. A sequence carrying n drafts has
    # i32[n + 1, ceil(V/32)], one mask per sampled row (the grammar after the drafts before it)
    token_bitmask: object = None
    num_device_drafts: int = 0

    def verify_row(self, j: int, drafts_before: Sequence[int]) -> SequenceSampling:
        """The inputs of the row that samples the j-th token after a sequence's known ones,
        in a step verifying drafts: sampled as plain decoding would sample that token once the
        drafts before it are accepted. drafts_before: those drafts when the host knows them
        (the n-gram proposer's); a draft model's are on the device, so they count as in flight
        and the sampler adds them to the penalty history there."""
        mask = self.token_bitmask
        if mask is not None and getattr(mask, "ndim", 1) == 2:
            mask = mask[j]
        if drafts_before and self.params.uses_penalties:  # their history must hold the drafts
            return dataclasses.replace(self, token_bitmask=mask, output_token_ids=(
                *self.output_token_ids, *drafts_before))
        device = j - len(drafts_before)
        return dataclasses.replace(self, token_bitmask=mask, num_in_flight=self.num_in_flight + j,
                                   num_device_drafts=self.num_device_drafts + device)


@dataclasses.dataclass(frozen=True)
class StepSequence:
    """One sequence's share of a step: feed token_ids at positions start_pos.. (a prefill
    chunk, a decode token, a recompute after preemption: all the same thing)."""
    token_ids: list[int]  # ordinary ids, or in_flight_ref(slot)
    start_pos: int
    page_ids: list[int]   # its page table, covering every position up to the step's end
    sampling: SequenceSampling
    # prompt logprobs only: per token row, the prompt token it predicts (-1 past the prompt)
    prompt_targets: list[int] | None = None
    # speculative decoding: the drafts at the end of token_ids; the step samples a token at
    # each of the last len + 1 rows (engine/speculative.py)
    draft_token_ids: list[int] = dataclasses.field(default_factory=list)
    # speculative decoding with a draft model: the runner's draft model proposes this many
    # drafts after token_ids (which holds the known tokens only) and the step verifies them
    num_model_drafts: int = 0
    # draft model: the tokens just before start_pos whose draft K/V is still missing (the last
    # draft of a fully accepted run, which the draft model never fed); it feeds them first
    draft_catch_up: tuple[int, ...] = ()

    @property
    def num_sampled_rows(self) -> int:
        return 1 + len(self.draft_token_ids) + self.num_model_drafts

    def __post_init__(self):
        if PLACEHOLDER in self.token_ids or DRAFT_PENDING in self.token_ids:
            raise ValueError("a step sequence still holds an unresolved in-flight placeholder")
        if self.num_model_drafts and self.draft_token_ids:
            raise ValueError("a sequence's drafts come from the proposer or the draft model, "
                             "not both")
        if len(self.draft_catch_up) > self.start_pos:
            raise ValueError("draft_catch_up reaches before the first position")
        if self.prompt_targets is not None and len(self.prompt_targets) != len(self.token_ids):
            raise ValueError("prompt_targets needs one entry per token row")
        if len(self.draft_token_ids) >= len(self.token_ids):
            raise ValueError("the drafts follow at least one known token")


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """Everything one step computes, in sequence-slot order (slot i = sequences[i])."""
    sequences: tuple[StepSequence, ...] = ()

    @property
    def num_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.sequences)

    @property
    def num_seqs(self) -> int:
        return len(self.sequences)

    @functools.cached_property  # read by the runner twice a step (variant, packing)
    def features(self) -> StepFeatures:
        params = [s.sampling.params for s in self.sequences]
        return StepFeatures(
            penalties=any(p.uses_penalties for p in params),
            logprobs=any(p.logprobs is not None for p in params),
            prompt_logprobs=any(s.prompt_targets is not None for s in self.sequences),
            token_bitmask=any(s.sampling.token_bitmask is not None for s in self.sequences),
            draft_tokens=any(s.draft_token_ids or s.num_model_drafts for s in self.sequences))

    @property
    def num_model_drafts(self) -> int:
        return sum(s.num_model_drafts for s in self.sequences)

    @property
    def num_sampled_rows(self) -> int:
        return sum(s.num_sampled_rows for s in self.sequences)
