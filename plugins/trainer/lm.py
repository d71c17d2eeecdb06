"""Language-model pieces the training stages share: loading, the packed LM loss, rank sharding.

``packed_lm_loss(model, batch)`` is the causal-LM loss of a packed batch
``{"input_ids", "labels", "doc_ids", "position_ids"}`` through ``model.loss`` (the core's fused
linear + cross-entropy, never full fp32 logits), attention kept inside each document.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from internlm2.core import InternLM2ForCausalLM
from internlm2.core.attention import DenseAttention


def load_causal_lm(path: str | Path, **config_overrides: Any) -> InternLM2ForCausalLM:
    """fp32 weights on CPU in train mode (DeepSpeed moves and casts them); ``config_overrides``
    (e.g. ``rope_theta``) replace fields of the checkpoint's config."""
    config = None
    if config_overrides:
        from internlm2.core import InternLM2Config

        config = InternLM2Config.from_pretrained(path).replace(**config_overrides)
    model = InternLM2ForCausalLM.from_pretrained(path, dtype=torch.float32, device="cpu", config=config)
    return model.train()


def load_tokenizer(path: str | Path):
    from internlm2.core.tokenizer import InternLM2Tokenizer

    return InternLM2Tokenizer.from_pretrained(path)


def packed_lm_loss(model: InternLM2ForCausalLM, batch: dict[str, torch.Tensor]):
    """(mean token loss, {"tokens": number of target tokens})."""
    attn = DenseAttention(doc_ids=batch["doc_ids"])
    loss = model.loss(batch["input_ids"], batch["labels"], position_ids=batch["position_ids"], attn=attn)
    return loss, {"target_tokens": (batch["labels"] != -100).sum().float()}


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
