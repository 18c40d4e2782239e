"""The draft model of speculative decoding (speculative_config method "draft_model"): a smaller
model with the target's vocabulary, run by the target's runner on the same devices.

Its KV cache has the target's page count and page size and is indexed by the target's page
tables: the draft's K/V for position p of a sequence sits in the same page slot as the
target's, so the block manager, prefix caching, forks and preemption serve both, and the draft
needs no scheduling of its own. Every target step first runs the draft over the same tokens
(the mirror pass: prefill chunks and decode tokens alike), so its cache keeps up. A decoding
sequence's one token and its catch-up token go in as one-token rows over the same pages, as
the target's verify rows do, so attention takes its decode path (native on CPU) instead of
prefill tiles. The logits of each proposing sequence's last token give its first draft, and a
jitted loop of k - 1 decode-shaped draft steps gives the others, all on the device. The target
step then reads the drafts from the device (they feed its verify rows as in-flight tokens) and
verifies them by rejection sampling against their distributions q (spec_sampling.py).

The draft's cache is only ever a hint: a stale entry (a page cached by a request whose last
accepted draft the draft never fed) lowers acceptance, never correctness, since every emitted
token is the target's.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.config import EngineConfig
from jaxserve.engine.step_plan import StepPlan
from jaxserve.models import build_model
from jaxserve.models.batch import ForwardBatch
from jaxserve.models.linear import pack_layer_matrices
from jaxserve.parallel import ShardingPlan, placement
from jaxserve.runner import programs, sampling
from jaxserve.runner.batch import Buckets, pack_batch
from jaxserve.runner.spec_sampling import draft_sample


class _MirrorSeq(NamedTuple):
    token_ids: list[int]
    start_pos: int
    page_ids: list[int]


def _propose(params, kv_cache, logits, md, base_key, step_index, first_pos, num_drafts,
             page_indices, target_rows, *, forward, k: int, page_size: int, num_pages: int,
             num_q_rows: int):
    """k drafts per sequence slot from the mirror pass's logits f32[S, V].

    first_pos i32[S]: the position of the first draft; num_drafts i32[S]: how many the slot
    wants (0: none); page_indices i32[S, P]; target_rows i32[R]: per target row, the flat
    index slot * k + j of the draft it verifies, or -1.
    Returns (kv_cache, row_drafts i32[R] (-1 where none), q f32[num_q_rows, V] at slot * k + j)."""
    key = jax.random.fold_in(base_key, step_index)
    S, V = logits.shape
    first, q0 = draft_sample(logits, md, key)
    drafts = jnp.zeros((S, k), jnp.int32).at[:, 0].set(first)          # i32[S, k]
    qs = jnp.zeros((S, k, V), jnp.float32).at[:, 0].set(q0)            # f32[S, k, V]
    slots = jnp.arange(S)
    # the slots past the last proposing one are padding (or one-token mirror rows): the loop's
    # matmuls and attention leave them uncomputed
    num_live = jnp.max(jnp.where(num_drafts > 0, slots + 1, 0)).astype(jnp.int32)

    def body(j, carry):
        kv_cache, drafts, qs = carry
        pos = first_pos + j - 1                       # where draft j - 1 is fed
        active = j < num_drafts                       # its successor is wanted
        page = page_indices[slots, jnp.minimum(pos // page_size, page_indices.shape[1] - 1)]
        batch = ForwardBatch(
            token_ids=drafts[:, j - 1], positions=jnp.where(active, pos, 0),
            slot_pages=jnp.where(active, page, num_pages),  # inactive rows write nothing
            slot_offsets=jnp.where(active, pos % page_size, 0),
            kv_lens=jnp.where(active, pos + 1, 1), page_indices=page_indices,
            cu_q_lens=jnp.arange(S + 1, dtype=jnp.int32),
            num_seqs=num_live[None], logits_indices=slots.astype(jnp.int32))
        kv_cache, step_logits = forward(params, kv_cache, batch)
        d, q = draft_sample(step_logits, md.replace(output_index=md.output_index + j), key)
        return kv_cache, drafts.at[:, j].set(d), qs.at[:, j].set(q)

    kv_cache, drafts, qs = jax.lax.fori_loop(1, k, body, (kv_cache, drafts, qs))
    flat = drafts.reshape(S * k)
    row_drafts = jnp.where(target_rows >= 0, flat[jnp.maximum(target_rows, 0)], -1)
    n = min(S, num_q_rows // k)  # slots past max_num_seqs are one-token mirror rows only
    q_flat = jnp.zeros((num_q_rows, V), jnp.float32).at[:n * k].set(qs[:n].reshape(n * k, V))
    return kv_cache, row_drafts.astype(jnp.int32), q_flat


def _draft_programs(cfg, attention, out_shardings, k: int, page_size: int, num_pages: int,
                    num_q_rows: int):
    """(mirror forward, proposal loop), jitted afresh per draft model (their jax caches go with
    it); engines share the executables through runner/programs.py, keyed by these settings."""
    cache_sharding, replicated, _ = out_shardings
    model = build_model(cfg, attention)
    forward = jax.jit(model.forward, donate_argnums=(1,),
                      out_shardings=(cache_sharding, replicated))
    propose = jax.jit(
        functools.partial(_propose, forward=model.forward, k=k, page_size=page_size,
                          num_pages=num_pages, num_q_rows=num_q_rows),
        donate_argnums=(1,), out_shardings=(cache_sharding, replicated, replicated))
    return forward, propose


class DraftModel:
    def __init__(self, loaded, config: EngineConfig, attention_fn, num_pages: int,
                 num_target_rows: int, linear_backend: str):
        sched, spec = config.scheduler, config.speculative
        self.cfg = loaded.config
        self.k = spec.num_speculative_tokens
        self.page_size = config.cache.page_size
        self.num_pages = num_pages
        self.pages_per_seq = -(-sched.max_model_len // self.page_size)
        # a step's tokens plus, per sequence, one catch-up token (engine: Request.draft_lag);
        # a decoding sequence's two become two one-token rows, hence 2 x max_num_seqs slots
        self.buckets = Buckets.make(sched.max_num_batched_tokens + sched.max_num_seqs,
                                    2 * sched.max_num_seqs)
        self.num_q_rows = sched.max_num_seqs * self.k
        self.num_target_rows = num_target_rows
        self.sharding_plan = ShardingPlan.build(self.cfg, config.tensor_parallel_size,
                                                config.sharding_config)
        self.params = self.sharding_plan.place_params(loaded.params)
        dtype = self.params["final_norm"].dtype
        if linear_backend == "native":
            self.params = pack_layer_matrices(self.params)
        self.kv_cache = self.sharding_plan.zeros_kv_cache(num_pages, self.page_size, dtype)
        sp = self.sharding_plan
        settings = (self.cfg, sp.wrap_attention(attention_fn), sp.step_out_shardings(), self.k,
                    self.page_size, num_pages, self.num_q_rows)
        self._forward, self._propose = _draft_programs(*settings)
        # what each jitted function computes (programs.shapes_key's identity), by function
        self._identity = {self._forward: (settings, "draft_forward"),
                          self._propose: (settings, "draft_propose")}
        # a step without drafts verifies nothing: these stand in for the draft model's outputs
        # (device arrays with the outputs' sharding, so either kind runs the same program)
        self.no_drafts = placement.put_replicated(np.full(num_target_rows, -1, np.int32),
                                                  sp.mesh)
        self.no_draft_probs = placement.put_replicated(
            np.zeros((self.num_q_rows, self.cfg.vocab_size), np.float32), sp.mesh)
        self._executables: dict = {}

    # -- one step ---------------------------------------------------------------------------
    def _mirror_batch(self, plan: StepPlan):
        """The mirror pass's batch, whose logits row i is plan sequence i's last token, and the
        proposal's page table i32[S, P] (row i: plan sequence i's pages; S the batch's slots)."""
        rows, last_rows = [], []
        for q in plan.sequences:
            tokens = list(q.draft_catch_up) + list(q.token_ids)
            start = q.start_pos - len(q.draft_catch_up)
            if len(q.token_ids) == 1:  # decoding: one-token rows, attention's decode path
                rows += [_MirrorSeq([t], start + j, q.page_ids) for j, t in enumerate(tokens)]
            else:
                rows.append(_MirrorSeq(tokens, start, q.page_ids))
            last_rows.append(len(rows) - 1)
        t, s = self.buckets.pick(sum(len(m.token_ids) for m in rows), len(rows))
        batch = pack_batch(rows, t, s, self.pages_per_seq, self.page_size, self.num_pages)
        logits_indices = np.zeros(s, np.int32)
        logits_indices[:len(last_rows)] = batch.cu_q_lens[np.asarray(last_rows, np.int64) + 1] - 1
        slot_pages = np.zeros((s, self.pages_per_seq), np.int32)
        for i, q in enumerate(plan.sequences):
            slot_pages[i, :len(q.page_ids)] = q.page_ids
        return batch.replace(logits_indices=logits_indices), slot_pages

    def _propose_args(self, plan: StepPlan, slot_pages: np.ndarray, target_rows: np.ndarray,
                      base_key, step_index: int):
        s = slot_pages.shape[0]
        # drafts are drawn without penalties or grammar masks: the target's rows apply the
        # penalties and verify against any q exactly; constrained requests get no drafts
        inputs = [dataclasses.replace(q.sampling, token_bitmask=None) for q in plan.sequences]
        md = sampling.build_sampling_metadata(inputs, s, self.cfg.vocab_size,
                                              use_penalties=False)
        first_pos = np.zeros(s, np.int32)
        num_drafts = np.zeros(s, np.int32)
        for i, q in enumerate(plan.sequences):
            first_pos[i] = q.start_pos + len(q.token_ids)
            num_drafts[i] = q.num_model_drafts
        sp = self.sharding_plan
        return (sp.put_replicated(md), base_key, sp.put_replicated(np.uint32(step_index)),
                *sp.put_replicated((first_pos, num_drafts, slot_pages, target_rows)))

    def run(self, plan: StepPlan, target_rows: np.ndarray, base_key, step_index: int):
        """The mirror pass over the plan's tokens, then (if any sequence wants drafts) the
        proposals: (row_drafts i32[R], q f32[Q, V]) on the device, or the no-draft stand-ins."""
        batch, slot_pages = self._mirror_batch(plan)
        batch = self.sharding_plan.put_batch(batch)
        self.kv_cache, logits = self._call(self._forward, (self.params, self.kv_cache, batch))
        if not plan.num_model_drafts:
            return self.no_drafts, self.no_draft_probs
        args = self._propose_args(plan, slot_pages, target_rows, base_key, step_index)
        self.kv_cache, row_drafts, q = self._call(self._propose,
                                                  (self.params, self.kv_cache, logits, *args))
        return row_drafts, q

    def _call(self, fn, args):
        key = programs.shapes_key(self._identity[fn], (), args)
        compiled = self._executables.get(key)
        return compiled(*args) if compiled is not None else fn(*args)

    # -- warm-up ----------------------------------------------------------------------------
    def compile_jobs(self, base_key) -> dict:
        """key -> compile thunk for every mirror bucket and every proposal shape."""
        jobs = {}
        for t, s in self.buckets.all_shapes():
            batch = self.sharding_plan.put_batch(
                pack_batch([], t, s, self.pages_per_seq, self.page_size, self.num_pages))
            args = (self.params, self.kv_cache, batch)
            jobs[programs.shapes_key(self._identity[self._forward], (), args)] = functools.partial(
                self._lower, self._forward, args)
        for s in self.buckets.seq_buckets:
            logits = jax.ShapeDtypeStruct((s, self.cfg.vocab_size), np.float32,
                                          sharding=self.sharding_plan.replicated())
            args = (self.params, self.kv_cache, logits,
                    *self._propose_args(StepPlan(), np.zeros((s, self.pages_per_seq), np.int32),
                                        np.full(self.num_target_rows, -1, np.int32),
                                        base_key, 0))
            jobs[programs.shapes_key(self._identity[self._propose], (), args)] = functools.partial(
                self._lower, self._propose, args)
        return jobs

    @staticmethod
    def _lower(fn, args):
        return fn.lower(*args).compile()

    def bind(self, executables: dict) -> None:
        """Use these compiled executables (key -> executable, from programs.compile_all)."""
        self._executables.update(executables)
