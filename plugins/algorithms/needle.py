"""Needle in a haystack: can the model retrieve a fact planted at a given depth of a long context?

For each (context length L, depth d) cell: filler text fills L tokens, the needle sentence ("The
special magic number is 48213.") is inserted at fraction d of the filler, and a question follows. The
model is scored teacher-forced on the answer tokens in a single forward pass:

    retrieved   every answer token is the model's argmax — what greedy decoding would emit
    logprob     mean log-prob per answer token — a graded signal that also moves for small models

The grid is averaged over a few needles per cell and drawn as a heatmap (lengths × depths), the
plot the InternLM2 report shows for its 200k-token results. Tokenisation is the caller's: pass
``encode`` (text -> ids without BOS).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

DEFAULT_FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
    "Rivers run to the sea, and the sea does not fill. Mountains stand still while clouds pass over them. "
)
NEEDLE = "The special magic number is {value}."
QUESTION = "\nWhat is the special magic number mentioned in the text above? The special magic number is"
ANSWER = " {value}."


@dataclass(frozen=True)
class NeedleCase:
    length: int  # target prompt length in tokens
    depth: float  # 0 = needle at the start of the context, 1 = at its end
    prompt_ids: list[int]
    answer_ids: list[int]


def build_case(encode: Callable[[str], list[int]], length: int, depth: float, value: str,
               bos_id: int | None, filler: str = DEFAULT_FILLER) -> NeedleCase:
    """A prompt of about ``length`` tokens (BOS + filler with the needle at ``depth`` + question)."""
    needle = encode(" " + NEEDLE.format(value=value) + " ")
    question = encode(QUESTION)
    answer = encode(ANSWER.format(value=value))
    head = [bos_id] if bos_id is not None else []
    budget = length - len(head) - len(needle) - len(question)
    if budget < 0:
        raise ValueError(f"lengths: {length} tokens cannot hold the needle and question "
                         f"({len(head) + len(needle) + len(question)} tokens)")
    filler_ids = encode(filler)
    if not filler_ids:
        raise ValueError("filler: encodes to no tokens")
    context = (filler_ids * (budget // len(filler_ids) + 1))[:budget]
    at = round(depth * budget)
    return NeedleCase(length, depth, head + context[:at] + needle + context[at:] + question, answer)


@torch.no_grad()
def score_case(model, case: NeedleCase) -> tuple[bool, float]:
    """(retrieved, mean answer-token log-prob), from one forward of prompt + answer."""
    device = next(model.parameters()).device
    ids = torch.tensor([case.prompt_ids + case.answer_ids], device=device)
    hidden = model.model(ids)  # (1, T, H)
    n = len(case.answer_ids)
    # Position t predicts token t + 1: the answer is predicted from the n positions before its end.
    logits = model.compute_logits(hidden[0, -n - 1 : -1]).float()  # (n, V), n is a handful of tokens
    targets = torch.tensor(case.answer_ids, device=device)
    logprob = torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).mean()
    return bool((logits.argmax(dim=-1) == targets).all()), float(logprob)


@dataclass
class NeedleGrid:
    lengths: list[int]
    depths: list[float]
    retrieval: list[list[float]]  # [depth][length], fraction of needles retrieved
    logprob: list[list[float]]  # [depth][length], mean answer-token log-prob

    @property
    def mean_retrieval(self) -> float:
        cells = [v for row in self.retrieval for v in row]
        return sum(cells) / len(cells)

    def to_dict(self) -> dict:
        return {"lengths": self.lengths, "depths": self.depths, "retrieval": self.retrieval,
                "logprob": self.logprob, "mean_retrieval": self.mean_retrieval}


def evaluate_grid(
    model,
    encode: Callable[[str], list[int]],
    lengths: Sequence[int],
    depths: Sequence[float],
    bos_id: int | None,
    needles_per_cell: int = 2,
    seed: int = 0,
    filler: str = DEFAULT_FILLER,
    on_cell: Callable[[int, int], None] | None = None,
) -> NeedleGrid:
    """Scores every (depth, length) cell; ``on_cell(done, total)`` reports progress and may raise to stop."""
    rng = random.Random(seed)
    retrieval = [[0.0] * len(lengths) for _ in depths]
    logprob = [[0.0] * len(lengths) for _ in depths]
    total, done = len(lengths) * len(depths), 0
    for i, depth in enumerate(depths):
        for j, length in enumerate(lengths):
            hits, lp = 0, 0.0
            for _ in range(needles_per_cell):
                case = build_case(encode, length, depth, str(rng.randrange(10000, 100000)), bos_id, filler)
                hit, case_lp = score_case(model, case)
                hits += hit
                lp += case_lp
            retrieval[i][j] = hits / needles_per_cell
            logprob[i][j] = lp / needles_per_cell
            done += 1
            if on_cell is not None:
                on_cell(done, total)
    return NeedleGrid(list(lengths), list(depths), retrieval, logprob)


def plot_heatmap(grid: NeedleGrid, path: str | Path, title: str = "Needle in a haystack") -> Path:
    """Writes a PNG: retrieval per cell (x: context length, y: needle depth), values annotated."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training workers
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(grid.lengths), 1.0 + 0.5 * len(grid.depths)))
    image = ax.imshow(grid.retrieval, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(grid.lengths)), [str(n) for n in grid.lengths])
    ax.set_yticks(range(len(grid.depths)), [f"{d:.0%}" for d in grid.depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(title)
    for i, row in enumerate(grid.retrieval):
        for j, value in enumerate(row):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7)
    fig.colorbar(image, ax=ax, label="retrieved")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
