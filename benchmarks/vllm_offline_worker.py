"""vLLM's offline `LLM.generate` on given token-id prompts, timed: the peer side of
`throughput.py --compare-vllm`. Runs in vLLM's own venv, never in jaxserve's (vLLM pins its own
torch and transformers), so it imports only the standard library, numpy and vllm.

    VLLM_TARGET_DEVICE=cpu VLLM_CPU_KVCACHE_SPACE=2 /path/to/vllm_venv/bin/python \\
        benchmarks/vllm_offline_worker.py IN.json OUT.json [--serve]

IN.json: {"engine": {LLM keyword arguments: model, dtype, max_model_len, max_num_seqs, ...},
"warmup": WORKLOAD, "workloads": [WORKLOAD, ...]} with WORKLOAD = {"name", "prompts" (token id
lists), "output_lens"}. Every request is greedy with exactly its output length (ignore_eos,
min_tokens), all submitted at once, as jaxserve's run_offline does.

OUT.json: {"vllm_version", "startup_s" (LLM construction: model load, torch.compile, KV cache),
"warmup_s", "peak_rss_bytes" (this process), "children_peak_rss_bytes" (its engine process and
any others it spawned, VmHWM summed: shared pages count twice, an upper bound), "env",
"runs": [{"workload", "index", "round", "elapsed_s" (generate only), "output_tokens_per_s",
..., "token_ids"}]}.

Without --serve every workload runs once and the worker exits. With --serve it builds the engine,
writes OUT.json, prints READY and then runs one workload per stdin line ({"run": INDEX,
"round": K}), rewriting OUT.json and printing DONE after each, until EOF or {"quit": true}: the
caller alternates its own runs with these on an engine that stays up. The marker lines start
with MARKER because vLLM logs to stdout too.
"""

import json
import os
import sys
import time

# Python puts this script's folder first on sys.path, and benchmarks/ holds modules whose names
# vLLM's dependencies probe for (transformers imports a package "kernels" if it finds one):
# drop it, here at import time, so the engine process vLLM spawns (which re-runs this module)
# sees a clean path too.
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != HERE]

MARKER = "@@vllm-peer"
ENV_KEYS = ("VLLM_TARGET_DEVICE", "VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND",
            "VLLM_CPU_NUM_OF_RESERVED_CPU", "VLLM_CACHE_ROOT", "OMP_NUM_THREADS")


def descendants(pid: int) -> list[int]:
    """Live descendant pids, from /proc (no psutil: the worker imports only vllm's needs)."""
    parent = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as fh:
                    # the command name may contain spaces; ppid is the 2nd field after ")"
                    parent[int(name)] = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    out, frontier = [], [pid]
    while frontier:
        kids = [p for p, pp in parent.items() if pp in frontier]
        out += kids
        frontier = kids
    return out


def vm_hwm(pid: int) -> int:
    """Peak resident set (VmHWM) of a live process in bytes, 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def memory() -> dict:
    # VmHWM, not getrusage: Linux carries ru_maxrss over fork + exec, so the worker would
    # report the larger jaxserve parent's peak as its own
    return {"peak_rss_bytes": vm_hwm(os.getpid()),
            "children_peak_rss_bytes": sum(vm_hwm(p) for p in descendants(os.getpid()))}


def generate(llm, workload: dict) -> tuple[float, list[list[int]]]:
    """(seconds of generate, output ids per request) for one workload."""
    from vllm import SamplingParams

    prompts = [{"prompt_token_ids": p} for p in workload["prompts"]]
    params = [SamplingParams(temperature=0.0, max_tokens=n, min_tokens=n, ignore_eos=True)
              for n in workload["output_lens"]]
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    ids = [list(o.outputs[0].token_ids) for o in outs]
    short = [i for i, (t, n) in enumerate(zip(ids, workload["output_lens"])) if len(t) != n]
    if short:
        raise RuntimeError(f"vLLM generated other lengths than asked in {len(short)} requests "
                           f"(first: {short[0]}); ignore_eos/min_tokens not honoured")
    return elapsed, ids


def run(llm, workloads: list, index: int, round_: int) -> dict:
    w = workloads[index]
    elapsed, ids = generate(llm, w)
    n_out, n_in = sum(w["output_lens"]), sum(len(p) for p in w["prompts"])
    return {"engine": "vllm", "workload": w["name"], "index": index, "round": round_,
            "elapsed_s": elapsed, "requests_per_s": len(ids) / elapsed,
            "output_tokens_per_s": n_out / elapsed, "total_tokens_per_s": (n_in + n_out) / elapsed,
            "token_ids": ids, **memory()}


def write(path: str, report: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(report, fh)
    os.replace(tmp, path)  # the caller never reads half a file


def say(event: str, **fields) -> None:
    print(f"{MARKER} {json.dumps({'event': event, **fields})}", flush=True)


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[2:] not in ([], ["--serve"]):
        print(__doc__, file=sys.stderr)
        return 2
    with open(argv[0]) as fh:
        spec = json.load(fh)
    out_path, serve = argv[1], argv[2:] == ["--serve"]
    t0 = time.perf_counter()
    import vllm
    from vllm import LLM

    llm = LLM(**spec["engine"])
    startup_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    generate(llm, spec["warmup"])  # first-call allocations, lazy compiles
    report = {"vllm_version": vllm.__version__, "startup_s": startup_s,
              "warmup_s": time.perf_counter() - t1, "engine": spec["engine"],
              "env": {k: os.environ.get(k) for k in ENV_KEYS}, **memory(), "runs": []}
    write(out_path, report)
    if not serve:
        for i in range(len(spec["workloads"])):
            report["runs"].append(run(llm, spec["workloads"], i, 0))
        report.update(memory())
        write(out_path, report)
        return 0
    say("ready")
    for line in sys.stdin:
        if not line.strip():
            continue
        cmd = json.loads(line)
        if cmd.get("quit"):
            break
        report["runs"].append(run(llm, spec["workloads"], int(cmd["run"]), int(cmd.get("round", 0))))
        report.update(memory())
        write(out_path, report)
        say("done", run=len(report["runs"]) - 1)
    return 0


if __name__ == "__main__":  # vLLM spawns its engine process, which re-imports this module
    sys.exit(main(sys.argv[1:]))
