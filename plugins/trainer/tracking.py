"""Experiment tracking of every training stage: TensorBoard event files, optional offline Weights & Biases
runs, and a ``metrics.png``.

``MetricsTracker(ctx, config)`` writes each step's metrics (already averaged over ranks) on the main rank:
TensorBoard scalars to ``<stage output>/tensorboard`` (``tensorboard --logdir <job dir>`` shows every stage
of a job side by side) and, with ``wandb: true``, an offline W&B run under ``<stage output>/wandb`` — one
run per stage, grouped by job, uploaded later with ``wandb sync`` (training nodes often have no route to
the internet, and an online run would make a W&B outage a training failure). ``plot_history(history,
path)`` draws every metric of a run's history, one panel each, into a PNG that the stage registers next to
``metrics.json``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..contract import ArtifactKind, StageContext

if TYPE_CHECKING:
    from .config import TrainingConfig


class MetricsTracker:
    """Per-step metrics to TensorBoard and/or an offline W&B run (main rank only; a no-op elsewhere or when
    both are off)."""

    def __init__(self, ctx: StageContext, config: TrainingConfig):
        self._writer = None
        self._wandb_run = None
        if not ctx.is_main:
            return
        if config.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            logdir = ctx.output_dir / "tensorboard"
            self._writer = SummaryWriter(log_dir=str(logdir), flush_secs=30)
            ctx.add_artifact("tensorboard", logdir, ArtifactKind.OTHER)
        if config.wandb:
            self._wandb_run = _offline_wandb_run(ctx, config)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        finite = {name: float(value) for name, value in metrics.items()
                  if isinstance(value, (int, float)) and math.isfinite(value)}
        if self._writer is not None:
            for name, value in finite.items():
                self._writer.add_scalar(name, value, step)
        if self._wandb_run is not None:
            self._wandb_run.log(finite, step=step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None


def _offline_wandb_run(ctx: StageContext, config: TrainingConfig):
    try:
        import wandb
    except ImportError:
        raise ValueError("wandb: true needs the wandb package on the worker (pip install wandb)") from None
    # A resumed attempt starts a new offline run of the same name: W&B's resume needs the server.
    run = wandb.init(mode="offline", dir=str(ctx.output_dir), project=config.wandb_project,
                     group=ctx.job_id, job_type=ctx.stage, name=f"{ctx.name}-attempt{ctx.attempt}",
                     config=config.model_dump(mode="json"), reinit="create_new",
                     settings=wandb.Settings(console="off", silent=True, x_disable_stats=True))
    ctx.add_artifact("wandb", ctx.output_dir / "wandb", ArtifactKind.OTHER)
    return run


def plot_history(history: Sequence[Mapping[str, float]], path: Path, title: str = "") -> Path:
    """One panel per metric of ``history`` ([{"step": s, name: value, ...}]) against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({k for row in history for k, v in row.items()
                    if k != "step" and isinstance(v, (int, float))})
    cols = min(3, max(1, len(names)))
    rows = max(1, math.ceil(len(names) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.6 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        points = [(row["step"], row[name]) for row in history if name in row]
        ax.plot([p[0] for p in points], [p[1] for p in points], color="#4c72b0", lw=1.2)
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(path)
