"""The engine's attention backend: the model's ``backend(layer_idx, q, k, v)`` over the paged KV pool.

A step is one ragged batch flattened into N tokens (the model sees [1, N] or [N, 1]). The runner sets
``metadata`` before each forward:

    tokens [0, num_decodes)     one query token per sequence (decode)  -> paged decode
    then PrefillChunks           q_len tokens after ctx_len cached ones -> causal attention
                                 (``count`` equal-length fresh prompts in a row run as one batch)

Every layer first writes the step's new K/V into their slots, then attends, so a sequence's own new
tokens are read back from the pool like its context. Decode uses the Triton paged-decode kernel on
CUDA (``triton_decode``) and ``decode_attention_reference`` (gather the blocks, masked SDPA) elsewhere;
prefill uses SDPA (flash on CUDA) on the chunk, over the gathered context when there is one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..attention import sdpa
from .kv_cache import PagedKVCache


@dataclass(slots=True)
class PrefillChunk:
    q_start: int  # first of its tokens in the flattened step
    q_len: int
    ctx_len: int  # tokens already in the cache before this chunk
    row: int = -1  # its row of AttentionMetadata.prefill_block_tables (chunks with context only)
    count: int = 1  # ctx_len 0 only: this many sequences of q_len tokens back to back, one SDPA batch


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # (N,) int64: where each new token's K/V goes
    num_decodes: int = 0
    decode_block_tables: torch.Tensor | None = None  # (num_decodes, max_blocks) int32
    decode_seq_lens: torch.Tensor | None = None  # (num_decodes,) int32/int64, including the new token
    decode_max_blocks: int = 0  # widest decode block table actually used (host int)
    decode_num_splits: int = 1  # Triton split count (fixed per captured CUDA graph)
    prefills: list[PrefillChunk] = field(default_factory=list)
    prefill_block_tables: torch.Tensor | None = None  # (num_prefills_with_context, max_blocks) int64


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """k, v (N, Hkv, D) into slots of the (num_blocks, block_size, Hkv, D) layer caches."""
    hkv, d = k.shape[1:]
    k_cache.view(-1, hkv, d).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, hkv, d).index_copy_(0, slot_mapping, v)


def gather_kv(cache: torch.Tensor, block_ids: torch.Tensor, length: int) -> torch.Tensor:
    """The first ``length`` tokens of a sequence's blocks: (length, Hkv, D)."""
    bs = cache.shape[1]
    return cache[block_ids[: -(-length // bs)]].flatten(0, 1)[:length]


def decode_attention_reference(q, k_cache, v_cache, block_tables, seq_lens, max_blocks: int) -> torch.Tensor:
    """q (S, Hq, D) -> (S, Hq, D): gather each sequence's blocks, mask past its length, SDPA."""
    bt = block_tables[:, :max_blocks].long()
    keys = k_cache[bt].flatten(1, 2)  # (S, max_blocks * bs, Hkv, D)
    values = v_cache[bt].flatten(1, 2)
    mask = torch.arange(keys.shape[1], device=q.device)[None, :] < seq_lens[:, None].long()  # (S, L)
    return sdpa(q[:, None], keys, values, mask[:, None, :], causal=False)[:, 0]


def prefill_attention(q, k, v, ctx_k=None, ctx_v=None) -> torch.Tensor:
    """Causal attention of a chunk's q (T, Hq, D) over [context, chunk] keys; query i sits at ctx + i."""
    if ctx_k is None:
        return sdpa(q[None], k[None], v[None], None, causal=True)[0]
    keys, values = torch.cat([ctx_k, k]), torch.cat([ctx_v, v])
    groups = q.shape[1] // k.shape[1]
    qt, kt, vt = q.transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1)  # (H, T, D)
    if groups > 1:
        kt, vt = kt.repeat_interleave(groups, 0), vt.repeat_interleave(groups, 0)
    t, total = q.shape[0], keys.shape[0]
    # Bottom-right aligned causal mask: query i sees keys 0 .. ctx + i.
    mask = torch.ones(t, total, dtype=torch.bool, device=q.device).tril(diagonal=total - t)
    return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask).transpose(0, 1)


class PagedAttention:
    """Callable attention backend over a ``PagedKVCache``; ``metadata`` is set per step."""

    def __init__(self, kv_cache: PagedKVCache, num_heads: int, use_triton: bool):
        self.kv = kv_cache
        self.num_heads = num_heads
        self.use_triton = use_triton
        self.metadata: AttentionMetadata | None = None

    def __call__(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        md = self.metadata
        shape = q.shape
        n = shape[0] * shape[1]
        q = q.reshape(n, *shape[2:])  # (N, Hq, D)
        k = k.reshape(n, *k.shape[2:])  # (N, Hkv, D)
        v = v.reshape(n, *v.shape[2:])
        k_cache, v_cache = self.kv.k[layer_idx], self.kv.v[layer_idx]
        write_kv(k_cache, v_cache, k, v, md.slot_mapping)

        nd = md.num_decodes
        parts = []
        if nd:
            qd = q[:nd]
            if self.use_triton:
                from .triton_decode import paged_decode

                parts.append(paged_decode(qd.contiguous(), k_cache, v_cache, md.decode_block_tables, md.decode_seq_lens,
                                          q.shape[-1] ** -0.5, md.decode_num_splits))
            else:
                parts.append(decode_attention_reference(qd, k_cache, v_cache, md.decode_block_tables,
                                                        md.decode_seq_lens, md.decode_max_blocks))
        for p in md.prefills:
            if p.ctx_len == 0:
                sl = slice(p.q_start, p.q_start + p.q_len * p.count)
                qg, kg, vg = (t[sl].view(p.count, p.q_len, *t.shape[1:]) for t in (q, k, v))
                parts.append(sdpa(qg, kg, vg, None, causal=True).reshape(-1, *q.shape[1:]))
            else:
                sl = slice(p.q_start, p.q_start + p.q_len)
                block_ids = md.prefill_block_tables[p.row]
                parts.append(prefill_attention(q[sl], k[sl], v[sl], gather_kv(k_cache, block_ids, p.ctx_len),
                                               gather_kv(v_cache, block_ids, p.ctx_len)))
        out = parts[0] if len(parts) == 1 else torch.cat(parts)
        return out.view(shape)
