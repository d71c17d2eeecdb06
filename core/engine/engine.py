"""LLMEngine: the synchronous engine core. One ``step()`` = schedule -> execute -> update -> outputs.

Collaborators, each owning one concern:
    Scheduler        (+ BlockManager, Preemption)   request ids, token counts, KV blocks
    ModelRunner      (+ PagedAttention, Sampler)    tensors: one forward per step, sampling on device
    OutputProcessor                                 text: detokenization, stop strings, RequestOutputs
Not thread-safe: one thread drives it (``AsyncLLMEngine`` runs it on its own thread).
"""

from __future__ import annotations

import bisect
import itertools
import logging
import time
from collections.abc import Sequence

import torch

from ..config import ConfigError
from .block_manager import BlockManager
from .errors import DuplicateRequestError, InvalidRequestError
from .kv_cache import PagedKVCache, plan_num_blocks
from .output_processor import OutputProcessor
from .outputs import CANCELLED, ERROR, ITERATION_TOKENS_BUCKETS, EngineStats, RequestOutput
from .params import EngineConfig, SamplingParams
from .request import Request
from .runner import ModelRunner
from .sampler import Sampler, engine_noise_key, noise_key, sibling_key
from .scheduler import Scheduler
from .structured import StructuredOutputs

logger = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, model, tokenizer=None, config: EngineConfig | None = None):
        self.config = config = (config or EngineConfig()).validate()
        self.model = model.eval()
        self.tokenizer = tokenizer
        mc = model.config
        self.vocab_size = mc.vocab_size
        self.device = model.device
        dtype = model.dtype

        limit = config.max_model_len or mc.max_position_embeddings
        if not config.enable_chunked_prefill:  # every (re)computed sequence must fit one step's budget
            if config.max_model_len is not None and config.max_model_len > config.max_num_batched_tokens:
                raise ConfigError(
                    "max_model_len", f"{config.max_model_len} exceeds max_num_batched_tokens "
                    f"({config.max_num_batched_tokens}), which caps it with chunked prefill off",
                )
            limit = min(limit, config.max_num_batched_tokens)
        reserved = 0
        if self.device.type == "cuda" and config.num_gpu_blocks is None and config.kv_cache_bytes is None:
            reserved = self._profile(limit)
        num_blocks = plan_num_blocks(config, mc, dtype, self.device, limit, reserved)
        capacity = num_blocks * config.block_size
        if config.max_model_len is not None and config.max_model_len > capacity:
            raise ConfigError("max_model_len", f"{config.max_model_len} tokens exceed the KV pool ({capacity} tokens)")
        self.max_model_len = min(limit, capacity)

        self.kv_cache = PagedKVCache(mc, num_blocks, config.block_size, dtype, self.device)
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(config, self.block_manager, self.max_model_len)
        self.structured = StructuredOutputs(tokenizer, self.vocab_size)
        self.sampler = Sampler(self.device, self.structured)
        self.runner = ModelRunner(model, self.kv_cache, config, self.max_model_len, self.sampler)
        self.output_processor = OutputProcessor(tokenizer)
        if tokenizer is not None:
            self.eos_token_ids = frozenset(tokenizer.stop_token_ids)
        else:
            self.eos_token_ids = frozenset([mc.eos_token_id])
        self._pending: list[RequestOutput] = []  # final outputs of requests ended between steps
        self._times = {"schedule": 0.0, "execute": 0.0, "update": 0.0}
        self._num_steps = 0
        self._iteration_tokens = [0] * (len(ITERATION_TOKENS_BUCKETS) + 1)  # per bucket, last = above all
        self._iteration_tokens_sum = 0
        self._num_unseeded = 0  # requests added without a seed: the index of their noise key
        if self.device.type == "cuda" and not config.enforce_eager:
            self.runner.capture_graphs(config.graph_batch_sizes())

    def _profile(self, max_model_len: int) -> int:
        """Peak step memory, measured on a throwaway pool just big enough for one full step."""
        c = self.config
        tokens = min(c.max_num_batched_tokens, max_model_len)
        tmp = PagedKVCache(self.model.config, -(-tokens // c.block_size), c.block_size, self.model.dtype,
                           self.device)
        runner = ModelRunner(self.model, tmp, c, max_model_len, Sampler(self.device))
        peak = runner.profile_peak_bytes(tokens, c.max_num_seqs)
        del runner, tmp
        torch.cuda.empty_cache()
        return peak

    # ---- requests --------------------------------------------------------------------------------
    def validate_request(self, request_id: str, prompt_token_ids: Sequence[int], params: SamplingParams) -> list[int]:
        """Raise InvalidRequestError for anything this engine could never run; returns the prompt as a list."""
        if not isinstance(request_id, str) or not request_id:
            raise InvalidRequestError("request_id", "must be a non-empty string")
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError("params", f"must be SamplingParams, got {type(params).__name__}")
        params.validate()
        try:
            prompt = [int(t) for t in prompt_token_ids]
        except (TypeError, ValueError):
            raise InvalidRequestError("prompt_token_ids", "must be a sequence of integer token ids") from None
        if not prompt:
            raise InvalidRequestError("prompt", "is empty")
        bad = next((t for t in prompt if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise InvalidRequestError(
                "prompt_token_ids", f"token id {bad} is outside the vocabulary [0, {self.vocab_size})"
            )
        if len(prompt) >= self.max_model_len:
            raise InvalidRequestError(
                "prompt", f"{len(prompt)} tokens leave no room in the context of {self.max_model_len} tokens"
            )
        if len(prompt) + params.max_new_tokens > self.max_model_len:
            raise InvalidRequestError(
                "max_new_tokens",
                f"prompt ({len(prompt)}) + max_new_tokens ({params.max_new_tokens}) exceeds the context of "
                f"{self.max_model_len} tokens",
            )
        if params.stop_token_ids and any(t >= self.vocab_size for t in params.stop_token_ids):
            raise InvalidRequestError("stop_token_ids", f"ids must be below the vocabulary size {self.vocab_size}")
        if params.stop and self.tokenizer is None:
            raise InvalidRequestError("stop", "stop strings need an engine with a tokenizer")
        if params.structured_output is not None:
            self._validate_structured(params)
        return prompt

    def _validate_structured(self, params: SamplingParams) -> None:
        """A constrained request must be able to end, and its spec must compile (slow the first time for
        a spec: AsyncLLMEngine calls validate_request off its engine thread; the result is cached)."""
        if params.min_new_tokens:
            raise InvalidRequestError(
                "min_new_tokens", "cannot be combined with structured_output (the grammar decides where it ends)"
            )
        if not self._end_token_ids(params):
            raise InvalidRequestError(
                "structured_output", "needs an end token: ignore_eos or empty stop_token_ids leave none"
            )
        self.structured.compile(params.structured_output)

    def _end_token_ids(self, params: SamplingParams) -> frozenset[int]:
        eos = frozenset() if params.ignore_eos else self.eos_token_ids
        return eos | frozenset(params.stop_token_ids or ())

    def add_request(self, request_id: str, prompt_token_ids: Sequence[int],
                    params: SamplingParams | None = None) -> None:
        """Queue a request. Raises InvalidRequestError (bad request; DuplicateRequestError for a live id)
        or EngineOverloadedError."""
        params = params if params is not None else SamplingParams()
        self.add_validated_request(request_id, self.validate_request(request_id, prompt_token_ids, params), params)

    def add_validated_request(self, request_id: str, prompt: list[int], params: SamplingParams) -> None:
        """``add_request`` for a prompt ``validate_request`` already returned (AsyncLLMEngine validates on
        the caller's side, so the rules run once per request)."""
        if request_id in self.scheduler.groups:
            raise DuplicateRequestError(request_id)
        if params.seed is not None:
            key = noise_key(params.seed)
        else:  # the engine's own stream: reproducible given config.seed and arrival order
            key = engine_noise_key(self.config.seed, self._num_unseeded)
            self._num_unseeded += 1
        leader = Request(request_id, prompt, params, self.eos_token_ids, key)
        siblings = [leader] + [
            Request(request_id, prompt, params, self.eos_token_ids, sibling_key(key, i), index=i, leader=leader)
            for i in range(1, params.num_sequences)
        ]
        if params.structured_output is not None:
            for req in siblings:  # compiled already (validate_request): a cache hit
                req.structured = self.structured.matcher(params.structured_output, self._end_token_ids(params))
        self.scheduler.add_request(siblings)  # may raise EngineOverloadedError
        for req in siblings:
            self.output_processor.add(req)

    def abort(self, request_id: str) -> bool:
        """Cancel a request (all its siblings) now, freeing their blocks at once; the next ``step()``
        returns their final outputs with finish_reason "cancelled". False if it is unknown or finished."""
        group = self.scheduler.groups.get(request_id)
        if group is None:
            return False
        for req in group:
            if not req.is_finished:
                self.scheduler.finish_request(req, CANCELLED)
                self._pending.append(self.output_processor.final_output(req))
        return True

    def reset_prefix_cache(self) -> int:
        """Forget every cached prefix block (call after updating the model's weights in place: cached KV
        was computed with the old ones). Returns the number of blocks dropped from the cache."""
        return self.block_manager.reset_prefix_cache(self.scheduler.running)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._pending)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    # ---- the step ---------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        outputs, self._pending = self._pending, []
        t0 = time.perf_counter()
        sched = self.scheduler.schedule()
        t1 = time.perf_counter()
        if sched.is_empty:
            self._times["schedule"] += t1 - t0
            return outputs
        self._iteration_tokens[bisect.bisect_left(ITERATION_TOKENS_BUCKETS, sched.total_tokens)] += 1
        self._iteration_tokens_sum += sched.total_tokens
        try:
            sampled = self.runner.execute(sched)
        except Exception as exc:  # a failed step must not take the engine down with it
            logger.exception("engine step failed; failing its %d requests", len(sched.requests))
            return outputs + self._fail(sched.requests, f"{type(exc).__name__}: {exc}")
        t2 = time.perf_counter()
        updated = self.scheduler.update_from_output(sched, sampled)
        step_outputs, stopped = self.output_processor.process(updated)
        for req, stop in stopped:
            self.scheduler.finish_request(req, "stop", stop)
        t3 = time.perf_counter()
        self._times["schedule"] += t1 - t0
        self._times["execute"] += t2 - t1
        self._times["update"] += t3 - t2
        self._num_steps += 1
        return outputs + step_outputs

    def _fail(self, requests: list[Request], message: str, reason: str = ERROR) -> list[RequestOutput]:
        out = []
        for req in requests:
            if not req.is_finished:
                self.scheduler.finish_request(req, reason, error=message)
                out.append(self.output_processor.final_output(req))
        return out

    def fail_all(self, message: str, reason: str = ERROR) -> list[RequestOutput]:
        """Finish every request now (the engine is shutting down or broken); returns their final outputs."""
        outputs, self._pending = self._pending, []
        return outputs + self._fail(list(self.scheduler.requests.values()), message, reason)

    # ---- convenience ------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams] | None = None,
                 request_id_prefix: str = "gen") -> list[RequestOutput]:
        """Run ``prompts`` to completion (blocking); one merged RequestOutput per prompt and sibling (n),
        prompt-major, in order."""
        params_list = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise InvalidRequestError("params", f"{len(params_list)} params for {len(prompts)} prompts")
        ids = [f"{request_id_prefix}-{i}-{time.monotonic_ns()}" for i in range(len(prompts))]
        for rid, prompt, p in zip(ids, prompts, params_list):
            self.add_request(rid, prompt, p)
        keys = [(rid, i) for rid, p in zip(ids, params_list) for i in range(p.num_sequences if p is not None else 1)]
        merged: dict[tuple[str, int], RequestOutput] = {}
        remaining = set(keys)
        while remaining:
            for out in self.step():
                key = (out.request_id, out.index)
                if key in remaining:
                    merged[key] = merge_outputs(merged.get(key), out)
                    if out.finished:
                        remaining.discard(key)
        return [merged[key] for key in keys]

    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_cache_usage=bm.usage,
            num_free_blocks=bm.num_free_blocks,
            num_total_blocks=bm.num_total_blocks,
            prefix_cache_hit_tokens=bm.prefix_hit_tokens,
            prefix_cache_queried_tokens=bm.prefix_queried_tokens,
            num_computed_prompt_tokens=self.scheduler.num_computed_prompt_tokens,
            num_generated_tokens=self.scheduler.num_generated_tokens,
            num_preemptions=self.scheduler.preemption.count,
            num_steps=self._num_steps,
            schedule_time_s=self._times["schedule"],
            execute_time_s=self._times["execute"],
            update_time_s=self._times["update"],
            prepare_time_s=self.runner.prepare_time,
            block_size=self.config.block_size,
            max_model_len=self.max_model_len,
            iteration_tokens_buckets=tuple(itertools.accumulate(self._iteration_tokens)),
            iteration_tokens_sum=self._iteration_tokens_sum,
            enable_prefix_caching=self.config.enable_prefix_caching,
        )


def merge_outputs(acc: RequestOutput | None, delta: RequestOutput) -> RequestOutput:
    """Fold a delta into the running total of a request (tokens, text, logprobs appended)."""
    if acc is None:
        return RequestOutput(
            request_id=delta.request_id, new_token_ids=list(delta.new_token_ids), new_text=delta.new_text,
            logprobs=list(delta.logprobs) if delta.logprobs is not None else None, finished=delta.finished,
            finish_reason=delta.finish_reason, stop_reason=delta.stop_reason, prompt_tokens=delta.prompt_tokens,
            completion_tokens=delta.completion_tokens, prompt_logprobs=delta.prompt_logprobs, error=delta.error,
            metrics=delta.metrics, index=delta.index, cumulative_logprob=delta.cumulative_logprob,
        )
    acc.new_token_ids.extend(delta.new_token_ids)
    acc.new_text += delta.new_text
    if delta.logprobs is not None:
        acc.logprobs = (acc.logprobs or []) + delta.logprobs
    if delta.prompt_logprobs is not None:
        acc.prompt_logprobs = delta.prompt_logprobs
    acc.finished = delta.finished
    acc.finish_reason = delta.finish_reason
    acc.stop_reason = delta.stop_reason
    acc.completion_tokens = delta.completion_tokens
    acc.error = delta.error
    acc.metrics = delta.metrics
    acc.cumulative_logprob = delta.cumulative_logprob
    return acc
