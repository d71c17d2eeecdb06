"""Engine RequestOutputs -> InferenceService messages.

``Completion`` follows one request: each engine delta becomes a ``GenerateDelta`` tagged with its
sibling ``index``; at the end it builds the ``GenerateFinal`` (or the whole ``GenerateResponse``) with
one ``GenerateChoice`` per sibling (raw text with special tokens kept, tool calls parsed out of it),
the top-level fields repeating choice 0, and usage counting the prompt once.
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


class _Choice:
    """The output of one sibling sequence so far."""

    def __init__(self, index: int):
        self.index = index
        self.token_ids: list[int] = []
        self.text: list[str] = []
        self.logprobs: list[common_pb2.TokenLogprob] = []
        self.last = None  # the final engine output once finished

    def ending(self, tok, parse_tools: bool, with_output: bool) -> inference_pb2.GenerateChoice:
        """This sibling's GenerateChoice; ``with_output`` False leaves text, ids and logprobs to the
        stream's deltas."""
        out = self.last
        raw_text = tok.decode(self.token_ids, skip_special_tokens=False)
        if parse_tools:
            from internlm2.core.tokenizer import parse_tool_calls

            content, calls = parse_tool_calls(raw_text)
        else:
            content, calls = "".join(self.text), []
        reason = FINISH_REASONS.get(out.finish_reason, inference_pb2.FINISH_REASON_CANCELLED) if out else (
            inference_pb2.FINISH_REASON_CANCELLED
        )
        choice = inference_pb2.GenerateChoice(
            index=self.index,
            finish_reason=reason,
            stop_reason="" if out is None or out.stop_reason is None else str(out.stop_reason),
            tool_calls=tool_calls_to_proto(calls),
            raw_text=raw_text,
            content=content,
            completion_tokens=len(self.token_ids) if out is None else out.completion_tokens or len(self.token_ids),
        )
        if with_output:
            choice.text = "".join(self.text)
            choice.token_ids.extend(self.token_ids)
            choice.logprobs.extend(self.logprobs)
        return choice


def _cumulative(choice: _Choice) -> float:
    out = choice.last
    value = out.cumulative_logprob if out is not None else None
    return float("-inf") if value is None else value


class Completion:
    """The output of one request (its ``n`` sibling sequences) so far."""

    def __init__(self, tokenizer, request_id: str, prompt_ids: list[int], parse_tools: bool = True, n: int = 1,
                 keep: int | None = None):
        self.tok = tokenizer
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.parse_tools = parse_tools
        self.n = n  # validated by the engine before the first delta; choices are made as they come
        self.keep = n if keep is None else keep  # best_of: the n (of best_of) with the highest cumulative logprob
        self.choices: dict[int, _Choice] = {}
        self.prompt_logprobs: list[common_pb2.TokenLogprob] = []
        self.metrics = None  # sibling 0's engine timings, once finished
        self.num_cached_tokens = 0

    @property
    def finished(self) -> bool:
        return len(self.choices) == self.n and all(c.last is not None for c in self.choices.values())

    def add(self, out) -> inference_pb2.GenerateDelta | None:
        """Take one engine delta; returns the proto delta, or None when it carries nothing new."""
        choice = self.choices.get(out.index) or self.choices.setdefault(out.index, _Choice(out.index))
        delta = inference_pb2.GenerateDelta(text=out.new_text, token_ids=out.new_token_ids, index=out.index)
        if out.logprobs:
            entries = [logprob_to_proto(e, self.tok) for e in out.logprobs]
            delta.logprobs.extend(entries)
            choice.logprobs.extend(entries)
        if out.prompt_logprobs is not None and not self.prompt_logprobs:
            # The engine has one entry per prompt token after the first; the proto has one per
            # prompt token, the first without a logprob.
            first = common_pb2.TokenLogprob(
                token_id=self.prompt_ids[0], logprob=0.0, token=self.tok.id_to_piece(self.prompt_ids[0])
            )
            entries = [first, *(logprob_to_proto(e, self.tok) for e in out.prompt_logprobs)]
            delta.prompt_logprobs.extend(entries)
            self.prompt_logprobs.extend(entries)
        choice.token_ids.extend(out.new_token_ids)
        choice.text.append(out.new_text)
        if out.metrics is not None and out.metrics.num_cached_tokens and out.index == 0:
            self.num_cached_tokens = out.metrics.num_cached_tokens
        if out.finished:
            choice.last = out
            if out.index == 0:
                self.metrics = out.metrics
        if not (out.new_text or out.new_token_ids or delta.logprobs or delta.prompt_logprobs):
            return None
        return delta

    # ---- the end -----------------------------------------------------------------------------------
    def _summary(self, with_output: bool) -> tuple[dict, list[inference_pb2.GenerateChoice]]:
        mine = [self.choices.get(i) or _Choice(i) for i in range(max(1, self.n))]
        choices = [c.ending(self.tok, self.parse_tools, with_output) for c in mine]
        prompt_tokens = next((c.last.prompt_tokens for c in mine if c.last and c.last.prompt_tokens),
                             len(self.prompt_ids))
        completion_tokens = sum(c.completion_tokens for c in choices)  # best_of: every generated token
        if self.keep < len(choices):
            order = sorted(range(len(mine)), key=lambda i: -_cumulative(mine[i]))[: self.keep]
            choices = [choices[i] for i in order]
            for index, choice in enumerate(choices):
                choice.index = index
        usage = common_pb2.Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
            cached_prompt_tokens=self.num_cached_tokens,
        )
        first = choices[0]
        return {
            "finish_reason": first.finish_reason,
            "stop_reason": first.stop_reason,
            "usage": usage,
            "tool_calls": first.tool_calls,
            "raw_text": first.raw_text,
            "content": first.content,
            "metrics": metrics_to_proto(self.metrics),
            "choices": choices,
        }, choices

    def final(self) -> inference_pb2.GenerateFinal:
        summary, _ = self._summary(with_output=False)
        return inference_pb2.GenerateFinal(**summary)

    def response(self) -> inference_pb2.GenerateResponse:
        summary, choices = self._summary(with_output=True)
        first = choices[0]
        return inference_pb2.GenerateResponse(
            request_id=self.request_id,
            text=first.text,
            token_ids=first.token_ids,
            logprobs=first.logprobs,
            prompt_logprobs=self.prompt_logprobs,
            **summary,
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
