"""Fused RMSNorm and residual-add + RMSNorm: Triton forward and backward kernels.

Forward (one program per row, the whole row in registers):
    s = x + residual                       (add variant only; rounded to x.dtype, written out)
    rstd = rsqrt(mean(s^2) + eps)          (fp32, saved for backward: 4 bytes per row)
    y = weight * round(s * rstd)           (rounded as InternLM2RMSNorm does)
Backward (each program walks a contiguous range of rows):
    g = dy * weight;  xhat = s * rstd
    ds = rstd * (g - xhat * mean(g * xhat))  (+ d new_residual, add variant)
    dweight = sum_rows dy * round(xhat)      (fp32 partial per program, summed in torch)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import as_rows, parallel_programs, round_to, row_block, warps_for


@triton.jit
def _rmsnorm_fwd_kernel(
    X, RES, W, Y, RES_OUT, RSTD,
    stride_x, stride_res, stride_y, stride_res_out,
    N, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(RES + row * stride_res + cols, mask=mask, other=0.0).to(tl.float32)
        x = round_to(x + r, RES_OUT.dtype.element_ty)
        tl.store(RES_OUT + row * stride_res_out + cols, x.to(RES_OUT.dtype.element_ty), mask=mask)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / N + eps)
    tl.store(RSTD + row, rstd)
    h = round_to(x * rstd, X.dtype.element_ty)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    y = round_to(w * h, Y.dtype.element_ty)
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rmsnorm_bwd_kernel(
    DY, S, W, RSTD, DRES_OUT, DS, DW_PARTIAL,
    stride_dy, stride_s, stride_dres_out, stride_ds,
    M, N, rows_per_program,
    HAS_DY: tl.constexpr, HAS_DRES_OUT: tl.constexpr, COMPUTE_DW: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    row_start = pid.to(tl.int64) * rows_per_program  # int64 loop index: row * stride may exceed 2**31
    row_end = tl.minimum(row_start + rows_per_program, M)
    for row64 in range(row_start, row_end):
        ds = tl.zeros([BLOCK], dtype=tl.float32)
        if HAS_DY:
            s = tl.load(S + row64 * stride_s + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + row64)
            dy = tl.load(DY + row64 * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
            xhat = s * rstd
            if COMPUTE_DW:
                dw += dy * round_to(xhat, S.dtype.element_ty)
            g = dy * w
            ds = rstd * (g - xhat * (tl.sum(g * xhat, axis=0) / N))
        if HAS_DRES_OUT:
            ds += tl.load(DRES_OUT + row64 * stride_dres_out + cols, mask=mask, other=0.0).to(tl.float32)
        ds = round_to(ds, DS.dtype.element_ty)
        tl.store(DS + row64 * stride_ds + cols, ds.to(DS.dtype.element_ty), mask=mask)
    if COMPUTE_DW:
        tl.store(DW_PARTIAL + pid * N + cols, dw, mask=mask)


def _forward(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float):
    """Runs the forward kernel; returns (y, new_residual or None, normalised input as rows, rstd)."""
    n = x.shape[-1]
    x2 = as_rows(x)
    m = x2.shape[0]
    y = torch.empty((m, n), dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    rstd = torch.empty(m, dtype=torch.float32, device=x.device)
    if residual is not None:
        r2 = as_rows(residual)
        s2 = torch.empty((m, n), dtype=x.dtype, device=x.device)
    else:
        r2, s2 = x2, x2
    if m > 0:
        block = row_block(n)
        _rmsnorm_fwd_kernel[(m,)](
            x2, r2, weight, y, s2, rstd,
            x2.stride(0), r2.stride(0), y.stride(0), s2.stride(0),
            n, eps,
            HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=warps_for(block),
        )  # fmt: skip
    new_residual = s2.view(x.shape) if residual is not None else None
    return y.view(x.shape), new_residual, s2, rstd


def _backward(dy, dres_out, s2, rstd, weight, compute_dw: bool):
    """Gradient wrt the normalised input (rows) and the weight (or None)."""
    m, n = s2.shape
    ds = torch.empty((m, n), dtype=s2.dtype, device=s2.device)
    dy2 = as_rows(dy) if dy is not None else ds
    dres2 = as_rows(dres_out) if dres_out is not None else ds
    programs = parallel_programs(s2.device, m)
    dw_partial = torch.empty((programs, n), dtype=torch.float32, device=s2.device) if compute_dw else ds
    if m > 0:
        block = row_block(n)
        _rmsnorm_bwd_kernel[(programs,)](
            dy2, s2, weight, rstd, dres2, ds, dw_partial,
            dy2.stride(0), s2.stride(0), dres2.stride(0), ds.stride(0),
            m, n, triton.cdiv(m, programs),
            HAS_DY=dy is not None, HAS_DRES_OUT=dres_out is not None, COMPUTE_DW=compute_dw,
            BLOCK=block, num_warps=warps_for(block),
        )  # fmt: skip
    if not compute_dw:
        return ds, None
    if m == 0:
        return ds, torch.zeros_like(weight)
    return ds, dw_partial.sum(0).to(weight.dtype)


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        y, _, s2, rstd = _forward(x, None, weight, eps)
        ctx.save_for_backward(s2, weight, rstd)
        ctx.x_shape = x.shape
        return y

    @staticmethod
    def backward(ctx, dy):
        s2, weight, rstd = ctx.saved_tensors
        ds, dw = _backward(dy, None, s2, rstd, weight, ctx.needs_input_grad[1])
        return ds.view(ctx.x_shape), dw, None


class AddRMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, eps):
        ctx.set_materialize_grads(False)  # an unused output gets no zero-filled gradient
        y, new_residual, s2, rstd = _forward(x, residual, weight, eps)
        ctx.save_for_backward(s2, weight, rstd)
        ctx.x_shape, ctx.residual_dtype = x.shape, residual.dtype
        return y, new_residual

    @staticmethod
    def backward(ctx, dy, dres_out):
        s2, weight, rstd = ctx.saved_tensors
        if dy is None and dres_out is None:
            return None, None, None, None
        ds, dw = _backward(dy, dres_out, s2, rstd, weight, ctx.needs_input_grad[2] and dy is not None)
        if dw is None and ctx.needs_input_grad[2]:
            dw = torch.zeros_like(weight)
        ds = ds.view(ctx.x_shape)
        return ds, ds.to(ctx.residual_dtype), dw, None


def _needs_autograd(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Triton RMSNorm; same contract as :func:`reference.rms_norm`."""
    if _needs_autograd(x, weight):
        return RMSNormFunction.apply(x, weight, eps)
    return _forward(x, None, weight, eps)[0]


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """Triton residual add + RMSNorm in one pass; same contract as :func:`reference.add_rms_norm`."""
    if _needs_autograd(x, residual, weight):
        return AddRMSNormFunction.apply(x, residual, weight, eps)
    y, new_residual, _, _ = _forward(x, residual, weight, eps)
    return y, new_residual
