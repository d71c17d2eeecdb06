"""long_context: extend the context window (InternLM2 report's 4k -> 32k phase), then measure it with a
needle-in-a-haystack sweep.

    checkpoint -> config with the raised RoPE base (rope_theta, 50k -> 1M in the report; 1e6 is what the
    released configs ship) and context length (max_position_embeddings) -> causal-LM training on long
    packed rows from token shards (``prepare_data``; documents kept apart by per-token doc ids, as in
    ``pretrain``) -> needle-in-a-haystack over context lengths x needle depths -> heatmap PNG +
    needle.json -> ``final/`` with the new config values

The report keeps more than half of the long-context phase's data shorter than 4k and the batch at 4M
tokens; both are properties of the data and of micro_batch_size x accumulation, set by the caller.
"""

from __future__ import annotations

import json

from pydantic import Field, field_validator

from ..algorithms.needle import DEFAULT_FILLER, evaluate_grid, plot_heatmap
from ..contract import ArtifactKind, Stage, StageContext
from ..data.packing import collate
from ..data.shards import PackedTokenDataset
from ..trainer import (
    TrainingConfig,
    load_causal_lm,
    load_tokenizer,
    packed_lm_loss,
    rank_batches,
    run_deepspeed_training,
    save_final_checkpoint,
    target_tokens,
)
from .pretrain import find_dataset


class LongContextConfig(TrainingConfig):
    """Context-window extension and its needle-in-a-haystack evaluation."""

    model: str | None = Field(None, description="Checkpoint to extend; default: the previous stage's.")
    data: str | None = Field(None, description="Token-shard folder of long documents (e.g. stage:prepare_data); "
                             "default: the latest earlier 'dataset' artifact.")
    rope_theta: float = Field(1_000_000.0, gt=0, description="New RoPE base written to config.json (report: 1e6).")
    context_length: int = Field(32768, ge=16, description="New max_position_embeddings written to config.json.")
    seq_len: int | None = Field(None, ge=8, description="Tokens per packed training row; default: context_length.")
    shuffle: bool = Field(True, description="Visit rows in a seeded random order.")
    needle_lengths: list[int] = Field(default_factory=lambda: [1024, 4096, 8192, 16384, 32768], description=
                                      "Context lengths (tokens) of the needle sweep; those above context_length "
                                      "are dropped.")
    needle_depths: list[float] = Field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0], description="Needle "
                                       "positions as fractions of the context (0 = start).")
    needles_per_cell: int = Field(2, ge=1, description="Needles (random magic numbers) scored per cell.")
    needle_filler: str | None = Field(None, description="Haystack text file; default: a built-in filler.")

    @field_validator("needle_depths")
    @classmethod
    def _depths_in_range(cls, v: list[float]) -> list[float]:
        if any(not 0.0 <= d <= 1.0 for d in v):
            raise ValueError("depths must lie in [0, 1]")
        return v


def run(ctx: StageContext) -> dict[str, float]:
    """Raise rope_theta and the context length, train on long packed rows, sweep needles; write final/."""
    cfg: LongContextConfig = ctx.config
    model_dir = ctx.resolve_model(cfg.model)
    tokenizer = load_tokenizer(model_dir)
    model = load_causal_lm(model_dir, cfg, rope_theta=cfg.rope_theta, max_position_embeddings=cfg.context_length)
    seq_len = cfg.seq_len or cfg.context_length
    if seq_len > cfg.context_length:
        raise ValueError(f"seq_len: {seq_len} exceeds context_length={cfg.context_length}")
    dataset = PackedTokenDataset(find_dataset(ctx, cfg.data), seq_len)
    if int(dataset[0].input_ids.max()) >= model.config.vocab_size:
        raise ValueError("data: token ids exceed the model's vocabulary (tokenizer and model differ)")
    ctx.log(f"rope_theta -> {cfg.rope_theta:g}, context -> {cfg.context_length}; {len(dataset)} rows of {seq_len}")
    batches = rank_batches(dataset, cfg.micro_batch_size, ctx.rank, ctx.world_size, collate,
                           shuffle_seed=cfg.seed if cfg.shuffle else None)
    result = run_deepspeed_training(ctx, model, batches, packed_lm_loss, cfg, save_final=False,
                                    count_targets=target_tokens)

    summary = {**result.final_metrics, "initial_loss": result.initial_loss}
    lengths = [n for n in cfg.needle_lengths if n <= cfg.context_length]
    if lengths:  # every rank sweeps inside the engine's forward (ZeRO-3 gathers there); rank 0 writes
        filler = DEFAULT_FILLER
        if cfg.needle_filler:
            filler = ctx.resolve(cfg.needle_filler, "dataset").read_text(encoding="utf-8")

        def on_cell(done: int, total: int) -> None:
            ctx.raise_if_cancelled()
            ctx.log(f"needle sweep: {done}/{total} cells")

        def encode(text: str) -> list[int]:
            return tokenizer.encode(text, add_bos=False, allow_special=False)

        def sweep(m, _batch):
            return evaluate_grid(m.eval(), encode, lengths, cfg.needle_depths, tokenizer.bos_id,
                                 cfg.needles_per_cell, cfg.seed, filler, on_cell)

        grid = result.forward(sweep)
        if ctx.is_main:
            (ctx.output_dir / "needle.json").write_text(json.dumps(grid.to_dict(), indent=1))
            png = plot_heatmap(grid, ctx.output_dir / "needle_heatmap.png",
                               f"Needle in a haystack (rope_theta {cfg.rope_theta:g})")
            ctx.add_artifact("needle", ctx.output_dir / "needle.json", ArtifactKind.OTHER)
            ctx.add_artifact("needle_heatmap", png, ArtifactKind.OTHER)
        summary["needle_retrieval"] = grid.mean_retrieval
    doc = {"stage": ctx.stage, "name": ctx.name, "steps": result.steps, "resumed_from": result.resumed_from,
           "rope_theta": cfg.rope_theta, "context_length": cfg.context_length, "final": summary,
           "history": result.history}
    save_final_checkpoint(ctx, model, tokenizer, doc)
    return summary


STAGE = Stage(
    name="long_context",
    description="Context extension: raise rope_theta (default 1e6) and max_position_embeddings, train on long "
    "packed rows from token shards, then a needle-in-a-haystack sweep over lengths x depths saved as a "
    "heatmap PNG; writes the checkpoint with the new config values.",
    config_model=LongContextConfig,
    run=run,
)
