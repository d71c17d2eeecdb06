"""Per-chunk cross-entropy kernel for :mod:`fused_cross_entropy`: one program per row of a logits chunk.

Works in place on the [C, V] logits chunk (the matmul output, in the activation dtype) so no fp32 copy of
the chunk exists:
    COMPUTE_LSE  pass 1: online max / sum-exp over V  -> lse[row], loss[row] = lse - logit[label]
    WRITE_GRAD   pass 2: logits[row] <- scale[row] * (softmax - onehot(label)), rounded to the logits dtype
Rows whose label is ``ignore_index`` get loss 0 and a zero gradient row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import round_to

_BLOCK_V = 4096


@triton.jit
def _ce_chunk_kernel(
    LOGITS, LABELS, LSE, LOSS, SCALE,
    stride_row, V, ignore_index,
    COMPUTE_LSE: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride_row
    label = tl.load(LABELS + row)
    valid = label != ignore_index
    if COMPUTE_LSE:
        m = float("-inf")
        acc = 0.0
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            acc = acc * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            m = m_new
        lse = m + tl.log(acc)
        target = tl.load(base + tl.where(valid, label, 0)).to(tl.float32)
        tl.store(LSE + row, lse)
        tl.store(LOSS + row, tl.where(valid, lse - target, 0.0))
    else:
        lse = tl.load(LSE + row)
    if WRITE_GRAD:
        scale = tl.where(valid, tl.load(SCALE + row), 0.0)
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = cols < V
            x = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
            p = tl.exp(x - lse)
            g = tl.where(cols == label, p - 1.0, p) * scale
            g = round_to(g, LOGITS.dtype.element_ty)
            tl.store(base + cols, g.to(LOGITS.dtype.element_ty), mask=mask)


def ce_chunk(
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    loss: torch.Tensor | None,
    row_scale: torch.Tensor | None,
    ignore_index: int,
) -> None:
    """Fills ``lse``/``loss`` (when ``loss`` is given) and, when ``row_scale`` is given, overwrites
    ``logits`` [C, V] (contiguous rows) with the scaled logits gradient. ``lse`` is read, not written,
    when ``loss`` is None."""
    rows, vocab = logits.shape
    if rows == 0:
        return
    assert logits.stride(1) == 1
    compute_lse = loss is not None
    write_grad = row_scale is not None
    _ce_chunk_kernel[(rows,)](
        logits, labels, lse, loss if compute_lse else lse, row_scale if write_grad else lse,
        logits.stride(0), vocab, ignore_index,
        COMPUTE_LSE=compute_lse, WRITE_GRAD=write_grad, BLOCK_V=min(_BLOCK_V, triton.next_power_of_2(vocab)),
        num_warps=8,
    )  # fmt: skip
