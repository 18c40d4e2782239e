"""Shared fixtures: tiny random HF models built once per test session, offline."""

from __future__ import annotations

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _gpu_visible() -> bool:
    try:
        import jax
        return any(d.platform == "gpu" for d in jax.devices())
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    if _gpu_visible():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """tiny_model_dir(variant, dtype="float32") -> path of a tiny HF checkpoint (cached)."""
    from checkpoints.make_tiny_model import make_tiny_model

    made = {}

    def get(variant: str = "llama-gqa", dtype: str = "float32") -> str:
        key = (variant, dtype)
        if key not in made:
            out = tmp_path_factory.mktemp(f"{variant}-{dtype}")
            made[key] = make_tiny_model(str(out), variant, seed=0, dtype=dtype)
        return made[key]

    return get


@pytest.fixture(scope="session")
def default_model_dir():
    """The embedded default model (SmolLM2-135M-Instruct) as an HF folder."""
    from checkpoints.default_model import ensure_default_model

    return ensure_default_model()
