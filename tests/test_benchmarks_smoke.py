"""Smoke tests of the benchmark scripts: each runs end to end in a tiny configuration, as CI would
run it, and its figures are checked for shape and sanity (not speed).

serving.py is driven against a minimal fake OpenAI SSE server on 127.0.0.1 (http.server in a
thread), so these tests do not depend on jaxserve's own server.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import roofline  # noqa: E402
from benchmarks.model_shapes import builtin_config, kv_bytes_per_token, num_params  # noqa: E402
from benchmarks.serving import RequestResult, calculate_metrics, parse_goodput  # noqa: E402
from benchmarks.workloads import make_workload, sharegpt_lengths  # noqa: E402


def _run(script: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


# -- roofline -------------------------------------------------------------------------------------

def test_model_shapes_match_published_sizes():
    cfg = builtin_config("llama3-8b")
    assert num_params(cfg) * 2 == pytest.approx(16.06e9, rel=1e-3)  # REFERENCE.md: 16.06 GB
    assert kv_bytes_per_token(cfg) == 128 * 1024
    assert num_params(builtin_config("qwen2.5-7b")) == pytest.approx(7.62e9, rel=1e-2)
    assert num_params(builtin_config("smollm2-135m")) == pytest.approx(134.5e6, rel=1e-2)


def test_roofline_floors_sit_just_under_the_published_anchors():
    # The anchors count every parameter; our floors skip the gathered (untied) embedding
    # table, so they are lower by its 1.05 GB, never higher.
    cfg = builtin_config("llama3-8b")
    h100 = roofline.ANCHORS["h100-spec"]
    for batch, anchor_ms in ((1, 4.8), (64, 7.4), (256, 15.0)):
        step = roofline.decode_step_floor(cfg, batch, 1024, h100)["step_s"] * 1e3
        assert anchor_ms - 0.4 < step <= anchor_ms + 0.05, (batch, step)
    prefill = roofline.prefill_floor(cfg, 1024, roofline.DeviceRates("x", 3350, 800, "given"))
    assert 17.0 < prefill["seconds"] * 1e3 <= 20.6
    # long prompts, short replies: prefill FLOPs dominate; the reverse: weight reads do
    floor = roofline.workload_floor(cfg, [1024] * 64, [128] * 64, 64, h100)
    assert floor["bound"] == "compute" and floor["min_decode_steps"] == 128
    floor = roofline.workload_floor(cfg, [128] * 64, [2048] * 64, 64, h100)
    assert floor["bound"] == "memory" and floor["min_decode_steps"] == 2048


def test_roofline_cli(tmp_path):
    out = tmp_path / "roofline.json"
    proc = _run("roofline.py", "--model-config", "llama3-8b", "--device", "h200",
                "--batch", "1", "64", "--context", "1024", "--json", str(out), timeout=60)
    assert "memory" in proc.stdout
    data = json.loads(out.read_text())
    assert data["device"]["bandwidth_gbs"] == 4300
    assert [d["batch"] for d in data["decode"]] == [1, 64]
    assert data["decode"][0]["step_s"] < data["decode"][1]["step_s"]


# -- workloads ------------------------------------------------------------------------------------

def test_workloads_are_reproducible_and_filtered():
    a, b = make_workload("sharegpt", 50, seed=3), make_workload("sharegpt", 50, seed=3)
    assert a.prompts == b.prompts and a.output_lens == b.output_lens
    ins, outs = sharegpt_lengths(500, seed=0)
    assert min(ins) >= 4 and min(outs) >= 4 and max(ins) <= 1024
    assert max(i + o for i, o in zip(ins, outs)) <= 2048
    w = make_workload("1024/128", 3, seed=0)
    assert w.input_lens == [1024] * 3 and w.output_lens == [128] * 3
    with pytest.raises(ValueError, match="IN/OUT"):
        make_workload("1024x128", 1)


def test_mixed_workload_is_one_fixed_set_of_shapes():
    from benchmarks.workloads import MIXED_MAX_MODEL_LEN
    w = make_workload("mixed", 48, seed=0)
    assert (sum(w.input_lens), sum(w.output_lens)) == (9190, 6743)  # documented in workloads.py
    assert w.max_total_len <= MIXED_MAX_MODEL_LEN and min(w.input_lens) >= 4
    other = make_workload("mixed", 48, seed=5)     # the seed picks token ids, not lengths
    assert other.input_lens == w.input_lens and other.output_lens == w.output_lens
    assert other.prompts != w.prompts


# -- throughput -----------------------------------------------------------------------------------

def test_random_weights_are_made_on_the_device_and_fit_the_runner():
    import jax

    from benchmarks.bench_engine import EngineSettings
    from benchmarks.model_shapes import random_model
    from jaxserve.llm import resolve_attention
    from jaxserve.runner.runner import ModelRunner

    cfg = builtin_config("tiny")
    model = random_model(cfg, seed=1)
    leaves = jax.tree.leaves(model.params)
    assert all(isinstance(x, jax.Array) and x.dtype == "float32" for x in leaves)
    assert sum(x.size for x in leaves) == num_params(cfg)
    assert float(model.params["final_norm"][0]) == 1.0
    settings = EngineSettings(max_num_seqs=2, max_num_batched_tokens=16, num_pages=8)
    runner = ModelRunner(model, settings.engine_config("random:tiny", None, 64),
                         resolve_attention(None)[1], log=lambda _: None)
    assert runner.plan.weight_bytes == num_params(cfg) * 4  # no warm-up: nothing compiled



def test_throughput_smoke_with_transformers(tmp_path):
    out = tmp_path / "throughput.json"
    _run("throughput.py", "--smoke", "--compare-transformers", "--scheduling", "both",
         "--workload", "128/128", "1000/1000", "sharegpt", "--json", str(out), timeout=240)
    data = json.loads(out.read_text())
    assert [r["workload"] for r in data["results"]] == ["128/128", "1000/1000", "sharegpt"]
    for r in data["results"]:
        assert r["compiles_since_warmup"] == 0 and r["compiles_during_run"] == 0
        # the rates are the workload's own counts over the measured time
        assert r["output_tokens_per_s"] == pytest.approx(r["output_tokens"] / r["elapsed_s"])
        assert r["requests_per_s"] == pytest.approx(r["num_prompts"] / r["elapsed_s"])
        assert 0 < r["fraction_of_roofline"] < 1.5  # a floor: ~never beaten, CPU noise aside
        assert r["fraction_of_roofline"] == pytest.approx(r["workload_floor_s"] / r["elapsed_s"])
        # the host's share of a step is part of the step: no more than its wall time
        assert 0 < r["mean_host_ms_per_step"] <= r["mean_step_ms"]
        # a step samples at most one token per request: at least the mean output length
        assert r["steps"] >= r["output_tokens"] / r["num_prompts"]
        # same weights, same prompts, greedy: transformers must produce the same tokens
        assert r["greedy_agreement"] == 1.0
        hf = r["transformers"]
        assert r["speedup_vs_transformers"] == pytest.approx(
            r["output_tokens_per_s"] / hf["output_tokens_per_s"])
        assert hf["output_tokens_per_s"] == pytest.approx(r["output_tokens"] / hf["elapsed_s"])
        # all but the first step of a run are dispatched while the one before still runs
        assert r["async_scheduling"] and r["overlapped_steps"] >= r["dispatched_steps"] // 2
        assert r["async_sync_identical"] == 1.0
        assert r["async_speedup"] == pytest.approx(  # one round: the ratio of its two runs
            r["output_tokens_per_s"] / r["sync_scheduling"]["output_tokens_per_s"])
    assert data["results"][1]["input_tokens"] == 4 * round(1000 / 32)


def test_throughput_smoke_with_speculation(tmp_path):
    out = tmp_path / "throughput.json"
    _run("throughput.py", "--smoke", "--workload", "copy", "--json", str(out),
         "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 3, '
         '"prompt_lookup_max": 3}', timeout=240)
    (r,) = json.loads(out.read_text())["results"]
    assert r["workload"] == "copy" and r["compiles_during_run"] == 0
    assert r["output_tokens_per_s"] == pytest.approx(r["output_tokens"] / r["elapsed_s"])
    assert 0 <= r["spec_accepted_tokens"] <= r["spec_draft_tokens"]
    assert r["spec_draft_tokens"] > 0  # a repeated block always gives prompt lookup a match


# -- serving --------------------------------------------------------------------------------------

class _FakeOpenAI(BaseHTTPRequestHandler):
    """Streams one chunk per requested token, then a usage chunk and [DONE]."""
    protocol_version = "HTTP/1.0"  # the connection closes after each response: no framing
    received: list[dict] = []

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _send_json(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/v1/models":
            self._send_json(200, {"object": "list", "data": [{"id": "fake-model"}]})
        else:
            self._send_json(404, {"error": {"message": "not found"}})

    def do_POST(self):
        self._answer(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))

    def _answer(self, body: dict) -> None:
        type(self).received.append(body)
        if not isinstance(body.get("prompt"), list) or not body.get("stream"):
            self._send_json(400, {"error": {"message": "expected token ids, stream=true"}})
            return
        n = body["max_tokens"]
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for i in range(n):
            time.sleep(0.002)
            chunk = {"object": "text_completion", "usage": None, "choices": [
                {"index": 0, "text": f" t{i}", "finish_reason": "length" if i == n - 1 else None}]}
            if body.get("logprobs") is not None:
                chunk["choices"][0]["logprobs"] = {"tokens": [f" t{i}"], "token_logprobs": [-0.5]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()
        usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": n,
                 "total_tokens": len(body["prompt"]) + n}
        self.wfile.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode())
        self.wfile.write(b"data: [DONE]\n\n")


@pytest.fixture()
def fake_server():
    _FakeOpenAI.received = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeOpenAI)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_serving_against_fake_server(fake_server, tmp_path):
    out = tmp_path / "serving.json"
    proc = _run("serving.py", "--base-url", fake_server, "--random-input-len", "12",
                "--random-output-len", "6", "--num-prompts", "8", "--request-rate", "100",
                "--max-concurrency", "3", "--goodput", "ttft:5000", "tpot:5000",
                "--save-result", str(out), timeout=60)
    assert "Serving Benchmark Result" in proc.stdout
    data = json.loads(out.read_text())
    assert data["completed"] == 8 and data["failed"] == 0
    assert data["total_input_tokens"] == 96 and data["total_output_tokens"] == 48
    assert data["max_concurrent_requests"] <= 3
    assert data["request_goodput"] == pytest.approx(data["request_throughput"])
    for name in ("ttft", "tpot", "itl", "e2el"):
        assert data[f"median_{name}_ms"] == data[f"p50_{name}_ms"]
        assert data[f"p50_{name}_ms"] <= data[f"p90_{name}_ms"] <= data[f"p99_{name}_ms"]
    # the fake sleeps 2 ms before each of its 6 chunks
    assert data["mean_ttft_ms"] >= 1.5 and data["mean_itl_ms"] >= 1.5
    assert data["mean_tpot_ms"] >= 1.5 and data["mean_e2el_ms"] >= 6 * 1.5
    # per request e2el = ttft + 5 tpot, so their means too
    assert data["mean_e2el_ms"] == pytest.approx(data["mean_ttft_ms"] + 5 * data["mean_tpot_ms"])
    assert all(len(itl) == 5 for itl in data["itls"])
    sent = _FakeOpenAI.received
    assert len(sent) == 8 and all(b["model"] == "fake-model" and b["ignore_eos"] for b in sent)
    assert all(len(b["prompt"]) == 12 and b["stream_options"]["include_usage"] for b in sent)


def test_serving_asks_for_logprobs_and_counts_the_tokens_given_them(fake_server, tmp_path):
    out = tmp_path / "serving.json"
    _run("serving.py", "--base-url", fake_server, "--random-input-len", "4",
         "--random-output-len", "5", "--num-prompts", "3", "--logprobs", "2",
         "--save-result", str(out), timeout=60)
    data = json.loads(out.read_text())
    assert all(b["logprobs"] == 2 for b in _FakeOpenAI.received)
    assert data["total_output_tokens"] == data["total_logprob_tokens"] == 15


def test_serving_stops_dispatching_at_max_seconds(fake_server, tmp_path):
    out = tmp_path / "serving.json"
    _run("serving.py", "--base-url", fake_server, "--random-input-len", "4",
         "--random-output-len", "2", "--num-prompts", "1000", "--request-rate", "20",
         "--max-seconds", "0.5", "--model", "m", "--save-result", str(out), timeout=60)
    data = json.loads(out.read_text())
    assert 0 < data["completed"] < 100 and data["failed"] == 0


def test_serving_metrics_and_goodput():
    def res(ttft, latency, n):
        return RequestResult(prompt_len=10, success=True, output_tokens=n, ttft=ttft,
                             latency=latency, itl=[(latency - ttft) / (n - 1)] * (n - 1))
    results = [res(0.1, 1.1, 11), res(0.3, 0.8, 6), RequestResult(prompt_len=10, error="x")]
    m = calculate_metrics(results, 2.0, [50, 99], parse_goodput(["ttft:200", "tpot:200"]))
    assert m["completed"] == 2 and m["failed"] == 1
    assert m["mean_ttft_ms"] == pytest.approx(200.0)
    assert m["mean_tpot_ms"] == pytest.approx(100.0)       # 1.0/10 and 0.5/5 s per token
    assert m["request_goodput"] == pytest.approx(0.5)      # only the first meets ttft <= 200
    assert m["output_throughput"] == pytest.approx(8.5)
    with pytest.raises(ValueError, match="ttft"):
        parse_goodput(["latency:3"])


# -- vLLM as a peer (no vLLM needed: fake worker results, a fake vllm module, a fake server) ------

def test_token_agreement_and_median_ratio_with_a_fake_worker():
    from benchmarks.vllm_peer import compare_vllm, summary_table, token_agreement, vllm_lines

    ag = token_agreement([[1, 2, 3], [4, 5, 6], [7, 8, 9]], [[1, 2, 3], [4, 0, 6], [0, 8, 9]])
    assert ag["num_identical"] == 1 and ag["identical"] == pytest.approx(1 / 3)
    assert ag["first_mismatch"] == [0, 1] and ag["first_mismatch_min"] == 0
    assert token_agreement([[1]], [[1]])["first_mismatch_median"] is None

    class FakeWorker:
        tps = iter([100.0, 50.0, 200.0])

        def run(self, index, round_):
            t = next(self.tps)
            return {"engine": "vllm", "output_tokens_per_s": t, "requests_per_s": 1.0,
                    "total_tokens_per_s": 2 * t, "elapsed_s": 1.0, "token_ids": [[1, 2], [3, 9]]}

    jax_tps = iter([60.0, 300.0])
    first = {"output_tokens_per_s": 50.0, "token_ids": [[1, 2], [3, 4]]}
    r = compare_vllm(lambda k: {"output_tokens_per_s": next(jax_tps)}, FakeWorker(), 0, first, 3)
    assert r["jaxserve_rounds_output_tokens_per_s"] == [50.0, 60.0, 300.0]
    assert r["vllm_rounds_output_tokens_per_s"] == [100.0, 50.0, 200.0]
    assert r["ratio_vs_vllm"] == pytest.approx(1.2)  # median of 0.5, 1.2, 1.5
    assert r["vllm_agreement"]["first_mismatch"] == [1] and "token_ids" not in r["vllm"]
    r["workload"] = "x"
    assert "1/2 requests" in vllm_lines(r)[1] and "1.20x" in summary_table([r])


_FAKE_VLLM = '''
from types import SimpleNamespace as NS
__version__ = "0.0.fake"
class SamplingParams:
    def __init__(self, **kw):
        self.__dict__.update(kw)
class LLM:
    def __init__(self, **kw):
        assert kw["enable_prefix_caching"] is False
    def generate(self, prompts, params, use_tqdm=True):
        return [NS(outputs=[NS(token_ids=[p["prompt_token_ids"][-1] + i for i in range(s.max_tokens)])])
                for p, s in zip(prompts, params)]
'''


def test_vllm_worker_protocol_with_a_fake_vllm(tmp_path):
    from benchmarks.vllm_peer import OfflineWorker
    from benchmarks.workloads import Workload

    (tmp_path / "vllm.py").write_text(_FAKE_VLLM)
    ws = [Workload("a", [[5, 6], [7]], [3, 1]), Workload("b", [[9]], [2])]
    worker = OfflineWorker(sys.executable, {"model": "m", "enable_prefix_caching": False},
                           Workload("warm", [[1]], [1]), ws, log=open(os.devnull, "w"))
    worker.env["PYTHONPATH"] = str(tmp_path)  # the fake in place of vLLM
    with worker:
        info = worker.start(timeout=60)
        assert info["vllm_version"] == "0.0.fake" and info["peak_rss_bytes"] > 0
        assert info["env"]["VLLM_TARGET_DEVICE"] == "cpu"
        b = worker.run(1, 0)
        a = worker.run(0, 1)
    assert worker.proc.returncode == 0
    assert b["workload"] == "b" and b["token_ids"] == [[9, 10]]
    assert a["round"] == 1 and a["token_ids"] == [[6, 7, 8], [7]] and a["output_tokens_per_s"] > 0


class _LaunchedFake(_FakeOpenAI):
    def do_GET(self):
        if self.path == "/health":
            self._send_json(200, {})
        else:
            super().do_GET()

    def _answer(self, body: dict) -> None:
        if body.get("stream"):
            super()._answer(body)
        else:
            self._send_json(200, {"choices": [{"text": "x"}]})  # the readiness probe


@pytest.fixture()
def fake_launches(monkeypatch):
    """servers.spec_for launching stand-ins: an HTTP fake (a thread in this process) answers,
    while a real child process sleeps, so that start, peak_rss and stop run for real."""
    from benchmarks import servers

    started, calls = [], []

    def fake_spec(name, args, model, max_len, cache=None, flag=None):
        srv = ThreadingHTTPServer(("127.0.0.1", 0), _LaunchedFake)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        started.append(srv)
        calls.append((name, cache, flag))
        return servers.ServerSpec(name, [sys.executable, "-c", "import time; time.sleep(60)"],
                                  dict(os.environ), srv.server_address[1])

    monkeypatch.setattr(servers, "spec_for", fake_spec)
    monkeypatch.setattr(servers, "jaxserve_cache_flag", lambda: "--compilation-cache-dir")
    yield calls
    for srv in started:
        srv.shutdown()
        srv.server_close()


def test_launched_comparison_against_fake_servers(tmp_path, fake_launches):
    from benchmarks import serving

    out = tmp_path / "both.json"
    rc = serving.main(["--compare-vllm", "--model-path", str(tmp_path), "--workload", "8/4",
                       "--num-prompts", "3", "--request-rate", "inf", "--save-result", str(out),
                       "--server-log-dir", str(tmp_path / "logs")])
    assert rc == 0
    data = json.loads(out.read_text())
    assert list(data["servers"]) == ["jaxserve", "vllm"]
    for s in data["servers"].values():
        assert s["completed"] == 3 and s["total_output_tokens"] == 12
        assert s["startup"]["first_completion_s"] >= s["startup"]["listening_s"] > 0
        assert s["memory"]["peak_rss_bytes"] > 0 and s["p99_ttft_ms"] >= s["median_ttft_ms"]


def test_server_specs_share_the_limits():
    from benchmarks import serving, servers

    args = serving.parse_args(["--compare-vllm", "--vllm-python", sys.executable,
                               "--max-num-seqs", "7", "--vllm-args=--enforce-eager"])
    j = servers.jaxserve_spec(args, "M", 144, "/c", "--compilation-cache-dir")
    v = servers.vllm_spec(args, "M", 144, cache_root="/v")
    for spec in (j, v):
        argv = " ".join(spec.argv)
        assert "--model M" in argv and "--max-num-seqs 7" in argv and "--max-model-len 144" in argv
        assert "--no-enable-prefix-caching" in argv and "--dtype float32" in argv
    assert j.argv[-2:] == ["--compilation-cache-dir", "/c"] and "--block-size 32" in " ".join(v.argv)
    assert v.argv[-1] == "--enforce-eager" and v.cwd != servers.ROOT
    assert v.env["VLLM_TARGET_DEVICE"] == "cpu" and v.env["VLLM_CACHE_ROOT"] == "/v"
    assert servers.find_cache_flag("  --compilation-cache-dir DIR  persistent") == (
        "--compilation-cache-dir")
    assert servers.find_cache_flag("  --no-enable-prefix-caching") is None


def test_startup_cold_then_warm_on_the_same_cache(tmp_path, fake_launches):
    from benchmarks import startup

    out = tmp_path / "startup.json"
    assert startup.main(["--model-path", str(tmp_path), "--json", str(out),
                         "--server-log-dir", str(tmp_path / "logs")]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [(r["server"], r["phase"]) for r in rows] == [
        ("jaxserve", "cold"), ("jaxserve", "warm"), ("vllm", "cold"), ("vllm", "warm")]
    assert all(r["first_completion_s"] > 0 and r["peak_rss_bytes"] > 0 for r in rows)
    (_, c0, f0), (_, c1, _), (_, v0, _), (_, v1, _) = fake_launches
    assert c0 == c1 and v0 == v1 and c0 != v0 and f0 == "--compilation-cache-dir"
    assert not os.path.exists(c0)  # the temporary caches are removed afterwards


def test_quantization_benchmark_smoke(tiny_model_dir, tmp_path):
    out = tmp_path / "quant.json"
    _run("quantization.py", "--model", tiny_model_dir("llama-gqa"), "--variants", "float32",
         "int8", "int8-emb", "kv-int8", "--num-requests", "2", "--input-len", "8",
         "--output-len", "4", "--rounds", "1", "--max-num-seqs", "2", "--json", str(out),
         timeout=400)
    rows = json.loads(out.read_text())["results"]
    assert (rows["int8-emb"]["weight_bytes"] < rows["int8"]["weight_bytes"]
            < rows["float32"]["weight_bytes"] == rows["kv-int8"]["weight_bytes"])
    assert rows["kv-int8"]["kv_cache_dtype"] == "int8"
    assert rows["float32"]["kv_cache_dtype"] == "auto"
    assert rows["float32"]["same_tokens_as_float32"] == 2
    assert all(r["output_tokens_per_s"] > 0 for r in rows.values())
