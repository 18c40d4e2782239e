"""Launching the servers our online benchmarks drive: jaxserve (`python serve.py`) and vLLM's
CPU build (`python -m vllm.entrypoints.openai.api_server` from its own venv; its `vllm` console
script is broken there), with the same limits, on a free loopback port.

A Server counts from process start to "listening" (/health answers 200) and to its first served
completion (a one-token greedy request on token ids, which is also the warm-up both get before
a timed load), reads the peak RSS (VmHWM) of the server and of every process it spawned (vLLM's
engine core runs in a child), and stops its whole process group. Used by serving.py
(--launch / --compare-vllm) and startup.py.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import vllm_peer  # noqa: E402
from benchmarks.vllm_offline_worker import descendants, vm_hwm  # noqa: E402 (stdlib only)

SERVED_NAME = "bench"  # both servers answer to it, so requests need no model discovery
VLLM_MODULE = "vllm.entrypoints.openai.api_server"
PROBE_PROMPT = list(range(20, 28))  # token ids every model we ship has


def add_server_args(p) -> None:
    """The flags that say how to launch the servers (serving.py and startup.py)."""
    g = p.add_argument_group("launched servers")
    g.add_argument("--model-path", default=None,
                   help="HF folder both servers load (default: the embedded SmolLM2 folder)")
    g.add_argument("--max-num-seqs", type=int, default=32)
    g.add_argument("--max-num-batched-tokens", type=int, default=512)
    g.add_argument("--max-model-len", type=int, default=None,
                   help="default: the workload's longest request rounded up to a page")
    g.add_argument("--page-size", type=int, default=16,
                   help="jaxserve's page; vLLM's block is the nearest multiple of 32 it accepts")
    g.add_argument("--dtype", default="float32")
    g.add_argument("--vllm-python", default=vllm_peer.default_vllm_python(),
                   help="python of vLLM's venv (default: $VLLM_PYTHON or ../vllm_venv)")
    g.add_argument("--vllm-kv-cache-gib", type=int, default=2, help="VLLM_CPU_KVCACHE_SPACE")
    g.add_argument("--jaxserve-args", default="",
                   help="extra serve.py flags, one string: --jaxserve-args='--flag ...'")
    g.add_argument("--vllm-args", default="",
                   help="extra vLLM server flags, one string: --vllm-args='--enforce-eager'")
    g.add_argument("--server-timeout", type=float, default=1200.0,
                   help="seconds a server may take to serve its first completion")
    g.add_argument("--server-log-dir", default=None, help="server logs (default: a temp dir)")


def resolve_model_path(path: str | None) -> str:
    from checkpoints.default_model import default_model_dir, is_complete
    path = path or default_model_dir()
    if not os.path.isdir(path) or (path == default_model_dir() and not is_complete(path)):
        raise SystemExit(f"{path}: not a model folder (the default one is built by "
                         "`python checkpoints/default_model.py`)")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass
class ServerSpec:
    name: str                  # "jaxserve" or "vllm"
    argv: list[str]
    env: dict
    port: int
    # vLLM starts with `-m`, which puts the working directory first on sys.path: run it from an
    # empty folder so nothing of this checkout can shadow its imports
    cwd: str = ROOT

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def jaxserve_cache_flag() -> str | None:
    """serve.py's persistent compilation cache flag, if this checkout has one (read from
    --help, so the scripts keep working before and after it exists)."""
    out = subprocess.run([sys.executable, os.path.join(ROOT, "serve.py"), "--help"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300).stdout
    return find_cache_flag(out)


def find_cache_flag(help_text: str) -> str | None:
    flags = re.findall(r"(--(?!no-)[a-z-]*compil[a-z-]*cache[a-z-]*)", help_text)
    return flags[0] if flags else None


def jaxserve_spec(args, model: str, max_model_len: int, cache_dir: str | None = None,
                  cache_flag: str | None = None) -> ServerSpec:
    port = free_port()
    argv = [sys.executable, os.path.join(ROOT, "serve.py"), "--model", model,
            "--served-model-name", SERVED_NAME, "--host", "127.0.0.1", "--port", str(port),
            "--dtype", args.dtype, "--max-model-len", str(max_model_len),
            "--max-num-seqs", str(args.max_num_seqs),
            "--max-num-batched-tokens", str(args.max_num_batched_tokens),
            "--page-size", str(args.page_size), "--no-enable-prefix-caching",
            "--uvicorn-log-level", "warning"]
    if cache_dir and cache_flag:
        argv += [cache_flag, cache_dir]
    return ServerSpec("jaxserve", argv + shlex.split(args.jaxserve_args), dict(os.environ), port)


def vllm_spec(args, model: str, max_model_len: int, cache_root: str | None = None) -> ServerSpec:
    port = free_port()
    argv = [vllm_peer.check_vllm_python(args.vllm_python), "-m", VLLM_MODULE, "--model", model,
            "--served-model-name", SERVED_NAME, "--host", "127.0.0.1", "--port", str(port),
            "--dtype", args.dtype, "--max-model-len", str(max_model_len),
            "--max-num-seqs", str(args.max_num_seqs),
            "--max-num-batched-tokens", str(args.max_num_batched_tokens),
            "--block-size", str(vllm_peer.vllm_block_size(args.page_size)),
            "--no-enable-prefix-caching",
            "--uvicorn-log-level", "warning"]
    env = vllm_peer.vllm_env(args.vllm_kv_cache_gib, cache_root)
    return ServerSpec("vllm", argv + shlex.split(args.vllm_args), env, port,
                      tempfile.mkdtemp(prefix="vllm-server-"))


class Server:
    """One launched server process (its own session, so stop() reaches its children)."""

    def __init__(self, spec: ServerSpec, log_dir: str | None = None, tag: str = ""):
        self.spec = spec
        log_dir = log_dir or tempfile.mkdtemp(prefix="bench-servers-")
        os.makedirs(log_dir, exist_ok=True)
        self.log_path = os.path.join(log_dir, f"{spec.name}{tag}.log")
        self.proc: subprocess.Popen | None = None
        self.started = 0.0

    def start(self) -> "Server":
        log = open(self.log_path, "w")
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(self.spec.argv, env=self.spec.env, stdout=log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     cwd=self.spec.cwd, start_new_session=True)
        log.close()  # the child holds its own descriptor
        return self

    def _check_alive(self) -> None:
        if self.proc.poll() is not None:
            with open(self.log_path) as fh:
                tail = fh.read()[-3000:]
            raise RuntimeError(f"{self.spec.name} exited with status {self.proc.returncode} "
                               f"before serving; log {self.log_path}:\n{tail}")

    def wait_ready(self, timeout: float) -> dict:
        """Seconds from process start to /health == 200 and to the first served completion."""
        import httpx

        deadline = self.started + timeout
        url = self.spec.base_url
        body = {"model": SERVED_NAME, "prompt": PROBE_PROMPT, "max_tokens": 1,
                "temperature": 0.0}
        with httpx.Client(trust_env=False, timeout=httpx.Timeout(timeout, connect=2.0)) as c:
            self._poll(lambda: c.get(f"{url}/health", timeout=5.0), deadline, "not listening")
            listening = time.perf_counter() - self.started
            self._poll(lambda: c.post(f"{url}/v1/completions", json=body,
                                      timeout=max(1.0, deadline - time.perf_counter())),
                       deadline, "no completion")
        return {"listening_s": listening, "first_completion_s": time.perf_counter() - self.started}

    def _poll(self, request, deadline: float, what: str) -> None:
        """Repeat `request()` until it answers 200, while the server lives, until `deadline`."""
        import httpx

        while True:
            self._check_alive()
            try:
                if request().status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.perf_counter() > deadline:
                raise TimeoutError(f"{self.spec.name}: {what} after "
                                   f"{deadline - self.started:.0f} s")
            time.sleep(0.25)

    def peak_rss(self) -> dict:
        """VmHWM of the server and of its live descendants (summed: pages they share count
        twice, so the total is an upper bound)."""
        kids = descendants(self.proc.pid)
        own = vm_hwm(self.proc.pid)
        children = sum(vm_hwm(p) for p in kids)
        return {"peak_rss_bytes": own, "children_peak_rss_bytes": children,
                "num_children": len(kids), "total_peak_rss_bytes": own + children}

    def stop(self, grace: float = 30.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        pgid = self.proc.pid  # start_new_session: the group is ours alone
        os.killpg(pgid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(pgid, signal.SIGKILL)
            self.proc.wait()
        try:  # children that outlived their parent (an orphaned engine core)
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def spec_for(name: str, args, model: str, max_model_len: int, cache: str | None = None,
             cache_flag: str | None = None) -> ServerSpec:
    if name == "jaxserve":
        return jaxserve_spec(args, model, max_model_len, cache, cache_flag)
    return vllm_spec(args, model, max_model_len, cache)
