"""Convert a Hugging Face model folder into a jaxserve orbax checkpoint.

    python checkpoints/convert_to_orbax.py HF_DIR OUT_DIR [--dtype bfloat16] [--force]

Writes OUT_DIR/params (orbax, the stacked param pytree jaxserve runs), copies config.json and the
tokenizer/generation files next to it, and a jaxserve_orbax.json marker; see
jaxserve/loading/orbax.py for the layout and `load_orbax` for restoring it sharded. The tensors
go from the memory-mapped safetensors through host numpy to orbax without touching a device.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Everything of an HF folder except the weights travels with the checkpoint.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")
_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def convert(hf_dir: str, out_dir: str, dtype: str | None = None, force: bool = False) -> str:
    from jaxserve.loading.hf import SafetensorsFolder
    from jaxserve.loading.orbax import FORMAT_VERSION, MARKER, PARAMS_DIR, save_orbax
    from jaxserve.models.config import ModelConfig
    from jaxserve.models.hf_names import params_from_hf

    if os.path.exists(out_dir) and os.listdir(out_dir):
        if not force:
            raise SystemExit(f"{out_dir}: exists and is not empty (pass --force to replace it)")
        shutil.rmtree(out_dir)
    config = ModelConfig.from_folder(hf_dir, dtype=dtype)
    params = params_from_hf(config, SafetensorsFolder(hf_dir).get, hf_dir)
    os.makedirs(out_dir, exist_ok=True)
    save_orbax(params, os.path.join(out_dir, PARAMS_DIR))
    for name in sorted(os.listdir(hf_dir)):
        src = os.path.join(hf_dir, name)
        if (os.path.isfile(src) and not name.endswith(_WEIGHT_SUFFIXES)
                and name not in _WEIGHT_INDEXES):
            shutil.copy2(src, os.path.join(out_dir, name))
    with open(os.path.join(out_dir, MARKER), "w") as f:
        json.dump({"format": FORMAT_VERSION, "dtype": config.dtype,
                   "source": os.path.abspath(hf_dir)}, f, indent=1)
    return out_dir


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("hf_dir")
    parser.add_argument("out_dir")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="store the weights in this dtype (default: the checkpoint's)")
    parser.add_argument("--force", action="store_true", help="replace a non-empty OUT_DIR")
    args = parser.parse_args()
    print(convert(args.hf_dir, args.out_dir, args.dtype, args.force))


if __name__ == "__main__":
    main()
