"""GPT-2's byte-level alphabet: the reversible byte -> printable character map of byte-level BPE
vocabularies. No dependencies: the tokenizer builder (loading/) and the server's logprob token
spelling (server/, no jax) both use it."""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """Printable Latin-1 bytes map to themselves, the other 68 (controls, space, ...) to U+0100
    onwards, in byte order."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    out = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in out:
            out[b] = chr(0x100 + extra)
            extra += 1
    return out
