"""TrainingConfig: the optimisation section every training stage's config inherits (flat, so users
write ``{"lr": 1e-5, "max_steps": 200, "zero_stage": 2}``)."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, ValidationInfo, field_validator

from ..contract import StageConfig


class TrainingConfig(StageConfig):
    """Optimiser, schedule, DeepSpeed and checkpointing settings shared by the training stages."""

    lr: float = Field(1e-5, gt=0, le=1.0, description="Peak learning rate (AdamW).")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final LR as a fraction of lr (cosine/linear).")
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="LR decay after warmup.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas.")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping norm (0 = off).")
    max_steps: int = Field(100, ge=1, description="Optimizer steps to run.")
    micro_batch_size: int = Field(1, ge=1, description="Sequences (packed rows) per micro-batch per rank.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="DeepSpeed ZeRO stage.")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="auto: bf16 on CUDA, fp32 on CPU (DeepSpeed keeps fp32 master weights).")
    gradient_checkpointing: bool = Field(False, description="Recompute decoder layers in backward.")
    offload_optimizer: bool = Field(False, description="ZeRO-Offload the optimizer state to CPU.")
    offload_params: bool = Field(False, description="ZeRO-3 parameter offload to CPU (needs zero_stage 3).")
    zero3_param_persistence_threshold: int = Field(
        100_000, ge=0, description="ZeRO-3: parameters with fewer elements stay whole on every rank "
        "(DeepSpeed's stage3_param_persistence_threshold); 0 partitions every parameter.")
    zero3_max_live_parameters: int = Field(
        1_000_000_000, ge=1, description="ZeRO-3: most parameters gathered at once (stage3_max_live_parameters).")
    zero3_prefetch_bucket_size: int = Field(
        50_000_000, ge=1, description="ZeRO-3: parameters prefetched ahead of use (stage3_prefetch_bucket_size).")
    zero_bucket_size: int = Field(
        500_000_000, ge=1, description="ZeRO-2/3 reduce and all-gather bucket size in elements.")
    lora_rank: int = Field(0, ge=0, description="LoRA rank through peft (0 = full fine-tuning). Only the "
                           "adapters (and a reward model's v_head) train; final/ holds the merged weights.")
    lora_alpha: float = Field(16.0, gt=0, description="LoRA scaling numerator (scale = lora_alpha / lora_rank).")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    lora_target_modules: list[str] = Field(
        default_factory=lambda: ["wqkv", "wo", "w1", "w2", "w3"],
        description="Linear layers (by name) that get LoRA adapters.")
    tensorboard: bool = Field(True, description="Write TensorBoard event files to <output>/tensorboard.")
    wandb: bool = Field(False, description="Also log every step to Weights & Biases, offline: the run is written "
                        "under <output>/wandb and `wandb sync <output>/wandb/offline-run-*` uploads it later (no "
                        "network during training). Needs the wandb package on the workers.")
    wandb_project: str = Field("internlm2", min_length=1, description="W&B project of the offline runs (one run "
                               "per stage, grouped by job).")
    checkpoint_every: int = Field(50, ge=0, description="Save a resumable checkpoint every N steps (0 = never).")
    keep_checkpoints: int = Field(2, ge=1, description="Resumable checkpoints kept (older are deleted).")
    seed: int = Field(0, description="Seed of model init noise, shuffling and dropout.")

    @field_validator("offload_params")
    @classmethod
    def _offload_needs_zero3(cls, v: bool, info: ValidationInfo) -> bool:
        if v and info.data.get("zero_stage") != 3:
            raise ValueError("offload_params needs zero_stage 3")
        return v

    @field_validator("lora_target_modules")
    @classmethod
    def _lora_targets(cls, v: list[str]) -> list[str]:
        if not v or not all(isinstance(name, str) and name for name in v):
            raise ValueError("name at least one linear layer (e.g. wqkv, wo, w1, w2, w3)")
        return v

    @field_validator("offload_optimizer")
    @classmethod
    def _offload_needs_zero(cls, v: bool, info: ValidationInfo) -> bool:
        if v and info.data.get("zero_stage") == 0:
            raise ValueError("offload_optimizer needs zero_stage >= 1")
        return v


def uses_bf16(cfg: TrainingConfig) -> bool:
    """The one precision rule: bf16 when asked, or on CUDA under "auto"; fp32 otherwise."""
    return cfg.precision == "bf16" or (cfg.precision == "auto" and torch.cuda.is_available())


def training_dtype(cfg: TrainingConfig) -> torch.dtype:
    """The dtype the trained model's weights are built and loaded in (DeepSpeed keeps fp32 masters)."""
    return torch.bfloat16 if uses_bf16(cfg) else torch.float32
