"""sft: chat supervised fine-tuning with the assistant-only loss mask, packed, with DeepSpeed.

Data: ``{"messages": [...]}`` JSONL (FORMATS.md); the loss covers assistant turns only, and a turn
with ``"loss": false`` is excluded. Samples are packed whole into rows of ``max_length`` (attention
and positions stay inside each sample).

Optional alignment term (the seed's alignment loss), ``alignment_weight`` > 0: for each sample, the
divergence between the reference answer's token distribution (the normalised histogram of the
target tokens) and the model's mean predicted distribution over the answer positions,
``KL(q_ref || mean_t p_theta(. | prefix_t))`` (or Jensen-Shannon). Where the token loss rewards
each next token, this term measures how far the answer the model would produce is, as a whole,
from the reference text; it is zero exactly when the predicted answer distribution matches it.
Total loss = token CE + alignment_weight * divergence.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from internlm2.core import kernels
from internlm2.core.attention import DenseAttention

from ..contract import Stage, StageContext
from ..data.chat_rows import chat_rows
from ..data.packing import collate
from ..trainer import (
    TrainingConfig,
    load_causal_lm,
    load_tokenizer,
    packed_lm_loss,
    rank_batches,
    run_deepspeed_training,
    target_tokens,
)
from ..trainer.lm import normalised_token_loss
from ..trainer.lora import apply_lora


class SFTConfig(TrainingConfig):
    """Model, chat data, packing and the optional alignment term of chat SFT."""

    model: str | None = Field(None, description="Checkpoint to fine-tune (path or reference); default: "
                              "the previous stage's checkpoint or the job input 'base'.")
    data: str = Field(..., description="Chat JSONL ({\"messages\": [...]}; path or reference input:NAME).")
    max_length: int = Field(2048, ge=16, description="Tokens per packed row; longer samples are truncated.")
    shuffle: bool = Field(True, description="Visit rows in a seeded random order.")
    alignment_weight: float = Field(0.0, ge=0, description="Weight of the divergence between the model's "
                                    "answer distribution and the reference answer's (0 = off).")
    alignment_divergence: Literal["kl", "js"] = Field("kl", description="KL(q_ref || p) or Jensen-Shannon.")


def answer_distribution_divergence(log_probs: torch.Tensor, targets: torch.Tensor, groups: torch.Tensor,
                                   kind: str = "kl") -> torch.Tensor:
    """Mean over groups (samples) of D(q_g, p_g).

    log_probs [N, V] (model, at the N answer positions), targets [N] (reference tokens), groups [N]
    (sample index of each position, 0..G-1). q_g: histogram of the group's targets, normalised;
    p_g: mean of the group's predicted distributions.
    """
    n, v = log_probs.shape
    g = int(groups.max()) + 1
    counts = torch.zeros(g, device=log_probs.device, dtype=torch.float32).index_add_(
        0, groups, torch.ones(n, device=log_probs.device))
    p = torch.zeros(g, v, device=log_probs.device, dtype=torch.float32).index_add_(
        0, groups, log_probs.float().exp()) / counts[:, None]
    q = torch.zeros(g, v, device=log_probs.device, dtype=torch.float32).index_put_(
        (groups, targets), torch.ones(n, device=log_probs.device), accumulate=True) / counts[:, None]
    eps = 1e-12
    if kind == "kl":
        d = (q * (torch.log(q + eps) - torch.log(p + eps))).sum(-1)
    else:
        m = 0.5 * (p + q)
        d = 0.5 * (q * (torch.log(q + eps) - torch.log(m + eps))).sum(-1) + \
            0.5 * (p * (torch.log(p + eps) - torch.log(m + eps))).sum(-1)
    return d.mean()


def sft_loss(weight: float, divergence: str):
    if weight == 0:
        return packed_lm_loss

    def loss_fn(model, batch):
        attn = DenseAttention(doc_ids=batch["doc_ids"])
        hidden = model.model(batch["input_ids"], batch["position_ids"], attn)  # [B, T, H]
        labels = batch["labels"]
        ce = normalised_token_loss(kernels.fused_linear_cross_entropy(
            hidden.reshape(-1, hidden.shape[-1]), model.output.weight, labels.reshape(-1), reduction="sum"), batch)
        mask = labels != -100
        logits = model.compute_logits(hidden[mask])  # [N, V], answer positions only
        rows = torch.nonzero(mask)[:, 0]
        # One group per (row, document): a sample.
        key = rows * (int(batch["doc_ids"].max()) + 1) + batch["doc_ids"][mask]
        groups = torch.unique(key, return_inverse=True)[1]
        div = answer_distribution_divergence(F.log_softmax(logits.float(), -1), labels[mask], groups, divergence)
        return ce + weight * div, {"token_loss": ce.detach(), "alignment": div.detach()}

    return loss_fn


def run(ctx: StageContext) -> dict[str, float]:
    """Fine-tune on the chat data; writes ``final`` (official layout) and ``metrics.json``."""
    cfg: SFTConfig = ctx.config  # type: ignore[assignment]
    model_path = ctx.resolve_model(cfg.model)
    tok = load_tokenizer(model_path)
    # A prepare_data (format chat) folder is read as packed, memory-mapped rows; a JSONL is packed here.
    rows, info = chat_rows(tok, ctx.resolve(cfg.data, "dataset"), cfg.max_length)
    if info["truncated"]:
        ctx.log(f"{info['truncated']} samples longer than max_length={cfg.max_length} were truncated", "WARNING")
    ctx.log(f"{info['samples']} conversations {'prepared' if info['prepared'] else 'packed'} into {len(rows)} "
            f"rows of {cfg.max_length}")
    model = apply_lora(load_causal_lm(model_path, cfg), cfg)  # where it trains; ZeRO-3: partitioned as built
    batches = rank_batches(rows, cfg.micro_batch_size, ctx.rank, ctx.world_size, collate,
                           shuffle_seed=cfg.seed if cfg.shuffle else None)
    result = run_deepspeed_training(ctx, model, batches, sft_loss(cfg.alignment_weight, cfg.alignment_divergence),
                                    cfg, tokenizer=tok, count_targets=target_tokens)
    return {"loss": result.final_metrics.get("loss", float("nan")), "initial_loss": result.initial_loss}


STAGE = Stage(
    name="sft",
    description="Chat supervised fine-tuning: OpenAI-style messages, loss on assistant turns only "
    "(per-turn opt-out), packed rows, optional answer-distribution alignment term; DeepSpeed ZeRO.",
    config_model=SFTConfig,
    run=run,
)
