"""Online load generator for any OpenAI-compatible server (/v1/completions, stream=True).

Requests arrive as a Poisson process at --request-rate (gamma intervals with --burstiness, as in
`vllm bench serve`; inf sends them all at once), optionally capped at --max-concurrency in
flight; the run sends --num-prompts requests or stops dispatching after --max-seconds
(requests already sent finish, each bounded by --request-timeout). Prompts are token ids with
fixed output lengths and ignore_eos (benchmarks/workloads.py), so runs are reproducible.

Figures use `vllm bench serve`'s names and definitions, so its JSON and dashboards compare
directly: TTFT (first chunk with choices), TPOT ((E2EL - TTFT) / (output tokens - 1)), ITL
(gap between successive chunks), E2EL, at mean/median/std and --metric-percentiles;
request/output/total-token throughput; goodput (requests meeting every --goodput SLO, per s).

    python benchmarks/serving.py --base-url http://127.0.0.1:8000 --dataset-name random \\
        --random-input-len 1024 --random-output-len 128 --num-prompts 200 --request-rate 4 \\
        --goodput ttft:200 tpot:50 --save-result out.json
    python benchmarks/serving.py --compare-vllm --request-rate 1 --num-prompts 24 \\
        --workload 128/64 --save-result both.json             # launches both servers in turn

--launch jaxserve vllm (or --compare-vllm) starts each server itself (benchmarks/servers.py:
the same model folder, max_num_seqs, max_num_batched_tokens, max_model_len, dtype and page size
(vLLM: the nearest block size it accepts), prefix caching off), one at a time so they never
share the CPU, sends each one warm-up completion, then the same load (the same token-id prompts,
arrival times and output lengths), and prints the figures side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import json
import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import servers  # noqa: E402
from benchmarks.workloads import DEFAULT_ID_RANGE, make_workload  # noqa: E402

SLO_METRICS = ("ttft", "tpot", "e2el")


@dataclasses.dataclass
class RequestResult:
    prompt_len: int
    success: bool = False
    output_tokens: int = 0
    ttft: float = 0.0                     # seconds
    latency: float = 0.0                  # E2EL, seconds
    itl: list[float] = dataclasses.field(default_factory=list)
    generated_text: str = ""
    logprob_tokens: int = 0               # tokens the stream gave logprobs for (--logprobs)
    error: str = ""
    start: float = 0.0                    # perf_counter at send


async def send_request(client, url: str, payload: dict, headers: dict,
                       result: RequestResult) -> None:
    """POST one streaming completion and time its chunks (vLLM's rules: any chunk with
    non-empty `choices` is a token event, even if its text is empty; a usage chunk gives the
    exact output token count)."""
    result.start = start = time.perf_counter()
    last = start
    chunks = 0
    try:
        async with client.stream("POST", url, json=payload, headers=headers) as resp:
            if resp.status_code != 200:
                body = (await resp.aread()).decode(errors="replace")
                result.error = f"HTTP {resp.status_code}: {body[:500]}"
                return
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators, SSE comments, keep-alives
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                msg = json.loads(data)
                if "error" in msg:
                    result.error = json.dumps(msg["error"])[:500]
                    return
                now = time.perf_counter()
                if msg.get("choices"):
                    if chunks == 0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
                    chunks += 1
                    result.generated_text += msg["choices"][0].get("text") or ""
                    logprobs = msg["choices"][0].get("logprobs") or {}
                    result.logprob_tokens += len(logprobs.get("token_logprobs") or [])
                if msg.get("usage"):
                    result.output_tokens = int(msg["usage"].get("completion_tokens", 0))
        result.latency = time.perf_counter() - start
        result.output_tokens = result.output_tokens or chunks
        result.success = chunks > 0
        if not result.success:
            result.error = "the stream ended without any token"
    except Exception as e:  # a benchmark records failures and goes on
        result.error = f"{type(e).__name__}: {e}"


def arrival_intervals(n: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """Seconds to wait before each request: gamma(shape=burstiness, mean 1/rate); burstiness 1
    is a Poisson process, below 1 burstier, above more regular; rate inf sends at once."""
    if math.isinf(rate):
        return [0.0] * n
    rng = np.random.default_rng(seed)
    return rng.gamma(burstiness, 1.0 / (rate * burstiness), size=n).tolist()


async def run_load(args, workload, url: str, model: str | None) -> tuple[list, float, int]:
    """Dispatch every request on its arrival schedule; returns (results, duration, peak in
    flight)."""
    import httpx

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limit = args.max_concurrency or len(workload.prompts)
    gate = asyncio.Semaphore(limit)
    results = [RequestResult(prompt_len=len(p)) for p in workload.prompts]
    in_flight = peak = 0

    async def one(i: int, client) -> None:
        nonlocal in_flight, peak
        async with gate:
            in_flight += 1
            peak = max(peak, in_flight)
            payload = {"prompt": workload.prompts[i], "max_tokens": workload.output_lens[i],
                       "temperature": 0.0, "stream": True,
                       "stream_options": {"include_usage": True}}
            if model:
                payload["model"] = model
            if args.ignore_eos:
                payload["ignore_eos"] = True
            if args.logprobs is not None:
                payload["logprobs"] = args.logprobs
            await send_request(client, url, payload, headers, results[i])
            in_flight -= 1

    limits = httpx.Limits(max_connections=limit, max_keepalive_connections=limit)
    timeout = httpx.Timeout(args.request_timeout, connect=30.0)
    tasks = []
    async with httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=False) as client:
        start = time.perf_counter()
        for i, wait in enumerate(arrival_intervals(len(results), args.request_rate,
                                                   args.burstiness, args.seed)):
            if wait:
                await asyncio.sleep(wait)
            if args.max_seconds and time.perf_counter() - start > args.max_seconds:
                break
            tasks.append(asyncio.create_task(one(i, client)))
        await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    return results[:len(tasks)], duration, peak


def parse_goodput(items: list[str] | None) -> dict[str, float]:
    """['ttft:200', 'tpot:50'] -> {'ttft': 200.0, 'tpot': 50.0} (milliseconds)."""
    slos = {}
    for item in items or []:
        name, _, value = item.partition(":")
        if name not in SLO_METRICS or not value:
            raise ValueError(f"--goodput {item!r}: expected NAME:MS with NAME in "
                             f"{', '.join(SLO_METRICS)}")
        slos[name] = float(value)
    return slos


def calculate_metrics(results: list[RequestResult], duration: float,
                      percentiles: list[float], slos: dict[str, float]) -> dict:
    ok = [r for r in results if r.success]
    ttfts = [r.ttft for r in ok]
    e2els = [r.latency for r in ok]
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    itls = [x for r in ok for x in r.itl]
    good = 0
    for r in ok:
        tpot = (r.latency - r.ttft) / (r.output_tokens - 1) if r.output_tokens > 1 else 0.0
        ms = {"ttft": r.ttft * 1e3, "tpot": tpot * 1e3, "e2el": r.latency * 1e3}
        good += all(ms[k] <= v for k, v in slos.items())
    n_in = sum(r.prompt_len for r in ok)
    n_out = sum(r.output_tokens for r in ok)
    m = {
        "duration": duration, "completed": len(ok), "failed": len(results) - len(ok),
        "total_input_tokens": n_in, "total_output_tokens": n_out,
        # with --logprobs: the tokens that came with logprobs (a server ignoring them shows)
        "total_logprob_tokens": sum(r.logprob_tokens for r in ok),
        "request_throughput": len(ok) / duration,
        "request_goodput": good / duration if slos else None,
        "output_throughput": n_out / duration, "total_token_throughput": (n_in + n_out) / duration,
    }
    for name, values in (("ttft", ttfts), ("tpot", tpots), ("itl", itls), ("e2el", e2els)):
        arr = np.asarray(values or [0.0]) * 1e3
        m[f"mean_{name}_ms"] = float(arr.mean())
        m[f"median_{name}_ms"] = float(np.median(arr))
        m[f"std_{name}_ms"] = float(arr.std())
        for p in percentiles:
            m[f"p{p:g}_{name}_ms"] = float(np.percentile(arr, p))
    return m


def print_report(m: dict, percentiles: list[float], slos: dict) -> None:
    print("{s:{c}^50}".format(s=" Serving Benchmark Result ", c="="))
    rows = [("Successful requests:", m["completed"]), ("Failed requests:", m["failed"]),
            ("Benchmark duration (s):", f"{m['duration']:.2f}"),
            ("Total input tokens:", m["total_input_tokens"]),
            ("Total generated tokens:", m["total_output_tokens"]),
            ("Request throughput (req/s):", f"{m['request_throughput']:.2f}")]
    if m["total_logprob_tokens"]:
        rows.insert(5, ("Tokens with logprobs:", m["total_logprob_tokens"]))
    if slos:
        rows.append(("Request goodput (req/s):", f"{m['request_goodput']:.2f}"))
    rows += [("Output token throughput (tok/s):", f"{m['output_throughput']:.2f}"),
             ("Total token throughput (tok/s):", f"{m['total_token_throughput']:.2f}")]
    for label, value in rows:
        print(f"{label:<40}{value:>10}")
    for name, title in (("ttft", "Time to First Token"), ("tpot", "Time per Output Token "
                        "(excl. 1st token)"), ("itl", "Inter-token Latency"),
                        ("e2el", "End-to-end Latency")):
        print("{s:{c}^50}".format(s=f" {title} ", c="-"))
        print(f"{f'Mean {name.upper()} (ms):':<40}{m[f'mean_{name}_ms']:>10.2f}")
        print(f"{f'Median {name.upper()} (ms):':<40}{m[f'median_{name}_ms']:>10.2f}")
        for p in percentiles:
            print(f"{f'P{p:g} {name.upper()} (ms):':<40}{m[f'p{p:g}_{name}_ms']:>10.2f}")
    print("=" * 50)


def discover_model(base_url: str, api_key: str | None) -> str | None:
    """The first model id of GET /v1/models, or None when the server has no such route."""
    import httpx
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        r = httpx.get(f"{base_url}/v1/models", headers=headers, timeout=10.0, trust_env=False)
        return r.json()["data"][0]["id"] if r.status_code == 200 else None
    except (httpx.HTTPError, KeyError, IndexError, ValueError):
        return None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default=None, help="e.g. http://127.0.0.1:8000")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--endpoint", default="/v1/completions")
    p.add_argument("--model", default=None, help="model name to send (default: GET /v1/models)")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    p.add_argument("--dataset-name", choices=["random", "sharegpt"], default="random")
    p.add_argument("--random-input-len", type=int, default=1024)
    p.add_argument("--random-output-len", type=int, default=128)
    p.add_argument("--token-id-range", type=int, nargs=2, default=list(DEFAULT_ID_RANGE),
                   metavar=("LO", "HI"), help="prompt token ids are drawn from [LO, HI)")
    p.add_argument("--workload", default=None, help="IN/OUT, 'sharegpt' or 'mixed' "
                   "(benchmarks/workloads.py); instead of --dataset-name and --random-*-len")
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s")
    p.add_argument("--burstiness", type=float, default=1.0)
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--max-seconds", type=float, default=None,
                   help="stop dispatching new requests after this many seconds")
    p.add_argument("--request-timeout", type=float, default=600.0)
    p.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false")
    p.add_argument("--logprobs", type=int, default=None,
                   help="every request also asks for this many top logprobs per token")
    p.add_argument("--goodput", nargs="+", default=None, metavar="NAME:MS",
                   help="SLOs, e.g. ttft:200 tpot:50 (names: ttft, tpot, e2el)")
    p.add_argument("--metric-percentiles", default="50,90,99")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-result", "--json", dest="save_result", default=None,
                   help="write the metrics and per-request lists as JSON here")
    p.add_argument("--launch", nargs="+", choices=["jaxserve", "vllm"], default=None,
                   help="start these servers one after the other and load each the same way "
                   "(instead of --base-url)")
    p.add_argument("--compare-vllm", action="store_true", help="= --launch jaxserve vllm")
    servers.add_server_args(p)
    args = p.parse_args(argv)
    if args.burstiness <= 0:
        p.error("--burstiness must be positive")
    try:
        args.slos = parse_goodput(args.goodput)
    except ValueError as e:
        p.error(str(e))
    args.percentiles = [float(x) for x in args.metric_percentiles.split(",") if x]
    args.base_url = (args.base_url or f"http://{args.host}:{args.port}").rstrip("/")
    if args.compare_vllm:
        args.launch = ["jaxserve", "vllm"]
    return args


def launched_runs(args, workload) -> dict:
    """Start each server of --launch in turn, warm it, run the load, read its memory, stop it."""
    model = servers.resolve_model_path(args.model_path)
    page = args.page_size
    max_len = args.max_model_len or -(-workload.max_total_len // page) * page
    runs = {}
    for name in args.launch:
        spec = servers.spec_for(name, args, model, max_len)
        print(f"starting {name}: {' '.join(spec.argv)}", file=sys.stderr)
        with servers.Server(spec, args.server_log_dir) as server:
            ready = server.wait_ready(args.server_timeout)
            print(f"{name} served its first completion {ready['first_completion_s']:.1f} s "
                  f"after start (log {server.log_path})", file=sys.stderr)
            results, duration, peak = asyncio.run(run_load(
                args, workload, spec.base_url + args.endpoint, servers.SERVED_NAME))
            runs[name] = {"results": results, "duration": duration, "peak": peak,
                          "startup": ready, "memory": server.peak_rss(),
                          "command": spec.argv, "max_model_len": max_len}
    return runs


SIDE_BY_SIDE = (("completed", "Successful requests", "{:.0f}"),
                ("duration", "Duration (s)", "{:.2f}"),
                ("output_throughput", "Output tok/s", "{:.2f}"),
                ("request_throughput", "Requests/s", "{:.3f}"))


def print_side_by_side(named: dict[str, dict], percentiles: list[float]) -> None:
    """One column per server: throughput, then TTFT/TPOT/ITL/E2EL at median and percentiles."""
    names = list(named)
    rows = [(label, [fmt.format(named[n][key]) for n in names]) for key, label, fmt in SIDE_BY_SIDE]
    for metric in ("ttft", "tpot", "itl", "e2el"):
        for stat in ["median"] + [f"p{p:g}" for p in percentiles if p != 50]:
            rows.append((f"{metric.upper()} {stat.replace('median', 'p50')} (ms)",
                         [f"{named[n][f'{stat}_{metric}_ms']:.1f}" for n in names]))
    rows.append(("First completion after start (s)",
                 [f"{named[n]['startup']['first_completion_s']:.1f}" for n in names]))
    rows.append(("Peak RSS incl. children (GiB)",
                 [f"{named[n]['memory']['total_peak_rss_bytes'] / 2**30:.2f}" for n in names]))
    print("{s:{c}^{w}}".format(s=" Side by side ", c="=", w=36 + 14 * len(names)))
    print(f"{'':<36}" + "".join(f"{n:>14}" for n in names))
    for label, values in rows:
        print(f"{label:<36}" + "".join(f"{v:>14}" for v in values))


def main(argv=None) -> int:
    args = parse_args(argv)
    case = args.workload or ("sharegpt" if args.dataset_name == "sharegpt"
                             else f"{args.random_input_len}/{args.random_output_len}")
    workload = make_workload(case, args.num_prompts, args.seed, tuple(args.token_id_range))
    if args.launch:
        return main_launched(args, case, workload)
    model = args.model or discover_model(args.base_url, args.api_key)
    url = args.base_url + args.endpoint
    print(f"{len(workload.prompts)} requests ({case}) to {url}, model {model}, request rate "
          f"{args.request_rate}, max concurrency {args.max_concurrency}", file=sys.stderr)
    results, duration, peak = asyncio.run(run_load(args, workload, url, model))
    metrics = calculate_metrics(results, duration, args.percentiles, args.slos)
    print_report(metrics, args.percentiles, args.slos)
    errors = [r.error for r in results if not r.success]
    if errors:
        print(f"first error: {errors[0]}", file=sys.stderr)
    if args.save_result:
        report = {
            "date": datetime.datetime.now().strftime("%Y%m%d-%H%M%S"), "backend": "openai",
            "endpoint": url, "model_id": model, "dataset_name": args.dataset_name,
            "num_prompts": args.num_prompts, "request_rate": args.request_rate,
            "burstiness": args.burstiness, "max_concurrency": args.max_concurrency,
            "max_concurrent_requests": peak, "goodput_slos_ms": args.slos, **metrics,
            "input_lens": [r.prompt_len for r in results],
            "output_lens": [r.output_tokens for r in results],
            "ttfts": [r.ttft for r in results], "itls": [r.itl for r in results],
            "generated_texts": [r.generated_text for r in results],
            "errors": [r.error for r in results],
        }
        with open(args.save_result, "w") as fh:
            json.dump(report, fh, indent=2)
    return 0 if results and not errors else 1


def main_launched(args, case: str, workload) -> int:
    runs = launched_runs(args, workload)
    named, ok = {}, True
    for name, run in runs.items():
        m = calculate_metrics(run["results"], run["duration"], args.percentiles, args.slos)
        print(f"\n{name}:")
        print_report(m, args.percentiles, args.slos)
        errors = [r.error for r in run["results"] if not r.success]
        if errors:
            ok = False
            print(f"{name}: first error: {errors[0]}", file=sys.stderr)
        named[name] = {**m, "startup": run["startup"], "memory": run["memory"],
                       "max_concurrent_requests": run["peak"], "command": run["command"],
                       "max_model_len": run["max_model_len"],
                       "errors": [r.error for r in run["results"]]}
    print()
    print_side_by_side(named, args.percentiles)
    if args.save_result:
        report = {"date": datetime.datetime.now().strftime("%Y%m%d-%H%M%S"), "workload": case,
                  "num_prompts": len(workload.prompts), "input_tokens": sum(workload.input_lens),
                  "output_tokens": sum(workload.output_lens), "request_rate": args.request_rate,
                  "burstiness": args.burstiness, "max_concurrency": args.max_concurrency,
                  "goodput_slos_ms": args.slos, "command": " ".join(sys.argv),
                  "servers": named}
        with open(args.save_result, "w") as fh:
            json.dump(report, fh, indent=2)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
