"""pretrain: causal-LM training on packed token shards (from ``prepare_data``) with DeepSpeed.

Rows of ``seq_len`` tokens with per-token document ids (attention and positions restart at each
document), the fused linear-CE loss through ``model.loss``, and everything else from
``run_deepspeed_training`` (ZeRO, precision, accumulation, resumable checkpoints, final layout).
"""

from __future__ import annotations

from pydantic import Field

from ..contract import Stage, StageContext
from ..data.packing import collate
from ..data.shards import PackedTokenDataset
from ..trainer import (
    TrainingConfig,
    load_causal_lm,
    load_tokenizer,
    packed_lm_loss,
    rank_batches,
    run_deepspeed_training,
    target_tokens,
)


class PretrainConfig(TrainingConfig):
    """Model, data and sequence length of causal-LM pretraining (plus the training settings)."""

    model: str | None = Field(None, description="Checkpoint to start from (path or reference); default: "
                              "the previous stage's checkpoint or the job input 'base'.")
    data: str | None = Field(None, description="Token-shard folder (path or reference, e.g. "
                             "stage:prepare_data); default: the latest earlier 'dataset' artifact.")
    seq_len: int = Field(2048, ge=8, description="Tokens per packed row.")
    shuffle: bool = Field(True, description="Visit rows in a seeded random order.")


def find_dataset(ctx: StageContext, ref: str | None):
    """``resolve(ref)`` or the newest ``dataset`` artifact of an earlier stage."""
    if ref:
        return ctx.resolve(ref, "dataset")
    for out in reversed(ctx.inputs.previous):
        if "dataset" in out.artifacts:
            return out.artifacts["dataset"].path
    raise FileNotFoundError("no data given and no earlier stage produced a 'dataset' artifact")


def run(ctx: StageContext) -> dict[str, float]:
    """Train on packed rows; writes ``final`` (official layout) and ``metrics.json``."""
    cfg: PretrainConfig = ctx.config  # type: ignore[assignment]
    model_path = ctx.resolve_model(cfg.model)
    dataset = PackedTokenDataset(find_dataset(ctx, cfg.data), cfg.seq_len)
    model = load_causal_lm(model_path, cfg)  # where it trains, in its dtype; ZeRO-3: partitioned as built
    if int(dataset[0].input_ids.max()) >= model.config.vocab_size:
        raise ValueError("data: token ids exceed the model's vocabulary (tokenizer and model differ)")
    batches = rank_batches(dataset, cfg.micro_batch_size, ctx.rank, ctx.world_size, collate,
                           shuffle_seed=cfg.seed if cfg.shuffle else None)
    ctx.log(f"{len(dataset)} rows of {cfg.seq_len} tokens from {dataset.meta['num_docs']} documents")
    result = run_deepspeed_training(ctx, model, batches, packed_lm_loss, cfg,
                                    tokenizer=load_tokenizer(model_path), count_targets=target_tokens)
    return {"loss": result.final_metrics.get("loss", float("nan")), "initial_loss": result.initial_loss}


STAGE = Stage(
    name="pretrain",
    description="Causal language-model training on packed token shards (documents kept apart by "
    "per-token doc ids) with DeepSpeed ZeRO; writes an InternLM2 checkpoint in the official layout.",
    config_model=PretrainConfig,
    run=run,
)
