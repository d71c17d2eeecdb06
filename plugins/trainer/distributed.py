"""The two collectives every training loop needs (the shared trainer and PPO's own loop); no-ops on one rank."""

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
