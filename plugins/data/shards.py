"""Memory-mapped token shards (format in FORMATS.md) and the packed dataset that reads them.

    ShardWriter(folder, shard_tokens)  .add(ids) per document, .close(extra_meta) -> meta
    PackedTokenDataset(folder, seq_len)  rows of exactly seq_len tokens over the concatenated
                                         documents, with per-token doc ids (documents are cut at
                                         row ends; the remainder starts the next row as a new doc)
    write_packed_rows(folder, samples, max_len, pad_id)  SFT samples packed once into int32 row files
    PackedRowDataset(folder)             those rows, memory-mapped (what sft reads)
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .packing import PackedRow
from .tokenize import IGNORE

FORMAT = "internlm2-token-shards/1"
DTYPE = np.uint32


def write_meta(folder: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """``folder/meta.json``, atomically and last: its presence means the dataset is complete."""
    tmp = folder / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, folder / "meta.json")
    return meta


def has_format(path: str | os.PathLike, fmt: str) -> bool:
    """Whether ``path`` is a complete dataset folder whose meta.json names ``fmt``."""
    meta = Path(path) / "meta.json"
    return meta.is_file() and json.loads(meta.read_text()).get("format") == fmt


class ShardWriter:
    def __init__(self, folder: str | os.PathLike, shard_tokens: int = 1 << 26):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.shard_tokens = shard_tokens
        self.shards: list[dict[str, Any]] = []
        self._buf: list[np.ndarray] = []
        self._offsets: list[int] = [0]

    def add(self, ids: Sequence[int]) -> None:
        arr = np.asarray(ids, dtype=DTYPE)
        self._buf.append(arr)
        self._offsets.append(self._offsets[-1] + len(arr))
        if self._offsets[-1] >= self.shard_tokens:
            self._flush()

    def _flush(self) -> None:
        if len(self._offsets) == 1:
            return
        k = len(self.shards)
        tokens_name, offsets_name = f"shard-{k:05d}.bin", f"shard-{k:05d}.idx.npy"
        np.concatenate(self._buf).astype(DTYPE).tofile(self.folder / tokens_name)
        np.save(self.folder / offsets_name, np.asarray(self._offsets, dtype=np.int64))
        self.shards.append({"tokens": tokens_name, "offsets": offsets_name,
                            "num_docs": len(self._offsets) - 1, "num_tokens": int(self._offsets[-1])})
        self._buf, self._offsets = [], [0]

    def close(self, **extra: Any) -> dict[str, Any]:
        self._flush()
        meta = {"format": FORMAT, "dtype": "uint32", "shards": self.shards,
                "num_docs": sum(s["num_docs"] for s in self.shards),
                "num_tokens": sum(s["num_tokens"] for s in self.shards), **extra}
        return write_meta(self.folder, meta)


class PackedTokenDataset:
    """Indexable rows (``PackedRow``) of ``seq_len`` tokens over every shard, memory-mapped."""

    def __init__(self, folder: str | os.PathLike, seq_len: int):
        self.folder = Path(folder)
        meta_path = self.folder / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{self.folder} is not a token-shard dataset (no meta.json)")
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("format") != FORMAT:
            raise ValueError(f"{meta_path}: format {self.meta.get('format')!r}, expected {FORMAT!r}")
        self.seq_len = seq_len
        self._tokens = [np.memmap(self.folder / s["tokens"], dtype=DTYPE, mode="r") for s in self.meta["shards"]]
        # Global token offset of each shard, and global document starts (sorted).
        self._shard_start = np.cumsum([0] + [s["num_tokens"] for s in self.meta["shards"]])
        starts = [np.load(self.folder / s["offsets"])[:-1] + base
                  for s, base in zip(self.meta["shards"], self._shard_start[:-1])]
        self._doc_starts = np.concatenate(starts) if starts else np.zeros(0, dtype=np.int64)
        self.num_tokens = int(self._shard_start[-1])
        if self.num_tokens < seq_len:
            raise ValueError(f"{self.folder}: {self.num_tokens} tokens, fewer than one row of {seq_len}")

    def __len__(self) -> int:
        return self.num_tokens // self.seq_len

    def _slice(self, start: int, end: int) -> np.ndarray:
        parts = []
        for k, tokens in enumerate(self._tokens):
            lo, hi = max(start, self._shard_start[k]), min(end, self._shard_start[k + 1])
            if lo < hi:
                parts.append(tokens[lo - self._shard_start[k]:hi - self._shard_start[k]])
        return np.concatenate(parts).astype(np.int64)

    def __getitem__(self, i: int) -> PackedRow:
        if not 0 <= i < len(self):
            raise IndexError(i)
        start, end = i * self.seq_len, (i + 1) * self.seq_len
        ids = self._slice(start, end)
        # Document of each token: the last document start at or before it; renumbered from 0 in the row.
        doc = np.searchsorted(self._doc_starts, np.arange(start, end), side="right") - 1
        doc = doc - doc[0]
        labels = np.full(self.seq_len, IGNORE, dtype=np.int64)
        same = doc[1:] == doc[:-1]
        labels[:-1] = np.where(same, ids[1:], IGNORE)
        return PackedRow(ids, labels, doc.astype(np.int64))


# ------------------------------------------------------------------------------------------ packed rows
ROWS_FORMAT = "internlm2-packed-rows/1"
_ROW_ARRAYS = ("input_ids", "labels", "doc_ids")


def write_packed_rows(folder: str | os.PathLike, samples: Sequence[tuple[Sequence[int], Sequence[int]]],
                      max_len: int, pad_id: int, **extra: Any) -> dict[str, Any]:
    """Pack ``(ids, targets)`` samples ONCE (best-fit decreasing) into int32 row files of ``max_len``:
    ``input_ids.npy``, ``labels.npy`` (shifted, -100 = no loss), ``doc_ids.npy`` [rows, max_len], written
    row by row into memory maps, and ``meta.json`` last (its presence means complete)."""
    from .packing import clip, pack_lengths, row_from_segments

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    bins = pack_lengths([len(ids) for ids, _ in samples], max_len)
    arrays = {name: np.lib.format.open_memmap(folder / f"{name}.npy", mode="w+", dtype=np.int32,
                                              shape=(len(bins), max_len)) for name in _ROW_ARRAYS}
    for r, b in enumerate(bins):
        row = row_from_segments([clip(samples[i], max_len) for i in b], max_len, pad_id)
        for name in _ROW_ARRAYS:
            arrays[name][r] = getattr(row, name)
    for a in arrays.values():
        a.flush()
    del arrays
    targets = sum(sum(t != IGNORE for t in clip(s, max_len)[1][1:]) for s in samples)
    meta = {"format": ROWS_FORMAT, "dtype": "int32", "num_rows": len(bins), "max_length": max_len,
            "num_samples": len(samples), "target_tokens": int(targets),
            "truncated": sum(len(ids) > max_len for ids, _ in samples),
            "fill": sum(min(len(ids), max_len) for ids, _ in samples) / max(1, len(bins) * max_len), **extra}
    return write_meta(folder, meta)


def is_packed_rows(path: str | os.PathLike) -> bool:
    return has_format(path, ROWS_FORMAT)


class PackedRowDataset:
    """The rows :func:`write_packed_rows` wrote, memory-mapped: every rank indexes the same files and
    reads only its own rows (``rank_batches``); nothing is tokenised or packed again."""

    def __init__(self, folder: str | os.PathLike, max_length: int | None = None):
        self.folder = Path(folder)
        if not is_packed_rows(self.folder):
            raise ValueError(f"{self.folder}: not a packed-rows dataset ({ROWS_FORMAT}); run prepare_data "
                             "with format chat")
        self.meta = json.loads((self.folder / "meta.json").read_text())
        if max_length is not None and max_length != self.meta["max_length"]:
            raise ValueError(f"max_length: {max_length} differs from the packed rows' {self.meta['max_length']} "
                             f"({self.folder}); prepare the data again or use that length")
        self._arrays = {name: np.load(self.folder / f"{name}.npy", mmap_mode="r") for name in _ROW_ARRAYS}

    def __len__(self) -> int:
        return int(self.meta["num_rows"])

    def __getitem__(self, i: int) -> PackedRow:
        if not 0 <= i < len(self):
            raise IndexError(i)
        return PackedRow(*(np.asarray(self._arrays[name][i], dtype=np.int64) for name in _ROW_ARRAYS))
