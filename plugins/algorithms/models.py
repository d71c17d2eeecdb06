"""Building the models of the alignment stages from checkpoints.

- a reward model from a causal-LM checkpoint: its trunk, plus a new zero-initialised ``v_head`` (as
  XTuner does — every pair starts at score 0, the ranking loss alone decides the first updates) and
  ``reward_token_id`` in the config; or an existing reward-model checkpoint as it is;
- frozen copies (reference policy, reward model) that never get gradients.
"""

from __future__ import annotations

import torch
from torch import nn

from internlm2.core import InternLM2Config, InternLM2ForCausalLM, InternLM2ForRewardModel


def reward_config(config: InternLM2Config, reward_token_id: int) -> InternLM2Config:
    return config.replace(architectures=["InternLM2ForRewardModel"], reward_token_id=reward_token_id)


def reward_model_from_checkpoint(path, reward_token_id: int | None, device="cpu",
                                 dtype: torch.dtype | str | None = None) -> InternLM2ForRewardModel:
    """A reward-model checkpoint loads as it is (``reward_token_id`` may override its token); a causal-LM
    checkpoint gives its trunk to a new reward model whose ``v_head`` starts at zero."""
    config = InternLM2Config.from_pretrained(path)
    if config.is_reward_model:
        model = InternLM2ForRewardModel.from_pretrained(path, dtype=dtype, device=device)
        if reward_token_id is not None and reward_token_id != config.reward_token_id:
            model.config = model.config.replace(reward_token_id=reward_token_id)
        if model.config.reward_token_id is None:
            raise ValueError("reward_token_id: the reward model's config.json does not set it")
        return model
    if reward_token_id is None:
        raise ValueError("reward_token_id: neither the config nor the tokenizer names a reward token")
    lm = InternLM2ForCausalLM.from_pretrained(path, dtype=dtype, device=device)
    return reward_model_from_trunk(lm, reward_token_id)


def reward_model_from_trunk(lm: InternLM2ForCausalLM, reward_token_id: int) -> InternLM2ForRewardModel:
    """Moves ``lm``'s trunk (no copy) under a new reward model with a zero ``v_head``."""
    with torch.device("meta"):
        rm = InternLM2ForRewardModel(reward_config(lm.config, reward_token_id))
    rm.model = lm.model
    rm.v_head = nn.Linear(lm.config.hidden_size, 1, bias=False, device=lm.device, dtype=lm.dtype)
    nn.init.zeros_(rm.v_head.weight)
    return rm


def freeze(model: nn.Module) -> nn.Module:
    """No gradients, eval mode: the reference policy and the reward model during PPO/DPO."""
    model.requires_grad_(False)
    return model.eval()


def frozen_dtype(precision: str, device: str | torch.device) -> torch.dtype:
    """The dtype of models that only run forward (reference, reward model): what the trained model
    computes in — bf16 on CUDA unless the stage's precision is fp32, fp32 on the CPU."""
    on_cuda = torch.device(device).type == "cuda"
    return torch.bfloat16 if on_cuda and precision != "fp32" else torch.float32
