"""Subprocess script: greedy tokens of a quantized model (int8 made at load, and 4-bit blocks
as a GGUF Q4_1 file holds them) unsharded and on meshes of 2 and 4 devices, plus the sharding
of one quantized matrix's fields, as JSON on stdout.

    python tests/sharded/quantized_tokens.py MODEL_DIR tp2 tp4
"""

from __future__ import annotations

import json
import sys

from sharded_driver import ShardedDriver, prompts

import numpy as np  # noqa: E402
from gguf import GGMLQuantizationType  # noqa: E402
from gguf.quants import quantize as gguf_quantize  # noqa: E402

from jaxserve.loading.gguf_quant import unpack_block_tensor  # noqa: E402
from jaxserve.loading.hf import SafetensorsFolder  # noqa: E402
from jaxserve.models import quant  # noqa: E402
from jaxserve.models.config import ModelConfig  # noqa: E402
from jaxserve.models.hf_names import params_from_hf  # noqa: E402
from jaxserve.parallel import ShardingPlan  # noqa: E402


def q4_1(name, arr):
    """Layer matrices as a Q4_1 GGUF file stores them (the gguf package's own quantizer)."""
    if arr.ndim != 2 or ".layers." not in name or "norm" in name:
        return arr
    raw = gguf_quantize(np.asarray(arr, np.float32), GGMLQuantizationType.Q4_1)
    return unpack_block_tensor(raw.reshape(-1), "Q4_1", arr.shape)


def main():
    model_dir, names = sys.argv[1], sys.argv[2:]
    cfg = ModelConfig.from_folder(model_dir)
    tensors = SafetensorsFolder(model_dir)
    variants = {
        "int8": params_from_hf(cfg, tensors.get, model_dir, quantize="int8"),
        "Q4_1": params_from_hf(cfg, lambda n: None if tensors.get(n) is None
                               else q4_1(n, tensors.get(n)), model_dir),
    }
    ps = prompts()
    result = {}
    for scheme, params in variants.items():
        assert quant.quantized_scheme(params) == scheme, quant.quantized_scheme(params)
        out = {"plain": ShardedDriver(cfg, params).greedy(ps, 8)}
        for name in names:
            plan = ShardingPlan.build(cfg, sharding_config=name)
            driver = ShardedDriver(cfg, params, plan)
            down = driver.params["layers"]["down_proj"]  # row parallel: K is split
            out[name] = {"tokens": driver.greedy(ps, 8),
                         "down_codes_shard": list(down.codes.addressable_shards[0].data.shape),
                         "down_scale_shard": list(down.scale.addressable_shards[0].data.shape),
                         "down_codes_shape": list(down.codes.shape)}
        result[scheme] = out
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
