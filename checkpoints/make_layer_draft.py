"""A draft model cut from a target: its first N decoder layers with the target's embeddings,
final norm and lm_head (an untrained early exit), as a Hugging Face folder.

The target's tokenizer comes along, so the draft's vocabulary is the target's by construction:
a draft for speculative decoding (speculative_config method "draft_model") when no smaller
model of the family is at hand. Its acceptance is whatever an untrained early exit gives;
benchmarks/RESULTS.md records what it gave.

    python checkpoints/make_layer_draft.py checkpoints/models/SmolLM2-135M-Instruct \\
        /tmp/smollm2-draft-8 --layers 8
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def make_layer_draft(target: str, out_dir: str, num_layers: int) -> str:
    from safetensors import safe_open
    from safetensors.numpy import save_file

    with open(os.path.join(target, "config.json")) as f:
        config = json.load(f)
    total = config["num_hidden_layers"]
    if not 1 <= num_layers <= total:
        raise ValueError(f"--layers must be in 1..{total}, got {num_layers}")
    os.makedirs(out_dir, exist_ok=True)
    tensors = {}
    for name in sorted(os.listdir(target)):
        if not name.endswith(".safetensors"):
            continue
        with safe_open(os.path.join(target, name), framework="numpy") as f:
            for key in f.keys():
                layer = _LAYER.match(key)
                if layer is None or int(layer.group(1)) < num_layers:
                    tensors[key] = f.get_tensor(key)
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    config["num_hidden_layers"] = num_layers
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    for name in os.listdir(target):  # tokenizer, chat template, generation config
        path = os.path.join(target, name)
        if (os.path.isfile(path) and name != "config.json" and not name.startswith("model.")
                and not name.endswith((".safetensors", ".gguf", ".bin", ".pt", ".pth"))):
            shutil.copy(path, os.path.join(out_dir, name))
    return out_dir


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", help="the target's Hugging Face folder (safetensors)")
    parser.add_argument("out_dir")
    parser.add_argument("--layers", type=int, required=True, help="decoder layers to keep")
    args = parser.parse_args()
    print(make_layer_draft(args.target, args.out_dir, args.layers))


if __name__ == "__main__":
    main()
