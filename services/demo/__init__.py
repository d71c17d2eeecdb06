"""``internlm2 demo``: the full chain on one machine (see runner.py)."""

from .runner import run

__all__ = ["run"]
