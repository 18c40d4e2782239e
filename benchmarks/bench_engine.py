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
    kv_cache_memory_bytes: int | None = None  # CPU KV budget (None: the engine's default)
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    async_scheduling: bool = True
    attention_backend: str | None = None
    linear_backend: str | None = None
    seed: int = 0
    compilation_cache_dir: str | None = None  # None: the engine's default folder
    speculative: dict | None = None  # speculative_config, as vLLM's

    def engine_config(self, model: str, dtype: str | None, max_model_len: int) -> EngineConfig:
        return EngineConfig(
            model=model, dtype=dtype, seed=self.seed, attention_backend=self.attention_backend,
            linear_backend=self.linear_backend, speculative=self.speculative,
            **({} if self.compilation_cache_dir is None
               else {"compilation_cache_dir": self.compilation_cache_dir}),
            cache=CacheConfig(page_size=self.page_size, num_pages=self.num_pages,
                              kv_cache_memory_bytes=self.kv_cache_memory_bytes,
                              gpu_memory_utilization=self.gpu_memory_utilization,
                              enable_prefix_caching=self.enable_prefix_caching),
            scheduler=SchedulerConfig(max_num_seqs=self.max_num_seqs,
                                      max_num_batched_tokens=self.max_num_batched_tokens,
                                      max_model_len=max_model_len,
                                      async_scheduling=self.async_scheduling))


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
    pack_s: float              # runner.last_host_seconds: batch packing on the host
    dispatched_at: float       # perf_counter when the runner queued it
    # From when the device could start it (dispatched, and the step before it back on the
    # host) until its results were on the host: its device time when the host keeps up.
    execute_s: float = 0.0
    wait_s: float = 0.0        # runner.fetch blocked on the device for it

    @property
    def is_decode(self) -> bool:
        return self.num_tokens == self.num_seqs


class StepRecorder:
    """Wraps engine.runner.dispatch / fetch (instance attributes, the runner's code is
    untouched) to record what each step computed and how long it took."""

    def __init__(self, engine: LLMEngine):
        self.runner = engine.runner
        self.records: list[StepRecord] = []
        self.total_wait_s = 0.0
        self._open: dict[int, StepRecord] = {}
        self._last_done = 0.0
        inner_dispatch, inner_fetch = self.runner.dispatch, self.runner.fetch

        def dispatch(plan):
            pending = inner_dispatch(plan)
            seqs = plan.sequences
            record = StepRecord(
                num_tokens=sum(len(s.token_ids) for s in seqs), num_seqs=len(seqs),
                kv_lens=[s.start_pos + len(s.token_ids) for s in seqs],
                pack_s=self.runner.last_host_seconds, dispatched_at=time.perf_counter())
            self.records.append(record)
            self._open[id(pending)] = record
            return pending

        def fetch(pending):
            record = self._open.pop(id(pending))
            out = inner_fetch(pending)
            done = time.perf_counter()
            record.wait_s = self.runner.last_wait_seconds
            record.execute_s = done - max(record.dispatched_at, self._last_done)
            self._last_done = done
            self.total_wait_s += record.wait_s
            return out

        self.runner.dispatch, self.runner.fetch = dispatch, fetch


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
    # every run starts cold: a repeated workload must not become prefix-cache hits
    engine.block_manager.reset_prefix_cache()
    overlapped_before, steps_before = engine.num_overlapped_steps, engine.num_steps
    spec_before = (engine.spec_num_draft_tokens, engine.spec_num_accepted_tokens)
    compiles_before = compile_count()
    start = time.perf_counter()
    ids = []
    for i, (prompt, n_out) in enumerate(zip(workload.prompts, workload.output_lens)):
        rid = f"{tag}-{i}"
        engine.add_request(rid, prompt, SamplingParams(max_tokens=n_out, temperature=0.0,
                                                       ignore_eos=True))
        ids.append(rid)
    finished = {}
    step_walls, host_s = [], []
    while engine.has_unfinished_requests():
        t0 = time.perf_counter()
        wait_before = recorder.total_wait_s
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out.outputs[0].token_ids
        step_walls.append(time.perf_counter() - t0)
        host_s.append(step_walls[-1] - (recorder.total_wait_s - wait_before))
    elapsed = time.perf_counter() - start
    token_ids = [finished[r] for r in ids]
    short = [i for i, (t, n) in enumerate(zip(token_ids, workload.output_lens)) if len(t) != n]
    if short:
        raise RuntimeError(f"{len(short)} requests did not generate their fixed output length "
                           f"(first: request {short[0]}); ignore_eos is not honoured")
    recs = recorder.records
    n_out, n_in = sum(workload.output_lens), sum(workload.input_lens)
    return {
        "engine": "jaxserve", "elapsed_s": elapsed,
        "requests_per_s": len(ids) / elapsed, "output_tokens_per_s": n_out / elapsed,
        "total_tokens_per_s": (n_in + n_out) / elapsed,
        "steps": len(recs), "decode_steps": sum(r.is_decode for r in recs),
        "mean_step_ms": 1e3 * sum(step_walls) / max(1, len(step_walls)),
        # host time per LLMEngine.step: scheduling, packing, dispatch, bookkeeping and
        # detokenizing, i.e. the step's wall time minus its wait for the device. With async
        # scheduling the device runs the next step meanwhile, so this is hidden while it is
        # shorter than a device step.
        "mean_host_ms_per_step": 1e3 * sum(host_s) / max(1, len(host_s)),
        "mean_pack_ms_per_step": 1e3 * sum(r.pack_s for r in recs) / max(1, len(recs)),
        "async_scheduling": engine.async_scheduling,
        "overlapped_steps": engine.num_overlapped_steps - overlapped_before,
        "dispatched_steps": engine.num_steps - steps_before,
        # speculative decoding: drafts proposed and accepted in this run (None: off)
        "spec_draft_tokens": (engine.spec_num_draft_tokens - spec_before[0]
                              if engine.proposer is not None else None),
        "spec_accepted_tokens": (engine.spec_num_accepted_tokens - spec_before[1]
                                 if engine.proposer is not None else None),
        "compiles_during_run": compile_count() - compiles_before,
        "compiles_since_warmup": engine.runner.compiles_since_warmup(),
        "peak_device_memory_bytes": peak_device_memory(),
        "host_peak_rss_bytes": host_peak_rss(),
        "token_ids": token_ids, "records": recs,
    }
