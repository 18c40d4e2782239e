"""Paged attention kernels (Pallas) and their pure-jnp references. Never imports jaxserve."""

from pallas_kernels.reference import ragged_paged_attention_reference

__all__ = ["ragged_paged_attention_reference"]
