"""Bad checkpoints fail with a clear message naming the file and the field, never a traceback."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxserve.loading import ModelLoadError, load_model


@pytest.fixture()
def model_copy(tiny_model_dir, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(tiny_model_dir("llama-gqa"), dst)
    return dst


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def test_missing_path(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file or folder"):
        load_model(str(tmp_path / "nope"))


def test_folder_without_config(model_copy):
    os.remove(model_copy / "config.json")
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(model_copy))


def test_unsupported_architecture_lists_supported(model_copy):
    _edit_config(model_copy, architectures=["GPT2LMHeadModel"])
    with pytest.raises(ModelLoadError, match=r"GPT2LMHeadModel.*supported: LlamaForCausalLM"):
        load_model(str(model_copy))


def test_unsupported_rope_type(model_copy):
    _edit_config(model_copy, rope_parameters={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(ModelLoadError, match="rope_scaling type 'yarn'"):
        load_model(str(model_copy))


def test_missing_tensor_is_named(model_copy):
    tensors = load_file(str(model_copy / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(model_copy / "model.safetensors"))
    with pytest.raises(ModelLoadError, match=r"missing tensor 'model.layers.1.mlp.up_proj.weight'"):
        load_model(str(model_copy))


def test_wrong_shape_names_tensor_and_both_shapes(model_copy):
    tensors = load_file(str(model_copy / "model.safetensors"))
    tensors["model.norm.weight"] = np.ones(63, np.float32)
    save_file(tensors, str(model_copy / "model.safetensors"))
    with pytest.raises(ModelLoadError, match=r"'model.norm.weight' has shape \(63,\), expected \(64,\)"):
        load_model(str(model_copy))


def test_truncated_file(model_copy):
    path = model_copy / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="truncated"):
        load_model(str(model_copy))


def test_sharded_checkpoint_with_index(model_copy):
    """Tensors split over two files and found through model.safetensors.index.json."""
    tensors = load_file(str(model_copy / "model.safetensors"))
    os.remove(model_copy / "model.safetensors")
    names = sorted(tensors)
    parts = {"model-00001-of-00002.safetensors": names[::2],
             "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for fname, keys in parts.items():
        save_file({k: tensors[k] for k in keys}, str(model_copy / fname))
        weight_map.update({k: fname for k in keys})
    (model_copy / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    loaded = load_model(str(model_copy))
    np.testing.assert_array_equal(loaded.params["embed"], tensors["model.embed_tokens.weight"])
    np.testing.assert_array_equal(loaded.params["layers"]["q_proj"][1],
                                  tensors["model.layers.1.self_attn.q_proj.weight"].T)
