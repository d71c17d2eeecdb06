"""GenerateStream calls -> OpenAI server-sent events.

A stream's first message is read before the HTTP response starts, so a request the engine refuses
(INVALID_ARGUMENT, RESOURCE_EXHAUSTED, UNAVAILABLE) still gets its JSON error and HTTP status; after
that, a failure becomes an ``data: {"error": ...}`` event (the status line is gone). Whenever the
response ends early (client disconnect, server shutdown) the gRPC calls are cancelled, which aborts
the requests in the engine and frees their KV blocks.

``ChatChunker`` / ``CompletionChunker`` turn deltas and the final message into chunk objects. With
tools offered, text stops streaming at the ``<|action_start|>`` token: the tool call arrives whole, as
one ``tool_calls`` delta, when the final message has parsed it; text after the call block (if any) is
sent then.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import defaultdict
from collections.abc import AsyncIterator

import grpc

from .errors import ApiError, from_rpc_error
from .translate import (
    chat_logprobs,
    choices_of,
    completion_logprobs,
    finish_reason,
    tool_calls_json,
    usage_json,
)

DONE = b"data: [DONE]\n\n"


def sse(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


class OpenStreams:
    """One or more started GenerateStream calls whose first message has arrived."""

    def __init__(self, calls: list, firsts: list, param_of):
        self.calls = calls
        self.firsts = firsts
        self.param_of = param_of

    @classmethod
    async def open(cls, backends, requests: list, request_id: str | None, param_of) -> OpenStreams:
        calls = [backends.stream("inference", "GenerateStream", r, request_id) for r in requests]
        try:
            firsts = [await call.read() for call in calls]
        except grpc.RpcError as exc:
            for call in calls:
                call.cancel()
            raise from_rpc_error(exc, param_of) from None
        except BaseException:
            for call in calls:
                call.cancel()
            raise
        return cls(calls, firsts, param_of)

    def cancel(self) -> None:
        for call in self.calls:
            call.cancel()

    async def messages(self) -> AsyncIterator[tuple[int, object]]:
        """(which call, message) in arrival order, until every call ended."""
        try:
            if len(self.calls) == 1:
                call, message = self.calls[0], self.firsts[0]
                while message is not grpc.aio.EOF:
                    yield 0, message
                    message = await call.read()
                return
            async for item in self._merged():
                yield item
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, self.param_of) from None
        finally:
            self.cancel()

    async def _merged(self):
        queue: asyncio.Queue = asyncio.Queue()
        end = object()

        async def pump(i, call, message):
            try:
                while message is not grpc.aio.EOF:
                    await queue.put((i, message))
                    message = await call.read()
                await queue.put((i, end))
            except grpc.RpcError as exc:
                await queue.put((i, exc))

        tasks = [asyncio.create_task(pump(i, c, m)) for i, (c, m) in enumerate(zip(self.calls, self.firsts))]
        try:
            remaining = len(tasks)
            while remaining:
                i, item = await queue.get()
                if item is end:
                    remaining -= 1
                elif isinstance(item, grpc.RpcError):
                    raise item
                else:
                    yield i, item
        finally:
            for task in tasks:
                task.cancel()


async def sse_body(chunks: AsyncIterator[dict], streams: OpenStreams, metrics, route: str, started: float):
    """The SSE byte stream: every chunk, then ``[DONE]``; an error after the start becomes an error event."""
    metrics.streams.inc()
    first = True
    try:
        async for chunk in chunks:
            if first and chunk.get("choices"):
                metrics.ttft.labels(route).observe(time.monotonic() - started)
                first = False
            yield sse(chunk)
    except ApiError as exc:
        yield sse(exc.body())
    finally:
        streams.cancel()
        metrics.streams.dec()
    yield DONE


class _Chunker:
    object_name = ""

    def __init__(self, completion_id: str, model: str, include_usage: bool):
        self.id = completion_id
        self.model = model
        self.created = int(time.time())
        self.include_usage = include_usage

    def chunk(self, choices: list[dict], usage: dict | None = None) -> dict:
        out = {"id": self.id, "object": self.object_name, "created": self.created, "model": self.model,
               "choices": choices}
        if self.include_usage:
            out["usage"] = usage
        return out


class ChatChunker(_Chunker):
    object_name = "chat.completion.chunk"

    def __init__(self, completion_id, model, include_usage, tools_offered: bool, logprobs: bool,
                 action_start_id: int | None):
        super().__init__(completion_id, model, include_usage)
        self.tools_offered = tools_offered
        self.logprobs = logprobs
        self.action_start_id = action_start_id
        self.started: set[int] = set()
        self.held: set[int] = set()
        self.sent: dict[int, str] = defaultdict(str)

    def _choice(self, index: int, delta: dict, finish=None, logprobs=None) -> dict:
        if index not in self.started:
            self.started.add(index)
            delta = {"role": "assistant", **delta}
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}

    def on_delta(self, delta) -> list[dict]:
        i = delta.index
        if self.tools_offered and (self.action_start_id is None or self.action_start_id in delta.token_ids):
            # From the call block on, the text is the call's JSON: it leaves as tool_calls at the end.
            self.held.add(i)
        if i in self.held:
            return [self.chunk([self._choice(i, {})])] if i not in self.started else []
        if not delta.text and not (self.logprobs and delta.logprobs):
            return [self.chunk([self._choice(i, {"content": ""})])] if i not in self.started else []
        self.sent[i] += delta.text
        logprobs = chat_logprobs(delta.logprobs) if self.logprobs else None
        return [self.chunk([self._choice(i, {"content": delta.text}, logprobs=logprobs)])]

    def on_final(self, final) -> list[dict]:
        out = []
        for c in choices_of(final):
            reason = finish_reason(c, self.tools_offered)
            if c.index in self.held:
                sent = self.sent[c.index]
                rest = c.content[len(sent):] if c.content.startswith(sent) else ""
                if rest:
                    out.append(self.chunk([self._choice(c.index, {"content": rest})]))
                if reason == "tool_calls":
                    calls = [{"index": k, **call} for k, call in enumerate(tool_calls_json(c.tool_calls))]
                    out.append(self.chunk([self._choice(c.index, {"tool_calls": calls})]))
            out.append(self.chunk([self._choice(c.index, {}, finish=reason)]))
        if self.include_usage:
            out.append(self.chunk([], usage_json(final.usage)))
        return out


class CompletionChunker(_Chunker):
    """Text completion chunks; ``offset`` numbers the choices of prompt p as p * n + sibling."""

    object_name = "text_completion"

    def __init__(self, completion_id, model, include_usage, logprobs: bool, n: int):
        super().__init__(completion_id, model, include_usage)
        self.logprobs = logprobs
        self.n = n
        self.text_offset: dict[int, int] = defaultdict(int)
        self.usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0,
                      "prompt_tokens_details": {"cached_tokens": 0}}
        self.finals = 0

    def on_delta(self, prompt_index: int, delta) -> list[dict]:
        index = prompt_index * self.n + getattr(delta, "index", 0)
        if not delta.text and not (self.logprobs and delta.logprobs):
            return []
        logprobs = completion_logprobs(delta.logprobs, self.text_offset[index]) if self.logprobs else None
        self.text_offset[index] += len(delta.text)
        return [self.chunk([{"index": index, "text": delta.text, "logprobs": logprobs, "finish_reason": None}])]

    def on_final(self, prompt_index: int, final, prompts: int) -> list[dict]:
        out = []
        for c in choices_of(final):
            index = prompt_index * self.n + c.index
            reason = finish_reason(c, False)
            out.append(self.chunk([{"index": index, "text": "", "logprobs": None, "finish_reason": reason}]))
        usage = usage_json(final.usage)
        for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
            self.usage[key] += usage[key]
        self.usage["prompt_tokens_details"]["cached_tokens"] += usage["prompt_tokens_details"]["cached_tokens"]
        self.finals += 1
        if self.include_usage and self.finals == prompts:
            out.append(self.chunk([], self.usage))
        return out
