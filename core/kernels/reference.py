"""Eager PyTorch references for every fused kernel: the numerical contract the Triton paths must meet.

Each function is written the way the official InternLM2 modelling code computes it (dtype casts included),
so the eager backend reproduces the released model bit for bit and the tests have one oracle per kernel.
Autograd differentiates these directly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """InternLM2RMSNorm: normalise in fp32, cast back to ``x.dtype``, then scale by ``weight``.

    Output dtype: ``torch.promote_types(weight.dtype, x.dtype)`` (PyTorch promotion of the last product).
    """
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``new_residual = x + residual`` in ``x.dtype``; returns ``(rms_norm(new_residual), new_residual)``."""
    new_residual = (x + residual).to(x.dtype)
    return rms_norm(new_residual, weight, eps), new_residual


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` (InternLM2 MLP: ``w2(silu(w1(x)) * w3(x))``)."""
    return F.silu(gate) * up


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``cat(-x2, x1)`` over the last dimension, ``x1``/``x2`` its halves (HF convention)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE on ``q`` [B, T, Hq, D] and ``k`` [B, T, Hkv, D]; ``cos``/``sin`` [B, T, D] cast to ``q.dtype``."""
    cos = cos.to(q.dtype).unsqueeze(2)  # [B, T, 1, D]
    sin = sin.to(q.dtype).unsqueeze(2)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """``F.cross_entropy((hidden @ weight.T).float(), labels)`` through full [N, V] logits.

    "mean" divides by the number of non-ignored labels and returns 0 (not NaN) when there are none.
    """
    logits = (hidden @ weight.T).float()  # [N, V]
    losses = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="none")  # [N], 0 if ignored
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    if reduction == "mean":
        return losses.sum() / (labels != ignore_index).sum().clamp(min=1)
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
