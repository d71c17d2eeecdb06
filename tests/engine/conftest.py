"""Fixtures every engine test shares."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny matmuls: OpenMP threads only add contention on a shared 2-core box (and change nothing).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok(official_tokenizer_path):
    """The official InternLM2 tokenizer (../shared reference data)."""
    from internlm2.core.tokenizer import InternLM2Tokenizer

    return InternLM2Tokenizer.from_pretrained(official_tokenizer_path)
