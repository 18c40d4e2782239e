"""Start-up time of each server: seconds from process start until it listens (/health 200) and
until it has served its first completion, cold and warm, plus its peak RSS.

Cold starts with empty compilation caches: for vLLM a fresh VLLM_CACHE_ROOT (its torch.compile,
inductor and triton caches live under it); for jaxserve a fresh folder for serve.py's persistent
compilation cache flag, when this checkout's serve.py has one (found in `serve.py --help`;
without it both jaxserve starts are plain starts and the report says so). Warm is a second start
on the same cache. The OS page cache (model file, Python modules) is warm for every start but
the very first: we cannot drop it without root. Peak RSS is VmHWM of the server process plus
its live children (vLLM's engine core is a child), read after the first completion.

    python benchmarks/startup.py                                   # both servers, defaults
    python benchmarks/startup.py --servers vllm --vllm-python /path/to/vllm_venv/bin/python \\
        --max-model-len 1536 --json startup.json

Starts run one at a time (a server is stopped before the next starts); each takes minutes on a
small CPU machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import servers  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--servers", nargs="+", choices=["jaxserve", "vllm"],
                   default=["jaxserve", "vllm"])
    p.add_argument("--phases", nargs="+", choices=["cold", "warm"], default=["cold", "warm"])
    p.add_argument("--keep-caches", action="store_true", help="do not delete the cache folders")
    p.add_argument("--json", help="write the results here")
    servers.add_server_args(p)
    args = p.parse_args(argv)
    args.max_model_len = args.max_model_len or 1536  # the "mixed" workload's length
    return args


def measure(name: str, args, model: str, cache: str | None, flag: str | None, tag: str) -> dict:
    spec = servers.spec_for(name, args, model, args.max_model_len, cache, flag)
    print(f"starting {name} ({tag}): {' '.join(spec.argv)}", file=sys.stderr)
    with servers.Server(spec, args.server_log_dir, f"-{tag}") as server:
        ready = server.wait_ready(args.server_timeout)
        mem = server.peak_rss()
        log = server.log_path
    print(f"  {name} {tag}: listening {ready['listening_s']:.1f} s, first completion "
          f"{ready['first_completion_s']:.1f} s, peak RSS {mem['total_peak_rss_bytes'] / 2**30:.2f}"
          f" GiB", file=sys.stderr)
    with open(log, errors="replace") as fh:
        # vLLM 0.32 on CPU saves its AOT torch.compile artefact but fails to load it on the next
        # start ("'function' object has no attribute 'finalize_loading'") and compiles again:
        # its warm start is then only as warm as the inductor cache; say so in the figures
        reloaded = "Compiling model again due to a load failure" not in fh.read()
    return {"server": name, "phase": tag, **ready, **mem, "compile_cache_loaded": reloaded,
            "log": log, "command": spec.argv}


def main(argv=None) -> int:
    args = parse_args(argv)
    model = servers.resolve_model_path(args.model_path)
    flag = servers.jaxserve_cache_flag() if "jaxserve" in args.servers else None
    rows, caches = [], []
    try:
        for name in args.servers:
            cache = tempfile.mkdtemp(prefix=f"startup-{name}-cache-")
            caches.append(cache)
            use_cache = cache if (name == "vllm" or flag) else None
            for phase in args.phases:
                rows.append(measure(name, args, model, use_cache, flag, phase))
    finally:
        if not args.keep_caches:
            for c in caches:
                shutil.rmtree(c, ignore_errors=True)
    jax_cache = (f"{flag} (fresh folder, then the same)" if flag else
                 "none: serve.py has no compilation cache flag, both starts are plain")
    print(f"\n{'server':<10}{'phase':<7}{'listening s':>13}{'first completion s':>20}"
          f"{'peak RSS GiB':>14}{'children':>10}")
    for r in rows:
        print(f"{r['server']:<10}{r['phase']:<7}{r['listening_s']:>13.1f}"
              f"{r['first_completion_s']:>20.1f}{r['total_peak_rss_bytes'] / 2**30:>14.2f}"
              f"{r['num_children']:>10}")
    print(f"jaxserve compilation cache: {jax_cache}; vLLM: VLLM_CACHE_ROOT (fresh, then the same)")
    failed = [f"{r['server']} {r['phase']}" for r in rows if not r["compile_cache_loaded"]]
    if failed:
        print(f"compile cache failed to load (recompiled) in: {', '.join(failed)}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"benchmark": "startup", "date": datetime.date.today().isoformat(),
                       "model": model, "max_model_len": args.max_model_len,
                       "max_num_seqs": args.max_num_seqs,
                       "max_num_batched_tokens": args.max_num_batched_tokens,
                       "cpu_count": os.cpu_count(), "jaxserve_cache": jax_cache,
                       "results": rows}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
