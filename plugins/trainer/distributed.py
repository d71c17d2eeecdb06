"""The collectives every training loop needs (the shared trainer and PPO's own loop); no-ops on one rank."""

from __future__ import annotations

import torch


def _group_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is True on any: all ranks stop (e.g. on cancel) at the same step."""
    if _group_size() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device="cuda" if torch.cuda.is_available() else "cpu")
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def barrier() -> None:
    if _group_size() > 1:
        torch.distributed.barrier()


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def sum_across_ranks(value: float) -> float:
    """The sum of ``value`` over all ranks (e.g. target tokens, before normalising a loss); fp64."""
    if _group_size() == 1:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=_device())
    torch.distributed.all_reduce(t)
    return float(t.item())


def mean_across_ranks(metrics: dict[str, float]) -> dict[str, float]:
    """Each metric averaged over all ranks (every rank passes the same keys); one all-reduce.
    Logged training metrics are the whole data-parallel batch's, not rank 0's share."""
    if _group_size() == 1 or not metrics:
        return dict(metrics)
    keys = sorted(metrics)
    t = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=_device())
    torch.distributed.all_reduce(t)
    t /= _group_size()
    return dict(zip(keys, t.tolist()))


def max_across_ranks(value: float) -> float:
    """The largest ``value`` of all ranks (e.g. how many collective forwards every rank must run)."""
    if _group_size() == 1:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=_device())
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return float(t.item())
