"""Per-token log-probs of chosen tokens, without full-vocabulary logits.

DPO and PPO need log π(token) only at response positions. The trunk runs once; the hidden states of the
selected positions go through ``fused_linear_cross_entropy(reduction="none")``, whose negation is the
log-prob of each label — chunked over rows, never an [N, V] fp32 logits tensor, and differentiable
per token (the kernel recomputes logits chunks in backward for a per-token grad_output).
"""

from __future__ import annotations

import torch

from internlm2.core.attention import DenseAttention
from internlm2.core.kernels import fused_linear_cross_entropy

IGNORE = -100


def right_pad(rows, pad_id: int = 0, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Lists of token ids (or 0/1 flags) -> (ids [B, T], padding_mask [B, T] True on real tokens)."""
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.as_tensor(list(row), dtype=torch.long)
        mask[i, : len(row)] = True
    return ids.to(device), mask.to(device)


def shifted_labels(input_ids: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """labels[:, t] = input_ids[:, t + 1] where token t + 1 is a target, else IGNORE. [B, T]."""
    labels = torch.full_like(input_ids, IGNORE)
    labels[:, :-1] = torch.where(target_mask[:, 1:].bool(), input_ids[:, 1:], IGNORE)
    return labels


def token_logprobs(
    model, input_ids: torch.Tensor, labels: torch.Tensor, padding_mask: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """log p(labels[:, t] | input_ids[:, :t + 1]) at every labelled position, 0 where labels == IGNORE.

    ``model`` is an ``InternLM2ForCausalLM`` (or anything with ``.model`` -> hidden and ``.output``);
    ``padding_mask`` [B, T] marks real tokens of right-padded rows. ``temperature``: the log-probs of
    softmax(logits / T), the distribution PPO's rollouts were sampled from (the output head has no bias,
    so scaling the hidden states scales the logits). Returns [B, T] fp32.
    """
    attn = DenseAttention(padding_mask=padding_mask.bool()) if padding_mask is not None else None
    hidden = model.model(input_ids, attn=attn)  # (B, T, H)
    selected = labels != IGNORE
    out = torch.zeros(labels.shape, dtype=torch.float32, device=hidden.device)
    if selected.any():
        rows = hidden[selected] if temperature == 1.0 else hidden[selected] / temperature
        nll = fused_linear_cross_entropy(rows, model.output.weight, labels[selected], reduction="none")  # (N,)
        out = out.masked_scatter(selected, -nll.float())
    return out


def sequence_logprobs(
    model, input_ids: torch.Tensor, labels: torch.Tensor, padding_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Sum over labelled positions of the token log-probs: [B]."""
    return token_logprobs(model, input_ids, labels, padding_mask).sum(dim=1)
