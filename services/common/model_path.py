"""Where a server's model comes from: ``--model`` or, failing that, ``$INTERNLM2_MODEL``."""

from __future__ import annotations

import os
from pathlib import Path

MODEL_ENV = "INTERNLM2_MODEL"


class MissingModelError(ValueError):
    pass


def resolve_model_path(args, service: str, flag: str = "model") -> str:
    """The checkpoint path for ``service``; raises MissingModelError (a clear CLI message) when unset
    or absent, before any port is opened."""
    path = getattr(args, flag, None) or os.environ.get(MODEL_ENV)
    if not path:
        raise MissingModelError(f"give --model PATH or set {MODEL_ENV} (the {service} checkpoint)")
    if not Path(path).exists():
        raise MissingModelError(f"model path {path} does not exist")
    return str(path)


def resolve_device(args) -> str:
    """``--device`` or, by default, the first CUDA device when there is one, else the CPU."""
    device = getattr(args, "device", None)
    if device and device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(args) -> str | None:
    """``--dtype`` or None: the checkpoint's dtype on accelerators, fp32 on CPU (the core decides)."""
    dtype = getattr(args, "dtype", None)
    return None if dtype in (None, "auto") else dtype
