"""Reward shaping for online RL (PPO): a penalty for responses cut off at the length limit.

A response that hits ``max_new_tokens`` without its stop token was truncated: its reward model score
judges half an answer, and a policy that learns to ramble until the cut can game it. As TRL's
``missing_eos_penalty`` and OpenRLHF do, such responses lose a fixed amount from their score.
"""

from __future__ import annotations

import torch


def penalize_truncated(rewards: torch.Tensor, truncated: torch.Tensor, penalty: float | None) -> torch.Tensor:
    """``rewards`` [B] minus ``penalty`` where ``truncated`` [B] (bool) is set; unchanged for None/0.

    ``truncated``: the response ended at the length limit, not at a stop token.
    """
    if not penalty:
        return rewards
    if penalty < 0:
        raise ValueError(f"truncation_penalty: must be >= 0 (it is subtracted), got {penalty}")
    return rewards - penalty * truncated.to(device=rewards.device, dtype=rewards.dtype)
