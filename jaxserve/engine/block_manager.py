"""BlockManager: the page allocator of the paged KV cache, with automatic prefix caching.

The device holds `num_pages` pages of `page_size` token slots each (runner/ and models/batch.py
KVCache). This module only does the bookkeeping, on the host, for the scheduler: which request
owns which pages (`Request.page_ids`, its page table), how many owners a page has, which pages
are free, and which pages hold a known run of tokens that a later request can reuse.

Every page is in exactly one of three states:
  * free:       ref_count 0, no hash; handed out first.
  * evictable:  ref_count 0, hashed (its tokens are known); reusable by a prefix hit, otherwise
                evicted in least-recently-freed order when no free page is left.
  * referenced: ref_count >= 1 (several owners after a prefix hit or a fork); hashed or not.

Prefix caching follows vLLM v1: only FULL pages are hashed, each hash chaining the previous
page's hash with the page's tokens, so a hash names the whole prefix up to the end of the page.
The chain uses sha256 rather than Python's hash(): prompts come from untrusted users, and a
crafted collision on a non-cryptographic hash would let one user read another's cached K/V
(vLLM's CVE-2025-25183).

No copy-on-write: a step only ever writes K/V at positions >= num_computed_tokens, and the pages
that can have several owners (prefix hits, forks) lie entirely below every owner's
num_computed_tokens. A fork shares only full pages; the partially filled last page is recomputed
by the child (at most page_size - 1 tokens), which is cheaper than a device copy op and keeps
the step function free of page copies.
"""

from __future__ import annotations

import collections
import hashlib
import struct

from jaxserve.engine.request import Request

_ROOT_HASH = b"jaxserve-prefix-root"


class BlockManager:
    def __init__(self, num_pages: int, page_size: int, enable_prefix_caching: bool = True):
        if num_pages < 1:
            raise ValueError(f"num_pages must be at least 1, got {num_pages}")
        if page_size < 1:
            raise ValueError(f"page_size must be at least 1, got {page_size}")
        self.num_pages = num_pages
        self.page_size = page_size
        self.enable_prefix_caching = enable_prefix_caching

        self._ref_counts = [0] * num_pages
        self._page_hash: list[bytes | None] = [None] * num_pages
        self._free: collections.deque[int] = collections.deque(range(num_pages))
        # Insertion order is the LRU order: the first key is the next page to evict.
        self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._hash_to_page: dict[bytes, int] = {}
        # How many leading pages of each request were already offered to the cache, so that
        # cache_full_pages only looks at the newly filled ones each step.
        self._num_registered: dict[str, int] = {}

        # Counted in tokens per admission, like vLLM's prefix_cache_queries / prefix_cache_hits.
        self.prefix_queries = 0
        self.prefix_hits = 0

    # ------------------------------------------------------------------ sizes

    @property
    def num_free_pages(self) -> int:
        """Pages an allocation can take now: free ones plus evictable cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached_pages(self) -> int:
        """Pages whose tokens are hashed (referenced or evictable)."""
        return len(self._hash_to_page)

    @property
    def num_evictable_pages(self) -> int:
        return len(self._evictable)

    @property
    def usage(self) -> float:
        """Fraction of pages owned by some request (evictable cached pages count as free)."""
        return 1.0 - self.num_free_pages / self.num_pages

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    # ------------------------------------------------------------------ prefix cache

    def _hash_pages(self, request: Request, num_full_pages: int) -> list[bytes]:
        """Extend request.page_hashes to cover its first num_full_pages full pages."""
        hashes = request.page_hashes
        tokens = request.all_token_ids
        size = self.page_size
        for i in range(len(hashes), num_full_pages):
            parent = hashes[-1] if hashes else _ROOT_HASH
            page_tokens = tokens[i * size:(i + 1) * size]
            payload = struct.pack(f"<{size}q", *page_tokens)
            hashes.append(hashlib.sha256(parent + payload).digest())
        return hashes

    def get_computed_pages(self, request: Request) -> tuple[list[int], int]:
        """Longest run of cached full pages that starts this request's tokens.

        Returns (page ids, number of tokens they hold). It stops one token short of the whole
        sequence, so a prompt that is entirely cached still has its last token computed and the
        step yields logits to sample from. Takes no references: pass the pages to
        allocate_slots(cached_pages=...) in the same scheduling pass.
        """
        if not self.enable_prefix_caching or request.skip_prefix_cache:
            return [], 0  # (prompt logprobs need every prompt row computed)
        max_pages = (request.num_tokens - 1) // self.page_size
        pages = []
        for page_hash in self._hash_pages(request, max_pages)[:max_pages]:
            page = self._hash_to_page.get(page_hash)
            if page is None:
                break
            pages.append(page)
        return pages, len(pages) * self.page_size

    def cache_full_pages(self, request: Request) -> None:
        """Hash the request's pages that became full of computed tokens, making them reusable.

        Call once the step that computes them is scheduled (it may still run: only later steps
        can read the page, and the device runs steps in order). Only tokens known on the host
        count, not those sampled in flight, whose ids the hash needs. A page whose tokens are
        already cached in another page (two identical prompts prefilled in the same step) stays
        unhashed and goes back to the free list when released; the first copy serves later hits.
        """
        if not self.enable_prefix_caching:
            return
        num_known = min(request.num_computed_tokens, request.num_tokens)
        num_full = min(num_known // self.page_size, len(request.page_ids))
        start = self._num_registered.get(request.request_id, 0)
        if num_full <= start:
            return
        hashes = self._hash_pages(request, num_full)
        for i in range(start, num_full):
            page = request.page_ids[i]
            if self._page_hash[page] is None and hashes[i] not in self._hash_to_page:
                self._page_hash[page] = hashes[i]
                self._hash_to_page[hashes[i]] = page
        self._num_registered[request.request_id] = num_full

    def reset_prefix_cache(self) -> int:
        """Forget every evictable cached page (e.g. after new weights); returns how many."""
        count = len(self._evictable)
        while self._evictable:
            page, _ = self._evictable.popitem(last=False)
            self._unhash(page)
            self._free.append(page)
        return count

    def _unhash(self, page: int) -> None:
        page_hash = self._page_hash[page]
        if page_hash is not None:
            del self._hash_to_page[page_hash]
            self._page_hash[page] = None

    # ------------------------------------------------------------------ allocation

    def _take_page(self) -> int:
        if self._free:
            page = self._free.popleft()
        else:
            page, _ = self._evictable.popitem(last=False)  # least recently freed
            self._unhash(page)
        self._ref_counts[page] = 1
        return page

    def _retain(self, page: int) -> None:
        if self._ref_counts[page] == 0:
            del self._evictable[page]
        self._ref_counts[page] += 1

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       cached_pages: list[int] | None = None) -> bool:
        """Make request.page_ids cover its computed tokens plus num_new_tokens more.

        For a request being admitted, pass the pages from get_computed_pages as cached_pages
        (possibly []): they become the head of its page table, count as computed, and the
        admission is counted in prefix_queries / prefix_hits. Returns False and changes nothing
        when the pool cannot supply the pages.
        """
        admitting = cached_pages is not None
        if not admitting:  # the common decode case: the last page still has room
            total = request.num_computed_tokens + num_new_tokens
            if total <= len(request.page_ids) * self.page_size:
                return True
        cached_pages = cached_pages or []
        if admitting and request.page_ids:
            raise ValueError(f"request {request.request_id} already has pages; cached_pages "
                             "are only for a request being admitted")
        num_computed = request.num_computed_tokens + len(cached_pages) * self.page_size
        num_needed = self.pages_for(num_computed + num_new_tokens)
        num_new_pages = num_needed - len(request.page_ids) - len(cached_pages)
        # Cached pages sitting in the evictable set are about to be retained, so they cannot
        # also serve as fresh pages.
        num_cached_evictable = sum(1 for p in cached_pages if self._ref_counts[p] == 0)
        if num_new_pages > self.num_free_pages - num_cached_evictable:
            return False

        for page in cached_pages:  # retain first, so _take_page cannot evict them
            self._retain(page)
        request.page_ids.extend(cached_pages)
        request.page_ids.extend(self._take_page() for _ in range(max(num_new_pages, 0)))

        if admitting and self.enable_prefix_caching:
            self._num_registered[request.request_id] = len(cached_pages)
            self.prefix_queries += request.num_tokens
            self.prefix_hits += len(cached_pages) * self.page_size
        return True

    def free(self, request: Request) -> None:
        """Drop the request's references; pages nobody owns become free or evictable."""
        # Release the tail first so it is evicted first: a sequence's later pages are the least
        # likely to be shared by another request's prefix.
        for page in reversed(request.page_ids):
            self._ref_counts[page] -= 1
            if self._ref_counts[page] == 0:
                if self._page_hash[page] is not None:
                    self._evictable[page] = None
                else:
                    self._free.append(page)
        request.page_ids = []
        self._num_registered.pop(request.request_id, None)

    def fork(self, parent: Request, child: Request) -> None:
        """Let child share the parent's full computed pages (n > 1 samples of one prompt).

        The child's tokens must start with the parent's shared tokens. It gets references to
        those pages and num_computed_tokens = their length; the rest, including the parent's
        partial last page, it computes itself (see the module docstring on copy-on-write).
        """
        if child.page_ids or child.num_computed_tokens:
            raise ValueError(f"fork target {child.request_id} already has pages or computed tokens")
        num_shared_tokens = min(parent.num_computed_tokens, child.num_tokens - 1)
        num_shared = min(max(num_shared_tokens, 0) // self.page_size, len(parent.page_ids))
        shared_tokens = num_shared * self.page_size
        if parent.all_token_ids[:shared_tokens] != child.all_token_ids[:shared_tokens]:
            raise ValueError(f"cannot fork {parent.request_id} into {child.request_id}: "
                             "their leading tokens differ")
        for page in parent.page_ids[:num_shared]:
            self._retain(page)
        child.page_ids = list(parent.page_ids[:num_shared])
        child.num_computed_tokens = shared_tokens
        if self.enable_prefix_caching:
            # Shared pages the parent already offered to the cache need no second look.
            self._num_registered[child.request_id] = min(
                num_shared, self._num_registered.get(parent.request_id, 0))

    # ------------------------------------------------------------------ checks

    def check_invariants(self, requests: list[Request] | None = None) -> None:
        """Raise AssertionError if the pool's bookkeeping is inconsistent (for tests).

        Each page is free, evictable or referenced, never two at once, and the three add up to
        the pool. With `requests` (every request holding pages), each ref count must equal the
        number of page tables listing the page.
        """
        free = set(self._free)
        evictable = set(self._evictable)
        referenced = {p for p in range(self.num_pages) if self._ref_counts[p] > 0}
        assert len(free) == len(self._free), "a page is twice in the free list"
        assert not free & evictable, f"pages both free and evictable: {free & evictable}"
        assert not free & referenced, f"pages both free and referenced: {free & referenced}"
        assert not evictable & referenced, f"pages both evictable and referenced: {evictable & referenced}"
        assert len(free) + len(evictable) + len(referenced) == self.num_pages, "pages went missing"
        assert all(c >= 0 for c in self._ref_counts), "negative ref count"
        assert all(self._page_hash[p] is None for p in free), "a free page still has a hash"
        assert all(self._page_hash[p] is not None for p in evictable), "an evictable page has no hash"
        for page_hash, page in self._hash_to_page.items():
            assert self._page_hash[page] == page_hash, f"hash table disagrees on page {page}"
        assert sum(h is not None for h in self._page_hash) == len(self._hash_to_page)
        if requests is not None:
            owners = [0] * self.num_pages
            for request in requests:
                assert len(set(request.page_ids)) == len(request.page_ids), (
                    f"{request.request_id} lists a page twice")
                for page in request.page_ids:
                    owners[page] += 1
            assert owners == self._ref_counts, "ref counts differ from the page tables"
