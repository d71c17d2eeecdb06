"""Direct preference optimisation (Rafailov et al., 2023) against a frozen reference policy.

With sequence log-probs of the response tokens under the policy (π) and the reference (ref):

    h = β·[(log π(y_c|x) − log ref(y_c|x)) − (log π(y_r|x) − log ref(y_r|x))]
    L = −(1 − ε)·log σ(h) − ε·log σ(−h)          (ε: label smoothing, conservative DPO; 0 = plain DPO)

The implicit rewards β·(log π − log ref) of chosen and rejected, and their margin, are the metrics
a DPO run watches: the margin must go up.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class DPOLossOutput:
    loss: torch.Tensor  # scalar, differentiable
    chosen_rewards: torch.Tensor  # [N], detached
    rejected_rewards: torch.Tensor  # [N], detached

    @property
    def margin(self) -> float:
        return float((self.chosen_rewards - self.rejected_rewards).mean())

    @property
    def accuracy(self) -> float:
        return float((self.chosen_rewards > self.rejected_rewards).float().mean())


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> DPOLossOutput:
    """All inputs are [N] summed log-probs of the response tokens; the reference ones carry no grad."""
    chosen_logratio = policy_chosen.float() - ref_chosen.float()
    rejected_logratio = policy_rejected.float() - ref_rejected.float()
    h = beta * (chosen_logratio - rejected_logratio)
    losses = -(1.0 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)
    return DPOLossOutput(
        loss=losses.mean(),
        chosen_rewards=(beta * chosen_logratio).detach(),
        rejected_rewards=(beta * rejected_logratio).detach(),
    )

