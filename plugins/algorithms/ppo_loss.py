"""PPO pieces for COOL RLHF: KL-shaped token rewards, GAE, clipped policy and value losses.

All tensors are over response tokens only, right-padded: [B, T] with ``mask`` [B, T] (True = a real
response token). Token t is the action taken at the state "prompt + response[:t]"; ``values[:, t]`` is
the critic's value of that state, ``logprobs[:, t]`` the log-prob of the token taken.

    r_t  = −β·(log π_actor(a_t) − log π_ref(a_t))  (+ the sequence score at the last real token)
    δ_t  = r_t + γ·V_{t+1} − V_t                    (V past the last token = 0: the episode ends)
    A_t  = δ_t + γλ·A_{t+1},  R_t = A_t + V_t       (GAE, Schulman et al. 2016)
    L_pg = −min(ρ·A, clip(ρ, 1 − ε, 1 + ε)·A),  ρ = exp(log π − log π_old)
    L_v  = ½·max((V − R)², (clip(V, V_old ± ε_v) − R)²)

InternLM2 settings (report, via shared/research/training.md §1.5): β = 0.01, γ = 1, λ = 0.99
("larger λ for PPO leads to higher rewards in our case").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def token_mean(x: torch.Tensor, mask: torch.Tensor, denominator: torch.Tensor | float | None) -> torch.Tensor:
    """Sum over real tokens / ``denominator`` (the global token count of the step, per rank — see
    ``trainer.deepspeed_loop``), or the plain masked mean when none is given."""
    if denominator is None:
        return masked_mean(x, mask)
    return (x * mask.to(x.dtype)).sum() / denominator


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x − mean) / std over the real tokens; padded positions come back 0."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask.to(x.dtype)


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """[B] index of each row's last real token (right padding; a row with none gives 0)."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), positions, torch.zeros_like(positions)).max(dim=1).values


def kl_shaped_rewards(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    scores: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    score_clip: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards [B, T] = −β·KL_t, plus each row's sequence score [B] at its last real token.

    KL_t = log π_actor − log π_ref (the k1 estimator: unbiased, the one whose sum is the sequence KL).
    Returns (rewards, kl) with both zero on padding.
    """
    mask_f = mask.to(logprobs.dtype)
    kl = (logprobs - ref_logprobs) * mask_f
    rewards = -kl_coef * kl
    if score_clip is not None:
        scores = scores.clamp(-score_clip, score_clip)
    last = last_token_index(mask)
    has_tokens = mask.any(dim=1).to(rewards.dtype)
    rewards = rewards.scatter_add(1, last[:, None], (scores.to(rewards.dtype) * has_tokens)[:, None])
    return rewards, kl


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.99
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation. Returns (advantages, returns), both [B, T], zero on padding."""
    mask_f = mask.to(values.dtype)
    rewards = rewards * mask_f
    values = values * mask_f
    b, t = rewards.shape
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros(b, dtype=values.dtype, device=values.device)
    next_adv = torch.zeros_like(next_value)
    for i in reversed(range(t)):
        delta = rewards[:, i] + gamma * next_value - values[:, i]
        next_adv = (delta + gamma * lam * next_adv) * mask_f[:, i]
        advantages[:, i] = next_adv
        next_value = values[:, i]
    returns = (advantages + values) * mask_f
    return advantages, returns


@dataclass(frozen=True)
class PolicyLossOutput:
    loss: torch.Tensor  # scalar, differentiable
    clip_fraction: float  # share of tokens where the clipped term was the active one
    approx_kl: float  # mean of ½(log π − log π_old)² — how far this update has moved the policy


def clipped_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
    denominator: torch.Tensor | float | None = None,
) -> PolicyLossOutput:
    """Token-mean over real tokens of −min(ρA, clip(ρ, 1 ± ε)A) (``denominator``: see :func:`token_mean`)."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - clip, 1.0 + clip) * advantages
    loss = token_mean(-torch.min(unclipped, clipped), mask, denominator)
    with torch.no_grad():
        clip_fraction = float(masked_mean((clipped < unclipped).to(logprobs.dtype), mask))
        approx_kl = float(masked_mean(0.5 * log_ratio**2, mask))
    return PolicyLossOutput(loss, clip_fraction, approx_kl)


@dataclass(frozen=True)
class ValueLossOutput:
    loss: torch.Tensor
    clip_fraction: float


def clipped_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float | None = 0.2,
    denominator: torch.Tensor | float | None = None,
) -> ValueLossOutput:
    """Token-mean of ½·max((V − R)², (clip(V, V_old ± ε_v) − R)²); ``clip=None`` is the plain ½(V − R)²."""
    unclipped = (values - returns) ** 2
    if clip is None:
        return ValueLossOutput(0.5 * token_mean(unclipped, mask, denominator), 0.0)
    clipped_values = old_values + (values - old_values).clamp(-clip, clip)
    clipped = (clipped_values - returns) ** 2
    loss = 0.5 * token_mean(torch.max(unclipped, clipped), mask, denominator)
    with torch.no_grad():
        clip_fraction = float(masked_mean((clipped > unclipped).to(values.dtype), mask))
    return ValueLossOutput(loss, clip_fraction)
