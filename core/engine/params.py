"""What a request asks for (SamplingParams) and how the engine is sized (EngineConfig).

Both validate once, at the edge, and every error names its field: ``SamplingParams.validate()`` raises
``InvalidRequestError`` (a client mistake), ``EngineConfig.validate()`` raises ``ConfigError`` (an
operator mistake). Checks that need the model (vocabulary, context length) happen in
``LLMEngine.add_request``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import ConfigError
from .errors import InvalidRequestError

MAX_LOGPROBS = 20  # alternatives per token, as OpenAI and vLLM cap them
# Stop strings are matched (and their prefixes held back) on the engine thread after every token of
# the request, at a cost that grows with their number times their length: bound both so one request
# cannot slow every other request's steps.
MAX_STOP_STRINGS = 32
MAX_STOP_STRING_CHARS = 256
# Sibling completions per request: each is a sequence in the batch and a slot in the queue.
MAX_N = 64
# A schema / regex / grammar is compiled on a worker thread and cached; bound its text so one request
# cannot pin a huge compile (and its cache entry).
MAX_STRUCTURED_OUTPUT_CHARS = 64 * 1024


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(frozen=True)
class StructuredOutput:
    """What a constrained request's output must be: exactly one of a JSON schema (JSON text), a regular
    expression, a Lark grammar, or ``json_object`` (any JSON object). Frozen and hashable: the compiled
    grammar cache is keyed by it. ``kind`` / ``spec`` name the one that is set."""

    json_schema: str | None = None
    regex: str | None = None
    grammar: str | None = None
    json_object: bool = False

    @property
    def kind(self) -> str:
        set_ = [name for name in ("json_schema", "regex", "grammar") if getattr(self, name) is not None]
        if self.json_object:
            set_.append("json_object")
        if len(set_) != 1:
            raise InvalidRequestError(
                "structured_output", f"set exactly one of json_schema, regex, grammar, json_object (got {set_})"
            )
        return set_[0]

    @property
    def spec(self) -> str | bool:
        return getattr(self, self.kind)

    def validate(self) -> StructuredOutput:
        """Shape checks only; whether the schema / regex / grammar compiles is checked by the engine."""
        kind = self.kind
        field = f"structured_output.{kind}"
        if kind == "json_object":
            if self.json_object is not True:
                raise InvalidRequestError(field, f"must be true when set, got {self.json_object!r}")
            return self
        spec = self.spec
        if not isinstance(spec, str) or not spec.strip():
            raise InvalidRequestError(field, "must be a non-empty string")
        if len(spec) > MAX_STRUCTURED_OUTPUT_CHARS:
            raise InvalidRequestError(field, f"at most {MAX_STRUCTURED_OUTPUT_CHARS} characters, got {len(spec)}")
        return self


@dataclass
class SamplingParams:
    """Per-request decoding settings.

    temperature 0 is greedy. top_k 0 and top_p 1.0 and min_p 0.0 are off. Penalties follow vLLM:
    ``repetition_penalty`` (HF/CTRL: divide positive logits, multiply negative ones) over prompt and
    output tokens; ``presence_penalty`` / ``frequency_penalty`` (OpenAI) over output tokens only.
    ``seed`` makes sampling reproducible per request whatever else runs in the batch.
    ``stop`` strings (at most ``MAX_STOP_STRINGS``, each non-empty and at most ``MAX_STOP_STRING_CHARS``
    characters) end the output and are not part of it; ``stop_token_ids`` add to the tokenizer's
    end-of-turn ids (``</s>``, ``<|im_end|>``; None = only those); ``ignore_eos`` drops the latter.
    ``min_new_tokens`` masks every stop id and skips stop strings until that many tokens exist.
    ``logprobs=k``: the chosen token's logprob plus the k most likely alternatives (0 = chosen only);
    ``prompt_logprobs=k`` likewise for every prompt token after the first. Logprobs are those of the
    model's raw distribution (before temperature, penalties and truncation).
    ``n`` sibling completions share the prompt's KV blocks; sibling i > 0 samples with a key derived
    from the request's (``sampler.sibling_key``), so sibling 0 is the n = 1 completion.
    ``best_of`` (>= n) runs that many siblings and their outputs carry ``cumulative_logprob`` (sum of the
    chosen tokens' raw logprobs) so the caller can keep the n best (the service does).
    ``structured_output`` constrains every sampled token to keep the output a valid prefix of the
    schema / regex / grammar (``core.engine.structured``).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_new_tokens: int = 256
    min_new_tokens: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    n: int = 1
    structured_output: StructuredOutput | None = None
    best_of: int | None = None

    def __post_init__(self) -> None:
        # Accept the obvious spellings; anything else is left for validate() to name.
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        elif isinstance(self.stop, list):
            self.stop = tuple(self.stop)
        if isinstance(self.stop_token_ids, tuple):
            self.stop_token_ids = list(self.stop_token_ids)

    @property
    def num_sequences(self) -> int:
        """Sibling sequences the engine runs: best_of when set, else n."""
        return self.best_of if self.best_of is not None else self.n

    @property
    def wants_cumulative_logprob(self) -> bool:
        return self.best_of is not None and self.best_of > self.n

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def needs_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def validate(self) -> SamplingParams:
        """Raise ``InvalidRequestError(field, ...)`` on the first bad value; return self."""
        if not _is_number(self.temperature) or self.temperature < 0:
            raise InvalidRequestError("temperature", f"must be a finite number >= 0, got {self.temperature!r}")
        if not _is_number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise InvalidRequestError("top_k", f"must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not _is_number(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            raise InvalidRequestError("min_p", f"must be in [0, 1], got {self.min_p!r}")
        if not _is_number(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise InvalidRequestError(
                "repetition_penalty", f"must be a number > 0 (1 = off), got {self.repetition_penalty!r}"
            )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -2.0 <= value <= 2.0:
                raise InvalidRequestError(name, f"must be in [-2, 2], got {value!r}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**63):
            raise InvalidRequestError("seed", f"must be an integer in [0, 2**63), got {self.seed!r}")
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise InvalidRequestError("max_new_tokens", f"must be an integer >= 1, got {self.max_new_tokens!r}")
        if not _is_int(self.min_new_tokens) or not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise InvalidRequestError(
                "min_new_tokens", f"must be an integer in [0, max_new_tokens], got {self.min_new_tokens!r}"
            )
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) and s for s in self.stop):
            raise InvalidRequestError("stop", f"must be a list of non-empty strings, got {self.stop!r}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidRequestError("stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}")
        longest = max(self.stop, key=len, default="")
        if len(longest) > MAX_STOP_STRING_CHARS:
            raise InvalidRequestError(
                "stop", f"each stop string is at most {MAX_STOP_STRING_CHARS} characters, got {len(longest)}"
            )
        if self.stop_token_ids is not None and (
            not isinstance(self.stop_token_ids, list)
            or not all(_is_int(t) and t >= 0 for t in self.stop_token_ids)
        ):
            raise InvalidRequestError(
                "stop_token_ids", f"must be a list of token ids >= 0, got {self.stop_token_ids!r}"
            )
        for name in ("ignore_eos", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidRequestError(name, f"must be a bool, got {getattr(self, name)!r}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or not 0 <= value <= MAX_LOGPROBS):
                raise InvalidRequestError(name, f"must be an integer in [0, {MAX_LOGPROBS}], got {value!r}")
        if not _is_int(self.n) or not 1 <= self.n <= MAX_N:
            raise InvalidRequestError("n", f"must be an integer in [1, {MAX_N}], got {self.n!r}")
        if self.best_of is not None and (not _is_int(self.best_of) or not self.n <= self.best_of <= MAX_N):
            raise InvalidRequestError("best_of", f"must be an integer in [n, {MAX_N}], got {self.best_of!r}")
        if self.structured_output is not None:
            if not isinstance(self.structured_output, StructuredOutput):
                raise InvalidRequestError(
                    "structured_output", f"must be a StructuredOutput, got {type(self.structured_output).__name__}"
                )
            self.structured_output.validate()
        return self


@dataclass
class EngineConfig:
    """How big the engine is. The KV pool comes from, in order of precedence: ``num_gpu_blocks``;
    ``kv_cache_bytes``; ``kv_cache_memory_fraction`` of the device memory left free after the weights
    and a profiled peak step (CUDA) or a fixed default budget (CPU). The pool is never larger than
    ``max_num_seqs`` full-length sequences need. ``max_model_len`` (prompt + output) defaults to the
    model's ``max_position_embeddings`` capped at what the pool can hold.

    ``enable_chunked_prefill`` (on) splits prompts over steps within ``max_num_batched_tokens``; off, a
    prompt (or a preempted sequence's recompute) runs in one step, so the context is capped at
    ``max_num_batched_tokens``.

    Every field is a ``internlm2 serve inference`` flag under vLLM's name
    (``internlm2_client.cli._engine_flags.ENGINE_FLAGS``; a test fails for a field without one).

    Beyond the shared interface: ``enforce_eager`` turns off CUDA graphs; ``cuda_graph_batch_sizes``
    chooses the captured decode batch sizes (default 1, 2, 4, 8, then steps of 8 up to max_num_seqs);
    ``seed`` keys the sampling noise of requests without their own seed (with their arrival index).
    """

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    num_gpu_blocks: int | None = None
    kv_cache_memory_fraction: float = 0.9
    kv_cache_bytes: int | None = None
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    max_queue_size: int = 1024
    max_model_len: int | None = None
    enforce_eager: bool = False
    cuda_graph_batch_sizes: tuple[int, ...] | None = None
    seed: int = 0

    def validate(self) -> EngineConfig:
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "max_queue_size"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ConfigError(name, f"must be an integer >= 1, got {value!r}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            # Every running sequence decodes one token per step; a smaller budget could stall decodes.
            raise ConfigError(
                "max_num_batched_tokens",
                f"{self.max_num_batched_tokens} is below max_num_seqs={self.max_num_seqs}",
            )
        for name in ("enable_prefix_caching", "enable_chunked_prefill", "enforce_eager"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(name, f"must be a bool, got {getattr(self, name)!r}")
        for name in ("num_gpu_blocks", "kv_cache_bytes", "max_model_len"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 1):
                raise ConfigError(name, f"must be null or an integer >= 1, got {value!r}")
        if not _is_number(self.kv_cache_memory_fraction) or not 0 < self.kv_cache_memory_fraction <= 1:
            raise ConfigError(
                "kv_cache_memory_fraction", f"must be in (0, 1], got {self.kv_cache_memory_fraction!r}"
            )
        if self.cuda_graph_batch_sizes is not None and (
            not all(_is_int(b) and b >= 1 for b in self.cuda_graph_batch_sizes)
        ):
            raise ConfigError("cuda_graph_batch_sizes", f"must be integers >= 1, got {self.cuda_graph_batch_sizes!r}")
        return self

    def graph_batch_sizes(self) -> list[int]:
        if self.cuda_graph_batch_sizes is not None:
            sizes = set(self.cuda_graph_batch_sizes)
        else:
            sizes = {1, 2, 4, *range(8, self.max_num_seqs + 8, 8)}
            sizes.add(self.max_num_seqs)  # the largest decode batch must have a graph to pad into
        return sorted(b for b in sizes if b <= self.max_num_seqs)
