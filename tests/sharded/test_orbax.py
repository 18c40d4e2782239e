"""HF folder -> convert_to_orbax.py -> load_orbax into a 4-way sharded layout: same values,
the requested shardings, and the same greedy tokens as the HF folder."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from shard_harness import ROOT, run_script, tiny_model

CONVERTER = os.path.join(ROOT, "checkpoints", "convert_to_orbax.py")


@pytest.fixture(scope="module")
def converted(tiny_model_dir, tmp_path_factory):
    hf = tiny_model(tiny_model_dir, "llama-h8-kv4")
    out = str(tmp_path_factory.mktemp("orbax") / "ckpt")
    subprocess.run([sys.executable, CONVERTER, hf, out], check=True, cwd=ROOT,
                   capture_output=True, timeout=120)
    return hf, out


def test_converter_copies_config_and_tokenizer(converted):
    hf, out = converted
    names = set(os.listdir(out))
    assert {"params", "config.json", "tokenizer.json", "jaxserve_orbax.json"} <= names
    assert not any(n.endswith(".safetensors") for n in names)


def test_converter_refuses_to_overwrite(converted):
    hf, out = converted
    proc = subprocess.run([sys.executable, CONVERTER, hf, out], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0 and "--force" in proc.stderr


def test_round_trip_sharded_same_tokens(converted):
    hf, out = converted
    r = run_script("orbax_tokens.py", out, hf, "tp4")
    assert r["same_values"] and r["same_shardings"]
    assert r["q_proj_shard_shape"][2] * 4 == r["q_proj_shape"][2]
    assert len(r["unsharded_devices"]) == 1
    assert r["orbax_tokens"] == r["hf_tokens"]


def test_not_a_checkpoint_is_a_clear_error(tmp_path):
    from jaxserve.loading.orbax import OrbaxLoadError, load_orbax

    with pytest.raises(OrbaxLoadError, match="convert_to_orbax"):
        load_orbax(str(tmp_path))
