"""Fused kernels for InternLM2 behind one dispatch point.

Public API (all differentiable):
    rms_norm(x, weight, eps) -> y
    add_rms_norm(x, residual, weight, eps) -> (y, new_residual)
    swiglu(gate, up) -> silu(gate) * up
    apply_rotary(q, k, cos, sin) -> (q_out, k_out)
    fused_linear_cross_entropy(hidden, weight, labels, ignore_index=-100, reduction="mean", chunk_size=None)
    set_backend("auto" | "eager" | "triton"), get_backend(), use_backend(name) (context manager),
    active_path(*tensors) -> "triton" | "eager" (what a call on these tensors would run)

Backends:
    "eager"  — the PyTorch references in ``reference.py`` (fused_linear_cross_entropy stays chunked: it
               never builds [N, V] logits on any backend; only its per-chunk math changes).
    "triton" — the Triton kernels; on CPU tensors only when Triton runs interpreted (TRITON_INTERPRET=1
               set before Triton is first imported), otherwise a RuntimeError.
    "auto"   — (default) Triton when every tensor is on CUDA and Triton imports, else eager.
The backend is explicit process state set through this API (``use_backend`` overrides it for the current
context only); nothing is read from the environment. Shapes the Triton path does not handle (rows wider
than 65536, mismatched swiglu/rotary dtypes) fall back to eager under "auto" and raise under "triton".

Modules: reference.py (eager), triton_common.py, triton_rmsnorm.py, triton_swiglu.py, triton_rotary.py,
triton_cross_entropy.py (per-chunk CE kernel), fused_cross_entropy.py (chunked autograd function).
Triton modules are imported lazily, on first use.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
from collections.abc import Iterator

import torch

from . import reference
from .fused_cross_entropy import linear_cross_entropy as _linear_cross_entropy

__all__ = [
    "active_path",
    "add_rms_norm",
    "apply_rotary",
    "fused_linear_cross_entropy",
    "get_backend",
    "rms_norm",
    "set_backend",
    "swiglu",
    "triton_usable_on_cpu",
    "use_backend",
]

BACKENDS = ("auto", "eager", "triton")
_MAX_TRITON_ROW = 65536

_default_backend = "auto"
_backend_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("kernel_backend", default=None)


def _check(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


def set_backend(name: str) -> None:
    """Sets the process-wide backend (every thread)."""
    global _default_backend
    _default_backend = _check(name)


def get_backend() -> str:
    """The backend in force here: the innermost ``use_backend`` if any, else ``set_backend``'s."""
    override = _backend_override.get()
    return override if override is not None else _default_backend


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Overrides the backend inside the ``with`` block (current thread / asyncio task only)."""
    token = _backend_override.set(_check(name))
    try:
        yield
    finally:
        _backend_override.reset(token)


@functools.cache
def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_usable_on_cpu() -> bool:
    """True when the Triton kernels run interpreted, so CPU tensors can take the Triton path."""
    if not _triton_importable():
        return False
    from .triton_common import interpreter_active

    return interpreter_active()


def _use_triton(tensors: tuple[torch.Tensor, ...], supported: bool = True, why: str = "") -> bool:
    """Resolves the backend for one call on ``tensors``. ``supported`` False means the Triton kernel
    cannot take these arguments (``why`` says which)."""
    backend = get_backend()
    if backend == "eager":
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if backend == "auto":
        return supported and on_cuda and _triton_importable()
    if not _triton_importable():
        raise RuntimeError("backend 'triton' requested but triton is not installed")
    if not on_cuda and not triton_usable_on_cpu():
        raise RuntimeError(
            "backend 'triton' on CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 before "
            "triton (and internlm2.core.kernels' Triton modules) are first imported"
        )
    if not supported:
        raise ValueError(f"the Triton kernel does not support these arguments: {why}")
    return True


def active_path(*tensors: torch.Tensor) -> str:
    """"triton" or "eager": the path a kernel call on ``tensors`` takes under the current backend
    (for arguments the Triton kernels support)."""
    return "triton" if _use_triton(tensors) else "eager"


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """InternLM2RMSNorm over the last dim: ``weight * (x.float() * rsqrt(mean(x^2) + eps)).to(x.dtype)``.

    Output dtype: ``promote_types(weight.dtype, x.dtype)``.
    """
    if _use_triton((x, weight), x.shape[-1] <= _MAX_TRITON_ROW, "row wider than 65536"):
        from . import triton_rmsnorm

        return triton_rmsnorm.rms_norm(x, weight, eps)
    return reference.rms_norm(x, weight, eps)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``new_residual = x + residual`` (in ``x.dtype``); returns ``(rms_norm(new_residual), new_residual)``
    from one pass over memory on the Triton path."""
    if _use_triton((x, residual, weight), x.shape[-1] <= _MAX_TRITON_ROW, "row wider than 65536"):
        from . import triton_rmsnorm

        return triton_rmsnorm.add_rms_norm(x, residual, weight, eps)
    return reference.add_rms_norm(x, residual, weight, eps)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``; same shapes, any leading dims."""
    ok = gate.shape == up.shape and gate.dtype == up.dtype
    if _use_triton((gate, up), ok, "gate and up must share shape and dtype"):
        from . import triton_swiglu

        return triton_swiglu.swiglu(gate, up)
    return reference.swiglu(gate, up)


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE (rotate_half convention) on q [B, T, Hq, D] and k [B, T, Hkv, D] with cos/sin [B, T, D]
    (cast to ``q.dtype``). q/k may be non-contiguous views; outputs are new contiguous tensors."""
    ok = q.dim() == 4 and k.dim() == 4 and q.dtype == k.dtype and q.shape[-1] % 2 == 0
    ok = ok and q.shape[:2] == k.shape[:2] and q.shape[-1] == k.shape[-1]
    if _use_triton((q, k, cos, sin), ok, "q/k must be 4-D [B, T, H, D] of one dtype and even D"):
        from . import triton_rotary

        return triton_rotary.apply_rotary(q, k, cos, sin)
    return reference.apply_rotary(q, k, cos, sin)


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """``F.cross_entropy((hidden @ weight.T).float(), labels, ...)`` without the [N, V] logits.

    hidden [N, H] (or [..., H]), weight [V, H], labels [N] (or [...]). reduction "mean" (over non-ignored
    labels; 0 if none), "sum", or "none" (per-token fp32 losses, 0 where ignored, differentiable).
    ``chunk_size`` rows per chunk (default: ~2**26 logits elements per chunk).
    """
    use_triton = _use_triton((hidden, weight, labels))
    return _linear_cross_entropy(hidden, weight, labels, ignore_index, reduction, chunk_size, use_triton)
