"""Experiment tracking of every training stage: TensorBoard event files and a ``metrics.png``.

``MetricsTracker(ctx)`` writes each step's metrics (already averaged over ranks) as TensorBoard scalars
to ``<stage output>/tensorboard`` on the main rank (``tensorboard --logdir <job dir>`` shows every stage
of a job side by side); ``plot_history(history, path)`` draws every metric of a run's history, one
panel each, into a PNG that the stage registers next to ``metrics.json``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..contract import ArtifactKind, StageContext


class MetricsTracker:
    """TensorBoard scalars of a stage's steps (main rank only; a no-op elsewhere or when disabled)."""

    def __init__(self, ctx: StageContext, enabled: bool = True, subdir: str = "tensorboard"):
        self._writer = None
        if not (enabled and ctx.is_main):
            return
        from torch.utils.tensorboard import SummaryWriter

        logdir = ctx.output_dir / subdir
        self._writer = SummaryWriter(log_dir=str(logdir), flush_secs=30)
        ctx.add_artifact(subdir, logdir, ArtifactKind.OTHER)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        if self._writer is None:
            return
        for name, value in metrics.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self._writer.add_scalar(name, value, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


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
