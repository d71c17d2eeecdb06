"""Tokens -> text deltas, stop strings, RequestOutput records: the only part of the engine that sees text.

Per request a ``TextStream`` keeps an incremental detokenizer and the text not yet emitted. Stop strings
are matched on the detokenized text, so a match may span any number of tokens. Emitted text is never
taken back, hence the hold-back: after each token, the longest tail of the pending text that is a
prefix of some stop string stays pending until the next token decides it. A match cuts the text at its
start (the stop string and anything after it never reach the client) and finishes the request with
reason "stop". While ``min_new_tokens`` is unmet no stop string is looked for and nothing is held. The
stop/eos token that ends a request is not detokenized. At any other finish the held text is flushed.
"""

from __future__ import annotations

import time

from .outputs import STOP, RequestOutput
from .request import Request


def _held_tail(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of one of ``stops``."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


class TextStream:
    __slots__ = ("detok", "pending", "stops")

    def __init__(self, tokenizer, request: Request):
        from ..tokenizer import IncrementalDetokenizer

        self.detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=request.params.skip_special_tokens)
        self.stops = request.params.stop
        self.pending = ""

    def push(self, token_id: int, check_stops: bool) -> tuple[str, str | None]:
        """Feed one token; returns (text that is now final, the stop string matched or None)."""
        self.pending += self.detok.push(token_id)
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, None
        if not check_stops:
            out, self.pending = self.pending, ""
            return out, None
        # Earliest match; no match can start in already emitted text (that is what hold-back ensures).
        hit, at = None, len(self.pending)
        for s in self.stops:
            j = self.pending.find(s)
            if j != -1 and j < at:
                hit, at = s, j
        if hit is not None:
            out, self.pending = self.pending[:at], ""
            return out, hit
        keep = _held_tail(self.pending, self.stops)
        cut = len(self.pending) - keep
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, None

    def flush(self) -> str:
        out = self.pending + self.detok.flush()
        self.pending = ""
        return out


class OutputProcessor:
    """Builds each request's RequestOutput deltas; reports stop-string hits so the engine can finish them."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.streams: dict[tuple[str, int], TextStream] = {}  # by (request id, sibling index)

    def add(self, request: Request) -> None:
        if self.tokenizer is not None:
            self.streams[request.key] = TextStream(self.tokenizer, request)

    def process(self, requests: list[Request]) -> tuple[list[RequestOutput], list[tuple[Request, str]]]:
        """Outputs for requests that got tokens this step, and (request, stop string) pairs to finish."""
        outputs: list[RequestOutput] = []
        stopped: list[tuple[Request, str]] = []
        now = time.perf_counter()
        for req in requests:
            new_ids = req.token_ids[req.num_prompt_tokens + req.num_reported_tokens :]
            req.num_reported_tokens += len(new_ids)
            text, hit = self._text(req, new_ids)
            if hit is not None:
                # Finished by text: the scheduler frees it right after this returns.
                stopped.append((req, hit))
            outputs.append(self._output(req, new_ids, text, finished=req.is_finished or hit is not None,
                                        finish_reason=STOP if hit is not None else req.finish_reason,
                                        stop_reason=hit if hit is not None else req.stop_reason, now=now))
        return outputs, stopped

    def _text(self, req: Request, new_ids: list[int]) -> tuple[str, str | None]:
        stream = self.streams.get(req.key)
        if stream is None:
            return "", None
        parts = []
        p = req.params
        base = req.num_output_tokens - len(new_ids)
        for j, tok in enumerate(new_ids):
            ends_request = req.is_finished and j == len(new_ids) - 1 and req.finish_reason in ("eos", "stop")
            if ends_request:
                break  # the stop / eos token itself has no text in the output
            text, hit = stream.push(tok, check_stops=base + j + 1 > p.min_new_tokens)
            parts.append(text)
            if hit is not None:
                return "".join(parts), hit
        if req.is_finished:
            parts.append(stream.flush())
        return "".join(parts), None

    def _output(self, req: Request, new_ids, text, finished, finish_reason, stop_reason, now,
                error: str | None = None) -> RequestOutput:
        logprobs = None
        if req.new_logprobs is not None:
            logprobs, req.new_logprobs = req.new_logprobs, []
        prompt_logprobs = None
        if req.prompt_logprobs is not None and not req.needs_prompt_logprobs:
            prompt_logprobs, req.prompt_logprobs = req.prompt_logprobs, None  # first output only
        if finished:
            self.streams.pop(req.key, None)
        return RequestOutput(
            request_id=req.request_id, new_token_ids=list(new_ids), new_text=text, logprobs=logprobs,
            finished=finished, finish_reason=finish_reason if finished else None,
            stop_reason=stop_reason if finished else None, prompt_tokens=req.num_prompt_tokens,
            completion_tokens=req.num_output_tokens, prompt_logprobs=prompt_logprobs,
            error=error if error is not None else req.error, metrics=req.metrics(finished, now), index=req.index,
            cumulative_logprob=req.cumulative_logprob,
        )

    def final_output(self, req: Request) -> RequestOutput:
        """The closing record of a request finished outside a step's update (abort, error)."""
        new_ids = req.token_ids[req.num_prompt_tokens + req.num_reported_tokens :]
        req.num_reported_tokens += len(new_ids)
        stream = self.streams.get(req.key)
        text = ""
        if stream is not None and req.finish_reason != "cancelled":
            text = "".join(stream.push(t, check_stops=False)[0] for t in new_ids) + stream.flush()
        return self._output(req, new_ids, text, True, req.finish_reason, req.stop_reason, time.perf_counter())
