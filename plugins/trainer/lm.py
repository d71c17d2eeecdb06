"""Language-model pieces the training stages share: the packed LM loss, rank sharding, the tokenizer.

``packed_lm_loss(model, batch)`` is the causal-LM loss of a packed batch
``{"input_ids", "labels", "doc_ids", "position_ids"}`` through ``model.loss`` (the core's fused
linear + cross-entropy, never full fp32 logits), attention kept inside each document: the SUM of the
token losses divided by ``batch["loss_denominator"]`` when the training loop supplies it (the global
target count, see ``deepspeed_loop``), else the micro-batch's token mean. (Model loading lives in
``loading``; ``load_causal_lm`` is re-exported here for old imports.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from internlm2.core import InternLM2ForCausalLM
from internlm2.core.attention import DenseAttention

from .loading import load_causal_lm

__all__ = ["load_causal_lm", "load_tokenizer", "packed_lm_loss", "rank_batches", "target_tokens"]

IGNORE = -100


def load_tokenizer(path: str | Path):
    from internlm2.core.tokenizer import InternLM2Tokenizer

    return InternLM2Tokenizer.from_pretrained(path)


def target_tokens(batch: dict[str, torch.Tensor]) -> int:
    """The target tokens of a micro-batch (labels not IGNORE): ``count_targets`` of the LM stages."""
    return int((batch["labels"] != IGNORE).sum())


def normalised_token_loss(token_loss_sum: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed token losses / the loop's ``loss_denominator`` (global), or / this batch's targets."""
    denominator = batch.get("loss_denominator")
    if denominator is None:
        denominator = max(target_tokens(batch), 1)
    return token_loss_sum / denominator


def packed_lm_loss(model: InternLM2ForCausalLM, batch: dict[str, torch.Tensor]):
    """(token loss normalised as the module docstring says, {"target_tokens": targets in the batch})."""
    attn = DenseAttention(doc_ids=batch["doc_ids"])
    total = model.loss(batch["input_ids"], batch["labels"], position_ids=batch["position_ids"], attn=attn,
                       reduction="sum")
    return normalised_token_loss(total, batch), {"target_tokens": float(target_tokens(batch))}


def rank_batches(rows: Sequence[Any], micro_batch_size: int, rank: int, world_size: int,
                 collate: Callable[[list[Any]], Any], shuffle_seed: int | None = None) -> Callable[[int], Any]:
    """``micro-batch index -> batch`` for this rank: micro-batch i of rank r takes rows
    ``(i * world + r) * mbs ...`` of a fixed (optionally seeded-shuffled) order, cycling."""
    n = len(rows)
    if n == 0:
        raise ValueError("no training rows")
    order = list(range(n))
    if shuffle_seed is not None:
        g = torch.Generator().manual_seed(shuffle_seed)
        order = torch.randperm(n, generator=g).tolist()

    def get(i: int):
        first = (i * world_size + rank) * micro_batch_size
        return collate([rows[order[(first + k) % n]] for k in range(micro_batch_size)])

    return get
