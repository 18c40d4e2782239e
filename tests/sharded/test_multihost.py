"""Two jax.distributed processes on 127.0.0.1 with 4 CPU devices each (gloo collectives) run one
tp8 mesh: the leader broadcasts every step, the follower mirrors it, and the greedy tokens equal
the unsharded single-device run: first for the bare model forward, then through LLM (skipped
until the runner has the multi-host split, ModelRunner.run_packed)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from shard_harness import HERE, ROOT, device_env, tiny_model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_pair(script: str, *args: str, timeout: float = 240) -> str:
    """Run process 0 and 1 of a 2-process job; the leader's stdout."""
    port = str(_free_port())
    path = os.path.join(HERE, script)
    procs = [subprocess.Popen([sys.executable, path, str(pid), *(a if a != "PORT" else port
                                                                 for a in args)],
                              env=device_env(4), cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for pid in (0, 1)]
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:  # never leave a half of the job waiting on its peer
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-4000:]
    # gloo prints connection lines to stdout: the result is the last line
    return outs[0][0].strip().splitlines()[-1]


def test_two_processes_match_single_process(tiny_model_dir):
    model = tiny_model(tiny_model_dir, "llama-h8-kv4")
    r = json.loads(_run_pair("multihost_worker.py", "2", "PORT", model, "tp8"))
    assert (r["process_count"], r["device_count"], r["local_device_count"]) == (2, 8, 4)
    assert r["mesh"] == {"data": 1, "model": 8}
    assert r["tokens"] == r["plain"]


def test_llm_served_by_two_processes(tiny_model_dir):
    from jaxserve.runner.runner import ModelRunner

    if not hasattr(ModelRunner, "run_packed"):
        pytest.skip("ModelRunner has no multi-host split yet (run_packed + lead_call in _run)")
    model = tiny_model(tiny_model_dir, "llama-h8-kv4")
    r = json.loads(_run_pair("multihost_llm_worker.py", "PORT", model))
    assert r["tokens"] == r["plain"]
