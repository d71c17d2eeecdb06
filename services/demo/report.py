"""The demo's table and curves."""

from __future__ import annotations

from pathlib import Path


def _fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _cell(text: str, limit: int = 24) -> str:
    """One table cell: no newlines or pipes (they would break the markdown row), at most ``limit`` chars."""
    text = text.replace("\n", "⏎").replace("|", "¦").replace("`", "'")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def render_table(rows: list[dict]) -> str:
    lines = [
        "| stage | train loss | task accuracy (digits) | largest first | mean reward | answer perplexity "
        "| sample answers |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if "pairwise_accuracy" in row:
            lines.append(f"| {row['stage']} | {_fmt(row.get('loss'), '.3f')} | held-out pairs ranked right: "
                         f"{row['pairwise_accuracy']:.0%} | – | – | – | – |")
            continue
        samples = "; ".join(f"`{s['question'].removeprefix('Sort the digits: ')}` → `{_cell(s['answer']) or '∅'}`"
                            for s in row["samples"][:2])
        lines.append(f"| {row['stage']} | {_fmt(row.get('loss'), '.3f')} | {row['accuracy']:.0%} "
                     f"({row['digit_accuracy']:.0%}) | {row['descending']:.0%} | "
                     f"{row['mean_reward']:+.3f} | {row['perplexity']:.2f} | {samples} |")
    return "\n".join(lines)


def plot_curves(curves: list[dict], path: Path) -> None:
    """One panel per training stage: every metric logged per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ("loss", "reward", "rm_score", "mean_reward", "accuracy", "margin")
    stages = list(dict.fromkeys(c["stage"] for c in curves if c.get("step") is not None and any(k in c for k in keys)))
    if not stages:
        return
    fig, axes = plt.subplots(1, len(stages), figsize=(4 * len(stages), 3.2), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        points = [c for c in curves if c["stage"] == stage and c.get("step") is not None]
        for key in [k for k in keys if any(k in p for p in points)]:
            xs = [p["step"] for p in points if key in p]
            ys = [p[key] for p in points if key in p]
            if xs:
                ax.plot(xs, ys, label=key)
        ax.set_title(stage)
        ax.set_xlabel("step")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
