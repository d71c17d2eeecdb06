"""Paged decode attention in Triton: one query token per sequence over its KV blocks (flash-decoding).

Grid (sequence, kv head, split). A program loads the G query heads that share its KV head (GQA: query
head h reads KV head h // G) and walks its share of the sequence's blocks with an online softmax,
writing a partial output and its log-sum-exp. ``combine`` merges the splits. The split count is a
launch constant, and the blocks each split covers are derived from the sequence length inside the
kernel, so one launch shape serves every batch of a CUDA graph.

The plain-PyTorch reference is ``paged_attention.decode_attention_reference``; tests run both (under
the Triton interpreter on CPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _paged_decode_kernel(
    Q, K, V, BlockTables, SeqLens, OutPartial, LsePartial,
    scale,
    stride_qs, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_bs,
    stride_os, stride_oh, stride_op,
    stride_ls, stride_lh,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    NUM_SPLITS: tl.constexpr, IEEE: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    seq_len = tl.load(SeqLens + seq)
    num_blocks = tl.cdiv(seq_len, BLOCK_SIZE)
    per_split = tl.cdiv(num_blocks, NUM_SPLITS)
    first = split * per_split
    last = tl.minimum(first + per_split, num_blocks)

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_t = tl.arange(0, BLOCK_SIZE)
    g_mask = offs_g < GROUP
    heads = kv_head * GROUP + offs_g
    q = tl.load(Q + seq * stride_qs + heads[:, None] * stride_qh + offs_d[None, :], mask=g_mask[:, None], other=0.0)

    m = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_sum = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], dtype=tl.float32)
    for blk in range(first, last):
        block_id = tl.load(BlockTables + seq * stride_bs + blk).to(tl.int64)
        kv_off = block_id * stride_kb + offs_t[:, None] * stride_kt + kv_head * stride_kh + offs_d[None, :]
        k = tl.load(K + kv_off)  # (BLOCK_SIZE, HEAD_DIM)
        v = tl.load(V + kv_off)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * scale  # (GROUP_PAD, BLOCK_SIZE)
        valid = (blk * BLOCK_SIZE + offs_t) < seq_len
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m - m_new)
        l_sum = l_sum * alpha + tl.sum(p, axis=1)
        if IEEE:
            pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m = m_new

    empty = l_sum == 0.0  # this split had no blocks: weight 0 in the combine
    out = tl.where(empty[:, None], 0.0, acc / tl.where(empty, 1.0, l_sum)[:, None])
    lse = tl.where(empty, float("-inf"), m + tl.log(tl.where(empty, 1.0, l_sum)))
    o_ptr = OutPartial + seq * stride_os + heads[:, None] * stride_oh + split * stride_op + offs_d[None, :]
    tl.store(o_ptr, out, mask=g_mask[:, None])
    tl.store(LsePartial + seq * stride_ls + heads * stride_lh + split, lse, mask=g_mask)


def supports(head_dim: int, block_size: int) -> bool:
    """tl.dot needs power-of-two tiles of at least 16."""
    return all(x >= 16 and x & (x - 1) == 0 for x in (head_dim, block_size))


def num_splits_for(num_seqs: int, num_kv_heads: int, max_blocks: int, num_sms: int) -> int:
    """Enough programs to cover the SMs twice, never more splits than blocks."""
    want = -(-2 * num_sms // max(1, num_seqs * num_kv_heads))
    return max(1, min(16, want, max_blocks))


def paged_decode(
    q: torch.Tensor,  # (S, Hq, D)
    k_cache: torch.Tensor,  # (num_blocks, block_size, Hkv, D)
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # (S, max_blocks) int32
    seq_lens: torch.Tensor,  # (S,) int32 or int64, context including the new token
    scale: float,
    num_splits: int,
) -> torch.Tensor:
    s, hq, d = q.shape
    _, block_size, hkv, _ = k_cache.shape
    group = hq // hkv
    out_partial = torch.empty(s, hq, num_splits, d, dtype=torch.float32, device=q.device)
    lse_partial = torch.empty(s, hq, num_splits, dtype=torch.float32, device=q.device)
    grid = (s, hkv, num_splits)
    _paged_decode_kernel[grid](
        q, k_cache, v_cache, block_tables, seq_lens, out_partial, lse_partial,
        scale,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0),
        out_partial.stride(0), out_partial.stride(1), out_partial.stride(2),
        lse_partial.stride(0), lse_partial.stride(1),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=d, BLOCK_SIZE=block_size,
        NUM_SPLITS=num_splits, IEEE=q.dtype == torch.float32,
    )
    return combine(out_partial, lse_partial).to(q.dtype)


def combine(out_partial: torch.Tensor, lse_partial: torch.Tensor) -> torch.Tensor:
    """Merge split partials: out = sum_p exp(lse_p - lse) * out_p. (S, Hq, P, D), (S, Hq, P) -> (S, Hq, D)."""
    if out_partial.shape[2] == 1:
        return out_partial[:, :, 0]
    weights = torch.softmax(lse_partial, dim=-1)  # -inf splits get weight 0
    return (weights[..., None] * out_partial).sum(dim=2)
