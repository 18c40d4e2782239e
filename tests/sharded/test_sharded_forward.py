"""The model forward on meshes of 1, 2, 4 and 8 fake CPU devices is token-exact with the
unsharded forward, and the arrays carry the intended shardings (tests/sharded/forward_tokens.py
runs in a subprocess with 8 devices)."""

from __future__ import annotations

import pytest

from shard_harness import run_script, tiny_model

BIG = ("q_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The dimension of each big weight that the model axis splits: q [L,H,Hq*D], o [L,Hq*D,H], ...
SPLIT_DIM = {"q_proj": 2, "k_proj": 2, "v_proj": 2, "o_proj": 1, "gate_proj": 2, "up_proj": 2,
             "down_proj": 1, "embed": 0}

# variant -> (sharding configs to run, configs that must fail with these words in the message)
CASES = {
    # 4 heads / 2 KV heads: KV split at tp2, replicated at tp4 (one KV head per shard)
    # (and a user-written data-only config: 4 replicas, the batch's tokens split over them)
    "llama-gqa": (["tp2", "tp4", "tp8", "dp4.yaml"], {"tp8": ["4 attention heads", "8 devices"]}),
    # 8 heads / 4 KV heads: KV split at tp1..4 (dp2-tp4 also splits tokens over data),
    # replicated at tp8
    "llama-h8-kv4": (["tp1", "tp2", "tp8", "dp2-tp4"], {}),
    # 12 heads / 3 KV heads: replicated KV, shards straddle KV groups unevenly
    "llama-h12-kv3": (["tp2", "tp4", "tp8"], {"tp8": ["12 attention heads", "8 devices"]}),
    "qwen2": (["tp2"], {}),  # q/k/v biases, tied embeddings
}
TP = {"tp1": 1, "tp2": 2, "tp4": 4, "tp8": 8, "dp2-tp4": 4, "dp4.yaml": 1}
USER_CONFIGS = {"dp4.yaml": "mesh: {data: 4, model: 1}\nrules: {tokens: data}\n"}


@pytest.fixture(scope="module")
def results(tiny_model_dir, tmp_path_factory):
    cache, folder = {}, tmp_path_factory.mktemp("sharding-configs")
    paths = {}
    for name, text in USER_CONFIGS.items():
        paths[name] = str(folder / name)
        (folder / name).write_text(text)

    def get(variant):
        if variant not in cache:
            configs, _ = CASES[variant]
            out = run_script("forward_tokens.py", tiny_model(tiny_model_dir, variant),
                             *(paths.get(c, c) for c in configs))
            cache[variant] = {next((c for c in paths if paths[c] == k), k): v
                              for k, v in out.items()}
        return cache[variant]

    return get


@pytest.mark.parametrize("variant", list(CASES))
def test_tokens_identical_across_meshes(results, variant):
    out = results(variant)
    assert out["devices"] == 8
    configs, failing = CASES[variant]
    for name in configs:
        if name in failing:
            assert "error" in out[name], f"{variant} {name} should not fit"
            for words in failing[name]:
                assert words in out[name]["error"], out[name]["error"]
            continue
        assert "error" not in out[name], out[name].get("error")
        assert out[name]["tokens"] == out["plain"], f"{variant} under {name}"


@pytest.mark.parametrize("variant", list(CASES))
def test_arrays_have_intended_shardings(results, variant, tiny_model_dir):
    import json
    import os

    out = results(variant)
    with open(os.path.join(tiny_model(tiny_model_dir, variant), "config.json")) as f:
        hf = json.load(f)
    kv_heads = hf["num_key_value_heads"]
    configs, failing = CASES[variant]
    for name in configs:
        if name in failing:
            continue
        tp, facts = TP[name], out[name]["shardings"]
        for leaf in BIG + ("embed",):
            f, d = facts[leaf], SPLIT_DIM[leaf]
            assert f["shard_shape"][d] * tp == f["shape"][d], (name, leaf, f)
            assert f["replicated"] == (tp == 1), (name, leaf, f)
        kv_split = tp > 1 and kv_heads % tp == 0
        for leaf in ("k_proj", "v_proj"):
            f = facts[leaf]
            assert f["shard_shape"][2] * (tp if kv_split else 1) == f["shape"][2], (name, leaf, f)
        cache = facts["kv_cache_k"]
        # the cache that came out of the jitted steps kept the layout it went in with
        assert cache["spec"] == facts["kv_cache_expected_spec"], (name, cache)
        assert facts["kv_cache_shards"] == (tp if kv_split else 1)
        assert cache["shard_shape"][2] == kv_heads // facts["kv_cache_shards"], (name, cache)
        data_split = name in ("dp2-tp4", "dp4.yaml")  # rule tokens: data
        expected_spec = "P('data',)" if data_split else "P()"
        if tp == 1 and not data_split:  # a one-device mesh
            expected_spec = "numpy"
        assert facts["token_ids_spec"] == expected_spec, facts
        if not kv_split and tp > 1:
            assert "replicated" in facts["describe"] and "do not split" in facts["describe"]


def test_pallas_kernel_under_shard_map(tiny_model_dir):
    """The GPU default variant (split-K decode, falling back to the ragged kernel for prefill),
    in interpret mode, with KV heads split (tp2) and replicated (tp4)."""
    out = run_script("forward_tokens.py", tiny_model(tiny_model_dir, "llama-gqa"),
                     "--attention=pallas_splitk_decode", "tp2", "tp4")
    for name in ("tp2", "tp4"):
        assert out[name]["tokens"] == out["plain"], name


def test_quantized_models_give_the_same_tokens_on_2_and_4_devices(tiny_model_dir):
    # llama-h8-kv4: FFN 128 = 4 groups of 32 along down_proj's K, so tp4 shards whole groups
    r = run_script("quantized_tokens.py", tiny_model(tiny_model_dir, "llama-h8-kv4"), "tp2", "tp4")
    for scheme in ("int8", "Q4_1"):
        for name, n in (("tp2", 2), ("tp4", 4)):
            got = r[scheme][name]
            assert got["tokens"] == r[scheme]["plain"], (scheme, name)
            # down_proj [L, F, H] is row parallel: its codes (4-bit: F/2 packed rows) split n ways
            assert got["down_codes_shard"][1] * n == got["down_codes_shape"][1]
            if scheme == "Q4_1":  # and its group scales with them
                assert got["down_scale_shard"][1] * n == 128 // 32


@pytest.mark.parametrize("variant,attention", [("llama-gqa", None), ("llama-h12-kv3", None),
                                               ("llama-gqa", "pallas_splitk_decode")])
def test_a_quantized_kv_cache_gives_the_same_tokens_on_2_and_4_devices(tiny_model_dir, variant,
                                                                        attention):
    # llama-gqa: KV heads split at tp2, one replicated KV head cut per shard at tp4;
    # llama-h12-kv3: replicated, shards straddling KV groups (a KV head gathered per query head)
    args = [f"--attention={attention}"] if attention else []
    r = run_script("quantized_kv_tokens.py", tiny_model(tiny_model_dir, variant), *args,
                   "tp2", "tp4")
    kv_heads = {"llama-gqa": 2, "llama-h12-kv3": 3}[variant]
    for label, dtype in (("int8", "int8"), ("fp8", "float8_e4m3fn")):
        plain = r[label]["plain"]
        for name, n in (("tp2", 2), ("tp4", 4)):
            got = r[label][name]
            assert got["tokens"] == plain, (label, name)
            assert got["codes_dtype"] == dtype
            # codes [L, P, Hkv, ps, D] and scales [L, P, Hkv, ps] split (or not) alike
            split = kv_heads % n == 0
            assert got["codes_shard"][2] == got["scale_shard"][2] == (
                kv_heads // n if split else kv_heads), (label, name)
