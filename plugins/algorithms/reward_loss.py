"""The conditional reward model's loss, as the InternLM2 report (arXiv 2403.17297, COOL RLHF) defines it.

For a preference pair with scores r_c (chosen) and r_r (rejected), P = σ(r_c − r_r):

    L_rank    = −(1 − 2·max(0, P − ½))^γ · log P          (γ = 2: the report's "difficulty decay"
                                                           focal form — pairs the model already ranks
                                                           with confidence weigh less)
    L_penalty = −(log(r + 5) + log(5 − r))                 (log barrier, per score, keeps r in (−5, 5))
    L         = L_rank + λ·L_penalty,  λ = 0.02

Both formulas as quoted by the report's write-ups (shared/research/training.md §1.5); XTuner's
``RewardModel`` (same team) implements them the same way. Past ±(5 − ε) (ε = 1e-3) the barrier
continues as its tangent line — finite (no NaN for a score that escapes) and, unlike clamping the score
before the logs, with a gradient that keeps pulling the score back inside: a clamped barrier is flat
out there, so the ranking loss alone keeps pushing an escaped score further out. The focal
modulating factor is not detached (as in XTuner). Losses are means over pairs; the penalty sums the
chosen and the rejected score of each pair.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def focal_ranking_loss(chosen: torch.Tensor, rejected: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Mean over pairs of −(1 − 2·max(0, P − ½))^γ · log P, P = σ(chosen − rejected); ``gamma=0`` is the
    plain ranking (Bradley–Terry) loss. chosen, rejected: [N] scores."""
    margin = chosen.float() - rejected.float()
    log_p = F.logsigmoid(margin)
    if gamma == 0:
        return -log_p.mean()
    decay = (1.0 - 2.0 * torch.relu(torch.sigmoid(margin) - 0.5)) ** gamma
    return -(decay * log_p).mean()


def log_barrier_penalty(scores: torch.Tensor, bound: float = 5.0, eps: float = 1e-3) -> torch.Tensor:
    """Elementwise −(log(r + bound) + log(bound − r)) on [−bound + eps, bound − eps], extended linearly
    (the tangent at the edge) beyond it: the gradient past the edge is the edge's, pointing inward."""
    r = scores.float()
    edge = bound - eps
    inside = r.clamp(-edge, edge)  # no gradient through the clamp outside: the linear part carries it
    barrier = -(torch.log(inside + bound) + torch.log(bound - inside))
    slope = 1.0 / eps - 1.0 / (2.0 * bound - eps)  # d/dr of the barrier at +edge (-slope at -edge)
    return barrier + slope * (torch.relu(r - edge) + torch.relu(-edge - r))  # relu: no double gradient at the edge


@dataclass(frozen=True)
class RewardLossOutput:
    loss: torch.Tensor  # scalar, differentiable
    rank_loss: float
    penalty: float
    accuracy: float  # fraction of pairs with chosen > rejected
    chosen_mean: float
    rejected_mean: float


def reward_model_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    gamma: float = 2.0,
    penalty_weight: float = 0.02,
    bound: float = 5.0,
) -> RewardLossOutput:
    """L = focal_ranking_loss + λ·mean over pairs of (barrier(chosen) + barrier(rejected))."""
    rank = focal_ranking_loss(chosen, rejected, gamma)
    if penalty_weight:
        penalty = (log_barrier_penalty(chosen, bound) + log_barrier_penalty(rejected, bound)).mean()
    else:
        penalty = torch.zeros((), device=chosen.device)
    loss = rank + penalty_weight * penalty
    with torch.no_grad():
        return RewardLossOutput(
            loss=loss,
            rank_loss=float(rank.detach()),
            penalty=float(penalty.detach()),
            accuracy=float((chosen > rejected).float().mean()),
            chosen_mean=float(chosen.float().mean()),
            rejected_mean=float(rejected.float().mean()),
        )
