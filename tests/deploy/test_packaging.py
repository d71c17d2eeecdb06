"""The distributions ship every package: a non-editable install (the container images) copies only the
packages named in pyproject.toml, so a sub-package missing from the list would vanish in production."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(30)

REPO = Path(__file__).resolve().parents[2]


def packages_on_disk(root: Path, prefix: str) -> set[str]:
    found = set()
    for init in root.rglob("__init__.py"):
        rel = init.parent.relative_to(root)
        if any(part.startswith(".") or part in {"__pycache__", "build"} for part in rel.parts):
            continue
        found.add(".".join([prefix, *rel.parts]))
    return found


def test_platform_lists_every_package():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    expected = set()
    for package, folder in config["package-dir"].items():
        expected |= packages_on_disk(REPO / folder, package)
    # plugins/example_stage is a separate distribution (the third-party example), not part of this one
    expected = {p for p in expected if ".example_stage" not in p}
    assert expected - listed == set(), "add these to [tool.setuptools] packages"
    assert listed - expected == set(), "listed but not on disk"


def test_sdk_lists_every_package():
    config = tomllib.loads((REPO / "sdk/python/pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    root = REPO / "sdk" / "python"
    expected = packages_on_disk(root / "internlm2_client", "internlm2_client") | packages_on_disk(
        root / "internlm2", "internlm2"
    )
    assert expected == listed


def test_namespace_has_no_init():
    """`internlm2` is a PEP 420 namespace shared by the platform and the SDK: nobody may own it."""
    import internlm2

    assert getattr(internlm2, "__file__", None) is None
    assert not (REPO / "sdk" / "python" / "internlm2" / "__init__.py").exists()
