"""jaxserve: LLM inference and serving in JAX. `from jaxserve import LLM, SamplingParams`.

Attributes load lazily so that importing the host-side packages (engine/, server/) never pulls
in jax.
"""

from __future__ import annotations

__all__ = ["LLM", "SamplingParams", "StructuredOutputsParams", "RequestOutput",
           "CompletionOutput"]


def __getattr__(name: str):
    if name == "LLM":
        from jaxserve.llm import LLM
        return LLM
    if name in ("SamplingParams", "StructuredOutputsParams"):
        from jaxserve.engine import sampling_params
        return getattr(sampling_params, name)
    if name in ("RequestOutput", "CompletionOutput"):
        from jaxserve.engine import outputs
        return getattr(outputs, name)
    raise AttributeError(f"module 'jaxserve' has no attribute {name!r}")
