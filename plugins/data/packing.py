"""Packing samples into fixed-length rows for the core's packed forward.

A packed row carries per-token document ids; attention stays inside a document
(``DenseAttention(doc_ids=...)``) and positions restart at each one (``positions_from_doc_ids``),
so packing changes throughput, not what the model computes for each sample.

    pack_samples(samples, max_len, pad_id)   whole (ids, targets) samples, first-fit; padded rows (SFT)
    collate(rows)                            -> {"input_ids", "labels", "doc_ids", "position_ids"} [B, T]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from internlm2.core.attention import positions_from_doc_ids

from .tokenize import IGNORE


@dataclass
class PackedRow:
    input_ids: np.ndarray  # [T] int64
    labels: np.ndarray  # [T] int64, aligned with outputs (label[t] = target of position t), -100 = no loss
    doc_ids: np.ndarray  # [T] int64, 0.. per document; padding is one more document


def row_from_segments(segments: Sequence[tuple[Sequence[int], Sequence[int]]], max_len: int,
                      pad_id: int) -> PackedRow:
    """One row from ``(ids, targets)`` segments (unshifted targets; -100 = no loss), padded to max_len.
    A label never crosses a document boundary."""
    ids = np.full(max_len, pad_id, dtype=np.int64)
    labels = np.full(max_len, IGNORE, dtype=np.int64)
    docs = np.full(max_len, len(segments), dtype=np.int64)
    pos = 0
    for d, (seg_ids, seg_targets) in enumerate(segments):
        n = len(seg_ids)
        ids[pos:pos + n] = seg_ids
        docs[pos:pos + n] = d
        labels[pos:pos + n - 1] = np.asarray(seg_targets[1:n], dtype=np.int64)
        pos += n
    return PackedRow(ids, labels, docs)


def pack_samples(samples: Sequence[tuple[Sequence[int], Sequence[int]]], max_len: int, pad_id: int,
                 ) -> tuple[list[PackedRow], int]:
    """First-fit packing of whole samples (in order) into rows of ``max_len``; samples longer than
    ``max_len`` are truncated. Returns (rows, number truncated)."""
    bins: list[list[tuple[Sequence[int], Sequence[int]]]] = []
    room: list[int] = []
    truncated = 0
    for ids, targets in samples:
        if len(ids) > max_len:
            ids, targets = ids[:max_len], targets[:max_len]
            truncated += 1
        for b, free in enumerate(room):
            if len(ids) <= free:
                bins[b].append((ids, targets))
                room[b] -= len(ids)
                break
        else:
            bins.append([(ids, targets)])
            room.append(max_len - len(ids))
    return [row_from_segments(b, max_len, pad_id) for b in bins], truncated


def collate(rows: Sequence[PackedRow]) -> dict[str, torch.Tensor]:
    """Stack rows into a batch: input_ids, labels, doc_ids, position_ids, all [B, T] int64."""
    batch = {
        "input_ids": torch.from_numpy(np.stack([r.input_ids for r in rows])),
        "labels": torch.from_numpy(np.stack([r.labels for r in rows])),
        "doc_ids": torch.from_numpy(np.stack([r.doc_ids for r in rows])),
    }
    batch["position_ids"] = positions_from_doc_ids(batch["doc_ids"])
    return batch
