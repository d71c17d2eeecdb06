"""Pieces every Triton kernel here shares: PyTorch-exact rounding, row views, launch sizing.

Kernels do all arithmetic in fp32 and round explicitly with :func:`round_to` wherever the eager reference
rounds (after each op it runs in bf16/fp16). Two reasons: the result then matches the reference instead of
merely approximating it, and the Triton CPU interpreter (used by the tests) gets bf16 wrong otherwise — it
stores bf16 as raw uint16 (so bf16 arithmetic is garbage) and truncates fp32->bf16 casts instead of
rounding to nearest even.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# One program normalises a whole row in registers; wider rows fall back to the eager reference.
MAX_ROW_BLOCK = 65536


@triton.jit
def round_to(x, dtype: tl.constexpr):
    """fp32 ``x`` rounded to nearest even at ``dtype``'s precision, returned as fp32.

    bf16 is rounded with integer ops so compiled and interpreted kernels agree (fp32 subnormals aside).
    """
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        y = tl.where(x != x, x, bits.to(tl.float32, bitcast=True))
    elif dtype == tl.float16:
        y = x.to(tl.float16).to(tl.float32)
    else:
        y = x
    return y


def interpreter_active() -> bool:
    """True when ``triton.jit`` produced interpreted (CPU) kernels, i.e. TRITON_INTERPRET=1 was set
    before this module was first imported."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(round_to, InterpretedFunction)


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` viewed as [rows, x.shape[-1]] with unit stride on the last dim (copies only if it must)."""
    rows = x.reshape(-1, x.shape[-1])
    if rows.shape[1] > 1 and rows.stride(1) != 1:
        rows = rows.contiguous()
    return rows


def row_block(n: int) -> int:
    """Block covering one row of ``n`` elements."""
    return triton.next_power_of_2(n)


def warps_for(block: int) -> int:
    """Warps for a block of ``block`` fp32 elements: ~8-16 elements per thread, capped at 16 warps."""
    return int(min(16, max(1, block // 512)))


def parallel_programs(device: torch.device, rows: int) -> int:
    """Programs for a reduction over rows (rms_norm's weight gradient): a few per SM on CUDA."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(rows, 4 * sms))
    return max(1, min(rows, 8))
