"""Packing samples into fixed-length rows for the core's packed forward.

A packed row carries per-token document ids; attention stays inside a document
(``DenseAttention(doc_ids=...)``) and positions restart at each one (``positions_from_doc_ids``),
so packing changes throughput, not what the model computes for each sample.

    pack_lengths(lengths, max_len)           best-fit decreasing, O(n log n): sample indices per row
    pack_samples(samples, max_len, pad_id)   whole (ids, targets) samples -> padded rows (SFT)
    collate(rows)                            -> {"input_ids", "labels", "doc_ids", "position_ids"} [B, T]
"""

from __future__ import annotations

import bisect
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


def pack_lengths(lengths: Sequence[int], max_len: int, key=None) -> list[list[int]]:
    """Best-fit decreasing: indices of the samples in each bin of ``max_len`` tokens (lengths over
    ``max_len`` count as ``max_len``: they are truncated).

    Longest first, each sample goes to the open bin with the least room that still fits it. Open bins
    are grouped by remaining room; the distinct rooms (at most ``max_len``) stay sorted, so finding a
    bin is one bisection — O(n log n) for the sort plus O(n log max_len) for the placements, where
    first-fit over a list of bins is O(n x bins). ``key`` is passed to ``bisect`` (tests count probes).
    """
    order = sorted(range(len(lengths)), key=lambda i: -min(lengths[i], max_len))
    rooms: list[int] = []  # sorted distinct remaining rooms that have an open bin
    bins_with: dict[int, list[int]] = {}  # room -> open bins (stack)
    bins: list[list[int]] = []
    for i in order:
        need = min(lengths[i], max_len)
        j = bisect.bisect_left(rooms, need, key=key)
        if j == len(rooms):
            b, room = len(bins), max_len
            bins.append([])
        else:
            room = rooms[j]
            stack = bins_with[room]
            b = stack.pop()
            if not stack:
                del rooms[j], bins_with[room]
        bins[b].append(i)
        left = room - need
        if left > 0:
            if left not in bins_with:
                bisect.insort(rooms, left, key=key)
                bins_with[left] = []
            bins_with[left].append(b)
    return bins


def pack_samples(samples: Sequence[tuple[Sequence[int], Sequence[int]]], max_len: int, pad_id: int,
                 ) -> tuple[list[PackedRow], int]:
    """Whole ``(ids, targets)`` samples packed best-fit decreasing (:func:`pack_lengths`) into padded rows
    of ``max_len``; longer samples are truncated. Returns (rows, number truncated)."""
    bins = pack_lengths([len(ids) for ids, _ in samples], max_len)
    truncated = sum(len(ids) > max_len for ids, _ in samples)
    return [row_from_segments([clip(samples[i], max_len) for i in b], max_len, pad_id) for b in bins], truncated


def clip(sample: tuple[Sequence[int], Sequence[int]], max_len: int) -> tuple[Sequence[int], Sequence[int]]:
    ids, targets = sample
    return (ids[:max_len], targets[:max_len]) if len(ids) > max_len else (ids, targets)


def collate(rows: Sequence[PackedRow]) -> dict[str, torch.Tensor]:
    """Stack rows into a batch: input_ids, labels, doc_ids, position_ids, all [B, T] int64."""
    batch = {
        "input_ids": torch.from_numpy(np.stack([r.input_ids for r in rows])),
        "labels": torch.from_numpy(np.stack([r.labels for r in rows])),
        "doc_ids": torch.from_numpy(np.stack([r.doc_ids for r in rows])),
    }
    batch["position_ids"] = positions_from_doc_ids(batch["doc_ids"])
    return batch
