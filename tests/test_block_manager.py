"""BlockManager: ref counts, free list, prefix-cache hash chain, LRU eviction, forks (no model)."""

from __future__ import annotations

import random

import pytest

from jaxserve.engine.block_manager import BlockManager
from jaxserve.engine.request import Request
from jaxserve.engine.sampling_params import SamplingParams


def make_request(request_id, tokens):
    return Request(request_id, list(tokens), SamplingParams(max_tokens=100, ignore_eos=True))


def admit(bm, request):
    """What the scheduler does for a waiting request: prefix lookup, then pages for the rest."""
    pages, num_cached = bm.get_computed_pages(request)
    if not bm.allocate_slots(request, request.num_tokens - num_cached, cached_pages=pages):
        return False
    request.num_computed_tokens = num_cached
    return True


def compute_all(bm, request):
    """Pretend a step computed every known token."""
    request.num_computed_tokens = request.num_tokens
    bm.cache_full_pages(request)


def test_allocate_and_free_counts():
    bm = BlockManager(num_pages=8, page_size=4)
    request = make_request("a", range(10))  # 3 pages
    assert admit(bm, request)
    assert len(request.page_ids) == 3
    assert bm.num_free_pages == 5
    assert bm.usage == pytest.approx(3 / 8)
    bm.check_invariants([request])
    bm.free(request)
    assert request.page_ids == []
    assert bm.num_free_pages == 8 and bm.usage == 0.0
    bm.check_invariants([])


def test_allocation_failure_allocates_nothing():
    bm = BlockManager(num_pages=4, page_size=4)
    a = make_request("a", range(12))  # 3 pages
    assert admit(bm, a)
    b = make_request("b", range(100, 108))  # 2 pages, only 1 left
    assert not admit(bm, b)
    assert b.page_ids == [] and bm.num_free_pages == 1
    bm.check_invariants([a])
    # Growing a running request: one more token past a full page needs a new page.
    a.num_computed_tokens = 12
    assert bm.allocate_slots(a, 1)
    assert not bm.allocate_slots(a, 5)  # would need a fifth page
    assert len(a.page_ids) == 4
    bm.check_invariants([a])


def test_prefix_hit_three_full_pages():
    bm = BlockManager(num_pages=32, page_size=4)
    shared = list(range(12))  # 3 full pages
    a = make_request("a", shared + [50, 51])
    assert admit(bm, a)
    compute_all(bm, a)
    b = make_request("b", shared + [60, 61, 62])
    pages, num_cached = bm.get_computed_pages(b)
    assert pages == a.page_ids[:3] and num_cached == 12
    assert admit(bm, b)
    assert b.num_computed_tokens == 12 and b.page_ids[:3] == a.page_ids[:3]
    assert b.page_ids[3] != a.page_ids[3]  # the partial page is never shared
    bm.check_invariants([a, b])
    assert bm.prefix_queries == a.num_tokens + b.num_tokens
    assert bm.prefix_hits == 12
    # The shared pages outlive the first owner.
    bm.free(a)
    bm.check_invariants([b])
    assert bm.get_computed_pages(make_request("c", shared + [1]))[1] == 12


def test_partial_page_is_never_cached():
    bm = BlockManager(num_pages=16, page_size=4)
    a = make_request("a", range(6))  # one full page, one with 2 tokens
    assert admit(bm, a)
    compute_all(bm, a)
    assert bm.num_cached_pages == 1
    bm.free(a)
    # Same 6 tokens plus more: only the full page hits, the 2-token page was not kept.
    pages, num_cached = bm.get_computed_pages(make_request("b", list(range(6)) + [7, 8, 9]))
    assert num_cached == 4 and len(pages) == 1
    bm.check_invariants([])


def test_whole_prompt_never_counts_as_cached():
    bm = BlockManager(num_pages=16, page_size=4)
    a = make_request("a", range(8))  # exactly two full pages
    assert admit(bm, a)
    compute_all(bm, a)
    assert bm.num_cached_pages == 2
    # An identical prompt must still compute its last token to get logits: one page hits.
    pages, num_cached = bm.get_computed_pages(make_request("b", range(8)))
    assert num_cached == 4 and pages == a.page_ids[:1]


def test_different_prefix_same_page_tokens_miss():
    bm = BlockManager(num_pages=16, page_size=4)
    a = make_request("a", [1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert admit(bm, a)
    compute_all(bm, a)
    # Second page's tokens match, but the chain (first page) differs: no hit at all.
    b = make_request("b", [0, 2, 3, 4, 5, 6, 7, 8, 9])
    assert bm.get_computed_pages(b) == ([], 0)


def test_lru_eviction_order():
    bm = BlockManager(num_pages=6, page_size=4)
    requests = {name: make_request(name, [base + i for i in range(5)])
                for name, base in (("a", 100), ("b", 200), ("c", 300))}
    for request in requests.values():  # 2 pages each: one full (cached), one partial
        assert admit(bm, request)
        compute_all(bm, request)
    for name in "abc":
        bm.free(requests[name])
    assert bm.num_evictable_pages == 3 and bm.num_free_pages == 6

    # Touch a's page with a prefix hit and release it again: a becomes most recently used.
    a2 = make_request("a2", [100, 101, 102, 103, 7])
    assert admit(bm, a2) and a2.num_computed_tokens == 4
    bm.free(a2)

    def hit(name):
        return bm.get_computed_pages(make_request("q", requests[name].prompt_token_ids))[1] == 4

    # 5 pages: the 3 uncached free ones first, then evict b then c (least recently freed).
    big = make_request("big", range(1000, 1017))
    assert admit(bm, big)
    assert not hit("b") and not hit("c") and hit("a")
    bm.check_invariants([big])


def test_free_releases_tail_first():
    bm = BlockManager(num_pages=4, page_size=2)
    a = make_request("a", range(7))  # 3 full pages + 1 token
    assert admit(bm, a)
    compute_all(bm, a)
    first, second, third = a.page_ids[:3]
    bm.free(a)
    # A 2-page allocation takes the unhashed partial page, then evicts the last full page.
    b = make_request("b", range(50, 53))
    assert admit(bm, b)
    pages, num_cached = bm.get_computed_pages(make_request("q", range(7)))
    assert pages == [first, second] and num_cached == 4
    assert third in b.page_ids


def test_fork_shares_full_pages():
    bm = BlockManager(num_pages=16, page_size=4)
    parent = make_request("p", range(10))
    assert admit(bm, parent)
    compute_all(bm, parent)
    child = make_request("c", range(10))
    bm.fork(parent, child)
    assert child.page_ids == parent.page_ids[:2] and child.num_computed_tokens == 8
    bm.check_invariants([parent, child])
    assert bm.allocate_slots(child, child.num_tokens - child.num_computed_tokens)
    assert child.page_ids[2] != parent.page_ids[2]  # the partial page is recomputed
    bm.free(parent)
    bm.check_invariants([child])
    assert bm.num_free_pages == 16 - 3
    bm.free(child)
    bm.check_invariants([])
    with pytest.raises(ValueError, match="differ"):
        other = make_request("o", [9] * 10)
        assert admit(bm, parent)
        compute_all(bm, parent)
        bm.fork(parent, other)


def test_disabled_prefix_caching():
    bm = BlockManager(num_pages=8, page_size=4, enable_prefix_caching=False)
    a = make_request("a", range(12))
    assert admit(bm, a)
    compute_all(bm, a)
    assert bm.num_cached_pages == 0
    bm.free(a)
    assert bm.get_computed_pages(make_request("b", range(12))) == ([], 0)
    assert bm.prefix_queries == 0
    bm.check_invariants([])


def test_reset_prefix_cache():
    bm = BlockManager(num_pages=8, page_size=4)
    a = make_request("a", range(9))
    assert admit(bm, a)
    compute_all(bm, a)
    bm.free(a)
    assert bm.reset_prefix_cache() == 2
    assert bm.num_cached_pages == 0 and bm.num_free_pages == 8
    bm.check_invariants([])


@pytest.mark.parametrize("seed", range(6))
def test_random_alloc_free_keeps_invariants_and_contents(seed):
    """Random admissions, growth, forks and frees; cached pages must hold the right tokens."""
    rng = random.Random(seed)
    page_size = rng.choice([1, 2, 4, 8])
    bm = BlockManager(num_pages=rng.randint(8, 40), page_size=page_size,
                      enable_prefix_caching=rng.random() < 0.8)
    prefixes = [[rng.randrange(50) for _ in range(rng.randint(1, 20))] for _ in range(4)]
    content: dict[int, dict[int, int]] = {}  # page -> slot -> token: stands in for the K/V
    live: list[Request] = []

    def write(request, start):
        for pos in range(start, request.num_tokens):
            content.setdefault(request.page_ids[pos // page_size], {})[pos % page_size] = (
                request.all_token_ids[pos])

    def check_reads(request):
        for pos in range(request.num_computed_tokens):
            page = request.page_ids[pos // page_size]
            assert content[page][pos % page_size] == request.all_token_ids[pos]

    for step in range(400):
        op = rng.random()
        if op < 0.35:
            tokens = rng.choice(prefixes) + [rng.randrange(50) for _ in range(rng.randint(0, 10))]
            request = make_request(f"r{step}", tokens)
            if admit(bm, request):
                check_reads(request)  # prefix hits must map to pages holding these tokens
                write(request, request.num_computed_tokens)
                compute_all(bm, request)
                live.append(request)
        elif op < 0.65 and live:
            request = rng.choice(live)
            token = rng.randrange(50)
            request.append_output_token(token)
            start = request.num_computed_tokens
            # On failure (pool full; the scheduler would preempt) the new tokens stay pending.
            if bm.allocate_slots(request, request.num_tokens - start):
                write(request, start)
                compute_all(bm, request)
        elif op < 0.75 and live:
            parent = rng.choice(live)
            child = make_request(f"f{step}", parent.all_token_ids)
            bm.fork(parent, child)
            check_reads(child)
            if bm.allocate_slots(child, child.num_tokens - child.num_computed_tokens):
                write(child, child.num_computed_tokens)
                compute_all(bm, child)
                live.append(child)
            else:
                bm.free(child)
        elif live:
            request = live.pop(rng.randrange(len(live)))
            bm.free(request)
        bm.check_invariants(live)
        assert bm.num_free_pages + sum(1 for p in range(bm.num_pages)
                                       if bm._ref_counts[p]) == bm.num_pages
    for request in live:
        bm.free(request)
    bm.check_invariants([])
    assert bm.num_free_pages == bm.num_pages
    assert bm.prefix_hits <= bm.prefix_queries
