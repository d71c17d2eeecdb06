"""Engine RequestOutputs -> InferenceService messages.

``Completion`` follows one request: each engine delta becomes a ``GenerateDelta``; at the end it
builds the ``GenerateFinal`` (or the whole ``GenerateResponse``) with usage, timings, the raw text
(special tokens kept) and the tool calls parsed out of it.
"""

from __future__ import annotations

from internlm2.v1 import common_pb2, inference_pb2

from ..common.chat import tool_calls_to_proto

FINISH_REASONS = {
    "length": inference_pb2.FINISH_REASON_LENGTH,
    "stop": inference_pb2.FINISH_REASON_STOP,
    "eos": inference_pb2.FINISH_REASON_EOS,
    "cancelled": inference_pb2.FINISH_REASON_CANCELLED,
    "error": inference_pb2.FINISH_REASON_ERROR,
}


def logprob_to_proto(entry, tokenizer) -> common_pb2.TokenLogprob:
    return common_pb2.TokenLogprob(
        token_id=entry.token_id,
        logprob=entry.logprob,
        token=tokenizer.id_to_piece(entry.token_id),
        top=[common_pb2.TopLogprob(token_id=i, logprob=lp, token=tokenizer.id_to_piece(i)) for i, lp in entry.top],
    )


class Completion:
    """The output of one request so far."""

    def __init__(self, tokenizer, request_id: str, prompt_ids: list[int], parse_tools: bool = True):
        self.tok = tokenizer
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.parse_tools = parse_tools
        self.token_ids: list[int] = []
        self.text: list[str] = []
        self.logprobs: list[common_pb2.TokenLogprob] = []
        self.prompt_logprobs: list[common_pb2.TokenLogprob] = []
        self.last = None  # the final engine output once finished

    @property
    def finished(self) -> bool:
        return self.last is not None

    def add(self, out) -> inference_pb2.GenerateDelta | None:
        """Take one engine delta; returns the proto delta, or None when it carries nothing new."""
        delta = inference_pb2.GenerateDelta(text=out.new_text, token_ids=out.new_token_ids)
        if out.logprobs:
            entries = [logprob_to_proto(e, self.tok) for e in out.logprobs]
            delta.logprobs.extend(entries)
            self.logprobs.extend(entries)
        if out.prompt_logprobs is not None and not self.prompt_logprobs:
            # The engine has one entry per prompt token after the first; the proto has one per
            # prompt token, the first without a logprob.
            first = common_pb2.TokenLogprob(
                token_id=self.prompt_ids[0], logprob=0.0, token=self.tok.id_to_piece(self.prompt_ids[0])
            )
            entries = [first, *(logprob_to_proto(e, self.tok) for e in out.prompt_logprobs)]
            delta.prompt_logprobs.extend(entries)
            self.prompt_logprobs.extend(entries)
        self.token_ids.extend(out.new_token_ids)
        self.text.append(out.new_text)
        if out.finished:
            self.last = out
        if not (out.new_text or out.new_token_ids or delta.logprobs or delta.prompt_logprobs):
            return None
        return delta

    # ---- the end -----------------------------------------------------------------------------------
    def _summary(self) -> dict:
        out = self.last
        raw_text = self.tok.decode(self.token_ids, skip_special_tokens=False)
        if self.parse_tools:
            from internlm2.core.tokenizer import parse_tool_calls

            content, calls = parse_tool_calls(raw_text)
        else:
            content, calls = "".join(self.text), []
        metrics = out.metrics if out is not None else None
        prompt_tokens = out.prompt_tokens if out is not None and out.prompt_tokens else len(self.prompt_ids)
        completion_tokens = out.completion_tokens if out is not None and out.completion_tokens else len(self.token_ids)
        usage = common_pb2.Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
            cached_prompt_tokens=getattr(metrics, "num_cached_tokens", 0) or 0,
        )
        reason = (
            FINISH_REASONS.get(out.finish_reason, inference_pb2.FINISH_REASON_CANCELLED)
            if out
            else inference_pb2.FINISH_REASON_CANCELLED
        )
        stop_reason = "" if out is None or out.stop_reason is None else str(out.stop_reason)
        return {
            "finish_reason": reason,
            "stop_reason": stop_reason,
            "usage": usage,
            "tool_calls": tool_calls_to_proto(calls),
            "raw_text": raw_text,
            "content": content,
            "metrics": metrics_to_proto(metrics),
        }

    def final(self) -> inference_pb2.GenerateFinal:
        return inference_pb2.GenerateFinal(**self._summary())

    def response(self) -> inference_pb2.GenerateResponse:
        return inference_pb2.GenerateResponse(
            request_id=self.request_id,
            text="".join(self.text),
            token_ids=self.token_ids,
            logprobs=self.logprobs,
            prompt_logprobs=self.prompt_logprobs,
            **self._summary(),
        )


def metrics_to_proto(metrics) -> inference_pb2.RequestMetrics:
    if metrics is None:
        return inference_pb2.RequestMetrics()
    gaps = list(metrics.inter_token_latencies or ())
    return inference_pb2.RequestMetrics(
        queue_time_s=metrics.queue_time or 0.0,
        time_to_first_token_s=metrics.first_token_time or 0.0,
        mean_inter_token_latency_s=sum(gaps) / len(gaps) if gaps else 0.0,
        e2e_latency_s=metrics.e2e_latency or 0.0,
    )
