"""Where SFT rows come from: a ``prepare_data`` packed-rows folder (tokenised and packed once, memory-mapped)
or, for small data, a chat JSONL tokenised and packed in memory on the spot — the same rows either way."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .formats import load_chat
from .packing import PackedRow, pack_samples
from .shards import PackedRowDataset, is_packed_rows
from .tokenize import tokenize_chat


def chat_rows(tok: Any, path: str | os.PathLike, max_length: int) -> tuple[Sequence[PackedRow], dict[str, Any]]:
    """(rows, info) for chat SFT. ``info``: samples, truncated, and ``prepared`` (True when read from shards)."""
    path = Path(path)
    if path.is_dir() and is_packed_rows(path):
        rows = PackedRowDataset(path, max_length)
        return rows, {"samples": rows.meta["num_samples"], "truncated": rows.meta["truncated"], "prepared": True}
    conversations = load_chat(path)
    rows, truncated = pack_samples([tokenize_chat(tok, c) for c in conversations], max_length, tok.pad_id)
    return rows, {"samples": len(conversations), "truncated": truncated, "prepared": False}
