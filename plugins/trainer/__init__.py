"""The DeepSpeed training loop shared by every training stage.

    config                    TrainingConfig (lr, schedule, steps, ZeRO, precision, offload, checkpoints)
    deepspeed_loop            run_deepspeed_training(ctx, model, batches, loss_fn, config) -> TrainResult;
                              build_engine, deepspeed_config, init_distributed, save_final_checkpoint
    activation_checkpointing  apply_activation_checkpointing(model) (from outside the model)
    distributed               any_rank / barrier: the collectives of every training loop (PPO's own too)
    lm                        load_causal_lm, load_tokenizer, packed_lm_loss, rank_batches
"""

from .activation_checkpointing import apply_activation_checkpointing
from .config import TrainingConfig
from .deepspeed_loop import (
    TrainResult,
    build_engine,
    deepspeed_config,
    init_distributed,
    run_deepspeed_training,
    save_final_checkpoint,
)
from .lm import load_causal_lm, load_tokenizer, packed_lm_loss, rank_batches

__all__ = [
    "TrainResult",
    "TrainingConfig",
    "apply_activation_checkpointing",
    "build_engine",
    "deepspeed_config",
    "init_distributed",
    "load_causal_lm",
    "load_tokenizer",
    "packed_lm_loss",
    "rank_batches",
    "run_deepspeed_training",
    "save_final_checkpoint",
]
