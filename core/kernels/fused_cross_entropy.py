"""Linear + cross-entropy without materialising the [N, V] logits.

``loss = CE((hidden @ weight.T).float(), labels)`` is computed over row chunks of ``hidden``: each chunk's
logits [C, V] (activation dtype) are produced by one matmul, reduced to per-row ``lse``/loss, turned into
the logits gradient in place, and consumed by the two gradient matmuls before the next chunk. Peak extra
memory is one [C, V] chunk, plus, when the weight needs a gradient, an fp32 [V, H] accumulator (1.4 GiB for
InternLM2-7B) whose weight-dtype copy is what backward returns.

Gradient strategy (why two):
  * reduction "mean"/"sum" with grads needed — *precompute* (as Liger-Kernel does): the gradients are
    computed during forward, where the logits chunk already exists, and backward only scales them by the
    scalar grad_output. 1 logits matmul + 2 grad matmuls per chunk, the minimum.
  * reduction "none" — *recompute*: grad_output is a per-token vector (DPO/PPO weight token log-probs),
    unknown at forward time, so forward keeps only ``lse`` [N] (4 bytes per token) and backward recomputes
    each logits chunk. One extra matmul per chunk; in exchange no-grad calls (reference/scoring passes) do
    forward work only and no [V, H] gradient is held between forward and backward.
The per-chunk softmax/gradient math is a Triton kernel (``triton_cross_entropy``) when enabled, else the
eager functions below; both read the logits in the activation dtype and work in fp32.
"""

from __future__ import annotations

import torch

_REDUCTIONS = ("mean", "sum", "none")
# Default chunk: about 2**26 logits elements (128 MiB in bf16) per chunk, a multiple of 64 rows.
_CHUNK_ELEMENTS = 1 << 26


def default_chunk_size(vocab: int) -> int:
    return max(64, (_CHUNK_ELEMENTS // vocab) // 64 * 64)


# ---------------------------------------------------------------------------------------- per-chunk math
def _eager_ce_chunk(logits, labels, lse, loss, row_scale, ignore_index):
    """Eager twin of ``triton_cross_entropy.ce_chunk`` (same in/out contract, gradient written in place)."""
    valid = labels != ignore_index
    safe_labels = torch.where(valid, labels, 0).unsqueeze(1)  # [C, 1]
    logits32 = logits.float()  # [C, V]
    if loss is not None:
        lse.copy_(torch.logsumexp(logits32, dim=-1))
        target = logits32.gather(1, safe_labels).squeeze(1)
        loss.copy_(torch.where(valid, lse - target, 0.0))
    if row_scale is not None:
        grad = torch.exp(logits32.sub_(lse.unsqueeze(1)))  # softmax, reusing the fp32 buffer
        grad.scatter_add_(1, safe_labels, -valid.to(grad.dtype).unsqueeze(1))
        grad.mul_(torch.where(valid, row_scale, 0.0).unsqueeze(1))
        logits.copy_(grad)


def _chunk_fn(use_triton: bool):
    if use_triton:
        from .triton_cross_entropy import ce_chunk

        return ce_chunk
    return _eager_ce_chunk


# ------------------------------------------------------------------------------------------------ passes
def _chunks(n: int, chunk_size: int):
    for start in range(0, n, chunk_size):
        yield start, min(start + chunk_size, n)


def _grad_buffers(hidden, weight, need_hidden: bool, need_weight: bool):
    grad_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_hidden else None
    # fp32 accumulator: the weight gradient sums over every chunk; rounding each partial sum to bf16
    # would lose precision in proportion to the number of chunks.
    grad_weight = None
    if need_weight:
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    return grad_hidden, grad_weight


def _accumulate_grads(dlogits, hidden_chunk, weight, grad_hidden, grad_weight, start, end):
    """dlogits [C, V] -> grad_hidden[start:end] = dlogits @ W, grad_weight (fp32) += dlogits.T @ h."""
    if grad_hidden is not None:
        torch.mm(dlogits, weight, out=grad_hidden[start:end])
    if grad_weight is None:
        return
    if dlogits.dtype == torch.float32:
        grad_weight.addmm_(dlogits.t(), hidden_chunk)
        return
    # Half-precision operands: the product lands in a half-precision temporary before the fp32 add.
    # Slicing V bounds that temporary to ~_CHUNK_ELEMENTS (a full [V, H] one is 0.7 GiB for InternLM2-7B).
    vocab_slice = max(1, _CHUNK_ELEMENTS // hidden_chunk.shape[1])
    for v0 in range(0, dlogits.shape[1], vocab_slice):
        v1 = min(v0 + vocab_slice, dlogits.shape[1])
        grad_weight[v0:v1].add_(torch.mm(dlogits[:, v0:v1].t(), hidden_chunk))


def _forward_pass(hidden, weight, labels, ignore_index, chunk_size, use_triton, row_scale, grads):
    """Per-row losses and lse [N] (fp32); with ``row_scale`` also fills ``grads`` = (d hidden, d weight)."""
    n = hidden.shape[0]
    loss = torch.empty(n, dtype=torch.float32, device=hidden.device)
    lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
    ce_chunk = _chunk_fn(use_triton)
    for start, end in _chunks(n, chunk_size):
        h = hidden[start:end]
        logits = h @ weight.t()  # [C, V], activation dtype, as the reference computes it
        scale = row_scale[start:end] if row_scale is not None else None
        ce_chunk(logits, labels[start:end], lse[start:end], loss[start:end], scale, ignore_index)
        if row_scale is not None:
            _accumulate_grads(logits, h, weight, *grads, start, end)
    return loss, lse


def _recompute_grads(hidden, weight, labels, lse, row_scale, ignore_index, chunk_size, use_triton, grads):
    ce_chunk = _chunk_fn(use_triton)
    for start, end in _chunks(hidden.shape[0], chunk_size):
        h = hidden[start:end]
        logits = h @ weight.t()  # [C, V]
        ce_chunk(logits, labels[start:end], lse[start:end], None, row_scale[start:end], ignore_index)
        _accumulate_grads(logits, h, weight, *grads, start, end)


def _reduce(loss, n_valid, reduction):
    if reduction == "none":
        return loss
    total = loss.sum()
    return total if reduction == "sum" else total / n_valid.clamp(min=1)


# ---------------------------------------------------------------------------------------------- autograd
class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, reduction, chunk_size, use_triton):
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        valid = labels != ignore_index
        n_valid = valid.sum()
        ctx.meta = (ignore_index, reduction, chunk_size, use_triton)
        ctx.precomputed = reduction != "none"
        args = (hidden, weight, labels, ignore_index, chunk_size, use_triton)
        if ctx.precomputed:
            # d loss / d logits_row = scale * (softmax - onehot); scale = 1/n_valid ("mean") or 1 ("sum").
            if reduction == "mean":
                scale = 1.0 / n_valid.clamp(min=1).float()
            else:
                scale = torch.ones((), device=labels.device)
            row_scale = scale.expand(labels.shape[0]).contiguous()
            grad_hidden, grad_weight = _grad_buffers(hidden, weight, need_hidden, need_weight)
            grads = (grad_hidden, grad_weight)
            loss, _ = _forward_pass(*args, row_scale, grads)
            if grad_weight is not None:
                grad_weight = grad_weight.to(weight.dtype)
            ctx.save_for_backward(grad_hidden, grad_weight)
            ctx.backward_done = False
        else:
            loss, lse = _forward_pass(*args, None, None)
            ctx.save_for_backward(hidden, weight, labels, lse)
        return _reduce(loss, n_valid, reduction)

    @staticmethod
    def backward(ctx, grad_output):
        ignore_index, _, chunk_size, use_triton = ctx.meta
        if ctx.precomputed:
            # The saved gradients are scaled in place (no second [V, H] buffer), so they can serve once.
            if ctx.backward_done:
                raise RuntimeError("fused_linear_cross_entropy: backward through a 'mean'/'sum' loss twice "
                                   "is not supported (its gradients were precomputed in forward)")
            ctx.backward_done = True
            grad_hidden, grad_weight = ctx.saved_tensors
            if grad_hidden is not None:
                grad_hidden.mul_(grad_output.to(grad_hidden.dtype))
            if grad_weight is not None:
                grad_weight.mul_(grad_output.to(grad_weight.dtype))
            return grad_hidden, grad_weight, None, None, None, None, None
        hidden, weight, labels, lse = ctx.saved_tensors
        grads = _grad_buffers(hidden, weight, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        row_scale = grad_output.float().contiguous()  # [N]; ignored rows are zeroed by the chunk op
        _recompute_grads(hidden, weight, labels, lse, row_scale, ignore_index, chunk_size, use_triton, grads)
        grad_hidden, grad_weight = grads
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_size: int | None = None,
    use_triton: bool = False,
) -> torch.Tensor:
    """Chunked ``CE((hidden @ weight.T).float(), labels)``; see the module docstring.

    hidden [..., H], weight [V, H], labels [...] (int, each in [0, V) or ``ignore_index``; not range
    checked on the fused path). Returns a scalar fp32 loss, or per-token fp32 losses shaped like ``labels``
    (0 where ignored) for ``reduction="none"``. "mean" over zero valid labels is 0 with zero gradients.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden [..., H] and weight [V, H] disagree: {hidden.shape} vs {weight.shape}")
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"labels {labels.shape} must match hidden's leading dims {hidden.shape[:-1]}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share a dtype")
    out_shape = labels.shape
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1).long()
    if chunk_size is None:
        chunk_size = default_chunk_size(weight.shape[0])
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    args = (hidden, weight, labels, ignore_index, reduction, chunk_size, use_triton)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        loss = LinearCrossEntropyFunction.apply(*args)
    else:
        loss, _ = _forward_pass(hidden, weight, labels, ignore_index, chunk_size, use_triton, None, None)
        loss = _reduce(loss, (labels != ignore_index).sum(), reduction)
    return loss.view(out_shape) if reduction == "none" else loss
