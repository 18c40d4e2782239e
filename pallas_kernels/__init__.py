"""Paged attention kernels (Pallas) and their pure-jnp references. Never imports jaxserve."""

from pallas_kernels.reference import ragged_paged_attention_reference
from pallas_kernels.registry import available_variants, default_variant, get_attention_fn

__all__ = ["available_variants", "default_variant", "get_attention_fn",
           "ragged_paged_attention_reference"]
