"""The demo's synthetic world: a task with a checkable answer and the data every stage trains on.

The task is sorting digits ("Sort the digits: 7 2 9 4" -> "2 4 7 9"): a tiny model can learn it on a CPU
in minutes, the answer is checked exactly, and wrong answers are easy to make for preference pairs.
Held-out questions are digit lists that never appear in any training file.

Why RLHF has something to do here: the SFT demonstrations are of mixed quality, as human ones are. The
instruction does not say which way to sort, and only ``ascending_share`` of the demonstrators sort smallest
first; the rest write the digits largest first. SFT imitates that mixture, so its greedy answer is often
the descending one. What is wanted is stated once, in the conditional reward model's condition
(``CONDITION``), and taught by the preference pairs (ascending chosen over descending and over near-miss
answers). PPO against that reward model has to move the policy to the preferred behaviour, which the
held-out accuracy (ascending, exact) measures. A first attempt with a short SFT on clean demonstrations
left nothing the tiny reward model could judge better than the policy: its errors were digits copied
wrongly, which a reward model of the policy's own size ranks little better than chance (0.55 pairwise on
the policy's samples), so PPO learned the reward model's mistakes instead.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

CONDITION = "Judge sorting: the digits in ascending order."

FILLER = """\
InternLM2 is an open large language model. It reads text, answers questions and follows instructions.
Numbers are written with the digits 0 1 2 3 4 5 6 7 8 9. Sorting puts things in order, smallest first.
A list like 3 1 2 becomes 1 2 3 when it is sorted. The assistant answers the user. The user asks questions.
Small models learn simple rules from many examples. Training makes the loss go down.
"""


@dataclass(frozen=True)
class Question:
    digits: tuple[int, ...]

    @property
    def prompt(self) -> str:
        return "Sort the digits: " + " ".join(map(str, self.digits))

    @property
    def answer(self) -> str:
        return " ".join(map(str, sorted(self.digits)))

    def messages(self, answer: str | None = None) -> list[dict]:
        out = [{"role": "user", "content": self.prompt}]
        if answer is not None:
            out.append({"role": "assistant", "content": answer})
        return out

    def is_correct(self, text: str) -> bool:
        return text.strip() == self.answer

    def digit_accuracy(self, text: str) -> float:
        """Partial credit: the share of answer positions holding the right digit (extra output costs)."""
        expected, got = self.answer.split(), text.split()
        hits = sum(e == g for e, g in zip(expected, got))
        return hits / max(len(expected), len(got))


def descending(q: Question) -> str:
    """The other demonstrators' answer: the right digits, largest first."""
    return " ".join(map(str, sorted(q.digits, reverse=True)))


def wrong_answer(q: Question, rng: random.Random) -> str:
    """A plausible wrong answer: unsorted, a digit changed, or a digit dropped."""
    digits = list(q.digits)
    kind = rng.randrange(3)
    if kind == 0:
        candidate = digits[:]
        while " ".join(map(str, candidate)) == q.answer and len(set(candidate)) > 1:
            rng.shuffle(candidate)
        if " ".join(map(str, candidate)) != q.answer:
            return " ".join(map(str, candidate))
    ordered = sorted(digits)
    if kind == 1 or len(ordered) < 2:
        i = rng.randrange(len(ordered))
        ordered[i] = (ordered[i] + rng.randrange(1, 10)) % 10
        return " ".join(map(str, ordered))
    del ordered[rng.randrange(len(ordered))]
    return " ".join(map(str, ordered))


def questions(seed: int, count: int, exclude: set[tuple[int, ...]] = frozenset(),
              lengths: tuple[int, ...] = (3, 4, 5)) -> list[Question]:
    rng = random.Random(seed)
    out: list[Question] = []
    seen = set(exclude)
    while len(out) < count:
        digits = tuple(rng.randrange(10) for _ in range(rng.choice(lengths)))
        if digits not in seen:
            seen.add(digits)
            out.append(Question(digits))
    return out


def write_jsonl(path: Path, rows: Iterable[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


@dataclass
class DemoData:
    corpus: Path  # pretraining text {"text"}
    sft: Path  # chat {"messages"}
    preferences: Path  # {"prompt", "chosen", "rejected", "condition"}
    prompts: Path  # PPO prompts with reference answers
    heldout: list[Question]
    texts: list[str]  # what the tokenizer is trained on


def make_data(directory: Path, num_train: int = 600, num_heldout: int = 24, seed: int = 0,
              ascending_share: float = 0.3) -> DemoData:
    """Write every training file into ``directory``; returns their paths and the held-out questions.

    ``ascending_share`` of the SFT demonstrations sort ascending, the rest descending (see the module
    docstring). Every question gets two preference pairs: the ascending answer over the descending one, and
    over a near miss (unsorted, a digit changed or dropped), so the reward model judges the digits as well
    as their order.
    """
    rng = random.Random(seed)
    heldout = questions(seed + 1, num_heldout)
    train = questions(seed + 2, num_train, exclude={q.digits for q in heldout})
    corpus_rows = [{"text": para} for para in FILLER.split("\n") if para]
    # Pretraining sees the rule in plain prose (knowledge), never the chat format (that is SFT's job).
    corpus_rows += [{"text": f"The digits {' '.join(map(str, q.digits))} in order are {q.answer}."} for q in train]
    sft_rows = [{"messages": q.messages(q.answer if rng.random() < ascending_share else descending(q))}
                for q in train]
    pref_rows = [
        {"prompt": q.messages(), "chosen": [{"role": "assistant", "content": q.answer}],
         "rejected": [{"role": "assistant", "content": rejected}], "condition": CONDITION}
        for q in train
        for rejected in dict.fromkeys((descending(q), wrong_answer(q, rng)))
        if rejected != q.answer  # all digits equal: descending is the answer
    ]
    prompt_rows = [{"prompt": q.messages(), "reference": q.answer, "condition": CONDITION} for q in train]
    texts = [row["text"] for row in corpus_rows] + [q.prompt + "\n" + q.answer for q in train] + [CONDITION]
    return DemoData(
        corpus=write_jsonl(directory / "corpus.jsonl", corpus_rows),
        sft=write_jsonl(directory / "sft.jsonl", sft_rows),
        preferences=write_jsonl(directory / "preferences.jsonl", pref_rows),
        prompts=write_jsonl(directory / "ppo_prompts.jsonl", prompt_rows),
        heldout=heldout,
        texts=texts,
    )
