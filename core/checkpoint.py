"""Checkpoint I/O in the official Hugging Face layout.

Reads ``model.safetensors``, sharded ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``,
and ``pytorch_model*.bin`` (+ index) with ``weights_only=True``. The model is built on the meta device,
materialised once with ``to_empty`` and every tensor is copied into place one at a time, so peak memory
is the model plus one tensor — never two copies of the weights (tests/test_checkpoint.py measures it).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import InternLM2Config

SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
# Buffers some exporters write that are not weights (recomputed from the config).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class CheckpointError(ValueError):
    """The checkpoint does not fit the model; the message lists the tensors at fault."""


def resolve_dtype(dtype: torch.dtype | str | None, config: InternLM2Config, device: torch.device) -> torch.dtype:
    """Explicit dtype, else the checkpoint's ``torch_dtype`` on accelerators and fp32 on CPU
    (bf16 matmuls on CPU are slow and lossy; serving on CPU is for development)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype != "auto":
        try:
            return _DTYPES[dtype]
        except KeyError:
            raise CheckpointError(f"dtype: unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}") from None
    if device.type == "cpu" or config.torch_dtype is None:
        return torch.float32
    return _DTYPES[config.torch_dtype]


def weight_files(directory: Path) -> list[Path]:
    """The weight files of a checkpoint directory, safetensors preferred."""
    for index_name in (SAFE_INDEX, BIN_INDEX):
        index = directory / index_name
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted({directory / name for name in weight_map.values()})
            missing = [str(f) for f in files if not f.exists()]
            if missing:
                raise CheckpointError(f"{index_name} names shards that are missing: {missing}")
            return files
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (directory / single).exists():
            return [directory / single]
    raise CheckpointError(
        f"no weights in {directory}: expected model.safetensors, {SAFE_INDEX}, pytorch_model.bin or {BIN_INDEX}"
    )


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs, one at a time; .bin files are memory-mapped and read with weights_only."""
    for path in files:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                    yield name, f.get_tensor(name)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            for name in list(state):
                yield name, state.pop(name)
            del state


def load_pretrained(cls, path, dtype=None, device="cpu", config: InternLM2Config | None = None, strict: bool = True):
    directory = Path(path)
    if not directory.is_dir():
        raise CheckpointError(f"model path {directory} is not a directory")
    config = config or InternLM2Config.from_pretrained(directory)
    device = torch.device(device)
    dtype = resolve_dtype(dtype, config, device)
    with torch.device("meta"):
        model = cls(config).to(dtype)  # dtype first, on meta: the one real allocation is already the right size
    model = model.to_empty(device=device)
    params = dict(model.named_parameters())
    seen: set[str] = set()
    unexpected, mis_shaped = [], []
    for name, tensor in iter_tensors(weight_files(directory)):
        if name.endswith(IGNORED_SUFFIXES):
            continue
        target = params.get(name)
        if target is None:
            unexpected.append(name)
            continue
        if tuple(tensor.shape) != tuple(target.shape):
            mis_shaped.append(f"{name}: checkpoint {tuple(tensor.shape)} vs model {tuple(target.shape)}")
            seen.add(name)  # reported as mis-shaped, not also as missing
            continue
        with torch.no_grad():
            target.copy_(tensor)
        seen.add(name)
        del tensor
    missing = sorted(set(params) - seen)
    if config.tie_word_embeddings and "output.weight" in missing:
        missing.remove("output.weight")  # shares tok_embeddings' storage
    problems = []
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if mis_shaped:
        problems.append(f"mis-shaped tensors ({len(mis_shaped)}): {mis_shaped[:8]}")
    if unexpected and strict:
        problems.append(f"unexpected tensors ({len(unexpected)}): {unexpected[:8]}")
    if problems:
        raise CheckpointError(f"checkpoint {directory} does not fit {cls.__name__}: " + "; ".join(problems))
    return model.eval()


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}[dtype]


def save_pretrained(model, directory, max_shard_bytes: int = 5 * 2**30, safe_serialization: bool = True) -> None:
    """Write config.json + weights (sharded with an index past ``max_shard_bytes``) in the official layout."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = model.config.replace(
        torch_dtype=_dtype_name(model.dtype), architectures=[type(model).architecture]
    )
    config.save(directory)
    (directory / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
         "pad_token_id": config.pad_token_id}, indent=2) + "\n")
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("output.weight", None)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    ext = "safetensors" if safe_serialization else "bin"
    stem = "model" if safe_serialization else "pytorch_model"
    for stale in list(directory.glob("model*.safetensors")) + list(directory.glob("pytorch_model*.bin")):
        stale.unlink()
    names = [f"{stem}.{ext}"] if len(shards) == 1 else [
        f"{stem}-{i + 1:05d}-of-{len(shards):05d}.{ext}" for i in range(len(shards))
    ]
    for name, shard in zip(names, shards):
        tmp = directory / (name + ".tmp")
        if safe_serialization:
            save_file({k: v.cpu() for k, v in shard.items()}, str(tmp), metadata={"format": "pt"})
        else:
            torch.save({k: v.cpu() for k, v in shard.items()}, tmp)
        os.replace(tmp, directory / name)  # a reader never sees half a shard
    for stale_index in (SAFE_INDEX, BIN_INDEX):
        (directory / stale_index).unlink(missing_ok=True)
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
            "weight_map": {k: name for name, shard in zip(names, shards) for k in shard},
        }
        (directory / (SAFE_INDEX if safe_serialization else BIN_INDEX)).write_text(json.dumps(index, indent=2))
