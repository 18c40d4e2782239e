"""Model loading: a path (HF folder or .gguf file) -> config, host param pytree, tokenizer."""

from __future__ import annotations

import dataclasses
import os
import sys

from tqdm import tqdm

from jaxserve.models.config import ModelConfig, ModelConfigError
from jaxserve.models.hf_names import WeightError, params_from_hf, required_hf_tensors


class ModelLoadError(ValueError):
    """The path does not hold a model we can load; the message says which file and why."""


@dataclasses.dataclass
class LoadedModel:
    config: ModelConfig
    params: dict          # numpy pytree, see jaxserve.models.llama
    tokenizer: object     # transformers PreTrainedTokenizerFast
    source: str


def _progress(total: int, desc: str):
    # Only worth a bar for checkpoints that take a while; tiny test models load silently.
    return tqdm(total=total, desc=desc, unit="tensor", file=sys.stderr,
                disable=total < 64, leave=False)


def load_model(path: str, dtype: str | None = None, quantization: str | None = None,
               quantize_embeddings: bool = False) -> LoadedModel:
    """Load an HF folder or a GGUF file; `dtype` overrides the checkpoint's (float32/bfloat16).
    `quantization` as EngineConfig's: int8/fp8 quantize the layer matrices here (and the
    embedding table and lm_head with `quantize_embeddings`), gguf (or None for a .gguf) keeps
    the file's blocks packed, none dequantizes everything."""
    if not os.path.exists(path):
        raise ModelLoadError(f"{path}: no such file or folder")
    is_gguf = path.endswith(".gguf") and os.path.isfile(path)
    if quantization == "gguf" and not is_gguf:
        raise ModelLoadError(f"--quantization gguf: {path} is not a .gguf file")
    if quantization in ("gptq", "awq") and is_gguf:
        raise ModelLoadError(f"--quantization {quantization}: {path} is a GGUF file")
    quantize = quantization if quantization in ("int8", "fp8", "none") else None
    try:
        if is_gguf:
            return _load_gguf(path, dtype, keep_packed=quantization in (None, "gguf"),
                              quantize=quantize, quantize_embeddings=quantize_embeddings)
        if os.path.isdir(path):
            return _load_hf_folder(path, dtype, quantize,
                                   quantization if quantization in ("gptq", "awq") else None,
                                   quantize_embeddings)
    except (ModelConfigError, WeightError) as e:
        raise ModelLoadError(str(e)) from None
    raise ModelLoadError(f"{path}: expected a Hugging Face model folder or a .gguf file")


def _load_hf_folder(folder: str, dtype: str | None, quantize: str | None,
                    expected_method: str | None, quantize_embeddings: bool) -> LoadedModel:
    from jaxserve.loading.hf import SafetensorsFolder, load_tokenizer
    from jaxserve.loading.hf_quant import QuantConfigError, parse_quant_config, quantized_getter

    config = ModelConfig.from_folder(folder, dtype=dtype)
    tensors = SafetensorsFolder(folder)
    get = tensors.get
    qc = _quantization_config(folder)
    try:
        settings = None if qc is None else parse_quant_config(qc, f"{folder}/config.json")
    except QuantConfigError as e:
        raise ModelLoadError(str(e)) from None
    found = None if settings is None else settings["method"]
    if expected_method is not None and found != expected_method:
        raise ModelLoadError(f"--quantization {expected_method}: {folder} is "
                             f"{'not quantized' if found is None else found}")
    if settings is not None:
        get = quantized_getter(get, settings, folder)
    with _progress(len(required_hf_tensors(config)), f"loading {os.path.basename(folder)}") as bar:
        try:
            params = params_from_hf(config, get, folder, on_tensor=lambda _: bar.update(),
                                    quantize=quantize, quantize_embeddings=quantize_embeddings)
        except QuantConfigError as e:
            raise ModelLoadError(str(e)) from None
    return LoadedModel(config=config, params=params, tokenizer=load_tokenizer(folder), source=folder)


def _quantization_config(folder: str) -> dict | None:
    import json
    with open(os.path.join(folder, "config.json")) as f:
        return json.load(f).get("quantization_config") or None


def _load_gguf(path: str, dtype: str | None, keep_packed: bool,
               quantize: str | None, quantize_embeddings: bool) -> LoadedModel:
    from jaxserve.loading.gguf import load_gguf

    g = load_gguf(path, dtype=dtype, keep_packed=keep_packed)
    params = params_from_hf(g.config, g.tensors.get, path, quantize=quantize,
                            quantize_embeddings=quantize_embeddings)
    return LoadedModel(config=g.config, params=params, tokenizer=g.tokenizer, source=path)
