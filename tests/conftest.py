"""Shared fixtures: tiny configs and the reference data beside the repository (../shared)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# Tests live in folders by area (core, engine, services, runtime, stages, sdk, deploy); the helpers they
# share (services_fixtures, training_support, ...) stay here, importable from every folder.
sys.path.insert(0, str(Path(__file__).resolve().parent))

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO.parent / "shared" / "reference-data" / "internlm2"


def reference_dir() -> Path:
    """The official tokenizer and configs. CI always has ../shared; elsewhere tests skip with a reason."""
    if not (REFERENCE / "tokenizer.model").exists():
        if os.environ.get("CI"):
            raise RuntimeError(f"reference data missing at {REFERENCE}; CI must have ../shared beside the repo")
        pytest.skip(f"reference data not found at {REFERENCE} (../shared beside the repository)")
    return REFERENCE


@pytest.fixture(scope="session")
def reference_data() -> Path:
    return reference_dir()


@pytest.fixture(scope="session")
def official_tokenizer_path(reference_data) -> Path:
    return reference_data / "tokenizer.model"
