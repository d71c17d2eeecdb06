"""dpo: direct preference optimisation of a policy against a frozen reference.

    policy (default: the previous checkpoint) + reference (default: the same weights, frozen)
    -> reference log-probs of every pair computed once, up front (under ZeRO-3 partitioned and run through a
       forward-only DeepSpeed engine like the policy; then the reference leaves memory:
       on a GPU only the policy trains under DeepSpeed)
    -> DPO loss (``algorithms.dpo_loss``) on the response tokens' summed log-probs, computed through
       the fused linear + cross-entropy (``reduction="none"``), never full logits
    -> ``final/`` causal-LM checkpoint + metrics.json (implicit-reward margin before/after on held-out pairs)

Each pair is the prompt rendered with the generation prompt, then the answer as the policy would emit
it (its tokens + ``<|im_end|>``); chosen and rejected rows share one padded micro-batch.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
from pydantic import Field

from internlm2.core import InternLM2ForCausalLM

from ..algorithms import preference
from ..algorithms.datasets import split_holdout
from ..algorithms.dpo_loss import dpo_loss
from ..algorithms.logprobs import sequence_logprobs
from ..algorithms.models import freeze, frozen_dtype
from ..contract import Stage, StageContext
from ..data.preference_rows import preference_rows
from ..trainer import (
    apply_lora,
    engine_forward,
    inference_engine,
    load_causal_lm,
    load_tokenizer,
    run_deepspeed_training,
    save_final_checkpoint,
)
from ..trainer.distributed import max_across_ranks
from .reward_model import PreferenceDataConfig, shard, steps_for_epochs


class DPOConfig(PreferenceDataConfig):
    """Direct preference optimisation against a frozen reference."""

    model: str | None = Field(None, description="Policy checkpoint to optimise; default: the previous stage's.")
    reference: str | None = Field(None, description="Frozen reference policy; default: the policy's starting "
                                  "weights.")
    beta: float = Field(0.1, gt=0, description="β: strength of the implicit KL constraint to the reference.")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="Conservative DPO: assumed share of flipped "
                                   "labels (0 = plain DPO).")
    pairs_per_batch: int = Field(4, ge=1, description="Preference pairs per micro-batch (2 rows each).")
    lr: float = Field(5e-7, gt=0, le=1.0, description="Peak learning rate.")


def dpo_batches(tokenizer, pairs: Sequence[tuple[list[int], list[int], list[int]]],
                cfg: DPOConfig) -> tuple[list[dict], int]:
    """Micro-batches of encoded pairs (``preference_rows(..., "dpo")`` items); skipped (too long) count."""
    items, skipped = [], 0
    for prompt, chosen, rejected in pairs:
        if len(prompt) + max(len(chosen), len(rejected)) > cfg.max_length:
            skipped += 1
            continue
        items.append((prompt, chosen, rejected))
    batches = []
    for start in range(0, len(items), cfg.pairs_per_batch):
        b = preference.collate_dpo(items[start : start + cfg.pairs_per_batch], tokenizer.pad_id)
        batches.append({"input_ids": b.input_ids, "padding_mask": b.padding_mask, "labels": b.labels})
    return batches, skipped


def pair_logprobs(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs (chosen [N], rejected [N]) of one micro-batch."""
    logps = sequence_logprobs(model, batch["input_ids"], batch["labels"], batch["padding_mask"])
    n = logps.shape[0] // 2
    return logps[:n], logps[n:]


def attach_reference(forward, batches: list[dict]) -> None:
    """Adds the reference's "ref_chosen"/"ref_rejected" log-probs to every batch (kept on the CPU).
    ``forward(fn, batch)`` runs ``fn(reference, batch)`` without gradients. Under ZeRO-3 it is a collective
    (an inference engine's forward): every rank runs as many forwards as the rank with the most batches,
    repeating its last one (results dropped) — ranks' shards differ by one batch at most."""
    calls = int(max_across_ranks(len(batches)))
    for i in range(calls):
        batch = batches[min(i, len(batches) - 1)] if batches else None
        chosen, rejected = forward(pair_logprobs, batch)
        if i < len(batches):
            batch["ref_chosen"], batch["ref_rejected"] = chosen.float().cpu(), rejected.float().cpu()


def reference_forward(ref_dir, cfg: DPOConfig, device):
    """``(forward(fn, batch), release())`` over the frozen reference. ZeRO-3: loaded into partitions like
    the policy and run through a forward-only DeepSpeed engine (no rank holds it whole); otherwise whole on
    this rank's device in the dtype the policy computes in."""
    if cfg.zero_stage == 3:
        ref_cfg = cfg.model_copy(update={"lora_rank": 0})
        engine = inference_engine(load_causal_lm(ref_dir, ref_cfg).eval(), ref_cfg)

        def forward(fn, batch):
            return engine_forward(engine, fn, batch)

        return forward, engine.destroy
    reference = freeze(InternLM2ForCausalLM.from_pretrained(ref_dir, device=device,
                                                            dtype=frozen_dtype(cfg.precision, device)))

    @torch.no_grad()
    def forward(fn, batch):
        return fn(reference, {k: v.to(device) for k, v in batch.items()})

    return forward, lambda: None


def evaluate(forward, batches: Sequence[dict], cfg: DPOConfig) -> dict[str, float]:
    """Held-out DPO loss, implicit-reward margin and accuracy. ``forward(fn, batch)`` runs ``fn`` inside
    the training engine's forward: under ZeRO-3 the output head read by the log-probs is only gathered
    there (outside it is an empty partition)."""
    margins, accs, losses, n = 0.0, 0.0, 0.0, 0
    for batch in batches:
        chosen, rejected = forward(pair_logprobs, batch)
        out = dpo_loss(chosen, rejected, batch["ref_chosen"].to(chosen.device),
                       batch["ref_rejected"].to(chosen.device), cfg.beta, cfg.label_smoothing)
        k = chosen.shape[0]
        margins += out.margin * k
        accs += out.accuracy * k
        losses += float(out.loss) * k
        n += k
    if not n:
        return {}
    return {"eval_margin": margins / n, "eval_accuracy": accs / n, "eval_loss": losses / n}


def run(ctx: StageContext) -> dict[str, float]:
    """Optimise the policy with DPO on preference pairs; write the policy checkpoint."""
    cfg: DPOConfig = ctx.config
    model_dir = ctx.resolve_model(cfg.model)
    tokenizer = load_tokenizer(model_dir)
    device = ctx.device

    def read(ref: str) -> list:  # a prepare_data folder (tokenised once) or JSONL: the same ids
        return list(preference_rows(tokenizer, ctx.resolve(ref, "dataset"), "dpo")[0])

    pairs = read(cfg.train_data)
    if cfg.eval_data:
        held_out = read(cfg.eval_data)
    else:
        pairs, held_out = split_holdout(pairs, cfg.eval_fraction, cfg.seed, minimum=1 if cfg.eval_fraction else 0)
    random.Random(cfg.seed).shuffle(pairs)  # files are often grouped by domain; batches should mix them
    train_batches, skipped = dpo_batches(tokenizer, pairs, cfg)
    eval_batches, _ = dpo_batches(tokenizer, held_out, cfg)
    if not train_batches:
        raise ValueError(f"train_data: no pair fits max_length={cfg.max_length} ({skipped} skipped)")
    train_cfg = steps_for_epochs(cfg, len(train_batches), ctx.world_size, cfg.epochs)
    train_batches = shard(train_batches, ctx)

    # The reference scores every pair once, then is dropped: training holds only the policy.
    forward, release = reference_forward(ctx.resolve(cfg.reference) if cfg.reference else model_dir, cfg, device)
    attach_reference(forward, train_batches)
    attach_reference(forward, eval_batches)  # the same on every rank
    release()
    del forward, release  # the reference (and its engine) leave memory before the policy is built
    ctx.log(f"{len(pairs) - skipped} training pairs ({skipped} too long), {len(held_out)} held out; "
            "reference log-probs precomputed")

    # Built where it trains (partitioned under ZeRO-3), in the training dtype; DeepSpeed keeps fp32 masters.
    policy = apply_lora(load_causal_lm(model_dir, cfg), cfg)

    def loss_fn(model, batch):
        chosen, rejected = pair_logprobs(model, batch)
        out = dpo_loss(chosen, rejected, batch["ref_chosen"], batch["ref_rejected"], cfg.beta, cfg.label_smoothing)
        return out.loss, {"margin": out.margin, "accuracy": out.accuracy,
                          "chosen_reward": float(out.chosen_rewards.mean()),
                          "rejected_reward": float(out.rejected_rewards.mean())}

    def on_step(step: int, _metrics: dict, forward) -> None:
        if cfg.eval_every and step % cfg.eval_every == 0 and step < train_cfg.max_steps:
            ctx.log_metrics(step, **evaluate(forward, eval_batches, cfg))

    result = run_deepspeed_training(ctx, policy, train_batches, loss_fn, train_cfg, save_final=False,
                                    on_step=on_step)
    after = evaluate(result.forward, eval_batches, cfg)
    ctx.log_metrics(result.steps, **after)
    summary = {**result.final_metrics, **after, "skipped_pairs": skipped}
    doc = {"stage": ctx.stage, "name": ctx.name, "steps": result.steps, "resumed_from": result.resumed_from,
           "beta": cfg.beta, "final": summary, "history": result.history}
    save_final_checkpoint(ctx, policy, tokenizer, doc)
    return summary


STAGE = Stage(
    name="dpo",
    description="Direct preference optimisation against a frozen reference (β 0.1 default) on preference pairs "
    "{prompt, chosen, rejected}; response-token log-probs through the fused linear + cross-entropy; reports "
    "the implicit-reward margin, which should rise.",
    config_model=DPOConfig,
    run=run,
)
