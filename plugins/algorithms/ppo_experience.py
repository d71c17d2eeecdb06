"""From rollouts to PPO experience, and the two PPO losses over a minibatch of it.

Positions are those of the full prompt + response rows (:class:`~.rollout.RolloutBatch`): position t is
an action when token t + 1 is a response token; its log-prob is log π(ids[t + 1] | ids[≤ t]) and its
value V(ids[≤ t]) — the critic's per-token output at t. Scores (reward model + optional similarity) are
per sequence and land on each row's last action (:func:`~.ppo_loss.kl_shaped_rewards`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from internlm2.core.attention import DenseAttention

from .logprobs import token_logprobs
from .ppo_loss import (
    PolicyLossOutput,
    ValueLossOutput,
    clipped_policy_loss,
    clipped_value_loss,
    gae,
    kl_shaped_rewards,
    masked_mean,
    masked_whiten,
)
from .rollout import RolloutBatch


@dataclass
class Experience:
    batch: RolloutBatch
    old_logprobs: torch.Tensor  # (B, T) actor log-probs at rollout time
    ref_logprobs: torch.Tensor  # (B, T)
    old_values: torch.Tensor  # (B, T) critic values at rollout time
    rewards: torch.Tensor  # (B, T) KL-shaped token rewards
    advantages: torch.Tensor  # (B, T)
    returns: torch.Tensor  # (B, T)
    scores: torch.Tensor  # (B,) sequence scores (before the KL term)
    kl: torch.Tensor  # (B, T) log π_actor − log π_ref per action

    @property
    def mask(self) -> torch.Tensor:
        return self.batch.action_mask

    def stats(self) -> dict[str, float]:
        mask = self.mask
        return {
            "score": float(self.scores.mean()),
            "kl": float((self.kl * mask).sum(1).mean()),  # sequence KL(actor || ref), averaged
            "reward": float((self.rewards * mask).sum(1).mean()),
            "response_length": float(mask.sum(1).float().mean()),
            "value": float(masked_mean(self.old_values, mask)),
            "return": float(masked_mean(self.returns, mask)),
        }

    def minibatches(self, size: int, generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
        """Row indices of shuffled minibatches covering the experience once."""
        order = torch.randperm(self.batch.input_ids.shape[0], generator=generator)
        for start in range(0, len(order), size):
            yield order[start : start + size].to(self.batch.input_ids.device)

    def minibatch(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """The tensors the actor and critic losses read, for ``rows`` (a dict: DeepSpeed moves it whole)."""
        b = self.batch
        return {"input_ids": b.input_ids[rows], "padding_mask": b.padding_mask[rows], "labels": b.labels[rows],
                "action_mask": b.action_mask[rows], "old_logprobs": self.old_logprobs[rows],
                "advantages": self.advantages[rows], "old_values": self.old_values[rows],
                "returns": self.returns[rows]}


def critic_values(critic, input_ids: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
    """Per-position values (B, T) fp32 from an ``InternLM2ForRewardModel``-shaped critic."""
    return critic(input_ids, attn=DenseAttention(padding_mask=padding_mask)).float()


def policy_logprobs(model, batch: RolloutBatch, temperature: float = 1.0) -> torch.Tensor:
    """Log-probs (B, T) of the taken actions under softmax(logits / T) — the sampling distribution."""
    return token_logprobs(model, batch.input_ids, batch.labels, batch.padding_mask, temperature)


@torch.no_grad()
def make_experience(
    batch: RolloutBatch,
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    values: torch.Tensor,
    scores: torch.Tensor,
    kl_coef: float,
    gamma: float,
    lam: float,
    score_clip: float | None = None,
    whiten_advantages: bool = False,
) -> Experience:
    """KL-shaped rewards and GAE for one rollout batch, from the actor's and the reference's log-probs
    and the critic's values at rollout time (computed by the caller: under ZeRO-3 through the engines)."""
    mask = batch.action_mask
    values = values * mask
    rewards, kl = kl_shaped_rewards(old_logprobs, ref_logprobs, scores.to(old_logprobs.device), mask,
                                    kl_coef, score_clip)
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    if whiten_advantages:
        advantages = masked_whiten(advantages, mask)
    return Experience(batch, old_logprobs, ref_logprobs, values, rewards, advantages, returns,
                      scores.to(old_logprobs.device), kl)


def actor_loss(actor, mb: dict[str, torch.Tensor], clip: float, temperature: float = 1.0) -> PolicyLossOutput:
    """Clipped policy loss of a minibatch (:meth:`Experience.minibatch`) under the actor's current weights,
    at the sampling temperature; normalised by ``mb["loss_denominator"]`` when the loop gives one."""
    logprobs = token_logprobs(actor, mb["input_ids"], mb["labels"], mb["padding_mask"], temperature)
    return clipped_policy_loss(logprobs, mb["old_logprobs"], mb["advantages"], mb["action_mask"], clip,
                               mb.get("loss_denominator"))


def critic_loss(critic, mb: dict[str, torch.Tensor], clip: float | None) -> ValueLossOutput:
    """Clipped value loss of a minibatch under the critic's current weights."""
    values = critic_values(critic, mb["input_ids"], mb["padding_mask"])
    return clipped_value_loss(values, mb["old_values"], mb["returns"], mb["action_mask"], clip,
                              mb.get("loss_denominator"))
