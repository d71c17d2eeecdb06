"""Where preference pairs' token ids come from: a ``prepare_data`` preference folder (tokenised once,
memory-mapped) or a preference JSONL (file or folder) tokenised on the spot — the same ids either way,
because both go through ``algorithms.preference`` (``dpo_pair_ids``, ``reward_pair_ids``).

    write_preference_rows(folder, tok, pairs)      every pair's DPO and reward-model ids, int32, once
    preference_rows(tok, path, "dpo" | "reward")   (items, info); items[i] is (prompt, chosen, rejected)
                                                   for "dpo", (chosen, rejected) ending in the reward
                                                   token for "reward"
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .shards import has_format, write_meta

PREFERENCE_FORMAT = "internlm2-preference-rows/1"
# One pair's segments, in the order of the index columns.
SEGMENTS = ("dpo_prompt", "dpo_chosen", "dpo_rejected", "reward_chosen", "reward_rejected")
Kind = Literal["dpo", "reward"]
# Stored reward sequences end before the reward token: it is the model's (reward_token_id), known at read.
_NO_TOKEN = -1


def reward_ids(tok: Any, pair: Any, reward_token_id: int, conditions: Mapping[str, str],
               default_condition: str | None) -> tuple[list[int], list[int]]:
    """The reward model's (chosen, rejected) ids of a pair; a pair without condition takes
    ``default_condition`` (the reward_model stage's rule, used by it, by ppo's RM scoring and here)."""
    from ..algorithms import preference

    if pair.condition is None and default_condition:
        pair = preference.PreferencePair(pair.prompt, pair.chosen, pair.rejected, default_condition)
    return preference.reward_pair_ids(tok, pair, reward_token_id, conditions)


def write_preference_rows(folder: str | os.PathLike, tok: Any, pairs: Sequence[Any],
                          conditions: Mapping[str, str], **extra: Any) -> dict[str, Any]:
    """Tokenise every pair ONCE for both stages into ``tokens.npy`` (int32, all segments concatenated),
    ``offsets.npy`` / ``lengths.npy`` (int64 [pairs, 5], columns ``SEGMENTS``), then ``meta.json`` (its
    presence means complete). A pair DPO cannot use (chosen and rejected contexts differ) keeps its
    reward ids; its DPO lengths are -1 and ``meta["dpo_errors"]`` holds the reason."""
    from ..algorithms import preference

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    segments: list[list[int]] = []
    dpo_errors: dict[str, str] = {}
    for i, pair in enumerate(pairs):
        try:
            dpo = list(preference.dpo_pair_ids(tok, pair))
        except ValueError as exc:
            dpo_errors[str(i)] = str(exc)
            dpo = [None, None, None]
        chosen, rejected = reward_ids(tok, pair, _NO_TOKEN, conditions, None)
        segments += [*dpo, chosen[:-1], rejected[:-1]]
    lengths = np.asarray([-1 if s is None else len(s) for s in segments], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(np.maximum(lengths, 0))[:-1]]).astype(np.int64)
    total = int(np.maximum(lengths, 0).sum())
    tokens = np.lib.format.open_memmap(folder / "tokens.npy", mode="w+", dtype=np.int32, shape=(total,))
    for s, off in zip(segments, offsets):
        if s:
            tokens[off:off + len(s)] = s
    tokens.flush()
    del tokens
    shape = (len(pairs), len(SEGMENTS))
    np.save(folder / "offsets.npy", offsets.reshape(shape))
    np.save(folder / "lengths.npy", lengths.reshape(shape))
    meta = {"format": PREFERENCE_FORMAT, "dtype": "int32", "num_pairs": len(pairs), "num_tokens": total,
            "segments": list(SEGMENTS), "conditions": dict(conditions), "default_condition": None,
            "dpo_errors": dpo_errors, **extra}
    return write_meta(folder, meta)


def is_preference_rows(path: str | os.PathLike) -> bool:
    return has_format(path, PREFERENCE_FORMAT)


class PreferenceRowDataset:
    """The pairs :func:`write_preference_rows` wrote, memory-mapped: ``items[i]`` reads only pair i's
    segments from ``tokens.npy``; nothing is tokenised again."""

    def __init__(self, folder: str | os.PathLike, kind: Kind, reward_token_id: int | None = None):
        self.folder = Path(folder)
        if not is_preference_rows(self.folder):
            raise ValueError(f"{self.folder}: not a preference-rows dataset ({PREFERENCE_FORMAT}); run "
                             "prepare_data with format preference")
        if kind == "reward" and reward_token_id is None:
            raise ValueError("reward_token_id: required to read reward-model sequences")
        self.meta = json.loads((self.folder / "meta.json").read_text())
        self.kind, self.reward_token_id = kind, reward_token_id
        self.tokens = np.load(self.folder / "tokens.npy", mmap_mode="r")
        self.offsets = np.load(self.folder / "offsets.npy", mmap_mode="r")
        self.lengths = np.load(self.folder / "lengths.npy", mmap_mode="r")
        self._columns = range(3) if kind == "dpo" else range(3, 5)

    def __len__(self) -> int:
        return int(self.meta["num_pairs"])

    def _segment(self, i: int, column: int) -> list[int]:
        off, n = int(self.offsets[i, column]), int(self.lengths[i, column])
        return self.tokens[off:off + n].tolist()

    def __getitem__(self, i: int) -> tuple[list[int], ...]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        if self.kind == "dpo" and self.lengths[i, 0] < 0:
            raise ValueError(f"{self.folder} pair {i}: {self.meta['dpo_errors'][str(i)]}")
        parts = [self._segment(i, c) for c in self._columns]
        if self.kind == "reward":
            parts = [[*p, self.reward_token_id] for p in parts]
        return tuple(parts)


def preference_rows(tok: Any, path: str | os.PathLike, kind: Kind, *, reward_token_id: int | None = None,
                    conditions: Mapping[str, str] | None = None,
                    default_condition: str | None = None) -> tuple[Sequence[tuple[list[int], ...]], dict[str, Any]]:
    """(items, info) for the dpo (``kind="dpo"``) or reward_model (``kind="reward"``) stage. ``info``:
    pairs and ``prepared`` (True when read from a prepare_data folder). A prepared folder was encoded with
    its meta's condition table and no default condition; other settings are an error naming the field."""
    from ..algorithms import preference
    from ..algorithms.datasets import read_preference_pairs

    conditions = dict(preference.DEFAULT_CONDITIONS if conditions is None else conditions)
    path = Path(path)
    if path.is_dir() and is_preference_rows(path):
        rows = PreferenceRowDataset(path, kind, reward_token_id)
        if kind == "reward":
            if conditions != rows.meta["conditions"]:
                raise ValueError(f"conditions: differ from the table {path} was prepared with; prepare the "
                                 "data again or train from the JSONL")
            if default_condition != rows.meta["default_condition"]:
                raise ValueError(f"default_condition: {default_condition!r}, but {path} was prepared with "
                                 f"{rows.meta['default_condition']!r}; prepare again or train from the JSONL")
        return rows, {"pairs": len(rows), "prepared": True}
    pairs = read_preference_pairs(path)
    if kind == "dpo":
        items = [preference.dpo_pair_ids(tok, p) for p in pairs]
    else:
        if reward_token_id is None:
            raise ValueError("reward_token_id: required to encode reward-model sequences")
        items = [reward_ids(tok, p, reward_token_id, conditions, default_condition) for p in pairs]
    return items, {"pairs": len(items), "prepared": False}
