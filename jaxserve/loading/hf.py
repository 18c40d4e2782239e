"""Load a Hugging Face model folder: config.json, *.safetensors (single or sharded), tokenizer.

Tensors are memory-mapped, so a checkpoint is read once, tensor by tensor, straight into the
stacked parameter layout. The safetensors header is read here (not through safe_open) because
numpy has no bfloat16 for safe_open's numpy backend; ml_dtypes provides it, and reading the
header ourselves also lets a truncated file fail with a message naming the file and tensor.
"""

from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

from jaxserve.models.hf_names import WeightError

_DTYPES = {
    "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}


class SafetensorsFile:
    """Memory-mapped tensors of one .safetensors file, by name."""

    def __init__(self, path: str):
        self.path = path
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise WeightError(f"{path}: truncated safetensors file (no header)")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > size - 8:
                raise WeightError(f"{path}: truncated safetensors file (header of {header_len} "
                                  f"bytes, file has {size})")
            try:
                header = json.loads(f.read(header_len))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise WeightError(f"{path}: corrupt safetensors header ({e})") from None
        header.pop("__metadata__", None)
        self._data_start = 8 + header_len
        self._entries = header
        self._map = np.memmap(path, dtype=np.uint8, mode="r") if size > 0 else None
        for name, entry in header.items():
            begin, end = entry["data_offsets"]
            if self._data_start + end > size:
                raise WeightError(f"{path}: truncated file: tensor {name!r} ends at byte "
                                  f"{self._data_start + end}, the file has {size} bytes")

    def keys(self):
        return self._entries.keys()

    def get(self, name: str) -> np.ndarray:
        entry = self._entries[name]
        dtype = _DTYPES.get(entry["dtype"])
        if dtype is None:
            raise WeightError(f"{self.path}: tensor {name!r} has unsupported dtype {entry['dtype']}")
        begin, end = entry["data_offsets"]
        raw = self._map[self._data_start + begin:self._data_start + end]
        return raw.view(dtype).reshape(entry["shape"])


class SafetensorsFolder:
    """All tensors of a folder's safetensors files, found through the index when there is one."""

    def __init__(self, folder: str):
        index_path = os.path.join(folder, "model.safetensors.index.json")
        if os.path.isfile(index_path):
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
        if not files:
            raise WeightError(f"{folder}: no *.safetensors files in this folder")
        self.files = {}
        self.location = {}
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.isfile(path):
                raise WeightError(f"{index_path}: lists {name}, which is not in the folder")
            st = SafetensorsFile(path)
            self.files[name] = st
            for key in st.keys():
                self.location[key] = st

    def get(self, name: str) -> np.ndarray | None:
        st = self.location.get(name)
        return None if st is None else st.get(name)


def load_tokenizer(folder: str):
    """The folder's tokenizer (tokenizer.json + tokenizer_config.json, chat template included)."""
    from transformers import AutoTokenizer

    if not any(os.path.isfile(os.path.join(folder, n))
               for n in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise WeightError(f"{folder}: no tokenizer (tokenizer.json) in this folder")
    return AutoTokenizer.from_pretrained(folder)
