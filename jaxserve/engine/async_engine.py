"""AsyncEngine: the LLMEngine's step loop on a background thread, per-request asyncio streams.

Device steps block, so they run on their own thread and the event loop stays free for HTTP.
Only that thread touches the LLMEngine: requests and aborts reach it as commands through a
queue, and outputs come back to each request's asyncio.Queue via call_soon_threadsafe. The loop
beats a heartbeat every iteration (also while idle), so /health can tell a stuck loop from a
quiet one.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from typing import AsyncIterator

from jaxserve.engine.engine import LLMEngine
from jaxserve.engine.outputs import RequestOutput
from jaxserve.engine.sampling_params import SamplingParams

_IDLE_WAIT_S = 0.25


class EngineDeadError(RuntimeError):
    """The step loop died; the request cannot complete."""


class AsyncEngine:
    def __init__(self, engine: LLMEngine, model_name: str):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.model_name = model_name
        self.max_model_len = engine.max_model_len
        self.input_limits = engine.input_limits  # the server checks prompts by the same rules
        self.max_num_seqs = engine.scheduler.max_num_seqs  # the running batch's bound
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._heartbeat = time.monotonic()
        self._error: BaseException | None = None
        self._accepting = True

    # -- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        self.engine.grammar.prepare_in_background()  # a server will see constrained requests
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="jaxserve-step-loop",
                                            daemon=True)
            self._thread.start()

    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._error is None

    def heartbeat_age(self) -> float:
        return time.monotonic() - self._heartbeat

    async def shutdown(self, timeout: float) -> None:
        """Stop accepting; let in-flight requests finish, abort what is left after `timeout`."""
        self._accepting = False
        deadline = time.monotonic() + timeout
        while self._streams and time.monotonic() < deadline and self.is_running():
            await asyncio.sleep(0.05)
        for request_id in list(self._streams):
            await self.abort(request_id)
        await asyncio.sleep(0.05)
        self._stop.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 5.0)

    # -- requests -----------------------------------------------------------------------------
    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       prompt: str | None = None) -> AsyncIterator[RequestOutput]:
        """Cumulative RequestOutput snapshots; the last has finished=True. Invalid requests raise
        (RequestRejectedError with .param) before anything is yielded."""
        if not self._accepting:
            raise EngineDeadError("the server is shutting down")
        if not self.is_running():
            raise EngineDeadError(f"the engine loop is not running ({self._error!r})")
        loop = asyncio.get_running_loop()
        accepted = loop.create_future()
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (loop, stream)
        self._commands.put(("add", request_id, prompt_token_ids, params, loop, accepted))
        finished = False
        try:
            await accepted  # raises the engine's validation error, if any
            while not finished:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                if prompt is not None:
                    item.prompt = prompt
                finished = item.finished
                yield item
        finally:
            self._streams.pop(request_id, None)
            if not finished:  # cancelled, disconnected or failed: free its pages
                self._commands.put(("abort", request_id))

    async def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    def stats(self) -> dict:
        e = self.engine
        bm, sched = e.block_manager, e.scheduler
        return dict(num_running=sched.num_running, num_waiting=sched.num_waiting,
                    kv_cache_usage=bm.usage, prefix_cache_queries=bm.prefix_queries,
                    prefix_cache_hits=bm.prefix_hits, num_preemptions=sched.num_preemptions,
                    num_free_pages=bm.num_free_pages, num_pages=bm.num_pages,
                    structured_output_requests=e.num_structured_requests,
                    grammar_compiles=e.grammar.num_compiles,
                    grammar_compile_seconds=e.grammar.compile_seconds,
                    grammar_mask_seconds=e.mask_seconds,
                    spec_num_drafts=e.spec_num_drafts,
                    spec_num_draft_tokens=e.spec_num_draft_tokens,
                    spec_num_accepted_tokens=e.spec_num_accepted_tokens,
                    spec_accepted_per_pos=list(e.spec_accepted_per_pos))

    async def compile_grammar(self, spec, param: str | None = None) -> None:
        """Compile (or find cached) a request's constraint off the event loop and the step
        loop, so a bad grammar is a 400 before the request is queued; raises
        RequestRejectedError naming `param`."""
        await asyncio.get_running_loop().run_in_executor(
            None, self.engine.grammar.compile, spec, param)

    # -- the loop thread ----------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                self._heartbeat = time.monotonic()
                self._drain_commands(block=not self.engine.has_unfinished_requests())
                if self.engine.has_unfinished_requests():
                    for out in self.engine.step():
                        self._post(out.request_id, out)
        except BaseException as exc:  # the loop is dead: fail every waiting stream loudly
            self._error = exc
            for request_id in list(self._streams):
                self._post(request_id, EngineDeadError(f"engine step failed: {exc!r}"))
            raise

    def _drain_commands(self, block: bool) -> None:
        try:
            cmd = self._commands.get(timeout=_IDLE_WAIT_S) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            self._run_command(cmd)
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return

    def _run_command(self, cmd) -> None:
        if cmd[0] == "abort":
            final = self.engine.abort_request(cmd[1])
            if final is not None:  # ends a stream still waiting (e.g. aborted at shutdown)
                self._post(cmd[1], final)
            return
        _, request_id, prompt_ids, params, loop, accepted = cmd
        try:
            self.engine.add_request(request_id, prompt_ids, params)
        except Exception as exc:
            loop.call_soon_threadsafe(_settle, accepted, exc)
            return
        loop.call_soon_threadsafe(_settle, accepted, None)

    def _post(self, request_id: str, item) -> None:
        entry = self._streams.get(request_id)
        if entry is not None:
            loop, stream = entry
            loop.call_soon_threadsafe(stream.put_nowait, item)


def _settle(future: asyncio.Future, exc: BaseException | None) -> None:
    if future.done():
        return
    if exc is None:
        future.set_result(True)
    else:
        future.set_exception(exc)
