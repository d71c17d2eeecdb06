"""Structured output: grammar-constrained decoding from a JSON schema, a regex or an EBNF grammar.

    StructuredOutput (params)  --compile (off the engine thread, cached)-->  compiled grammar
    add request                --> one GrammarMatcher per sequence (Request.structured)
    every step (sampler)       --> a token bitmask for the constrained rows only, applied to their logits
                                   (unconstrained rows of the same batch are untouched)
    every token (scheduler)    --> matcher.accept_token; a terminated grammar ends the sequence

Library: xgrammar (https://github.com/mlc-ai/xgrammar, Apache-2.0; the default backend of vLLM, SGLang
and TensorRT-LLM). Measured on this machine's CPU with InternLM2's 92,544-token vocabulary against
llguidance 1.9 (the other candidate with a CPU wheel for cp311 x86_64; outlines-core builds a full
regex automaton index per schema up front, far slower to compile for a large vocabulary):

    per-token mask, JSON schema     xgrammar 14 us      llguidance 45 us
    compile a small JSON schema     xgrammar 13 ms      llguidance 1 ms (lazy, paid during decoding)
    SentencePiece byte-fallback     xgrammar: native (VocabType.BYTE_FALLBACK: ``▁`` and ``<0x0A>``);
                                    llguidance: we would build every token's bytes ourselves

Both compute masks on the CPU and run wherever torch runs; the mask is applied on the logits' device
by ``apply_bitmask`` (numpy's unpackbits on the CPU, torch shifts on a GPU: no kernel to build).
xgrammar's mask being 3x cheaper is what decides it: mask filling is per constrained row per step, on
the engine thread, while a compile happens once per distinct spec, off the engine thread and cached.

JSON is compact (``any_whitespace=False``): no whitespace between tokens, so a weak model cannot spend
its whole budget on spaces and the output is bounded by the schema. Special tokens (chat markers,
reserved ``[UNUSED_TOKEN_n]`` pieces, control pieces) are never allowed inside a constrained output; the
sequence's own end ids (``</s>`` / ``<|im_end|>``, or its stop_token_ids) are allowed once the grammar
is complete, and accepting one terminates the matcher, which ends the sequence.
"""

from __future__ import annotations

import logging
import re
import threading

import numpy as np
import torch

from ..json_limits import load_json
from .errors import InvalidRequestError
from .params import StructuredOutput

logger = logging.getLogger(__name__)

_RESERVED_PIECE = re.compile(r"\[UNUSED_TOKEN_\d+\]")
COMPILE_CACHE_BYTES = 256 * 2**20  # xgrammar's compiled-grammar cache (LRU by bytes)


def _encoded_vocab(tokenizer) -> list[str]:
    """Every id's piece as xgrammar's BYTE_FALLBACK vocabulary reads it; special pieces as "" (xgrammar
    treats empty tokens as special: never part of a grammar's text)."""
    sp = tokenizer._sp  # the SentencePiece model: piece kinds (control, unused) live only there
    special = set(tokenizer.special_tokens.values())
    vocab = []
    for i in range(tokenizer.vocab_size):
        piece = sp.id_to_piece(i)
        if (i in special or sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i)
                or _RESERVED_PIECE.fullmatch(piece) or "\x00" in piece):
            vocab.append("")
        else:
            vocab.append(piece)
    return vocab


class StructuredOutputs:
    """Compiles specs (thread-safe, cached) and makes per-sequence matchers. One per engine; xgrammar is
    imported on first use, so unconstrained serving never loads it."""

    def __init__(self, tokenizer, vocab_size: int):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._compiler = None
        self._lock = threading.Lock()

    def _get_compiler(self):
        with self._lock:
            if self._compiler is None:
                import xgrammar as xgr

                info = xgr.TokenizerInfo(
                    _encoded_vocab(self.tokenizer), xgr.VocabType.BYTE_FALLBACK, vocab_size=self.vocab_size,
                    stop_token_ids=list(self.tokenizer.stop_token_ids), add_prefix_space=False,
                )
                self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_limit_bytes=COMPILE_CACHE_BYTES)
            return self._compiler

    def compile(self, spec: StructuredOutput):
        """The compiled grammar of ``spec`` (cached by xgrammar). A spec that does not compile raises
        InvalidRequestError naming ``structured_output.<kind>``. Slow for a new spec: call it off the
        engine thread (``AsyncLLMEngine`` does)."""
        if self.tokenizer is None:
            raise InvalidRequestError("structured_output", "structured output needs an engine with a tokenizer")
        kind = spec.kind
        field = f"structured_output.{kind}"
        compiler = self._get_compiler()
        try:
            if kind == "json_object":
                return compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
            if kind == "json_schema":
                try:
                    schema = load_json(spec.json_schema)  # depth-bounded: no RecursionError
                except ValueError as exc:
                    raise InvalidRequestError(field, f"is not valid JSON: {exc}") from None
                if not isinstance(schema, (dict, bool)):
                    raise InvalidRequestError(field, f"must be a JSON object, got {type(schema).__name__}")
                return compiler.compile_json_schema(spec.json_schema, any_whitespace=False)
            if kind == "regex":
                return compiler.compile_regex(spec.regex)
            return compiler.compile_grammar(spec.grammar)
        except InvalidRequestError:
            raise
        except Exception as exc:  # xgrammar reports bad specs as RuntimeError / ValueError with a message
            raise InvalidRequestError(field, f"does not compile: {_first_line(exc)}") from None

    def matcher(self, spec: StructuredOutput, end_token_ids: frozenset[int]):
        """A fresh matcher for one sequence; ``end_token_ids`` are what may end it once complete."""
        import xgrammar as xgr

        return xgr.GrammarMatcher(self.compile(spec), override_stop_tokens=sorted(end_token_ids))

    def bitmask(self, matchers: list) -> torch.Tensor:
        """(len(matchers), ceil(V / 32)) int32 on the CPU: bit v of row i set = token v allowed next."""
        import xgrammar as xgr

        mask = xgr.allocate_token_bitmask(len(matchers), self.vocab_size)
        for row, m in enumerate(matchers):
            m.fill_next_token_bitmask(mask, row)
        return mask


_BIAS = np.array([-np.inf, 0.0], dtype=np.float32)  # bit 0 -> -inf, bit 1 -> unchanged


def apply_bitmask(logits: torch.Tensor, rows: list[int], bitmask: torch.Tensor) -> None:
    """In place: -inf on every token a row's bitmask forbids (rows[i] of ``logits`` <- bitmask[i]).

    Bit v of a row is bit v % 32 of its int32 word v // 32, i.e. (little-endian) bit v % 8 of byte v // 8.
    On the CPU numpy's ``unpackbits`` expands it in one C pass and a lookup turns bits into an additive
    0 / -inf bias (branch-free: a masked_fill over an irregular mask is much slower); on a GPU the int32
    words go over (32x smaller than a bool mask) and are expanded there with shifts."""
    vocab = logits.shape[1]
    all_rows = len(rows) == logits.shape[0]  # the rows are the batch's rows in order: no gather
    index = None if all_rows else torch.tensor(rows, device=logits.device)
    target = logits if all_rows else logits[index]
    if logits.device.type == "cpu":
        bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little")[:, :vocab]
        target.add_(torch.from_numpy(_BIAS[bits]))
    else:
        target.masked_fill_(forbidden_tokens(bitmask.to(logits.device, non_blocking=True), vocab), float("-inf"))
    if not all_rows:
        logits[index] = target


def forbidden_tokens(words: torch.Tensor, vocab: int) -> torch.Tensor:
    """(R, ceil(V / 32)) int32 bitmask -> (R, V) bool, True where the token is forbidden; on the words'
    device (the GPU path of ``apply_bitmask``)."""
    shifts = torch.arange(32, dtype=torch.int32, device=words.device)
    return ((words[:, :, None] >> shifts) & 1).view(words.shape[0], -1)[:, :vocab] == 0


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    msg = text[-1] if text else type(exc).__name__
    # xgrammar prefixes "[hh:mm:ss] /path/file.cc:123: "; the client needs only the reason.
    return re.sub(r"^\[[\d:]+\]\s*\S+:\d+:\s*", "", msg)
