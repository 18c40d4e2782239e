"""Scheduled sequences -> bucket-padded numpy arrays for one step (host side, cheap).

Shapes come from a small fixed set of buckets (token count x sequence count), each compiled at
warm-up, so the device never sees a new shape while serving.
"""

from __future__ import annotations

import bisect
import dataclasses
from typing import Protocol

import numpy as np

from jaxserve.models.batch import ForwardBatch


class SeqInput(Protocol):
    """One sequence's share of a step (engine.step_plan.StepSequence satisfies this)."""
    token_ids: list[int]   # new tokens, at positions start_pos .. start_pos + len - 1
    start_pos: int
    page_ids: list[int]    # the sequence's page table, covering every position so far


def geometric_buckets(lo: int, hi: int, factor: int = 2) -> list[int]:
    """lo, lo*factor, lo*factor^2, ... capped by hi, with hi itself always the last bucket."""
    out, b = [], lo
    while b < hi:
        out.append(b)
        b *= factor
    out.append(hi)
    return out


def token_buckets(lo: int, hi: int) -> list[int]:
    """lo, 1.5 lo, 2 lo, 3 lo, 4 lo, 6 lo, ... (powers of two and their midpoints), capped by
    hi, with hi always the last. Token rows are a step's cost (its dots are compute-bound from
    a few dozen rows up), so halving the worst padding (a 135-token step: 192 rows, not 256)
    pays for the extra compiled shapes; the midpoints are multiples of 8 from lo = 16 up."""
    out = set()
    for b in geometric_buckets(lo, hi):
        out.add(b)
        if b % 2 == 0:
            out.add(b + b // 2)
    return sorted({b for b in out if b < hi} | {hi})


@dataclasses.dataclass(frozen=True)
class Buckets:
    token_buckets: tuple[int, ...]
    seq_buckets: tuple[int, ...]

    @classmethod
    def make(cls, max_num_batched_tokens: int, max_num_seqs: int, min_tokens: int = 16):
        tokens = token_buckets(min(min_tokens, max_num_batched_tokens), max_num_batched_tokens)
        # Sequence slots only size the metadata and the sampler's [S, V] work, so coarser
        # steps (x4) cost little padding and halve the number of compiled variants.
        seqs = geometric_buckets(1, max_num_seqs, factor=4)
        return cls(tuple(tokens), tuple(seqs))

    def token_bucket(self, num_tokens: int) -> int:
        return self.token_buckets[bisect.bisect_left(self.token_buckets, num_tokens)]

    @property
    def prefill_seq_buckets(self) -> tuple[int, ...]:
        """Sequence buckets of prefill-shaped steps (T > S): the smallest above one sequence
        and the largest. There the step's cost is its T token rows; S only sizes the
        sampler's [S, V] work and the logits rows, so finer S buckets would buy little and each
        costs a compiled variant per token bucket."""
        above_one = [s for s in self.seq_buckets if s > 1] or list(self.seq_buckets)
        return tuple(sorted({above_one[0], self.seq_buckets[-1]}))

    def pick(self, num_tokens: int, num_seqs: int) -> tuple[int, int]:
        s = self.seq_buckets[bisect.bisect_left(self.seq_buckets, num_seqs)]
        if num_tokens <= s:
            # decode-shaped (one token per sequence): T == S lets attention take its decode
            # path (split-K) and keeps a 1-sequence decode at 1 token row, not 16
            return s, s
        pre = self.prefill_seq_buckets
        s = pre[bisect.bisect_left(pre, num_seqs)]
        return self.token_bucket(max(num_tokens, s)), s

    def all_shapes(self) -> list[tuple[int, int]]:
        """Every (tokens, seqs) pair `pick` can return: decode-shaped (s, s), and prefill-shaped
        (t, s) for each token bucket t and prefill sequence bucket s < t."""
        shapes = [(s, s) for s in self.seq_buckets]  # decode-shaped steps
        for t in self.token_buckets:
            for s in self.prefill_seq_buckets:
                if s < t and (t, s) not in shapes:
                    shapes.append((t, s))
        return shapes


def pack_batch(seqs: list[SeqInput], num_tokens: int, num_seq_slots: int, pages_per_seq: int,
               page_size: int, num_pages: int) -> ForwardBatch:
    """Numpy ForwardBatch padded to (num_tokens, num_seq_slots); logits rows = each seq's last."""
    token_ids = np.zeros(num_tokens, np.int32)
    positions = np.zeros(num_tokens, np.int32)
    slot_pages = np.full(num_tokens, num_pages, np.int32)  # out of range: padding writes dropped
    slot_offsets = np.zeros(num_tokens, np.int32)
    kv_lens = np.zeros(num_seq_slots, np.int32)
    page_indices = np.zeros((num_seq_slots, pages_per_seq), np.int32)
    cu_q_lens = np.zeros(num_seq_slots + 1, np.int32)
    row = 0
    for i, seq in enumerate(seqs):
        n = len(seq.token_ids)
        pos = np.arange(seq.start_pos, seq.start_pos + n, dtype=np.int32)
        pages = np.asarray(seq.page_ids, np.int32)
        token_ids[row:row + n] = seq.token_ids
        positions[row:row + n] = pos
        slot_pages[row:row + n] = pages[pos // page_size]
        slot_offsets[row:row + n] = pos % page_size
        kv_lens[i] = seq.start_pos + n
        page_indices[i, :len(pages)] = pages
        row += n
        cu_q_lens[i + 1] = row
    cu_q_lens[len(seqs) + 1:] = row
    logits_indices = np.maximum(cu_q_lens[1:] - 1, 0).astype(np.int32)
    return ForwardBatch(
        token_ids=token_ids, positions=positions, slot_pages=slot_pages, slot_offsets=slot_offsets,
        kv_lens=kv_lens, page_indices=page_indices, cu_q_lens=cu_q_lens,
        num_seqs=np.asarray([len(seqs)], np.int32), logits_indices=logits_indices)
