"""Rotary position embeddings as the official InternLM2 computes them.

Three variants, chosen by ``config.rope_scaling``:
- default: inv_freq = 1 / theta^(2i/d)
- linear: positions divided by ``factor``
- dynamic (NTK): when the sequence is longer than ``max_position_embeddings`` the base becomes
  theta * (factor * L / max_pos - (factor - 1)) ** (d / (d - 2)), L = the sequence length so far.

The official module caches cos/sin and only rebuilds the cache when a longer sequence arrives, so
after one long sequence it keeps the scaled base for every later short one (a known quirk of HF's
dynamic NTK). We compute the tables from the positions and the length of *this* sequence instead:
identical for any single sequence, and independent of what ran before (batch invariance).
"""

from __future__ import annotations

import torch

from .config import InternLM2Config


class RotaryEmbedding(torch.nn.Module):
    def __init__(self, config: InternLM2Config):
        super().__init__()
        self.dim = config.head_dim
        self.base = float(config.rope_theta)
        self.max_position_embeddings = config.max_position_embeddings
        scaling = config.rope_scaling or {}
        self.scaling_type = scaling.get("type", scaling.get("rope_type"))
        self.factor = float(scaling.get("factor", 1.0))
        # No buffer: the tables are rebuilt from the config on whatever device the positions are on
        # (meta-device construction would leave a buffer empty; the official one is not persistent).

    def inv_freq(self, seq_len: int | torch.Tensor | None, device: torch.device) -> torch.Tensor:
        """[D/2] frequencies, or [B, D/2] when ``seq_len`` is a per-row tensor (dynamic NTK)."""
        exponents = torch.arange(0, self.dim, 2, dtype=torch.int64, device=device).float() / self.dim
        if self.scaling_type != "dynamic" or seq_len is None:
            return 1.0 / (self.base**exponents)
        if isinstance(seq_len, int):
            if seq_len <= self.max_position_embeddings:
                return 1.0 / (self.base**exponents)
            base = self.base * (
                (self.factor * seq_len / self.max_position_embeddings) - (self.factor - 1)
            ) ** (self.dim / (self.dim - 2))
            return 1.0 / (base**exponents)
        lengths = seq_len.to(device=device, dtype=torch.float64)
        ratio = (self.factor * lengths / self.max_position_embeddings) - (self.factor - 1)
        base = torch.where(
            lengths > self.max_position_embeddings,
            self.base * ratio ** (self.dim / (self.dim - 2)),
            torch.full_like(lengths, self.base),
        ).float()
        return 1.0 / (base[:, None] ** exponents[None, :])

    def forward(
        self,
        position_ids: torch.Tensor,
        dtype: torch.dtype,
        seq_len: int | torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [B, T, D] for ``position_ids`` [B, T], cast to ``dtype`` as the official model does."""
        inv_freq = self.inv_freq(seq_len, position_ids.device)
        t = position_ids.float()
        if self.scaling_type == "linear":
            t = t / self.factor
        if inv_freq.dim() == 1:
            freqs = t[..., None] * inv_freq  # [B, T, D/2]
        else:
            freqs = t[..., None] * inv_freq[:, None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)
