"""What the engine hands back: per-step deltas of a request, and engine-wide counters."""

from __future__ import annotations

from dataclasses import dataclass, field

# finish_reason values
LENGTH, STOP, EOS, CANCELLED, ERROR = "length", "stop", "eos", "cancelled", "error"


@dataclass(slots=True)
class TokenLogprob:
    """``logprob`` of ``token_id`` under the model's raw distribution, and the ``top`` k alternatives
    as (token_id, logprob), most likely first (they may include ``token_id``)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass(slots=True)
class RequestMetrics:
    """Timings of one request, in seconds. ``arrival_time`` is wall-clock (``time.time()``); the rest
    are durations: ``queue_time`` arrival -> first scheduled, ``first_token_time`` arrival -> first token
    (TTFT), ``inter_token_latencies`` the gaps between successive tokens, ``e2e_latency`` arrival ->
    finish. Non-final outputs carry what is known so far with an empty ``inter_token_latencies``; the
    final output carries all of it."""

    arrival_time: float
    queue_time: float | None = None
    first_token_time: float | None = None
    inter_token_latencies: list[float] = field(default_factory=list)
    e2e_latency: float | None = None
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    num_preemptions: int = 0
    prefill_time: float | None = None  # first scheduled -> first token (final outputs)
    decode_time: float | None = None  # first token -> last token (final outputs)


@dataclass(slots=True)
class RequestOutput:
    """One delta of a request: the tokens and text produced since the previous output.

    ``finished`` outputs carry ``finish_reason`` (length | stop | eos | cancelled | error) and, for
    "stop", ``stop_reason`` (the matched stop string, or the stop token id); "eos" is one of the
    tokenizer's end-of-turn ids. The finishing stop/eos token is in ``new_token_ids`` but its text is
    not in ``new_text``; a matched stop string is cut from the text (with anything after it) while the
    token that completed it stays in ``new_token_ids``. ``prompt_logprobs`` (first output only) has one
    entry per prompt token after the first. ``LLMEngine.generate`` returns one merged output per request
    (all tokens, all text).

    A request with ``n`` > 1 yields the outputs of its n sibling sequences under its one
    ``request_id``, told apart by ``index`` (0 .. n-1); each sibling has its own ``finished`` output, and
    the request is done when all n are. ``prompt_tokens`` is the whole prompt on every sibling (usage
    counts it once per request). With ``best_of`` there are best_of siblings, each output carrying its
    ``cumulative_logprob`` so far.
    """

    request_id: str
    new_token_ids: list[int]
    new_text: str
    logprobs: list[TokenLogprob] | None
    finished: bool
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_logprobs: list[TokenLogprob] | None = None
    error: str | None = None
    metrics: RequestMetrics | None = None
    index: int = 0
    cumulative_logprob: float | None = None  # with SamplingParams.best_of > n: sum of chosen-token logprobs


@dataclass
class EngineStats:
    """A snapshot of the engine's state and cumulative counters.

    ``prefix_cache_hit_tokens`` / ``prefix_cache_queried_tokens``: prompt tokens served from / looked up
    in the prefix cache; ``num_computed_prompt_tokens``: prefill tokens actually run through the model
    (recomputation after preemption included). ``schedule_time_s`` / ``execute_time_s`` /
    ``update_time_s``: time spent in the scheduler, the model runner (input building + forward +
    sampling, up to the sampled ids on the host) and update + output processing, summed over
    ``num_steps`` steps; ``prepare_time_s`` is the runner's host-side input building within execute.
    """

    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_free_blocks: int
    num_total_blocks: int
    prefix_cache_hit_tokens: int = 0
    prefix_cache_queried_tokens: int = 0
    num_computed_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    num_preemptions: int = 0
    num_steps: int = 0
    schedule_time_s: float = 0.0
    execute_time_s: float = 0.0
    update_time_s: float = 0.0
    prepare_time_s: float = 0.0
    block_size: int = 16
    max_model_len: int = 0
    # Tokens scheduled per step, as a cumulative histogram: counts of steps with <= each bound of
    # ITERATION_TOKENS_BUCKETS (vLLM's iteration_tokens_total), their sum and number.
    iteration_tokens_buckets: tuple[int, ...] = ()
    iteration_tokens_sum: int = 0
    enable_prefix_caching: bool = True


# Upper bounds of the tokens-per-step histogram (vLLM's layout; +Inf is implied).
ITERATION_TOKENS_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
