"""Run a tests/sharded script in a subprocess that sees N fake CPU devices; read its JSON.

The pytest process itself must keep seeing one CPU device (every other test assumes it), and
XLA_FLAGS only takes effect before jax initialises, so each sharded check runs as a fresh
`python script.py` with --xla_force_host_platform_device_count set, printing one JSON object.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from unittest import mock

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))

# Tiny variants the sharded tests need beyond checkpoints/make_tiny_model.VARIANTS (hidden 64):
#   llama-h8-kv4: 8 query / 4 KV heads (head_dim 8): KV split at tp 2 and 4, replicated at tp 8
#   llama-h12-kv3: 12 query / 3 KV heads, hidden 96 (transformers wants hidden % heads == 0),
#     head_dim 16: tp 2 and 4 replicate KV heads and the shards' query heads straddle KV groups
#     unevenly (the gather path of shard_attention)
EXTRA_VARIANTS = {
    "llama-h8-kv4": ("LlamaForCausalLM", dict(num_attention_heads=8, num_key_value_heads=4)),
    "llama-h12-kv3": ("LlamaForCausalLM", dict(num_attention_heads=12, num_key_value_heads=3,
                                               hidden_size=96, head_dim=16)),
}


def tiny_model(tiny_model_dir, variant: str) -> str:
    """tiny_model_dir(variant), with EXTRA_VARIANTS known to make_tiny_model for the call."""
    from checkpoints import make_tiny_model

    with mock.patch.dict(make_tiny_model.VARIANTS, EXTRA_VARIANTS):
        return tiny_model_dir(variant)


def device_env(num_devices: int) -> dict:
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={num_devices}"])
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([ROOT, HERE, env.get("PYTHONPATH", "")])
    return env


def run_script(script: str, *args: str, num_devices: int = 8, timeout: float = 240) -> dict:
    """Run tests/sharded/<script> with num_devices CPU devices; its stdout's JSON as a dict."""
    proc = subprocess.run([sys.executable, os.path.join(HERE, script), *map(str, args)],
                          env=device_env(num_devices), cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(map(str, args))} failed "
                             f"(exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout)
