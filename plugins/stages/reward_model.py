"""reward_model: COOL RLHF's conditional reward model (InternLM2 report, arXiv 2403.17297).

One reward model for all preference domains, steered by a per-domain system prompt (the condition)
put in front of each conversation; the score is ``v_head`` at the reward token appended after the
chat-formatted conversation — the layout of the released InternLM2-Reward models, which
``RewardScorer`` and the reward service read unchanged.

    model (causal LM or reward checkpoint) -> trunk + zero v_head -> focal ranking loss + log barrier
    (``algorithms.reward_loss``) through the shared DeepSpeed loop -> held-out pairwise accuracy ->
    ``final/`` (architectures InternLM2ForRewardModel, reward_token_id from the tokenizer: 92527 for
    the official one) + metrics.json

Report settings as defaults: γ = 2, λ = 0.02, bounds ±5, lr 1e-5 cosine to 5e-6, weight decay 0.01,
one epoch (``epochs: 1``), constant-token batches (``batch_tokens: 16384``).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import torch
from pydantic import Field

from ..algorithms import preference
from ..algorithms.datasets import split_holdout
from ..algorithms.reward_loss import reward_model_loss
from ..contract import Stage, StageContext
from ..data.preference_rows import preference_rows, reward_ids
from ..trainer import apply_lora, load_reward_model, load_tokenizer, run_deepspeed_training, save_final_checkpoint
from ..trainer.config import TrainingConfig


class PreferenceDataConfig(TrainingConfig):
    """Preference data fields shared by the reward_model and dpo stages."""

    train_data: str = Field(..., description="Preference JSONL (file or folder): {prompt, chosen, rejected, "
                            "condition?} with OpenAI-style messages, or a prepare_data folder (format preference); "
                            "a reference (input:NAME, stage:NAME) or path.")
    eval_data: str | None = Field(None, description="Held-out preference JSONL; default: eval_fraction of train_data.")
    eval_fraction: float = Field(0.05, ge=0, lt=1, description="Share of train_data held out when eval_data is unset.")
    max_length: int = Field(2048, ge=8, description="Longest sequence in tokens; longer pairs are skipped (counted).")
    epochs: float | None = Field(None, gt=0, description="When set, max_steps = epochs over the training pairs.")
    eval_every: int = Field(0, ge=0, description="Evaluate on the held-out pairs every N steps (0 = only at the end).")


class RewardModelConfig(PreferenceDataConfig):
    """Conditional reward model training (COOL RLHF)."""

    model: str | None = Field(None, description="Causal-LM checkpoint whose trunk starts the reward model (or a "
                              "reward checkpoint to continue); default: the previous stage's checkpoint.")
    reward_token_id: int | None = Field(None, ge=0, description="Token whose v_head output is the score; default: "
                                        "the tokenizer's reward token ([UNUSED_TOKEN_130] = 92527 officially).")
    conditions: dict[str, str] = Field(default_factory=lambda: dict(preference.DEFAULT_CONDITIONS),
                                       description="Condition (domain) -> system prompt; a pair's condition not "
                                       "in this table is used as the system prompt itself.")
    default_condition: str | None = Field(None, description="Condition of pairs that name none (None: no system "
                                          "prompt).")
    focal_gamma: float = Field(2.0, ge=0, description="γ of the focal ranking loss (0 = plain ranking loss).")
    penalty_weight: float = Field(0.02, ge=0, description="λ of the log-barrier score penalty.")
    score_bound: float = Field(5.0, gt=0, description="Scores are kept inside (-bound, bound) by the barrier.")
    pairs_per_batch: int = Field(8, ge=1, description="Most preference pairs per micro-batch.")
    batch_tokens: int | None = Field(16384, ge=64, description="Most padded tokens per micro-batch (both sides of "
                                     "every pair; the report's constant 16,384), or null for pairs_per_batch only.")
    lr: float = Field(1e-5, gt=0, le=1.0, description="Peak learning rate (report: 1e-5).")
    min_lr_ratio: float = Field(0.5, ge=0, le=1, description="Final LR / lr (report: 5e-6 / 1e-5).")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay (report: 0.01).")
    epochs: float | None = Field(1.0, gt=0, description="Passes over the training pairs; max_steps follows from it "
                                 "(report: 1 epoch, against overfitting). null = use max_steps.")


def pair_batches(tokenizer, pairs: Sequence[preference.PreferencePair], reward_token_id: int, *,
                 conditions: dict[str, str], default_condition: str | None, max_length: int,
                 pairs_per_batch: int, batch_tokens: int | None) -> tuple[list[dict], int]:
    """Micro-batches {"input_ids", "padding_mask"} (chosen rows, then rejected rows); skipped count."""
    encoded = [reward_ids(tokenizer, pair, reward_token_id, conditions, default_condition) for pair in pairs]
    return reward_batches(tokenizer, encoded, max_length=max_length, pairs_per_batch=pairs_per_batch,
                          batch_tokens=batch_tokens)


def reward_batches(tokenizer, items: Sequence[tuple[list[int], list[int]]], *, max_length: int,
                   pairs_per_batch: int, batch_tokens: int | None) -> tuple[list[dict], int]:
    """:func:`pair_batches` of encoded pairs (``preference_rows(..., "reward")`` items)."""
    encoded = [(c, r) for c, r in items if max(len(c), len(r)) <= max_length]
    skipped = len(items) - len(encoded)
    groups = preference.plan_batches([max(len(c), len(r)) for c, r in encoded], pairs_per_batch, batch_tokens)
    batches = []
    for group in groups:
        b = preference.collate_reward([encoded[i] for i in group], tokenizer.pad_id)
        batches.append({"input_ids": b.input_ids, "padding_mask": b.padding_mask})
    return batches, skipped


def split_scores(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    scores = model.score(batch["input_ids"], batch["padding_mask"])  # (2N,) chosen rows first
    n = scores.shape[0] // 2
    return scores[:n], scores[n:]


def evaluate_pairs(forward, batches: Sequence[dict]) -> dict[str, float]:
    """Pairwise accuracy, mean margin and mean scores of a reward model over held-out batches.
    ``forward(fn, batch)`` runs ``fn(model, batch)`` through the training engine (ZeRO-3 gathers the
    weights there; a weight read outside it is an empty partition)."""
    chosen, rejected = [], []
    for batch in batches:
        c, r = forward(split_scores, batch)
        chosen.append(c.float().cpu())
        rejected.append(r.float().cpu())
    if not chosen:
        return {}
    c, r = torch.cat(chosen), torch.cat(rejected)
    return {"eval_accuracy": float((c > r).float().mean()), "eval_margin": float((c - r).mean()),
            "eval_chosen_score": float(c.mean()), "eval_rejected_score": float(r.mean()), "eval_pairs": len(c)}


def steps_for_epochs(cfg: TrainingConfig, num_batches: int, world_size: int, epochs: float | None) -> TrainingConfig:
    """``cfg`` with max_steps covering ``epochs`` passes over ``num_batches`` micro-batches (all ranks)."""
    if epochs is None:
        return cfg
    per_step = cfg.gradient_accumulation_steps * world_size
    return cfg.model_copy(update={"max_steps": max(1, math.ceil(epochs * num_batches / per_step))})


def shard(items: list, ctx: StageContext) -> list:
    """This rank's share of the micro-batches (every rank keeps at least one)."""
    if ctx.world_size == 1:
        return items
    mine = items[ctx.rank :: ctx.world_size]
    return mine or items[:1]


def run(ctx: StageContext) -> dict[str, float]:
    """Train the conditional reward model on preference pairs; write an InternLM2-Reward checkpoint."""
    cfg: RewardModelConfig = ctx.config
    model_dir = ctx.resolve_model(cfg.model)
    tokenizer = load_tokenizer(model_dir)
    reward_token_id = cfg.reward_token_id if cfg.reward_token_id is not None else tokenizer.reward_token_id
    # Built where it trains (partitioned under ZeRO-3), in the training dtype; DeepSpeed keeps fp32 masters.
    model = apply_lora(load_reward_model(model_dir, reward_token_id, cfg), cfg)
    ctx.log(f"reward model from {model_dir}: reward_token_id {model.config.reward_token_id}")

    rid = model.config.reward_token_id

    def read(ref: str) -> list:  # a prepare_data folder (tokenised once) or JSONL: the same ids
        return list(preference_rows(tokenizer, ctx.resolve(ref, "dataset"), "reward", reward_token_id=rid,
                                    conditions=cfg.conditions, default_condition=cfg.default_condition)[0])

    pairs = read(cfg.train_data)
    if cfg.eval_data:
        held_out = read(cfg.eval_data)
    else:
        pairs, held_out = split_holdout(pairs, cfg.eval_fraction, cfg.seed, minimum=1 if cfg.eval_fraction else 0)
    random.Random(cfg.seed).shuffle(pairs)  # files are often grouped by domain; batches should mix them
    batching = {"max_length": cfg.max_length, "pairs_per_batch": cfg.pairs_per_batch, "batch_tokens": cfg.batch_tokens}
    train_batches, skipped = reward_batches(tokenizer, pairs, **batching)
    eval_batches, _ = reward_batches(tokenizer, held_out, **batching)
    if not train_batches:
        raise ValueError(f"train_data: no pair fits max_length={cfg.max_length} ({skipped} skipped)")
    ctx.log(f"{len(pairs) - skipped} training pairs in {len(train_batches)} micro-batches, {skipped} too long; "
            f"{len(held_out)} held out")
    train_cfg = steps_for_epochs(cfg, len(train_batches), ctx.world_size, cfg.epochs)
    train_batches = shard(train_batches, ctx)

    def loss_fn(m, batch):
        chosen, rejected = split_scores(m, batch)
        out = reward_model_loss(chosen, rejected, cfg.focal_gamma, cfg.penalty_weight, cfg.score_bound)
        return out.loss, {"accuracy": out.accuracy, "rank_loss": out.rank_loss, "penalty": out.penalty,
                          "chosen_score": out.chosen_mean, "rejected_score": out.rejected_mean}

    def on_step(step: int, _metrics: dict, forward) -> None:
        if cfg.eval_every and step % cfg.eval_every == 0 and step < train_cfg.max_steps:
            ctx.log_metrics(step, **evaluate_pairs(forward, eval_batches))

    result = run_deepspeed_training(ctx, model, train_batches, loss_fn, train_cfg, save_final=False, on_step=on_step)
    after = evaluate_pairs(result.forward, eval_batches)
    ctx.log_metrics(result.steps, **after)
    summary = {**result.final_metrics, **after, "skipped_pairs": skipped}
    doc = {"stage": ctx.stage, "name": ctx.name, "steps": result.steps, "resumed_from": result.resumed_from,
           "reward_token_id": rid, "final": summary, "history": result.history}
    save_final_checkpoint(ctx, model, tokenizer, doc)
    return summary


STAGE = Stage(
    name="reward_model",
    description="COOL RLHF conditional reward model: trunk of a causal LM + v_head at the reward token, trained "
    "on preference pairs (condition = per-domain system prompt) with the InternLM2 focal ranking loss "
    "(γ 2) and a log-barrier penalty keeping scores in (-5, 5) (λ 0.02); writes an InternLM2-Reward checkpoint.",
    config_model=RewardModelConfig,
    run=run,
)
