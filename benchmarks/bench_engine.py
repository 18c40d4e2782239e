"""Engines for benchmarks (from a checkpoint, or random weights at a built-in shape), and one
timed offline run through LLMEngine.step with per-step figures.

`build_engine_from_model` does what jaxserve.llm.build_engine does after loading: the only
difference is that the model (config, params already on the device, tokenizer) is handed in,
so an 8B benchmark needs no checkpoint and no host copy of its weights.
"""

from __future__ import annotations

import dataclasses
import resource
import sys
import time

from jaxserve.config import CacheConfig, EngineConfig, SchedulerConfig
from jaxserve.engine.engine import LLMEngine
from jaxserve.engine.sampling_params import SamplingParams


@dataclasses.dataclass
class EngineSettings:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    page_size: int = 16
    num_pages: int | None = None
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    attention_backend: str | None = None
    seed: int = 0

    def engine_config(self, model: str, dtype: str | None, max_model_len: int) -> EngineConfig:
        return EngineConfig(
            model=model, dtype=dtype, seed=self.seed, attention_backend=self.attention_backend,
            cache=CacheConfig(page_size=self.page_size, num_pages=self.num_pages,
                              gpu_memory_utilization=self.gpu_memory_utilization,
                              enable_prefix_caching=self.enable_prefix_caching),
            scheduler=SchedulerConfig(max_num_seqs=self.max_num_seqs,
                                      max_num_batched_tokens=self.max_num_batched_tokens,
                                      max_model_len=max_model_len))


def _log(msg: str) -> None:
    print(msg, file=sys.stderr)


def build_engine_from_model(loaded, settings: EngineSettings, max_model_len: int) -> LLMEngine:
    """An engine over an already-built model (anything with config, params, tokenizer)."""
    from jaxserve.llm import build_engine

    config = settings.engine_config(loaded.source, loaded.config.dtype, max_model_len)
    return build_engine(config, loaded=loaded, log=_log)


def build_engine_from_path(path: str, settings: EngineSettings, dtype: str | None,
                           max_model_len: int) -> LLMEngine:
    from jaxserve.llm import build_engine
    return build_engine(settings.engine_config(path, dtype, max_model_len), log=_log)


@dataclasses.dataclass
class StepRecord:
    num_tokens: int            # real (unpadded) tokens in the step
    num_seqs: int
    kv_lens: list[int]         # context of each sequence after the step
    execute_s: float           # runner.execute: pack + device + copy back (blocking)
    pack_s: float              # runner.last_host_seconds: batch packing on the host
    step_s: float = 0.0        # LLMEngine.step: the above + scheduling + detokenizing

    @property
    def is_decode(self) -> bool:
        return self.num_tokens == self.num_seqs


class StepRecorder:
    """Wraps engine.runner.execute (an instance attribute, the runner's code is untouched) to
    record what each step computed and how long it took."""

    def __init__(self, engine: LLMEngine):
        self.runner = engine.runner
        self.records: list[StepRecord] = []
        inner = self.runner.execute

        def execute(seqs, sampling_inputs, **kw):
            start = time.perf_counter()
            out = inner(seqs, sampling_inputs, **kw)
            self.records.append(StepRecord(
                num_tokens=sum(len(s.token_ids) for s in seqs), num_seqs=len(seqs),
                kv_lens=[s.start_pos + len(s.token_ids) for s in seqs],
                execute_s=time.perf_counter() - start, pack_s=self.runner.last_host_seconds))
            return out

        self.runner.execute = execute


def peak_device_memory() -> int | None:
    """Peak bytes in use on the first device (None where the backend keeps no statistics:
    CPU). Cumulative over the process, so it includes warm-up."""
    import jax
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def host_peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_offline(engine: LLMEngine, workload, tag: str) -> dict:
    """Submit every request at t=0 (vLLM's offline throughput) and step until all finish.

    Returns the figures plus `records` (StepRecord per step) and `token_ids` per request."""
    from jaxserve.runner.compile_guard import compile_count

    recorder = getattr(engine, "_bench_recorder", None) or StepRecorder(engine)
    engine._bench_recorder = recorder
    recorder.records = []
    compiles_before = compile_count()
    start = time.perf_counter()
    ids = []
    for i, (prompt, n_out) in enumerate(zip(workload.prompts, workload.output_lens)):
        rid = f"{tag}-{i}"
        engine.add_request(rid, prompt, SamplingParams(max_tokens=n_out, temperature=0.0,
                                                       ignore_eos=True))
        ids.append(rid)
    finished = {}
    while engine.has_unfinished_requests():
        t0 = time.perf_counter()
        before = len(recorder.records)
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out.outputs[0].token_ids
        if len(recorder.records) > before:
            recorder.records[-1].step_s = time.perf_counter() - t0
    elapsed = time.perf_counter() - start
    token_ids = [finished[r] for r in ids]
    short = [i for i, (t, n) in enumerate(zip(token_ids, workload.output_lens)) if len(t) != n]
    if short:
        raise RuntimeError(f"{len(short)} requests did not generate their fixed output length "
                           f"(first: request {short[0]}); ignore_eos is not honoured")
    recs = recorder.records
    n_out, n_in = sum(workload.output_lens), sum(workload.input_lens)
    engine_host = [r.step_s - r.execute_s + r.pack_s for r in recs]
    return {
        "engine": "jaxserve", "elapsed_s": elapsed,
        "requests_per_s": len(ids) / elapsed, "output_tokens_per_s": n_out / elapsed,
        "total_tokens_per_s": (n_in + n_out) / elapsed,
        "steps": len(recs), "decode_steps": sum(r.is_decode for r in recs),
        "mean_step_ms": 1e3 * sum(r.step_s for r in recs) / max(1, len(recs)),
        # host time per step: batch packing plus everything LLMEngine.step does around the
        # device call (scheduling, bookkeeping, detokenizing); the device cannot overlap it
        # today because execute blocks on the sampled tokens
        "mean_host_ms_per_step": 1e3 * sum(engine_host) / max(1, len(recs)),
        "mean_pack_ms_per_step": 1e3 * sum(r.pack_s for r in recs) / max(1, len(recs)),
        "compiles_during_run": compile_count() - compiles_before,
        "compiles_since_warmup": engine.runner.compiles_since_warmup(),
        "peak_device_memory_bytes": peak_device_memory(),
        "host_peak_rss_bytes": host_peak_rss(),
        "token_ids": token_ids, "records": recs,
    }
