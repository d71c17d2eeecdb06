"""SwiGLU ``silu(gate) * up``: Triton forward and backward kernels (elementwise, memory bound).

Forward reads gate and up once and writes y; backward recomputes sigmoid(gate) from the saved inputs
instead of saving it, which costs nothing in a memory-bound kernel and saves an activation-sized buffer.
    s = round(gate * sigmoid(gate));  y = round(s * up)
    d_up   = dy * s
    d_gate = round(dy * up) * sigmoid(gate) * (1 + gate * (1 - sigmoid(gate)))
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import as_rows, round_to

_BLOCK = 1024


@triton.jit
def _swiglu_fwd_kernel(G, U, Y, stride_g, stride_u, stride_y, N, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    s = round_to(g * tl.sigmoid(g), G.dtype.element_ty)
    y = round_to(s * u, Y.dtype.element_ty)
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    DY, G, U, DG, DU,
    stride_dy, stride_g, stride_u, stride_dg, stride_du,
    N, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    s = round_to(g * sig, G.dtype.element_ty)
    du = round_to(dy * s, DU.dtype.element_ty)
    ds = round_to(dy * u, G.dtype.element_ty)
    dg = round_to(ds * sig * (1.0 + g * (1.0 - sig)), DG.dtype.element_ty)
    tl.store(DU + row * stride_du + cols, du.to(DU.dtype.element_ty), mask=mask)
    tl.store(DG + row * stride_dg + cols, dg.to(DG.dtype.element_ty), mask=mask)


def _grid(rows: torch.Tensor):
    return (rows.shape[0], triton.cdiv(rows.shape[1], _BLOCK))


def _forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    g2, u2 = as_rows(gate), as_rows(up)
    y = torch.empty(g2.shape, dtype=torch.promote_types(gate.dtype, up.dtype), device=gate.device)
    if y.numel() > 0:
        _swiglu_fwd_kernel[_grid(g2)](
            g2, u2, y, g2.stride(0), u2.stride(0), y.stride(0), g2.shape[1], BLOCK=_BLOCK, num_warps=4
        )
    return y.view(gate.shape)


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return _forward(gate, up)

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        g2, u2, dy2 = as_rows(gate), as_rows(up), as_rows(dy)
        dg = torch.empty(g2.shape, dtype=gate.dtype, device=gate.device)
        du = torch.empty(u2.shape, dtype=up.dtype, device=up.device)
        if dg.numel() > 0:
            _swiglu_bwd_kernel[_grid(g2)](
                dy2, g2, u2, dg, du,
                dy2.stride(0), g2.stride(0), u2.stride(0), dg.stride(0), du.stride(0),
                g2.shape[1], BLOCK=_BLOCK, num_warps=4,
            )  # fmt: skip
        return dg.view(gate.shape), du.view(up.shape)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Triton ``silu(gate) * up`` for same-shape, same-dtype inputs; contract of :func:`reference.swiglu`."""
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return SwiGLUFunction.apply(gate, up)
    return _forward(gate, up)
