"""The InternLM2 inference engine: continuous batching over a paged KV cache (serving and RLHF rollouts).

The iteration-level contract (STYLE 8), one ``LLMEngine.step()``:

    Scheduler.schedule()          -> SchedulerOutput: (request, num_new_tokens) pairs for this step
    ModelRunner.execute(out)      -> one forward over the flattened batch, logits for sampled rows only,
                                     sampling on the device -> a token per request that finished its tokens
    Scheduler.update_from_output  -> progress, token-level stops (eos / stop ids / length), free blocks
    OutputProcessor.process       -> detokenize, stop strings (may finish more), RequestOutput deltas

Every request is "tokens [num_computed, num_tokens) still to run"; prefill, chunked prefill, decode and
recompute-after-preemption are the same move, so the policies plug in as collaborators:

    block_manager  BlockPool (ref-counted blocks, LRU free queue) + BlockManager (hash-chained full-block
                   prefix cache: hash(parent, block tokens); hits skip their prefill)
    scheduler      FCFS with running requests first: decodes always get their token, prefill is chunked
                   to max_num_batched_tokens, Preemption (recompute) when blocks run out, bounded queue
                   (EngineOverloadedError)
    kv_cache       the pool's tensors, sized from num_gpu_blocks | kv_cache_bytes | a fraction of free
                   CUDA memory after a profiled step | a CPU default
    paged_attention the model's attention backend over the pool (decode: Triton kernel on CUDA /
                   gather+SDPA reference; prefill: SDPA over the chunk and its gathered context)
    triton_decode  the paged flash-decoding kernel (split-K, GQA heads per program)
    runner         input building, forward, CUDA graphs for decode batch sizes, prompt logprobs
    sampler        penalties, min-tokens stop masking, temperature/top-k/top-p/min-p, per-request seeds
                   (exponential race on counter-based noise hash(key, step, v): one vectorised int64 draw
                   per batch, batch- and preemption-invariant), logprobs with alternatives
    output_processor  text: incremental detokenization, stop strings across tokens with hold-back
    request        per-request state and token-level stopping; outputs / params / errors: the API types
    engine         LLMEngine (synchronous core)
    async_engine   AsyncLLMEngine: a background thread runs steps; per-request asyncio queues

Layering (STYLE 7): the scheduler sees ids, counts and blocks; the runner tensors; only the output
processor sees text. Failures never crash the engine: a step that raises fails its requests with
finish_reason "error"; running out of KV blocks preempts; a full queue refuses new requests.
"""

from .async_engine import AsyncLLMEngine
from .engine import LLMEngine, merge_outputs
from .errors import EngineClosedError, EngineOverloadedError, InvalidRequestError
from .outputs import EngineStats, RequestMetrics, RequestOutput, TokenLogprob
from .params import MAX_LOGPROBS, EngineConfig, SamplingParams, StructuredOutput

__all__ = [
    "MAX_LOGPROBS",
    "AsyncLLMEngine",
    "EngineClosedError",
    "EngineConfig",
    "EngineOverloadedError",
    "EngineStats",
    "InvalidRequestError",
    "LLMEngine",
    "RequestMetrics",
    "RequestOutput",
    "SamplingParams",
    "StructuredOutput",
    "TokenLogprob",
    "merge_outputs",
]
