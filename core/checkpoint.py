"""Checkpoint I/O in the official Hugging Face layout.

Reads ``model.safetensors``, sharded ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``,
and ``pytorch_model*.bin`` (+ index) with ``weights_only=True``. The model is built on the meta device,
materialised once with ``to_empty`` and every tensor is copied into place one at a time, so peak memory
is the model plus one tensor — never two copies of the weights (tests/core/test_checkpoint.py measures it).
``load_weights_into`` does the copying, also into a model built under ``deepspeed.zero.Init`` (each rank
keeps only its ZeRO-3 partition); ``ShardedWriter`` writes the official layout a tensor at a time.
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
    load_weights_into(model, directory, strict=strict)
    return model.eval()


def _copy_into(target: torch.Tensor, tensor: torch.Tensor) -> None:
    """Copy a full checkpoint tensor into ``target``: the whole parameter, or, for a parameter DeepSpeed
    ZeRO-3 has partitioned (``ds_tensor``), only this rank's flat slice of it — the layout
    ``deepspeed.zero.Init`` partitions into (flattened, padded to a multiple of the group size, rank r
    holding elements ``[r * part, (r + 1) * part)``). No rank ever holds a full copy of the model."""
    with torch.no_grad():
        part = getattr(target, "ds_tensor", None)
        if part is None:
            target.copy_(tensor)
            return
        size = part.ds_numel
        group = getattr(target, "ds_process_group", None)
        rank = torch.distributed.get_rank(group=group) if torch.distributed.is_initialized() else 0
        flat = tensor.reshape(-1)
        start = rank * size
        count = max(0, min(size, flat.numel() - start))
        if count:
            part.data.narrow(0, 0, count).copy_(flat.narrow(0, start, count))


def _shape(param: torch.Tensor) -> tuple[int, ...]:
    """The full shape of a parameter, also when ZeRO-3 has partitioned it (``ds_shape``)."""
    return tuple(getattr(param, "ds_shape", param.shape))


def load_weights_into(model, directory, *, strict: bool = True, rename=None,
                      allow_missing: tuple[str, ...] = ()) -> None:
    """Copy a checkpoint's tensors into ``model``'s existing parameters, one tensor at a time.

    Works for materialised models (``load_pretrained``) and for models built under
    ``deepspeed.zero.Init`` (each rank copies only its partition, see ``_copy_into``). ``rename`` maps a
    checkpoint name to the model's (``None`` skips the tensor: e.g. a causal LM's ``output.weight``
    when the model is a reward model); ``allow_missing`` names parameters the caller initialises.
    Tensors are converted to the parameter's dtype as they are copied.
    """
    directory = Path(directory)
    params = dict(model.named_parameters())
    seen: set[str] = set()
    unexpected, mis_shaped = [], []
    for name, tensor in iter_tensors(weight_files(directory)):
        if name.endswith(IGNORED_SUFFIXES):
            continue
        if rename is not None:
            name = rename(name)
            if name is None:
                continue
        target = params.get(name)
        if target is None:
            unexpected.append(name)
            continue
        if tuple(tensor.shape) != _shape(target):
            mis_shaped.append(f"{name}: checkpoint {tuple(tensor.shape)} vs model {_shape(target)}")
            seen.add(name)  # reported as mis-shaped, not also as missing
            continue
        _copy_into(target, tensor)
        seen.add(name)
        del tensor
    missing = sorted(set(params) - seen - set(allow_missing))
    if model.config.tie_word_embeddings and "output.weight" in missing:
        missing.remove("output.weight")  # shares tok_embeddings' storage
    problems = []
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if mis_shaped:
        problems.append(f"mis-shaped tensors ({len(mis_shaped)}): {mis_shaped[:8]}")
    if unexpected and strict:
        problems.append(f"unexpected tensors ({len(unexpected)}): {unexpected[:8]}")
    if problems:
        raise CheckpointError(f"checkpoint {directory} does not fit {type(model).__name__}: " + "; ".join(problems))


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}[dtype]


def save_pretrained(model, directory, max_shard_bytes: int = 5 * 2**30, safe_serialization: bool = True) -> None:
    """Write config.json + weights (sharded with an index past ``max_shard_bytes``) in the official layout."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("output.weight", None)
    writer = ShardedWriter(directory, model.config, type(model).architecture, model.dtype,
                           max_shard_bytes=max_shard_bytes, safe_serialization=safe_serialization)
    for name, tensor in state.items():
        writer.add(name, tensor)
    writer.close()


class ShardedWriter:
    """Writes a checkpoint in the official layout one tensor at a time: a shard is flushed to disk as
    soon as the next tensor would push it past ``max_shard_bytes``, so the writer never holds more
    than one shard (ZeRO-3 exports gather a module at a time and stream it here).

    Shards are written under temporary names and renamed on ``close()`` (their count is only known
    then); a reader never sees half a checkpoint's shard.
    """

    def __init__(self, directory, config: InternLM2Config, architecture: str, dtype: torch.dtype,
                 max_shard_bytes: int = 5 * 2**30, safe_serialization: bool = True):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self.safe = safe_serialization
        config = config.replace(torch_dtype=_dtype_name(dtype), architectures=[architecture])
        config.save(self.directory)
        (self.directory / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
             "pad_token_id": config.pad_token_id}, indent=2) + "\n")
        for stale in list(self.directory.glob("model*.safetensors")) + list(self.directory.glob("pytorch_model*.bin")):
            stale.unlink()
        for stale_index in (SAFE_INDEX, BIN_INDEX):
            (self.directory / stale_index).unlink(missing_ok=True)
        self._shard: dict[str, torch.Tensor] = {}
        self._size = 0
        self._written: list[tuple[Path, list[str]]] = []
        self.total_size = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Queue one tensor (copied to the CPU); flushes the current shard first when it is full."""
        nbytes = tensor.numel() * tensor.element_size()
        if self._shard and self._size + nbytes > self.max_shard_bytes:
            self._flush()
        self._shard[name] = tensor.detach().to("cpu").contiguous()
        self._size += nbytes
        self.total_size += nbytes

    def _flush(self) -> None:
        tmp = self.directory / f".shard-{len(self._written):05d}.tmp"
        if self.safe:
            save_file(self._shard, str(tmp), metadata={"format": "pt"})
        else:
            torch.save(self._shard, tmp)
        self._written.append((tmp, list(self._shard)))
        self._shard, self._size = {}, 0

    def close(self) -> None:
        if self._shard or not self._written:
            self._flush()
        ext = "safetensors" if self.safe else "bin"
        stem = "model" if self.safe else "pytorch_model"
        n = len(self._written)
        names = [f"{stem}.{ext}"] if n == 1 else [f"{stem}-{i + 1:05d}-of-{n:05d}.{ext}" for i in range(n)]
        for (tmp, _), name in zip(self._written, names):
            os.replace(tmp, self.directory / name)
        if n > 1:
            index = {"metadata": {"total_size": self.total_size},
                     "weight_map": {k: name for (_, keys), name in zip(self._written, names) for k in keys}}
            (self.directory / (SAFE_INDEX if self.safe else BIN_INDEX)).write_text(json.dumps(index, indent=2))
