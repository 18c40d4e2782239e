"""Step buckets: every step the scheduler can make maps to a compiled shape that holds it."""

from __future__ import annotations

import pytest

from jaxserve.runner.batch import Buckets


@pytest.mark.parametrize("max_tokens,max_seqs", [(512, 32), (256, 16), (16, 2), (100, 24),
                                                 (8, 8), (64, 1)])
def test_every_step_fits_a_compiled_shape(max_tokens, max_seqs):
    b = Buckets.make(max_tokens, max_seqs)
    shapes = set(b.all_shapes())
    assert len(shapes) == len(b.all_shapes())  # no duplicates to compile twice
    for num_seqs in range(1, max_seqs + 1):
        for num_tokens in range(num_seqs, max_tokens + 1):
            t, s = b.pick(num_tokens, num_seqs)
            assert (t, s) in shapes
            assert t >= num_tokens and s >= num_seqs


def test_decode_steps_stay_small_and_prefill_steps_use_two_seq_buckets():
    b = Buckets.make(512, 32)
    assert b.pick(1, 1) == (1, 1)
    assert b.pick(30, 30) == (32, 32)
    assert b.prefill_seq_buckets == (4, 32)
    assert b.pick(300, 1) == (384, 4)
    assert b.pick(300, 5) == (384, 32)
    # 4 decode shapes + (16, 4), (24, 4), (32, 4) + (t, 4) and (t, 32) for t in 48..512
    assert b.token_buckets == (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
    assert len(b.all_shapes()) == 23
    assert b.pick(135, 8) == (192, 32)  # a 128-token prompt + 7 decodes: 192 rows, not 256
