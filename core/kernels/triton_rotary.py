"""Rotary position embedding on q and k in one launch: Triton forward and backward kernels.

One program per token (b, t): it loads that token's cos/sin once (cast to q.dtype, as the official model
does) and rotates every q head and every k head. With x1, x2 the halves of the head dim and c, s likewise:
    forward   out1 = x1*c1 - x2*s1          out2 = x2*c2 + x1*s2
    backward  dx1 = dy1*c1 + dy2*s2         dx2 = dy2*c2 - dy1*s1
Each product and sum is rounded to q.dtype exactly where the eager ``q*cos + rotate_half(q)*sin`` rounds.
q and k may be any strided views whose last dim is contiguous (e.g. splits of a packed wqkv output);
cos/sin may be broadcast views (stride 0 over batch).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import round_to


@triton.jit
def _rotate_heads(
    X, OUT, stride_xb, stride_xt, stride_xh, stride_ob, stride_ot, stride_oh,
    b, t, H, c1, c2, s1, s2, HALF,
    BACKWARD: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):  # fmt: skip
    heads = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (heads < H) & (d < HALF)
    x_ptr = X + b * stride_xb + t * stride_xt + heads * stride_xh + d
    o_ptr = OUT + b * stride_ob + t * stride_ot + heads * stride_oh + d
    x1 = tl.load(x_ptr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + HALF, mask=mask, other=0.0).to(tl.float32)
    DT: tl.constexpr = OUT.dtype.element_ty
    if BACKWARD:
        out1 = round_to(round_to(x1 * c1, DT) + round_to(x2 * s2, DT), DT)
        out2 = round_to(round_to(x2 * c2, DT) - round_to(x1 * s1, DT), DT)
    else:
        out1 = round_to(round_to(x1 * c1, DT) - round_to(x2 * s1, DT), DT)
        out2 = round_to(round_to(x2 * c2, DT) + round_to(x1 * s2, DT), DT)
    tl.store(o_ptr, out1.to(DT), mask=mask)
    tl.store(o_ptr + HALF, out2.to(DT), mask=mask)


@triton.jit
def _rotary_kernel(
    Q, K, COS, SIN, QO, KO,
    sqb, sqt, sqh, skb, skt, skh,
    sqob, sqot, sqoh, skob, skot, skoh,
    scb, sct, ssb, sst,
    T, HQ, HKV, HALF,
    BACKWARD: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr, BLOCK_HALF: tl.constexpr,
):  # fmt: skip
    token = tl.program_id(0)
    b = (token // T).to(tl.int64)
    t = (token % T).to(tl.int64)
    d = tl.arange(0, BLOCK_HALF)[None, :]
    dmask = d < HALF
    DT: tl.constexpr = QO.dtype.element_ty
    cos_ptr = COS + b * scb + t * sct + d
    sin_ptr = SIN + b * ssb + t * sst + d
    c1 = round_to(tl.load(cos_ptr, mask=dmask, other=0.0).to(tl.float32), DT)
    c2 = round_to(tl.load(cos_ptr + HALF, mask=dmask, other=0.0).to(tl.float32), DT)
    s1 = round_to(tl.load(sin_ptr, mask=dmask, other=0.0).to(tl.float32), DT)
    s2 = round_to(tl.load(sin_ptr + HALF, mask=dmask, other=0.0).to(tl.float32), DT)
    _rotate_heads(Q, QO, sqb, sqt, sqh, sqob, sqot, sqoh, b, t, HQ, c1, c2, s1, s2, HALF,
                  BACKWARD, BLOCK_HQ, BLOCK_HALF)  # fmt: skip
    _rotate_heads(K, KO, skb, skt, skh, skob, skot, skoh, b, t, HKV, c1, c2, s1, s2, HALF,
                  BACKWARD, BLOCK_HKV, BLOCK_HALF)  # fmt: skip


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _launch(q, k, cos, sin, backward: bool):
    """Rotates (or un-rotates, for gradients) q and k; returns new contiguous tensors."""
    bsz, seqlen, hq, dim = q.shape
    hkv = k.shape[2]
    q, k = _last_dim_contiguous(q), _last_dim_contiguous(k)
    cos = _last_dim_contiguous(cos.expand(bsz, seqlen, dim))
    sin = _last_dim_contiguous(sin.expand(bsz, seqlen, dim))
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=q.dtype, device=k.device)
    if bsz * seqlen == 0:
        return q_out, k_out
    half = dim // 2
    block_half = triton.next_power_of_2(half)
    block_hq, block_hkv = triton.next_power_of_2(hq), triton.next_power_of_2(hkv)
    _rotary_kernel[(bsz * seqlen,)](
        q, k, cos, sin, q_out, k_out,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        q_out.stride(0), q_out.stride(1), q_out.stride(2), k_out.stride(0), k_out.stride(1), k_out.stride(2),
        cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1),
        seqlen, hq, hkv, half,
        BACKWARD=backward, BLOCK_HQ=block_hq, BLOCK_HKV=block_hkv, BLOCK_HALF=block_half,
        num_warps=4 if block_hq * block_half <= 2048 else 8,
    )  # fmt: skip
    return q_out, k_out


class RotaryFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _launch(q, k, cos, sin, backward=False)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        dq, dk = _launch(dq, dk, cos, sin, backward=True)
        return dq, dk, None, None


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Triton RoPE; contract of :func:`reference.apply_rotary` (q and k share a dtype, head dim even).

    cos/sin receive no gradient.
    """
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        return RotaryFunction.apply(q, k, cos, sin)
    return _launch(q, k, cos, sin, backward=False)
