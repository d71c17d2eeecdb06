"""Attention backends: how a layer's rotated q, k, v become its attention output.

The model computes q/k/v and RoPE and then calls ``backend(layer_idx, q, k, v)``; where the
keys and values live (nowhere, a contiguous cache, the engine's paged pool) is the backend's
business. That keeps one model for training, packed prefill, simple decoding and the paged
engine (which provides its own backend with this same call).

Shapes: q [B, T, Hq, D], k and v [B, T, Hkv, D]; the output is [B, T, Hq, D].
Query head h reads KV head h // G (G = Hq / Hkv), the grouping of the packed ``wqkv``.
"""

from __future__ import annotations

import itertools
from typing import Protocol

import torch
import torch.nn.functional as F


class AttentionBackend(Protocol):
    def __call__(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...


# torch >= 2.5: SDPA reads grouped K/V (query head h -> kv head h // G) without copying them.
_ENABLE_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
    """SDPA on [B, T, H, D] inputs with GQA. ``mask`` is a boolean [B, Tq, Tk] (True = attend)."""
    groups = q.shape[2] // k.shape[2]
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
    extra = {}
    if groups > 1 and _ENABLE_GQA:
        extra["enable_gqa"] = True  # query head h reads kv head h // G, the wqkv grouping
    elif groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=None if mask is None else mask[:, None], is_causal=causal and mask is None, **extra
    )
    return out.transpose(1, 2)


try:  # torch >= 2.5
    from torch.nn.attention.flex_attention import flex_attention as _flex_attention

    FLEX_AVAILABLE = True
except ImportError:  # pragma: no cover - older torch: the per-document path only
    FLEX_AVAILABLE = False
_compiled_flex = None


def flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask) -> torch.Tensor:
    """Flex attention on [B, T, H, D] inputs with GQA; compiled (fused) on CUDA, eager elsewhere."""
    global _compiled_flex
    fn = _flex_attention
    if q.is_cuda:
        if _compiled_flex is None:
            _compiled_flex = torch.compile(_flex_attention)
        fn = _compiled_flex
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    out = fn(q, k, v, block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1])
    return out.transpose(1, 2)


class DenseAttention:
    """Causal attention over the tokens of this call only (training, prefill without a cache).

    ``doc_ids`` [B, T]: packed rows — a token attends only to earlier tokens of the same document.
    ``padding_mask`` [B, T]: True for real tokens; keys at padded positions are never attended.

    Packed rows without padding (``packed_kernel``):

    - ``"flex"``: ONE flex-attention call per layer with a document block mask (built once per forward,
      shared by every layer): blocks outside every document's causal triangle are skipped, and on CUDA
      the call is a compiled fused kernel, forward and backward. Default on CUDA when available.
    - ``"per_document"``: one causal SDPA per document (the reference, and the CPU path: flex has no CPU
      backward and runs unfused there). No [T, T] mask, so the flash kernel stays usable; the document
      boundaries are read to the host once per forward and shared by every layer.
    """

    def __init__(self, doc_ids: torch.Tensor | None = None, padding_mask: torch.Tensor | None = None,
                 packed_kernel: str = "auto"):
        if packed_kernel not in ("auto", "flex", "per_document"):
            raise ValueError(f"packed_kernel: must be auto, flex or per_document, got {packed_kernel!r}")
        self.doc_ids = doc_ids
        self.padding_mask = padding_mask
        self.packed_kernel = packed_kernel
        self._mask: torch.Tensor | None = None
        self._segments: list[list[tuple[int, int]]] | None = None
        self._block_mask = None

    def mask(self, t: int, device: torch.device) -> torch.Tensor | None:
        if self.doc_ids is None and self.padding_mask is None:
            return None
        if self._mask is None:
            causal = torch.ones(t, t, dtype=torch.bool, device=device).tril()
            mask = causal[None]
            if self.doc_ids is not None:
                mask = mask & (self.doc_ids[:, :, None] == self.doc_ids[:, None, :])
            if self.padding_mask is not None:
                mask = mask & self.padding_mask[:, None, :].bool()
                # A padded query row would attend to nothing (NaN); let it see itself.
                mask = mask | torch.eye(t, dtype=torch.bool, device=device)[None]
            self._mask = mask
        return self._mask

    def segments(self) -> list[list[tuple[int, int]]]:
        """Per row, the (start, end) of each document."""
        if self._segments is None:
            rows = []
            for row in self.doc_ids.tolist():
                bounds = [0] + [i for i in range(1, len(row)) if row[i] != row[i - 1]] + [len(row)]
                rows.append(list(itertools.pairwise(bounds)))
            self._segments = rows
        return self._segments

    def use_flex(self, q: torch.Tensor) -> bool:
        if self.packed_kernel == "auto":
            return q.is_cuda and FLEX_AVAILABLE
        return self.packed_kernel == "flex"

    def block_mask(self, t: int):
        """Flex-attention block mask of the packed rows: causal and inside each document."""
        if self._block_mask is None:
            from torch.nn.attention.flex_attention import create_block_mask

            doc = self.doc_ids

            def same_document_causal(b, h, q_idx, kv_idx):
                return (doc[b, q_idx] == doc[b, kv_idx]) & (q_idx >= kv_idx)

            self._block_mask = create_block_mask(same_document_causal, doc.shape[0], None, t, t,
                                                 device=doc.device)
        return self._block_mask

    def __call__(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.doc_ids is not None and self.padding_mask is None and self.use_flex(q):
            return flex(q, k, v, self.block_mask(q.shape[1]))
        if self.doc_ids is not None and self.padding_mask is None:
            rows = [
                torch.cat([sdpa(q[r : r + 1, s:e], k[r : r + 1, s:e], v[r : r + 1, s:e], None, causal=True)
                           for s, e in row], dim=1)
                for r, row in enumerate(self.segments())
            ]
            return torch.cat(rows, dim=0)
        return sdpa(q, k, v, self.mask(q.shape[1], q.device), causal=True)


def doc_ids_from_lengths(lengths: list[list[int]] | list[int], total: int, device=None) -> torch.Tensor:
    """Document ids [B, T] for rows packed from documents of the given lengths (the tail is its own doc)."""
    rows = [lengths] if lengths and isinstance(lengths[0], int) else lengths
    out = torch.empty(len(rows), total, dtype=torch.long, device=device)
    for r, row in enumerate(rows):
        ids = torch.repeat_interleave(torch.arange(len(row)), torch.tensor(row))
        if ids.numel() > total:
            raise ValueError(f"documents of row {r} hold {ids.numel()} tokens, more than the row's {total}")
        out[r, : ids.numel()] = ids
        out[r, ids.numel() :] = len(row)
    return out


def positions_from_doc_ids(doc_ids: torch.Tensor) -> torch.Tensor:
    """Position ids that restart at 0 at every document boundary of a packed row."""
    b, t = doc_ids.shape
    idx = torch.arange(t, device=doc_ids.device).expand(b, t)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    start_idx = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - start_idx


class KVCache:
    """A contiguous KV cache for simple batched decoding (all rows advance together).

    Call ``model(ids, position_ids, attn=cache)`` then ``cache.advance(T)`` once per forward.
    Left-padded batches pass ``padding_mask`` over the cache length so pads are never attended.
    The engine's paged cache replaces this for serving.
    """

    def __init__(self, num_layers: int, batch_size: int, max_len: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu"):
        shape = (num_layers, batch_size, max_len, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0
        self.max_len = max_len
        self.padding_mask: torch.Tensor | None = None  # [B, max_len] bool

    @classmethod
    def for_model(cls, model, batch_size: int, max_len: int) -> KVCache:
        cfg = model.config
        p = next(model.parameters())
        return cls(cfg.num_hidden_layers, batch_size, max_len, cfg.num_key_value_heads, cfg.head_dim,
                   p.dtype, p.device)

    def __call__(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        t = q.shape[1]
        start, end = self.length, self.length + t
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens; this step needs {end}")
        self.k[layer_idx, :, start:end] = k
        self.v[layer_idx, :, start:end] = v
        keys, values = self.k[layer_idx, :, :end], self.v[layer_idx, :, :end]
        # Query i (absolute position start + i) sees keys 0 .. start + i.
        mask = torch.ones(t, end, dtype=torch.bool, device=q.device).tril(diagonal=start)[None]
        if self.padding_mask is not None:
            mask = mask & self.padding_mask[:, None, :end]
            # A pad query would attend to nothing (NaN); let it see its own key.
            own = torch.zeros(t, end, dtype=torch.bool, device=q.device)
            own[torch.arange(t), torch.arange(start, end)] = True
            mask = mask | own[None]
        return sdpa(q, keys, values, mask, causal=False)

    def advance(self, num_tokens: int) -> None:
        self.length += num_tokens
