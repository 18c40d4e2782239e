"""Offline throughput of jaxserve, in-process, against the roofline floor and optionally against
Hugging Face transformers `generate` and vLLM's CPU backend on the same model and prompts.

Every request is submitted at t=0 with a fixed output length (ignore_eos), as in `vllm bench
throughput`. One engine serves every workload of the run (its max_model_len covers the longest),
so the run also checks that nothing compiles after warm-up.

    python benchmarks/throughput.py --model-config llama3-8b                 # GPU, random weights
    python benchmarks/throughput.py --model default --workload 128/32 --num-prompts 8 \\
        --compare-transformers                                               # SmolLM2 on CPU
    python benchmarks/throughput.py --smoke --compare-transformers           # CI, seconds
    python benchmarks/throughput.py --model default --workload mixed --num-prompts 48 \\
        --max-num-seqs 32 --max-num-batched-tokens 512 --max-model-len 1536 \\
        --compare-vllm --rounds 3                                            # vs vLLM on CPU

--scheduling both runs each workload with async scheduling (the default: step N+1 prepared and
dispatched while step N runs) and then without, on the same engine, and reports the ratio.

--compare-vllm runs vLLM's `LLM.generate` (its own venv, --vllm-python) on the same HF folder,
the same token-id prompts, greedy with the same fixed lengths and the same limits (max_num_seqs,
max_num_batched_tokens, max_model_len, block size nearest --page-size, prefix caching off on both
sides, the same dtype), timing generate only, after a warm-up. With --rounds N both engines stay
up and alternate N times; the ratio is the median of per-round ratios. Greedy agreement is over
the full output length (benchmarks/vllm_peer.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shlex
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import roofline  # noqa: E402
from benchmarks.bench_engine import (EngineSettings, build_engine_from_model,  # noqa: E402
                                     build_engine_from_path, run_offline)
from benchmarks.model_shapes import (RandomModel, builtin_config, builtin_names,  # noqa: E402
                                     num_params, random_model, torch_model_from_config)
from benchmarks.workloads import GRID, Workload, make_workload, random_prompts  # noqa: E402

from benchmarks import vllm_peer  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="HF folder or .gguf; 'default' = the embedded SmolLM2")
    src.add_argument("--model-config", choices=builtin_names(),
                     help="random weights at a built-in shape, made on the device")
    p.add_argument("--workload", nargs="+", default=None,
                   help=f"IN/OUT cases, 'sharegpt' and/or 'mixed' (default: {' '.join(GRID)} "
                   "sharegpt)")
    p.add_argument("--num-prompts", type=int, default=128, help="requests per workload")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, f32 on CPU), float32, "
                   "bfloat16")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--num-pages", type=int, default=None)
    p.add_argument("--max-model-len", type=int, default=None,
                   help="default: the longest prompt+output, rounded up to a page")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                   default=None, help="default: on, off with --compare-vllm (on both sides)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--attention-backend", default=None)
    p.add_argument("--linear-backend", default=None, choices=("auto", "native", "xla"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scheduling", choices=["async", "sync", "both"], default="async",
                   help="async: prepare step N+1 while step N runs (default); sync: one step at "
                   "a time; both: each workload both ways, side by side")
    p.add_argument("--speculative-config", default=None,
                   help="JSON, as vLLM's (e.g. '{\"method\": \"ngram\", "
                   "\"num_speculative_tokens\": 3, \"prompt_lookup_max\": 4}'); with "
                   "--compare-vllm vLLM gets the same")
    p.add_argument("--rounds", type=int, default=1,
                   help="with --scheduling both or --compare-vllm: alternate the runs this many "
                   "times and report the median ratio (a shared machine drifts between runs)")
    p.add_argument("--compare-transformers", action="store_true",
                   help="also run transformers generate on the same model and prompts")
    p.add_argument("--hf-batch-size", type=int, default=None,
                   help="transformers batch size (default: --max-num-seqs)")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="torch intra-op threads for transformers (default: torch's choice; 1 "
                        "avoids OpenMP's collapse on a CPU shared with other work)")
    p.add_argument("--compare-vllm", action="store_true",
                   help="also run vLLM's LLM.generate (CPU build, its own venv) on the same model "
                   "folder and prompts")
    p.add_argument("--vllm-python", default=vllm_peer.default_vllm_python(),
                   help="python of vLLM's venv (default: $VLLM_PYTHON or ../vllm_venv)")
    p.add_argument("--vllm-kv-cache-gib", type=int, default=2,
                   help="KV cache GiB of both engines side by side (vLLM: VLLM_CPU_KVCACHE_SPACE)")
    p.add_argument("--vllm-block-size", type=int, default=None,
                   help="default: --page-size rounded up to vLLM CPU's multiple of 32")
    p.add_argument("--vllm-arg", action="append", default=[], metavar="KEY=JSON",
                   help="extra LLM(...) keyword, e.g. enforce_eager=true (repeatable)")
    p.add_argument("--device", choices=sorted(roofline.ANCHORS),
                   help="roofline rates from a published anchor (default: known GPU's anchor, "
                        "else measured here)")
    p.add_argument("--bandwidth-gbs", type=float)
    p.add_argument("--tflops", type=float)
    p.add_argument("--compilation-cache", help="persistent XLA compilation cache folder "
                   "(default: the engine's, $XDG_CACHE_HOME/jaxserve/xla)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny random model, every workload scaled down 32x, 4 prompts each")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    if args.smoke:
        args.model, args.model_config = None, "tiny"
        args.num_prompts = min(args.num_prompts, 4)
        # one token bucket and two sequence buckets: warm-up compiles 5 step variants
        args.max_num_seqs, args.max_num_batched_tokens = 2, 16
        args.page_size, args.num_pages = 8, 128
    if not args.model and not args.model_config:
        p.error("give --model PATH or --model-config NAME (or --smoke)")
    if args.compare_vllm:
        if not args.model or args.model.endswith(".gguf"):
            p.error("--compare-vllm needs --model with a Hugging Face folder (or 'default')")
        vllm_peer.check_vllm_python(args.vllm_python)
        try:
            args.vllm_args = {k: json.loads(v) for k, _, v in
                              (a.partition("=") for a in args.vllm_arg)}
        except ValueError as e:
            p.error(f"--vllm-arg: expected KEY=JSON ({e})")
    if args.enable_prefix_caching is None:
        args.enable_prefix_caching = not args.compare_vllm
    args.workload = args.workload or list(GRID) + ["sharegpt"]
    return args


def resolve_dtype(name: str) -> str:
    import jax
    if name != "auto":
        return name
    return "float32" if jax.devices()[0].platform == "cpu" else "bfloat16"


def engine_settings(args) -> EngineSettings:
    return EngineSettings(
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        page_size=args.page_size, num_pages=args.num_pages,
        # side by side, both engines get the same KV cache memory (vLLM's VLLM_CPU_KVCACHE_SPACE)
        kv_cache_memory_bytes=args.vllm_kv_cache_gib * 2**30 if args.compare_vllm else None,
        gpu_memory_utilization=args.gpu_memory_utilization,
        attention_backend=args.attention_backend, linear_backend=args.linear_backend,
        seed=args.seed,
        enable_prefix_caching=args.enable_prefix_caching,
        compilation_cache_dir=args.compilation_cache,
        speculative=json.loads(args.speculative_config) if args.speculative_config else None)


def build(args, max_model_len: int):
    """(engine, model config, transformers model or None) for the chosen model source."""
    settings = engine_settings(args)
    dtype = resolve_dtype(args.dtype)
    hf_model = None
    if args.model_config:
        cfg = builtin_config(args.model_config, dtype)
        if args.compare_transformers:
            if num_params(cfg) > 2e9:
                raise SystemExit(f"--compare-transformers builds {args.model_config} in "
                                 "transformers first; use it with small configs or --model")
            # the same random weights on both sides: made by transformers, converted by our
            # loader's name mapping
            hf_model, params = torch_model_from_config(cfg, args.seed)
            from checkpoints.make_tiny_model import train_tokenizer
            model = RandomModel(cfg, params, train_tokenizer(), f"random:{args.model_config}")
        else:
            model = random_model(cfg, args.seed)
        engine = build_engine_from_model(model, settings, max_model_len)
    else:
        path = args.model
        if path == "default":
            from checkpoints.default_model import ensure_default_model
            path = ensure_default_model()
        args.model = path
        engine = build_engine_from_path(path, settings, dtype, max_model_len)
        cfg = engine.model_config
        if args.compare_transformers:
            from benchmarks.hf_baseline import load_hf_model
            hf_model = load_hf_model(path, cfg.dtype)
    return engine, cfg, hf_model


def roofline_figures(cfg, result: dict, workload, max_num_seqs: int, rates) -> dict:
    """Floors for the workload and for the decode steps actually run, and measured/floor."""
    floor = roofline.workload_floor(cfg, workload.input_lens, workload.output_lens,
                                    max_num_seqs, rates)
    dec = [r for r in result["records"] if r.is_decode]
    dec_floor = sum(roofline.decode_step_floor(cfg, r.num_seqs, r.kv_lens, rates)["step_s"]
                    for r in dec)
    dec_measured = sum(r.execute_s for r in dec)
    return {
        "workload_floor_s": floor["seconds"], "workload_bound": floor["bound"],
        "floor_output_tokens_per_s": floor["output_tokens_per_s"],
        "fraction_of_roofline": floor["seconds"] / result["elapsed_s"],
        "decode_fraction_of_roofline": dec_floor / dec_measured if dec else None,
        "mean_decode_batch": sum(r.num_seqs for r in dec) / len(dec) if dec else None,
    }


def compare_sync(engine, workload, async_result: dict, rounds: int = 1) -> dict:
    """The same workload one step at a time, alternating with async runs `rounds` times;
    the figures of the first sync run, every round's throughput and the median ratio."""
    import statistics

    async_tps, sync_tps, same = [async_result["output_tokens_per_s"]], [], 1.0
    for k in range(rounds):
        if k:
            async_tps.append(run_offline(engine, workload, f"{workload.name}-async{k}")
                             ["output_tokens_per_s"])
        engine.async_scheduling = False
        try:
            sync = run_offline(engine, workload, f"{workload.name}-sync{k}")
        finally:
            engine.async_scheduling = True
        sync_tps.append(sync["output_tokens_per_s"])
        if not k:
            first_sync = sync
            pairs = zip(async_result["token_ids"], sync["token_ids"])
            same = sum(a == b for a, b in pairs) / max(1, len(sync["token_ids"]))
    keep = ("elapsed_s", "output_tokens_per_s", "mean_step_ms", "mean_host_ms_per_step", "steps",
            "compiles_during_run")
    return {"sync_scheduling": {k: first_sync[k] for k in keep},
            "async_rounds_output_tokens_per_s": async_tps,
            "sync_rounds_output_tokens_per_s": sync_tps,
            "async_speedup": statistics.median(a / b for a, b in zip(async_tps, sync_tps)),
            # batches differ by a step here and there, so padding may flip a late near-tie
            "async_sync_identical": same}


def print_case(name: str, r: dict, hf: dict | None) -> None:
    mem = r["peak_device_memory_bytes"]
    mem_s = f"{mem / 2**30:.2f} GiB" if mem is not None else "n/a (CPU)"
    dec = r["decode_fraction_of_roofline"]
    print(f"\n== {name}: {r['num_prompts']} requests, {r['input_tokens']} in / "
          f"{r['output_tokens']} out tokens")
    print(f"  jaxserve      {r['requests_per_s']:9.2f} req/s {r['output_tokens_per_s']:10.1f} "
          f"out tok/s {r['total_tokens_per_s']:10.1f} total tok/s  ({r['elapsed_s']:.2f} s)")
    frac = 100 * r["fraction_of_roofline"]
    print(f"  roofline      floor {r['workload_floor_s'] * 1e3:.1f} ms ({r['workload_bound']}-"
          f"bound, {r['floor_output_tokens_per_s']:.0f} out tok/s): {frac:.1f}% of roofline; "
          f"decode steps {'n/a' if dec is None else f'{100 * dec:.1f}%'}")
    print(f"  steps {r['steps']} ({r['decode_steps']} decode), mean {r['mean_step_ms']:.2f} ms, "
          f"host {r['mean_host_ms_per_step']:.2f} ms/step; compiles after warm-up "
          f"{r['compiles_since_warmup']}; peak device memory {mem_s}")
    if r.get("spec_draft_tokens") is not None:
        drafts, accepted = r["spec_draft_tokens"], r["spec_accepted_tokens"]
        rate = f"{accepted / drafts:.2f}" if drafts else "n/a"
        print(f"  speculative   {drafts} draft tokens, {accepted} accepted (acceptance {rate})")
    if "sync_scheduling" in r:
        sy = r["sync_scheduling"]
        print(f"  sync sched.   {sy['output_tokens_per_s']:10.1f} out tok/s, mean step "
              f"{sy['mean_step_ms']:.2f} ms, host {sy['mean_host_ms_per_step']:.2f} ms/step: "
              f"async is {r['async_speedup']:.2f}x (median of "
              f"{len(r['sync_rounds_output_tokens_per_s'])}); identical tokens in "
              f"{100 * r['async_sync_identical']:.0f}% of requests")
    if hf:
        print(f"  transformers  {hf['requests_per_s']:9.2f} req/s {hf['output_tokens_per_s']:10.1f}"
              f" out tok/s {hf['total_tokens_per_s']:10.1f} total tok/s  ({hf['elapsed_s']:.2f} s,"
              f" batch {hf['batch_size']})")
        print(f"  ratio         {r['speedup_vs_transformers']:.2f}x output tokens/s; greedy "
              f"agreement {100 * r['greedy_agreement']:.0f}% of requests (first 8 tokens)")
    if "vllm" in r:
        print("\n".join(vllm_peer.vllm_lines(r)))


def start_vllm(args, cfg, max_model_len: int, warm, workloads):
    """vLLM's offline worker with the same limits as our engine, built and warmed up."""
    engine = {"model": args.model, "dtype": cfg.dtype, "max_model_len": max_model_len,
              "max_num_seqs": args.max_num_seqs,
              "max_num_batched_tokens": args.max_num_batched_tokens,
              "block_size": args.vllm_block_size or vllm_peer.vllm_block_size(args.page_size),
              "enable_prefix_caching": args.enable_prefix_caching, "seed": args.seed,
              "disable_log_stats": True, **args.vllm_args}
    if args.speculative_config:  # the same n-gram settings on both sides
        engine["speculative_config"] = json.loads(args.speculative_config)
    worker = vllm_peer.OfflineWorker(args.vllm_python, engine, warm, workloads,
                                     args.vllm_kv_cache_gib)
    print(f"starting vLLM ({args.vllm_python}) ...", file=sys.stderr)
    info = worker.start()
    print(f"vLLM {info['vllm_version']} up in {info['startup_s']:.1f} s (+ warm-up "
          f"{info['warmup_s']:.1f} s)", file=sys.stderr)
    return worker, info


def main(argv=None) -> int:
    args = parse_args(argv)
    import jax
    scale = 1 / 32 if args.smoke else 1.0
    workloads = [make_workload(c, args.num_prompts, args.seed + 1 + i, scale=scale)
                 for i, c in enumerate(args.workload)]
    # measured before the engine exists: its own compiles must not count against the guard
    rates = roofline.resolve_rates(args.device, args.bandwidth_gbs, args.tflops)
    max_model_len = -(-max(w.max_total_len for w in workloads) // args.page_size) * args.page_size
    if args.max_model_len:
        if args.max_model_len < max(w.max_total_len for w in workloads):
            raise SystemExit(f"--max-model-len {args.max_model_len} is shorter than the longest "
                             f"request ({max(w.max_total_len for w in workloads)} tokens)")
        max_model_len = args.max_model_len
    t0 = time.perf_counter()
    engine, cfg, hf_model = build(args, max_model_len)
    build_s = time.perf_counter() - t0
    if any(max(map(max, w.prompts)) >= cfg.vocab_size for w in workloads):
        raise SystemExit(f"prompt token ids exceed the model's vocabulary ({cfg.vocab_size})")
    # warm the host paths (first scheduler/detokenizer calls) on other prompts: prefix caching
    # must not turn the timed run into cache hits
    first = workloads[0].head(2)
    warm = Workload("warm", random_prompts(first.input_lens, seed=10_000),
                    [min(4, n) for n in first.output_lens])
    run_offline(engine, warm, "warm")
    # after our build: a vLLM start-up competing for the CPU would blur both build times
    worker, vllm_info = (start_vllm(args, cfg, max_model_len, warm, workloads)
                         if args.compare_vllm else (None, None))

    from benchmarks.hf_baseline import greedy_agreement, run_hf
    if hf_model is not None and args.torch_threads:
        import torch
        torch.set_num_threads(args.torch_threads)
    results = []
    engine.async_scheduling = args.scheduling != "sync"
    try:
        for i, w in enumerate(workloads):
            r = run_offline(engine, w, f"{w.name}")
            if args.scheduling == "both":
                r.update(compare_sync(engine, w, r, args.rounds))
            if worker is not None:
                r.update(vllm_peer.compare_vllm(
                    lambda k: run_offline(engine, w, f"{w.name}-vllm{k}"), worker, i, r, args.rounds))
            r.update(roofline_figures(cfg, r, w, args.max_num_seqs, rates))
            r.update(workload=w.name, num_prompts=len(w.prompts), input_tokens=sum(w.input_lens),
                     output_tokens=sum(w.output_lens))
            hf = None
            if hf_model is not None:
                pad = engine.tokenizer.pad_token_id or 0
                hf = run_hf(hf_model, w, args.hf_batch_size or args.max_num_seqs, pad)
                r["speedup_vs_transformers"] = r["output_tokens_per_s"] / hf["output_tokens_per_s"]
                r["greedy_agreement"] = greedy_agreement(r["token_ids"], hf.pop("token_ids"))
                r["transformers"] = hf
            del r["records"], r["token_ids"]
            print_case(w.name, r, hf)
            results.append(r)
    finally:
        if worker is not None:
            worker.close()  # also when a run fails: never leave vLLM's processes behind
    if worker is not None:
        print("\n" + vllm_peer.summary_table(results))

    bad = [r["workload"] for r in results if r["compiles_during_run"]
           or r.get("sync_scheduling", {}).get("compiles_during_run")]
    if engine.runner.compiles_since_warmup() and not bad:
        bad = ["the untimed warm-up run"]
    dev = jax.devices()[0]
    report = {
        "benchmark": "throughput", "date": datetime.date.today().isoformat(),
        "command": " ".join(["python", "benchmarks/throughput.py"] + [
            shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])]),
        "device": f"{dev.platform}: {dev.device_kind}", "num_devices": jax.device_count(),
        "host": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "cpus_available": len(os.sched_getaffinity(0)),
        "jax_version": jax.__version__,
        "model": args.model or f"random weights, {args.model_config} shape",
        "dtype": cfg.dtype, "num_params": num_params(cfg),
        "engine": dataclasses.asdict(engine_settings(args)),
        "max_model_len": max_model_len, "num_pages": engine.runner.num_pages,
        "build_and_warmup_s": build_s, "roofline_device": dataclasses.asdict(rates),
        "results": results,
    }
    if hf_model is not None:
        import torch
        report["torch_threads"] = torch.get_num_threads()
        report["transformers_version"] = __import__("transformers").__version__
        report["torch_version"] = torch.__version__
    if vllm_info is not None:
        report["vllm"] = {**vllm_info, "python": args.vllm_python,
                          "kv_cache_gib": args.vllm_kv_cache_gib}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)
    print(f"\nbuild + warm-up {build_s:.1f} s; roofline rates {rates.bandwidth_gbs:.0f} GB/s, "
          f"{rates.tflops:.3g} TFLOP/s ({rates.source})")
    if bad:
        print(f"ERROR: compiled after warm-up in {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
