"""ModelRunner: owns params, the KV cache and the PRNG key; runs one bucketed step at a time.

The engine hands it a StepPlan (engine/step_plan.py: the sequences to compute, their sampling
inputs, the features the step needs); it pads it to a compiled bucket, runs the jitted step with
the cache donated (updated in place) and returns host arrays. Every bucket and variant is
compiled in `warmup`, so serving never compiles.

`dispatch` returns as soon as the step is queued on the device (jax dispatches asynchronously)
and `fetch` waits for its results, so the engine can prepare and queue step N+1 while step N
runs. Steps run on the device in dispatch order; a token id in_flight_ref(i) in a StepSequence
reads what the previously dispatched step sampled for slot i (see step.py).
"""

from __future__ import annotations

import bisect
import functools
import math
import os
import sys
import time
from typing import NamedTuple

import jax
import numpy as np
from tqdm import tqdm

from jaxserve.config import ConfigError, EngineConfig
from jaxserve.engine.step_plan import StepPlan, StepSequence, in_flight_ref
from jaxserve.models.linear import native_quantized_form_missing, pack_layer_matrices
from jaxserve.models.quant import quantized_scheme
from jaxserve.runner import programs, sampling
from jaxserve.runner.batch import Buckets, pack_batch
from jaxserve.runner.compile_guard import cache_counts, compile_count
from jaxserve.runner.linear_backend import resolve_linear_backend
from jaxserve.parallel import ShardingPlan, lead_call, placement
from jaxserve.runner.memory import page_bytes, plan_memory
from pallas_kernels.kv_quant import KV_CACHE_DTYPES as KV_CODE_DTYPES
from jaxserve.runner.step import step_functions


class StepVariant(NamedTuple):
    """The static part of a step: its bucket shape and which extras it computes."""
    num_tokens: int   # T, token rows
    num_seqs: int     # S, sequence slots
    extras: bool      # token penalties, logprobs of the sampled tokens, structured output masks
    all_logits: bool  # prompt logprobs: every row's logits (implies extras)
    # a draft-model engine's plain steps: rows may verify the draft model's drafts
    verify_drafts: bool = False

    def sample_statics(self) -> dict:
        """The sampler program's static arguments for this variant."""
        return dict(use_penalties=self.extras, logprobs=self.extras, use_bitmask=self.extras,
                    verify_drafts=self.verify_drafts)


def _verify_rows(sequences, k: int) -> tuple[list[StepSequence], list[int], list[tuple]]:
    """A sequence carrying n drafts (its last known token, then the drafts) becomes n + 1
    one-token sequences over the same page table, the j-th seeing the context up to its own
    position: the same causal attention as one n+1-token chunk (all K/V is written before any
    attention reads it), but decode-shaped, so the step takes the decode attention path, and
    each row is sampled at its own output index, as non-speculative decoding would sample it.

    A draft model's drafts are on the device: row j >= 1 feeds in_flight_ref(its previous row),
    which reads the draft that row verifies (runner/draft.py lays them out per row). Returns
    the rows, per row the flat index slot * k + j of the draft-model draft it verifies (-1:
    none), and per row the rows verifying the draft-model drafts before its token."""
    out, draft_index, rows_before = [], [], []
    for slot, q in enumerate(sequences):
        n = q.num_model_drafts
        if not q.draft_token_ids and not n:
            out.append(q)
            draft_index.append(-1)
            rows_before.append(())
            continue
        if len(q.token_ids) - len(q.draft_token_ids) != 1:
            raise ValueError("drafts follow a decode's one known token")
        first = len(out)
        tokens = list(q.token_ids) if not n else [q.token_ids[0]] + [
            in_flight_ref(first + j) for j in range(n)]
        for j, token in enumerate(tokens):  # row j samples the token after j drafts
            sampling = q.sampling.verify_row(j, q.draft_token_ids[:j])
            out.append(StepSequence([token], q.start_pos + j, q.page_ids, sampling))
            draft_index.append(slot * k + j if j < n else -1)
            rows_before.append(tuple(range(first, first + j)) if n else ())
    return out, draft_index, rows_before


class PackedStep(NamedTuple):
    """A StepPlan as host arrays padded to its variant's bucket: what run_packed runs, and what
    the multi-host leader broadcasts to every process."""
    variant: StepVariant
    batch: object         # models.batch.ForwardBatch of numpy arrays
    md: object            # sampling.SamplingMetadata of numpy arrays
    targets: np.ndarray   # i32[T] prompt-logprob targets (i32[1] in other variants)
    target_rows: np.ndarray  # i32[S_max] per row, the draft-model draft it verifies (or -1)


class ModelRunner:
    def __init__(self, loaded, config: EngineConfig, attention_fn, log=print, draft=None):
        """config: resolved (EngineConfig.resolved), so every limit is a number here.
        draft: the loaded draft model of speculative_config method draft_model."""
        if not config.scheduler.is_resolved:
            raise ValueError("ModelRunner needs a resolved EngineConfig (EngineConfig.resolved)")
        self.cfg = loaded.config
        self.config = config
        sched = config.scheduler
        max_model_len = sched.max_model_len
        # Speculative decoding: each draft is verified as its own one-token sequence over the
        # same pages (see _verify_rows), so steps hold up to max_num_seqs x (1 + k) slots.
        spec = config.speculative
        self.spec_width = 1 + spec.num_speculative_tokens if spec else 1
        max_slots = min(sched.max_num_seqs * self.spec_width, sched.max_num_batched_tokens)
        self.buckets = Buckets.make(sched.max_num_batched_tokens, max_slots)
        self.page_size = config.cache.page_size
        self.max_model_len = max_model_len
        self.pages_per_seq = math.ceil(max_model_len / self.page_size)
        self.sharding_plan = ShardingPlan.build(self.cfg, config.tensor_parallel_size,
                                                config.sharding_config)
        log(self.sharding_plan.describe())
        # each device receives only its own slices of the weights, never the whole model
        self.params = self.sharding_plan.place_params(loaded.params)
        dtype = self.params["final_norm"].dtype
        self.linear_backend, note = resolve_linear_backend(
            config.linear_backend, jax.devices()[0].platform, dtype,
            self.sharding_plan.num_devices, quantized_scheme(self.params),
            native_quantized_form_missing(self.params))
        if note:
            log(note)
        if self.linear_backend == "native":
            self.params = pack_layer_matrices(self.params)
        weight_bytes = self.sharding_plan.per_device_bytes(loaded.params)
        draft_page_bytes = 0
        if draft is not None:  # its weights and its share of every page count too
            if self.sharding_plan.multi_process:
                raise ConfigError("--speculative-config: a draft model runs on one host only")
            draft_plan = ShardingPlan.build(draft.config, config.tensor_parallel_size,
                                            config.sharding_config)
            weight_bytes += draft_plan.per_device_bytes(draft.params)
            draft_page_bytes = (page_bytes(draft.config, self.page_size, dtype)
                                // draft_plan.kv_cache_shards)
        self.plan = plan_memory(self.cfg, config.cache, weight_bytes, dtype,
                                sched.max_num_batched_tokens, sched.max_num_seqs,
                                kv_shards=self.sharding_plan.kv_cache_shards,
                                draft_page_bytes=draft_page_bytes)
        log(self.plan.describe())
        self.num_pages = self.plan.num_pages
        code_dtype = KV_CODE_DTYPES.get(config.cache.kv_cache_dtype)  # None: dtype itself
        self.kv_cache = self.sharding_plan.zeros_kv_cache(self.num_pages, self.page_size, dtype,
                                                          code_dtype)
        self.draft = None
        if draft is not None:
            from jaxserve.runner.draft import DraftModel
            self.draft = DraftModel(draft, config, attention_fn, self.num_pages,
                                    self.buckets.seq_buckets[-1], self.linear_backend)
        self.vocab_size = self.cfg.vocab_size
        self._step = step_functions(self.cfg, self.sharding_plan.wrap_attention(attention_fn),
                                   self.sharding_plan.step_out_shardings(code_dtype is not None))
        self.multihost = self.sharding_plan.multi_process
        self._key = self.sharding_plan.put_replicated(jax.random.PRNGKey(config.seed))
        self._num_steps = 0  # folded into the key on the device, one stream per step
        # i32[S_max]: what the last dispatched step sampled per slot, kept on the device (put
        # with the sharding the step gives it back with, so feeding it back never recompiles)
        self._sampled = placement.put_replicated(
            np.zeros(self.buckets.seq_buckets[-1], np.int32), self.sharding_plan.mesh)
        self.compiles_after_warmup: int | None = None
        self._warm_count = None
        self.warmup_stats: dict | None = None
        self._executables: dict = {}  # StepVariant -> its compiled (forward, sampler)
        self._num_programs = 0  # distinct compiled programs behind the variants
        self.last_host_seconds = 0.0  # packing the last dispatched step
        self.last_wait_seconds = 0.0  # the last fetch, blocked on the device
        self.last_variant: StepVariant | None = None  # of the last dispatched step

    # -- warm-up ---------------------------------------------------------------------------
    def _variants(self):
        """Every StepVariant the engine can issue. Plain steps (no penalties, no logprobs: the
        common case, and the cheapest) and steps with an extra (token penalties, logprobs or
        grammar masks, one variant for all: a neutral penalty and an all-ones mask are exact)
        exist at every bucket shape; the two share each shape's forward program, so the
        extras add one sampler program per sequence bucket. Prompt-logprob steps compute
        every row's logits in their own forward, at the largest sequence bucket."""
        s_max = self.buckets.seq_buckets[-1]
        verify = self.draft is not None  # every step of a draft-model engine may verify
        for t, s in self.buckets.all_shapes():
            yield StepVariant(t, s, False, False, verify_drafts=verify)
            yield StepVariant(t, s, True, False, verify_drafts=verify)
        for t in self.prompt_logprob_token_buckets():
            yield StepVariant(t, s_max, True, True, verify_drafts=verify)

    def prompt_logprob_token_buckets(self) -> list[int]:
        """Token buckets of the prompt-logprob variants (largest sequence bucket; rare, and
        their [T, V] work grows with T): every other one from that bucket up and the largest,
        so a step pads at most 4x, never to the largest bucket."""
        s_max = self.buckets.seq_buckets[-1]
        ts = [t for t in self.buckets.token_buckets if t >= s_max] or [s_max]
        return sorted(set(ts[::2]) | {ts[-1]})

    def warmup(self, progress: bool = True) -> None:
        variants = list(self._variants())
        start = time.perf_counter()
        hits0, misses0 = cache_counts()
        if not self.multihost:
            # compile (or load from the persistent cache) every program on all cores first;
            # the warm-up runs below then only execute them
            workers = max(1, min(len(os.sched_getaffinity(0)), 8))
            self._precompile(variants, workers, progress)
        # what was not compiled ahead compiles by running once (multi-host: the followers
        # compile each step the leader announces)
        todo = [v for v in variants if v not in self._executables]
        for variant in tqdm(todo, desc="compiling step variants", unit="variant",
                            file=sys.stderr, disable=not progress or not todo, leave=False):
            self._run(StepPlan(), variant)
        jax.block_until_ready(self.kv_cache)
        self._warm_count = compile_count()
        hits, misses = cache_counts()
        self.warmup_stats = dict(variants=len(variants), programs=self._num_programs,
                                 seconds=time.perf_counter() - start,
                                 cache_hits=hits - hits0, cache_misses=misses - misses0)
        if progress:
            cache_dir = jax.config.jax_compilation_cache_dir
            where = (f"{hits - hits0} loaded from the compilation cache {cache_dir}, "
                     f"{misses - misses0} compiled" if cache_dir else
                     "compilation cache off")
            programs = f" ({self._num_programs} programs)" if self._num_programs else ""
            print(f"warm-up: {len(variants)} step variants{programs} in "
                  f"{self.warmup_stats['seconds']:.1f}s ({where})", file=sys.stderr)

    def compiles_since_warmup(self) -> int:
        return compile_count() - (self._warm_count or 0)

    # -- one step --------------------------------------------------------------------------
    def execute(self, plan: StepPlan):
        """Run one step and wait for it: dispatch + fetch. Returns StepOutput as numpy."""
        return self.fetch(self.dispatch(plan))

    def fetch(self, pending):
        """Wait for a dispatched step's results; StepOutput as numpy."""
        start = time.perf_counter()
        out = jax.device_get(pending)
        self.last_wait_seconds = time.perf_counter() - start
        return out

    def dispatch(self, plan: StepPlan):
        """Queue one step on the device and return its pending StepOutput (device arrays) for
        `fetch`."""
        return self._run(plan, self.variant_for(plan))

    def variant_for(self, plan: StepPlan) -> StepVariant:
        """The compiled variant that runs `plan`: its bucket, and whether it takes the extras
        sampler (penalties, logprobs and token bitmasks alike) or computes prompt logprobs."""
        num_tokens = plan.num_tokens
        t, s = self.buckets.pick(num_tokens, plan.num_sampled_rows)
        features = plan.features
        if features.draft_tokens and self.spec_width == 1:
            raise ValueError("draft tokens need speculative decoding configured")
        if plan.num_model_drafts and self.draft is None:
            raise ValueError("draft-model drafts need a draft model (speculative_config)")
        if features.prompt_logprobs:
            s = self.buckets.seq_buckets[-1]
            ts = self.prompt_logprob_token_buckets()
            t = ts[bisect.bisect_left(ts, max(num_tokens, s))]
        return StepVariant(t, s, features.any, features.prompt_logprobs,
                           verify_drafts=self.draft is not None)

    def _pack(self, plan: StepPlan, variant: StepVariant) -> PackedStep:
        """Host arrays of one step, padded to the variant's bucket."""
        t, s = variant.num_tokens, variant.num_seqs
        seqs, draft_index, rows_before = plan.sequences, [], []
        k = self.spec_width - 1
        if plan.features.draft_tokens:
            seqs, draft_index, rows_before = _verify_rows(plan.sequences, k)
        batch = pack_batch(seqs, t, s, self.pages_per_seq, self.page_size, self.num_pages)
        if variant.all_logits:
            batch = batch.replace(logits_indices=np.arange(t, dtype=np.int32))
        # a fixed history width keeps penalty steps at one shape per bucket
        md = sampling.build_sampling_metadata([q.sampling for q in seqs], s, self.vocab_size,
                                              use_penalties=variant.extras,
                                              penalty_width=self.max_model_len,
                                              use_bitmask=variant.extras)
        # draft model: per target row, the draft it verifies (read by the draft's proposal,
        # which lays the drafts out per row, and by the sampler, which reads their q)
        target_rows = np.full(self.buckets.seq_buckets[-1], -1, np.int32)
        target_rows[:len(draft_index)] = draft_index
        md = md.replace(draft_index=target_rows[:s].copy())
        if variant.verify_drafts and variant.extras:  # penalty history: draft-model drafts
            before = np.full((s, k), -1, np.int32)
            for row, rows in enumerate(rows_before):
                before[row, :len(rows)] = rows
            md = md.replace(draft_rows_before=before)
        # prompt-logprob targets per token row, read only by the prompt-logprob forward
        targets = np.zeros(t if variant.all_logits else 1, np.int32)
        row = 0
        for q in seqs:
            if q.prompt_targets is not None and variant.all_logits:
                targets[row:row + len(q.prompt_targets)] = np.maximum(q.prompt_targets, 0)
            row += len(q.token_ids)
        return PackedStep(variant, batch, md, targets, target_rows)

    def _run(self, plan: StepPlan, variant: StepVariant):
        host_start = time.perf_counter()
        self.last_variant = variant
        packed = self._pack(plan, variant)
        self.last_host_seconds = time.perf_counter() - host_start
        if self.multihost:  # every process runs the same step: broadcast process 0's inputs
            return lead_call(self, "run_packed", packed)
        drafts = None
        if self.draft is not None:  # the draft model keeps up, and proposes (on the device)
            drafts = self.draft.run(plan, packed.target_rows, self._key, self._num_steps + 1)
        return self.run_packed(packed, drafts if variant.verify_drafts else None)

    def _step_args(self, batch, md, targets, step_index: int, all_logits: bool,
                   drafts=None):
        """Device arguments of one step: (its forward's, its sampler's without the logits);
        a prompt-logprob step's forward also takes the prompt targets. drafts: the draft
        model's (row_drafts, q), which the forward reads as its in-flight tokens."""
        sp = self.sharding_plan
        batch = sp.put_batch(batch)
        prev = self._sampled if drafts is None else drafts[0]
        forward = (self.params, self.kv_cache, batch, prev)
        if all_logits:
            forward += (sp.put_replicated(targets),)
        sample = (sp.put_replicated(md), self._key, sp.put_replicated(np.uint32(step_index)),
                  prev)
        if drafts is not None:
            sample += (drafts[1],)
        return forward, sample

    def _forward_fn(self, all_logits: bool):
        return self._step.forward_prompt_logprobs if all_logits else self._step.forward

    def _compile_jobs(self, variant: StepVariant) -> list:
        """(key, compile thunk) for the two programs of a variant; variants that share a
        program (same shapes) share its key, so it compiles once."""
        packed = self._pack(StepPlan(), variant)
        drafts = ((self.draft.no_drafts, self.draft.no_draft_probs) if variant.verify_drafts
                  else None)
        fwd_args, sample_args = self._step_args(packed.batch, packed.md, packed.targets, 0,
                                                variant.all_logits, drafts)
        logits = jax.ShapeDtypeStruct((variant.num_seqs, self.vocab_size), np.float32,
                                      sharding=self.sharding_plan.replicated())
        statics = variant.sample_statics()
        fwd, sample = self._forward_fn(variant.all_logits), self._step.sample
        fwd_name = "forward_prompt_logprobs" if variant.all_logits else "forward"
        return [
            (programs.shapes_key((self._step.identity, fwd_name), (), fwd_args),
             lambda: fwd.lower(*fwd_args).compile()),
            (programs.shapes_key((self._step.identity, "sample"), tuple(statics.items()),
                                 (logits, *sample_args)),
             lambda: sample.lower(logits, *sample_args, **statics).compile()),
        ]

    def _precompile(self, variants: list[StepVariant], workers: int, progress: bool) -> None:
        """Lower and compile every variant's programs without running them, each distinct one
        once, on `workers` threads (XLA compiles outside the GIL); the runner keeps the
        executables (shared with the process's other runners of the same shapes, see
        runner/programs.py) and run_packed runs them."""
        jobs = {v: self._compile_jobs(v) for v in variants}
        todo = {key: thunk for pair in jobs.values() for key, thunk in pair}
        draft_jobs = self.draft.compile_jobs(self._key) if self.draft is not None else {}
        compiled = programs.compile_all({**todo, **draft_jobs}, workers,
                                        "compiling step programs", progress)
        for v, pair in jobs.items():
            self._executables[v] = tuple(compiled[key] for key, _ in pair)
        if self.draft is not None:
            self.draft.bind({key: compiled[key] for key in draft_jobs})
        self._num_programs = len(todo) + len(draft_jobs)

    def run_packed(self, packed: PackedStep, drafts=None):
        """The device part of a step, on host arrays already padded to a bucket; drafts: the
        draft model's outputs for this step (DraftModel.run)."""
        self._num_steps += 1
        variant = packed.variant
        fwd_args, sample_args = self._step_args(packed.batch, packed.md, packed.targets,
                                                self._num_steps, variant.all_logits, drafts)
        executables = self._executables.get(variant)
        if executables is not None:
            forward, sample = executables
        else:  # not compiled ahead (multi-host followers, or warm-up skipped): jit does it
            forward = self._forward_fn(variant.all_logits)
            sample = functools.partial(self._step.sample, **variant.sample_statics())
        self.kv_cache, logits, *prompt = forward(*fwd_args)  # prompt: [outputs] or []
        out, self._sampled = sample(logits, *sample_args)
        if prompt:
            out = out.replace(**prompt[0])
        for leaf in jax.tree.leaves(out):
            leaf.copy_to_host_async()  # lands while the host prepares the next step
        return out
