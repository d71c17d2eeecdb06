"""Reading the JSONL records the alignment stages train and evaluate on.

A dataset reference resolves to a ``.jsonl`` file or a folder of them (read in name order); lines are
read and checked by ``internlm2.plugins.data.formats`` (errors name file, line and field). Formats:

    preference   {"prompt": [messages], "chosen": [messages], "rejected": [messages], "condition"?: str}
                 (plugins/data/FORMATS.md)
    text         {"text": str} (plugins/data/FORMATS.md): the PPO pretraining (ptx) data
    prompt       {"prompt": str | [messages], "reference"?: str, "condition"?: str}: PPO prompts, and the
                 eval stage's generation records ({"prompt", "reference"?, "answer"?})
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from ..data import formats
from .preference import PreferencePair, parse_pair

T = TypeVar("T")


def jsonl_files(path: str | Path) -> list[Path]:
    """A ``.jsonl`` file, or every ``.jsonl`` file under a folder (in name order)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.jsonl") if p.is_file())
        if not files:
            raise FileNotFoundError(f"{path}: no .jsonl files")
        return files
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    return [path]


def read_jsonl(path: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """(``file:line``, record) for every non-blank line of every file (``data.formats.read_jsonl``)."""
    return [item for file in jsonl_files(path) for item in formats.read_jsonl(file)]


def read_preference_pairs(path: str | Path) -> list[PreferencePair]:
    """Preference records checked by ``data.formats.check_preference``, then as :func:`parse_pair`."""
    return [parse_pair(formats.check_preference(record, where), where) for where, record in read_jsonl(path)]


def prompt_messages(record: dict[str, Any], where: str) -> list[dict]:
    """A record's ``prompt`` as chat messages (a plain string is one user turn)."""
    prompt = record.get("prompt")
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
        return [dict(m) for m in prompt]
    raise ValueError(f"{where}.prompt: must be a string or a non-empty list of messages")


def split_holdout(items: Sequence[T], fraction: float, seed: int, minimum: int = 1) -> tuple[list[T], list[T]]:
    """(train, held out): a seeded shuffle, ``fraction`` of the items (at least ``minimum``) held out."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n = max(minimum, round(fraction * len(items))) if fraction > 0 else 0
    if n >= len(items):
        raise ValueError(f"eval_fraction: holding out {n} of {len(items)} records leaves nothing to train on")
    held = sorted(order[:n])
    held_set = set(held)
    return [items[i] for i in range(len(items)) if i not in held_set], [items[i] for i in held]


@dataclass(frozen=True)
class PromptRecord:
    """A PPO prompt: chat messages, an optional reference answer (the alignment reward's target) and an
    optional condition (the reward model's domain)."""

    messages: list[dict]
    reference: str | None = None
    condition: str | None = None


def read_prompts(path: str | Path) -> list[PromptRecord]:
    out = []
    for where, record in read_jsonl(path):
        reference = record.get("reference")
        condition = record.get("condition")
        if reference is not None and not isinstance(reference, str):
            raise ValueError(f"{where}.reference: must be a string")
        if condition is not None and not isinstance(condition, str):
            raise ValueError(f"{where}.condition: must be a string")
        out.append(PromptRecord(prompt_messages(record, where), reference or None, condition or None))
    return out


def read_texts(path: str | Path) -> list[str]:
    """The ``text`` field of every record ({"text": ...}, the pretraining format)."""
    return [formats.check_text(record, where) for where, record in read_jsonl(path)]


def pack_texts(tokenizer, texts: Sequence[str], seq_len: int) -> list[list[int]]:
    """Documents (BOS + text + EOS) concatenated and cut into rows of ``seq_len`` tokens (the tail that
    does not fill a row is dropped unless it is all there is)."""
    stream: list[int] = []
    for text in texts:
        stream += [*tokenizer.encode(text, add_bos=True, allow_special=False), tokenizer.eos_id]
    rows = [stream[i : i + seq_len] for i in range(0, len(stream) - seq_len + 1, seq_len)]
    return rows or ([stream] if stream else [])
