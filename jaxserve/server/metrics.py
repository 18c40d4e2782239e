"""Prometheus metrics under vLLM's names, so that dashboards built for vLLM work unchanged.

Two sources: per-request counters and latency histograms, fed by the HTTP handlers as outputs
stream by (`RequestTracker`), and engine state (`engine.stats()`), read at scrape time by a
custom collector so that a gauge is never stale and the step loop never pays for metrics.
Each app has its own CollectorRegistry: several apps in one process (tests) never collide.
"""

from __future__ import annotations

import logging
import time

from prometheus_client import (CollectorRegistry, Counter, Histogram, disable_created_metrics,
                               generate_latest)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

log = logging.getLogger(__name__)

# `*_created` series double the scrape size and no vLLM dashboard reads them. (Process-wide
# setting of prometheus_client; it only affects how counters are exposed.)
disable_created_metrics()

# Buckets in seconds, spanning CPU-hosted toy models to long GPU generations.
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
_ITL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
                1.0, 2.5, 5.0, 10.0, 20.0, 80.0)
_REQUEST_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0,
                    30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)

# engine.stats() key -> (metric name, kind, help)
_ENGINE_METRICS = {
    "num_running": ("vllm:num_requests_running", "gauge", "Requests in the running batch."),
    "num_waiting": ("vllm:num_requests_waiting", "gauge", "Requests waiting to be scheduled."),
    "kv_cache_usage": ("vllm:kv_cache_usage_perc", "gauge",
                       "Fraction of KV-cache pages in use (1 = full)."),
    "prefix_cache_queries": ("vllm:prefix_cache_queries", "counter",
                             "Prompt tokens looked up in the prefix cache."),
    "prefix_cache_hits": ("vllm:prefix_cache_hits", "counter",
                          "Prompt tokens found in the prefix cache."),
    "num_preemptions": ("vllm:num_preemptions", "counter", "Requests preempted (pages freed)."),
    "num_free_pages": ("jaxserve:num_free_pages", "gauge", "Free KV-cache pages."),
    "num_pages": ("jaxserve:num_pages", "gauge", "KV-cache pages in the pool."),
    "structured_output_requests": ("jaxserve:structured_output_requests", "counter",
                                   "Requests with a structured-output constraint."),
    "grammar_compiles": ("jaxserve:grammar_compiles", "counter",
                         "Structured-output grammars compiled (cache misses)."),
    "grammar_compile_seconds": ("jaxserve:grammar_compile_seconds", "counter",
                                "Seconds spent compiling structured-output grammars."),
    "grammar_mask_seconds": ("jaxserve:grammar_mask_seconds", "counter",
                             "Host seconds spent filling structured-output token masks."),
    "spec_num_drafts": ("vllm:spec_decode_num_drafts", "counter",
                        "Sequences that carried draft tokens into a step."),
    "spec_num_draft_tokens": ("vllm:spec_decode_num_draft_tokens", "counter",
                              "Draft tokens proposed."),
    "spec_num_accepted_tokens": ("vllm:spec_decode_num_accepted_tokens", "counter",
                                 "Draft tokens accepted."),
}


class _EngineStatsCollector:
    """Reads engine.stats() when Prometheus scrapes; a failing engine yields no samples
    rather than a failing scrape (the /health route is where a dead engine shows)."""

    def __init__(self, engine, model_name: str):
        self._engine = engine
        self._model = model_name

    def describe(self):
        return []  # keeps registration from calling stats() before the engine runs

    def collect(self):
        try:
            stats = self._engine.stats()
        except Exception:  # noqa: BLE001 - a scrape must not take the server down
            log.exception("engine.stats() failed during a metrics scrape")
            return
        for key, (name, kind, doc) in _ENGINE_METRICS.items():
            if key not in stats:
                continue
            cls = GaugeMetricFamily if kind == "gauge" else CounterMetricFamily
            fam = cls(name, doc, labels=["model_name"])
            fam.add_metric([self._model], float(stats[key]))
            yield fam
        per_pos = stats.get("spec_accepted_per_pos")
        if per_pos:
            fam = CounterMetricFamily("vllm:spec_decode_num_accepted_tokens_per_pos",
                                      "Draft tokens accepted, by position in the draft.",
                                      labels=["model_name", "position"])
            for pos, count in enumerate(per_pos):
                fam.add_metric([self._model, str(pos)], float(count))
            yield fam


class ServerMetrics:
    def __init__(self, engine, model_name: str):
        self.model_name = model_name
        self.registry = reg = CollectorRegistry()
        lbl = ["model_name"]
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prefill tokens processed.", lbl,
                                     registry=reg).labels(model_name)
        self.generation_tokens = Counter("vllm:generation_tokens", "Generated tokens.", lbl,
                                         registry=reg).labels(model_name)
        self._success = Counter("vllm:request_success", "Finished requests by finish reason.",
                                lbl + ["finished_reason"], registry=reg)
        self._rejected = Counter("jaxserve:requests_rejected", "Requests refused before "
                                 "reaching the engine, by reason.", lbl + ["reason"], registry=reg)

        def hist(name, doc, buckets):
            return Histogram(name, doc, lbl, buckets=buckets, registry=reg).labels(model_name)

        self.ttft = hist("vllm:time_to_first_token_seconds", "Time to first token.", _TTFT_BUCKETS)
        self.itl = hist("vllm:inter_token_latency_seconds", "Time between output tokens.",
                        _ITL_BUCKETS)
        self.e2e = hist("vllm:e2e_request_latency_seconds", "Request latency, arrival to finish.",
                        _REQUEST_BUCKETS)
        self.queue = hist("vllm:request_queue_time_seconds", "Time waiting before first "
                          "scheduled (reported by the engine when it provides it).",
                          _REQUEST_BUCKETS)
        self.prefill = hist("vllm:request_prefill_time_seconds", "Scheduled to first token "
                            "(when the engine reports its queue time).", _REQUEST_BUCKETS)
        self.decode = hist("vllm:request_decode_time_seconds", "First token to last token.",
                           _REQUEST_BUCKETS)
        reg.register(_EngineStatsCollector(engine, model_name))

    def success(self, reason: str) -> None:
        self._success.labels(self.model_name, reason).inc()

    def rejected(self, reason: str) -> None:
        self._rejected.labels(self.model_name, reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def tracker(self) -> RequestTracker:
        return RequestTracker(self)


class RequestTracker:
    """Latency bookkeeping for one engine request; fed with each cumulative RequestOutput."""

    def __init__(self, metrics: ServerMetrics):
        self._m = metrics
        self.arrival = time.monotonic()
        self._first: float | None = None
        self._last: float | None = None
        self._num_generated = 0
        self._done = False
        self._queue_seen = False

    def on_output(self, out) -> None:
        now = time.monotonic()
        total = sum(len(c.token_ids) for c in out.outputs)
        new = total - self._num_generated
        if new > 0:
            if self._first is None:
                self._first = now
                self._m.ttft.observe(now - self.arrival)
                self._m.prompt_tokens.inc(len(out.prompt_token_ids))
            else:
                # Tokens of one snapshot share the interval; each counts once, as vLLM's do.
                gap = (now - self._last) / new
                for _ in range(min(new, 64)):
                    self._m.itl.observe(gap)
            self._last = now
            self._num_generated = total
            self._m.generation_tokens.inc(new)
        queue_time = getattr(out, "queue_time", None)  # optional field of RequestOutput
        if queue_time is not None and not self._queue_seen:
            self._queue_seen = True
            self._m.queue.observe(queue_time)
            if self._first is not None:
                self._m.prefill.observe(max(0.0, self._first - self.arrival - queue_time))
        if out.finished:
            self._finish([c.finish_reason or "stop" for c in out.outputs])

    def on_abort(self, n: int) -> None:
        """The client went away or the request failed before finishing."""
        self._finish(["abort"] * n)

    def _finish(self, reasons: list[str]) -> None:
        if self._done:
            return
        self._done = True
        self._m.e2e.observe(time.monotonic() - self.arrival)
        if self._first is not None and self._last is not None:
            self._m.decode.observe(self._last - self._first)
        for r in reasons:
            self._m.success(r)
