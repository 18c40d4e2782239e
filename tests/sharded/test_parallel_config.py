"""Sharding rules, configs and validation, in the main test process (no extra devices needed:
specs are checked on abstract meshes, and errors fire before any device is touched)."""

from __future__ import annotations

import json

import pytest
from jax.sharding import AbstractMesh, AxisType, PartitionSpec as P

from jaxserve.models.config import ModelConfig
from jaxserve.models.llama import param_shapes
from jaxserve.parallel import (PRESETS, AxisRules, ShardingError, ShardingPlan,
                               load_sharding_config, param_logical_axes, param_shardings,
                               resolve_sharding_config)
from jaxserve.parallel.rules import kv_cache_sharding
from jaxserve.parallel.sharding_config import dump_sharding_config


def _cfg(heads=8, kv_heads=4, **kw):
    base = dict(architecture="LlamaForCausalLM", vocab_size=384, hidden_size=64,
                intermediate_size=128, num_layers=2, num_heads=heads, num_kv_heads=kv_heads,
                head_dim=16)
    base.update(kw)
    return ModelConfig(**base)


def _mesh(dp, tp):
    return AbstractMesh((dp, tp), ("data", "model"), axis_types=(AxisType.Auto, AxisType.Auto))


@pytest.mark.parametrize("extra", [{}, {"attention_bias": True}, {"qk_norm": True},
                                   {"tie_word_embeddings": True}])
def test_every_leaf_has_logical_axes_of_its_rank(extra):
    cfg = _cfg(**extra)
    axes, shapes = param_logical_axes(cfg), param_shapes(cfg)
    assert set(axes) == set(shapes)
    assert set(axes["layers"]) == set(shapes["layers"])
    for name, shape in shapes["layers"].items():
        assert len(axes["layers"][name]) == len(shape), name


def test_param_specs_by_name():
    s = param_shardings(_cfg(attention_bias=True), _mesh(1, 4))
    L = s["layers"]
    assert L["q_proj"].spec == P(None, None, "model")
    assert L["k_proj"].spec == P(None, None, "model")  # 4 KV heads over 4 devices
    assert L["o_proj"].spec == P(None, "model")
    assert L["gate_proj"].spec == L["up_proj"].spec == P(None, None, "model")
    assert L["down_proj"].spec == P(None, "model")
    assert L["q_bias"].spec == P(None, "model")
    assert L["input_norm"].spec == P() and s["final_norm"].spec == P()
    assert s["embed"].spec == P("model") and s["lm_head"].spec == P(None, "model")


def test_kv_heads_replicated_when_tp_exceeds_or_does_not_divide_them():
    for cfg, tp in ((_cfg(8, 2), 8), (_cfg(12, 3), 4), (_cfg(12, 3), 2)):
        s = param_shardings(cfg, _mesh(1, tp))["layers"]
        assert s["k_proj"].spec == P() and s["v_proj"].spec == P()
        assert s["q_proj"].spec == P(None, None, "model")
        assert kv_cache_sharding(cfg, _mesh(1, tp)).k.spec == P(None, None, None, None, None)
    assert kv_cache_sharding(_cfg(8, 4), _mesh(2, 4)).k.spec == P(None, None, "model", None, None)


def test_indivisible_vocab_or_mlp_is_replicated_for_that_leaf():
    s = param_shardings(_cfg(vocab_size=385, intermediate_size=130), _mesh(1, 4))
    assert s["embed"].spec == P() and s["lm_head"].spec == P()
    assert s["layers"]["gate_proj"].spec == P() and s["layers"]["down_proj"].spec == P()


def test_heads_not_divisible_is_a_clear_error():
    with pytest.raises(ShardingError, match=r"12 attention heads.*8 devices"):
        ShardingPlan.build(_cfg(12, 3), tensor_parallel_size=8)


def test_more_devices_than_present_is_a_clear_error():
    import jax

    n = jax.device_count()
    with pytest.raises(ShardingError, match=rf"needs {2 * n} devices.*only {n}"):
        ShardingPlan.build(_cfg(8 * n, 2 * n), tensor_parallel_size=2 * n)


def test_single_device_plan_is_a_no_op_wrapper():
    plan = ShardingPlan.build(_cfg(), tensor_parallel_size=1)
    fn = lambda *a, **k: None  # noqa: E731
    assert plan.wrap_attention(fn) is fn
    assert plan.num_devices == 1 and plan.kv_cache_shards == 1


def test_presets_and_file_round_trip(tmp_path):
    assert {"tp1", "tp2", "tp4", "tp8", "dp2-tp4"} <= set(PRESETS)
    for name in PRESETS:
        c = load_sharding_config(name)
        assert c.name == name
        path = tmp_path / f"{name}.yaml"
        path.write_text(dump_sharding_config(c))
        assert load_sharding_config(str(path)) == c
    dp = load_sharding_config("dp2-tp4")
    assert (dp.parallel.data_parallel_size, dp.tensor_parallel_size) == (2, 4)
    assert dp.rules.tokens == "data"
    js = tmp_path / "custom.json"
    js.write_text(json.dumps({"mesh": {"model": 2}, "rules": {"vocab": None}}))
    c = load_sharding_config(str(js))
    assert c.tensor_parallel_size == 2 and c.rules.vocab is None and c.rules.heads == "model"


@pytest.mark.parametrize("text, words", [
    ("mesh: {model: 2}\nrules: {heads: modle}", "'modle' is not a mesh axis"),
    ("mesh: {model: 2}\nrules: {experts: model}", "unknown logical axis 'experts'"),
    ("mesh: {model: 2, pipe: 2}", "unknown mesh axis 'pipe'"),
    ("mesh: {model: 0}", "positive integer"),
    ("mesh: {model: 2}\nrules: {layers: model}", "layers: null"),
    ("mesh: {model: 2}\nrules: {kv_heads: data}", "kv_heads"),
    ("rules: {}", "'mesh' must map"),
    ("mesh: [", "not valid YAML"),
])
def test_bad_config_files_name_the_problem(tmp_path, text, words):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ShardingError, match="bad.yaml") as e:
        load_sharding_config(str(path))
    assert words in str(e.value)


def test_tensor_parallel_size_and_config_must_agree():
    assert resolve_sharding_config(4).tensor_parallel_size == 4
    assert resolve_sharding_config(4, "tp4").name == "tp4"
    assert resolve_sharding_config(1, "dp2-tp4").tensor_parallel_size == 4
    with pytest.raises(ShardingError, match=r"--tensor-parallel-size 2.*model axis 4"):
        resolve_sharding_config(2, "tp4")
    with pytest.raises(ShardingError, match="neither a preset"):
        resolve_sharding_config(1, "tp3")


def test_rules_reject_unknown_axes_directly():
    with pytest.raises(ShardingError):
        AxisRules(vocab="tensor")


def test_place_params_keeps_arrays_already_in_place():
    """Params restored from orbax arrive as jax.Arrays in their layout: placing them is free."""
    import jax
    import numpy as np

    plan = ShardingPlan.build(_cfg(), tensor_parallel_size=1)
    host = {"embed": np.ones((384, 64), np.float32)}
    shardings = {"embed": plan.param_shardings()["embed"]}
    from jaxserve.parallel import place_params

    placed = place_params(host, shardings)
    assert isinstance(placed["embed"], jax.Array)
    assert place_params(placed, shardings)["embed"] is placed["embed"]
