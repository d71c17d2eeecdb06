"""The DeepSpeed training loop shared by every training stage.

    config                    TrainingConfig (lr, schedule, steps, ZeRO, precision, offload, LoRA, checkpoints)
    deepspeed_loop            run_deepspeed_training(ctx, model, batches, loss_fn, config) -> TrainResult;
                              build_engine, engine_forward, deepspeed_config, init_distributed,
                              save_final_checkpoint
    loading                   load_causal_lm, load_reward_model, build_model: models built where they train
                              (meta device / deepspeed.zero.Init) and filled tensor by tensor, no host copy
    export                    export_model: official layout from ZeRO-3 partitions, LoRA merged
    lora                      apply_lora (peft), lora_layers, merged_weight
    tracking                  MetricsTracker (TensorBoard, offline W&B), plot_history (metrics.png)
    activation_checkpointing  apply_activation_checkpointing(model) (from outside the model)
    distributed               any_rank / barrier / sum_across_ranks / mean_across_ranks
    lm                        load_tokenizer, packed_lm_loss, target_tokens, rank_batches
"""

from .activation_checkpointing import apply_activation_checkpointing
from .config import TrainingConfig, training_dtype, uses_bf16
from .deepspeed_loop import (
    TrainResult,
    build_engine,
    deepspeed_config,
    engine_forward,
    inference_engine,
    init_distributed,
    run_deepspeed_training,
    save_final_checkpoint,
)
from .export import export_model
from .lm import load_tokenizer, normalised_token_loss, packed_lm_loss, rank_batches, target_tokens
from .loading import build_model, is_partitioned, load_causal_lm, load_reward_model
from .lora import apply_lora

__all__ = [
    "TrainResult",
    "TrainingConfig",
    "apply_activation_checkpointing",
    "apply_lora",
    "build_engine",
    "build_model",
    "deepspeed_config",
    "engine_forward",
    "export_model",
    "inference_engine",
    "init_distributed",
    "is_partitioned",
    "load_causal_lm",
    "load_reward_model",
    "load_tokenizer",
    "normalised_token_loss",
    "packed_lm_loss",
    "rank_batches",
    "run_deepspeed_training",
    "save_final_checkpoint",
    "target_tokens",
    "training_dtype",
    "uses_bf16",
]
