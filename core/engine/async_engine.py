"""AsyncLLMEngine: the LLMEngine driven by one background thread, streamed to asyncio callers.

    caller (event loop)                           engine thread
    generate(): validate, register a queue,  -->  inbox: add / abort ops
                await deltas                 <--  loop.call_soon_threadsafe(dispatch, step outputs)

Only the engine thread touches the LLMEngine, so the engine needs no locks; the inbox and the stream
table share one condition variable, on which the thread sleeps while there is no request. It applies
queued ops before every step, so an abort (``await abort(id)``, or closing / cancelling the iterator)
frees the request's blocks before the next step runs (one step at most). ``stats()`` is a snapshot the
thread publishes after every step. A step that raises fails its requests ("error") and the thread goes
on; ``shutdown()`` cancels whatever is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Sequence

from .engine import LLMEngine
from .errors import DuplicateRequestError, EngineClosedError
from .outputs import CANCELLED, EngineStats, RequestOutput
from .params import EngineConfig, SamplingParams

logger = logging.getLogger(__name__)


class AsyncLLMEngine:
    def __init__(self, model=None, tokenizer=None, config: EngineConfig | None = None, *,
                 engine: LLMEngine | None = None):
        self.engine = engine if engine is not None else LLMEngine(model, tokenizer, config)
        self._cond = threading.Condition()
        self._inbox: list[tuple] = []
        # request id -> (its caller's loop, its queue, how many of its n sequences are still open)
        self._streams: dict[str, list] = {}
        self._closed = False
        self._stats = self.engine.stats()
        self._thread = threading.Thread(target=self._run, name="internlm2-engine", daemon=True)
        self._thread.start()

    # ---- caller side (event loop) -------------------------------------------------------------
    async def generate(self, request_id: str, prompt_token_ids: Sequence[int],
                       params: SamplingParams | None = None) -> AsyncIterator[RequestOutput]:
        """Stream a request's RequestOutput deltas (of all its siblings, ``n`` or ``best_of``, told apart by
        ``index``); each sibling's last one has ``finished=True`` and the stream ends after the last.

        Raises InvalidRequestError (DuplicateRequestError for a live id) / EngineOverloadedError /
        EngineClosedError on the first iteration. Validation runs here, on the caller's side, once (the
        engine thread only queues the request). Leaving the loop early, ``aclose()`` or cancelling the
        consuming task aborts the request.
        """
        params = params if params is not None else SamplingParams()
        if params.structured_output is not None:  # compiling a new grammar may take a while: not on the loop
            prompt = await asyncio.to_thread(self.engine.validate_request, request_id, prompt_token_ids, params)
        else:
            prompt = self.engine.validate_request(request_id, prompt_token_ids, params)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        with self._cond:
            if self._closed or not self._thread.is_alive():
                raise EngineClosedError("the engine is shut down")
            # The live-id rule is the engine's (DuplicateRequestError); asking it here, before the add
            # reaches the engine thread, keeps a duplicate from taking over the live stream's queue.
            if request_id in self._streams:
                raise DuplicateRequestError(request_id)
            self._streams[request_id] = [loop, queue, params.num_sequences]
            self._inbox.append(("add", request_id, prompt, params))
            self._cond.notify()
        open_ = params.num_sequences
        try:
            while open_:
                out = await queue.get()
                if isinstance(out, BaseException):
                    open_ = 0
                    raise out
                if out.finished:
                    open_ -= 1
                yield out
        finally:
            if open_:
                self._abort_nowait(request_id)

    async def abort(self, request_id: str) -> bool:
        """Cancel a request; returns once its blocks are free (False if it was unknown or done).
        A live ``generate`` iterator of it ends with finish_reason "cancelled"."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        with self._cond:
            if self._closed:
                return False
            self._inbox.append(("abort", request_id, (loop, done)))
            self._cond.notify()
        return await done

    def stats(self) -> EngineStats:
        """The snapshot published after the engine thread's last step or op."""
        return self._stats

    async def shutdown(self) -> None:
        """Stop the engine thread; open streams end with finish_reason "cancelled"."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join)

    async def __aenter__(self) -> AsyncLLMEngine:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.shutdown()

    def _abort_nowait(self, request_id: str) -> None:
        with self._cond:
            self._streams.pop(request_id, None)
            if not self._closed:
                self._inbox.append(("abort", request_id, None))
                self._cond.notify()

    # ---- engine thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        while True:
            with self._cond:
                while not self._inbox and not engine.has_unfinished() and not self._closed:
                    self._cond.wait()
                if self._closed:
                    break
                ops, self._inbox = self._inbox, []
            outputs: list = []
            replies = []
            for op in ops:
                if op[0] == "add":
                    _, rid, prompt, params = op
                    try:
                        engine.add_validated_request(rid, prompt, params)
                    except Exception as exc:  # overloaded: the caller's iterator raises it
                        outputs.append((rid, exc))
                else:
                    _, rid, reply = op
                    found = engine.abort(rid)
                    if reply is not None:
                        replies.append((reply, found))
            if engine.has_unfinished():
                try:
                    outputs.extend((o.request_id, o) for o in engine.step())
                except Exception as exc:  # not expected (step fails its own requests); never kill the thread
                    logger.exception("engine step raised")
                    outputs.extend((o.request_id, o) for o in engine.fail_all(f"{type(exc).__name__}: {exc}"))
            self._stats = engine.stats()
            self._deliver(outputs)
            for (loop, fut), found in replies:
                _call_soon(loop, _resolve, fut, found)
        # Shutting down: end every open stream and refuse the adds still queued.
        leftovers = [(o.request_id, o) for o in engine.fail_all("engine shut down", reason=CANCELLED)]
        with self._cond:
            for op in self._inbox:
                if op[0] == "add":
                    leftovers.append((op[1], EngineClosedError("the engine is shut down")))
                elif op[2] is not None:
                    _call_soon(op[2][0], _resolve, op[2][1], False)
            self._inbox = []
        self._stats = engine.stats()
        self._deliver(leftovers)

    def _deliver(self, items: list[tuple[str, object]]) -> None:
        """Hand (request id, output or exception) pairs to their streams' loops, one callback per loop."""
        if not items:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        with self._cond:
            for rid, item in items:
                entry = self._streams.get(rid)
                if entry is None:  # the caller went away
                    continue
                if isinstance(item, BaseException):
                    del self._streams[rid]
                elif item.finished:
                    entry[2] -= 1
                    if not entry[2]:
                        del self._streams[rid]
                by_loop.setdefault(entry[0], []).append((entry[1], item))
        for loop, batch in by_loop.items():
            _call_soon(loop, _put_all, batch)


def _call_soon(loop: asyncio.AbstractEventLoop, fn, *args) -> None:
    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening any more
        loop.call_soon_threadsafe(fn, *args)


def _put_all(batch) -> None:
    for queue, item in batch:
        queue.put_nowait(item)


def _resolve(fut: asyncio.Future, value) -> None:
    if not fut.done():
        fut.set_result(value)
