"""Writing a trained model in the official layout from any rank layout: ZeRO-3 partitions, LoRA adapters.

``export_model(model, directory, is_main)`` walks the model one module at a time. Under ZeRO-3 the
module's own parameters are gathered (``deepspeed.zero.GatheredParameters``, every rank joins, released
on exit) and rank 0 streams them into a ``core.checkpoint.ShardedWriter`` — so no rank ever holds
more than one module's full weights plus one shard waiting to be written, never a second full model.
A LoRA-wrapped linear (peft) is written merged, under its original name: ``W + scale * B @ A``, so the
result is a plain InternLM2 checkpoint that ``from_pretrained`` and the inference engine load unchanged.
Call it on every rank.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from internlm2.core.checkpoint import ShardedWriter

from .lora import lora_layers, merged_weight


def _gathered(params: list[nn.Parameter]):
    if params and any(hasattr(p, "ds_tensor") for p in params):
        from .deepspeed_loop import _deepspeed

        return _deepspeed().zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


def _official_name(name: str) -> str:
    return name.replace(".base_layer.", ".")


def iter_export_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(official name, full tensor) for every weight of ``model``, LoRA layers merged; on every rank
    (ZeRO-3 gathers are collective). Each tensor is valid only until the next one is requested."""
    lora = lora_layers(model)
    inside_lora = tuple(f"{prefix}." for prefix in lora)
    for prefix, module in model.named_modules():
        if prefix in lora:
            layer = lora[prefix]
            params = list(layer.parameters())
            with _gathered(params), torch.no_grad():
                yield f"{prefix}.weight", merged_weight(layer)
                if layer.base_layer.bias is not None:
                    yield f"{prefix}.bias", layer.base_layer.bias.detach()
            continue
        if prefix.startswith(inside_lora):
            continue
        own = list(module.named_parameters(recurse=False))
        if not own:
            continue
        with _gathered([p for _, p in own]), torch.no_grad():
            for pname, p in own:
                yield _official_name(f"{prefix}.{pname}" if prefix else pname), p.detach()


def export_model(model: nn.Module, directory: str | Path, is_main: bool, max_shard_bytes: int = 5 * 2**30) -> None:
    """Write ``model`` (config.json, generation_config.json, safetensors shards) to ``directory`` on the
    main rank; every rank must call it."""
    config = model.config
    dtype = next(p.dtype for p in model.parameters() if p.dtype.is_floating_point)
    writer = ShardedWriter(directory, config, type(model).architecture, dtype,
                           max_shard_bytes=max_shard_bytes) if is_main else None
    tied = getattr(config, "tie_word_embeddings", False)
    for name, tensor in iter_export_tensors(model):
        if writer is not None and not (tied and name == "output.weight"):
            # A copy: a gathered ZeRO-3 tensor is released when its module's gather ends.
            writer.add(name, tensor.to(device="cpu", dtype=dtype, copy=True))
    if writer is not None:
        writer.close()
