"""The state of one request as the scheduler and block manager see it: token ids, KV blocks, progress.

No text here (STYLE 7): the scheduler sees request ids, token counts and blocks; text and stop strings
live in ``output_processor``. Token-level stopping (stop ids, eos, length) is decided here because it
needs only ids.

Progress is one number, ``num_computed_tokens``: how many of ``token_ids`` (prompt + output) have their
KV in the cache. A step runs tokens ``[num_computed_tokens, num_computed_tokens + n)``; when that reaches
``num_tokens`` the step's last logits sample the next token. Prefill, chunked prefill, decode and
recompute-after-preemption are all this same move.
"""

from __future__ import annotations

import enum
import time

from .outputs import EOS, LENGTH, STOP, RequestMetrics, TokenLogprob
from .params import SamplingParams

_ROOT_HASH = 0x2545F4914F6CDD1D  # parent of a sequence's first block


class RequestStatus(enum.Enum):
    WAITING = 0  # queued, or preempted and waiting to be recomputed
    RUNNING = 1
    FINISHED = 2


class Request:
    __slots__ = (
        "arrival",
        "arrival_wall",
        "block_hashes",
        "block_ids",
        "blocks",
        "cumulative_logprob",
        "eos_token_ids",
        "error",
        "finish_reason",
        "first_scheduled",
        "first_token",
        "index",
        "inter_token_latencies",
        "last_token",
        "leader",
        "new_logprobs",
        "noise_key",
        "num_cached_blocks",
        "num_cached_tokens",
        "num_computed_tokens",
        "num_preemptions",
        "num_prompt_tokens",
        "num_reported_tokens",
        "params",
        "prompt_logprobs",
        "request_id",
        "status",
        "stop_reason",
        "stop_token_ids",
        "structured",
        "token_ids",
    )

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        eos_token_ids: frozenset[int],
        noise_key: int = 0,
        index: int = 0,
        leader: Request | None = None,
    ):
        self.request_id = request_id
        # Sibling ``index`` of an n > 1 request; siblings after the first wait for the ``leader`` (index
        # 0) to compute the prompt, then start from its cached blocks (``Scheduler.schedule``).
        self.index = index
        self.leader = leader
        # The grammar matcher of a constrained request (``structured.GrammarMatcher``), else None.
        self.structured = None
        self.params = params
        self.token_ids: list[int] = list(prompt_token_ids)  # prompt, then output as it grows
        self.num_prompt_tokens = len(self.token_ids)
        self.num_computed_tokens = 0
        # KV blocks (owned through the BlockManager); block_ids mirrors blocks for the runner.
        self.blocks: list = []
        self.block_ids: list[int] = []
        self.block_hashes: list[int] = []  # chained hashes of the full blocks of token_ids, grown lazily
        self.num_cached_blocks = 0  # leading blocks already registered in the prefix cache
        self.num_cached_tokens = 0  # prompt tokens served by the prefix cache at admission
        self.status = RequestStatus.WAITING
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.error: str | None = None
        self.eos_token_ids = frozenset() if params.ignore_eos else eos_token_ids
        self.stop_token_ids = frozenset(params.stop_token_ids or ())
        # int64 key of the request's sampling noise (sampler.noise_key / engine_noise_key): with the output
        # count it fixes every draw, so the tokens do not depend on the batch or on preemption.
        self.noise_key = noise_key
        self.new_logprobs: list[TokenLogprob] | None = [] if params.logprobs is not None else None
        self.cumulative_logprob: float | None = 0.0 if params.wants_cumulative_logprob else None
        # Prompt logprobs are the same for every sibling: only the first computes and reports them.
        self.prompt_logprobs: list[TokenLogprob] | None = (
            [] if params.prompt_logprobs is not None and index == 0 else None
        )
        self.num_reported_tokens = 0  # output tokens already handed out in a RequestOutput
        self.num_preemptions = 0
        self.arrival = time.perf_counter()
        self.arrival_wall = time.time()
        self.first_scheduled: float | None = None
        self.first_token: float | None = None
        self.last_token: float | None = None
        self.inter_token_latencies: list[float] = []

    @property
    def key(self) -> tuple[str, int]:
        """Unique among live sequences: the request id and the sibling index."""
        return self.request_id, self.index

    @property
    def waits_for_leader(self) -> bool:
        """A sibling not yet started while its leader still computes the shared prompt."""
        leader = self.leader
        return (leader is not None and self.first_scheduled is None and not leader.is_finished
                and leader.num_computed_tokens < leader.num_prompt_tokens)

    # ---- sizes ----------------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Prompt logprobs asked for and not all collected (they need every prompt position's logits)."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < self.num_prompt_tokens - 1

    @property
    def stops_suppressed(self) -> bool:
        """While fewer than min_new_tokens tokens exist, the next one may not be a stop."""
        return self.num_output_tokens < self.params.min_new_tokens

    # ---- prefix-cache keys -----------------------------------------------------------------------
    def block_hash(self, index: int, block_size: int) -> int:
        """hash(parent block's hash, this block's tokens) of full block ``index`` (vLLM's chain).

        Python's hash of a tuple of ints is deterministic across processes (PYTHONHASHSEED only salts
        str/bytes); equal chains mean equal token prefixes up to a 2**-64 collision chance.
        """
        hashes = self.block_hashes
        while len(hashes) <= index:
            i = len(hashes)
            parent = hashes[i - 1] if i else _ROOT_HASH
            hashes.append(hash((parent, tuple(self.token_ids[i * block_size : (i + 1) * block_size]))))
        return hashes[index]

    # ---- progress ------------------------------------------------------------------------------
    def append_token(self, token_id: int, now: float) -> None:
        self.token_ids.append(token_id)
        if self.first_token is None:
            self.first_token = now
        else:
            self.inter_token_latencies.append(now - self.last_token)
        self.last_token = now

    def check_stop(self, token_id: int, max_model_len: int) -> tuple[str, str | int | None] | None:
        """(finish_reason, stop_reason) if the just-appended ``token_id`` ends the request."""
        if self.num_output_tokens > self.params.min_new_tokens:
            if token_id in self.stop_token_ids:
                return STOP, token_id
            if token_id in self.eos_token_ids:
                return EOS, None
        if self.num_output_tokens >= self.params.max_new_tokens or self.num_tokens >= max_model_len:
            return LENGTH, None
        return None

    def reset_for_recompute(self) -> None:
        """Preempted: its blocks are gone, so everything (prompt and output so far) is recomputed."""
        self.num_computed_tokens = 0
        self.num_cached_blocks = 0
        self.num_preemptions += 1
        self.status = RequestStatus.WAITING

    def metrics(self, final: bool, now: float | None = None) -> RequestMetrics:
        m = RequestMetrics(arrival_time=self.arrival_wall)
        if self.first_scheduled is not None:
            m.queue_time = self.first_scheduled - self.arrival
        if self.first_token is not None:
            m.first_token_time = self.first_token - self.arrival
        m.num_cached_tokens = self.num_cached_tokens
        m.num_preemptions = self.num_preemptions
        if final:
            if self.first_token is not None and self.first_scheduled is not None:
                m.prefill_time = self.first_token - self.first_scheduled
                m.decode_time = self.last_token - self.first_token
            m.inter_token_latencies = list(self.inter_token_latencies)
            m.e2e_latency = (now if now is not None else time.perf_counter()) - self.arrival
        return m
