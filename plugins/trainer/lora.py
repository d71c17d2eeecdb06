"""LoRA through ``peft``: adapters injected into the model in place, merged back on export.

``apply_lora(model, cfg)`` wraps the named linears (``cfg.lora_target_modules``) with peft's LoRA layers
(``peft.inject_adapter_in_model``: the model keeps its class, forward and checkpoint names, only the
wrapped linears gain ``base_layer`` / ``lora_A`` / ``lora_B``) and freezes everything else. A reward
model's ``v_head`` stays trainable (a new head has nothing to adapt). ``export.export_model`` writes
the merged weights in the official layout. Used by SFT, DPO, the reward model and PPO's actor.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import TrainingConfig

ALWAYS_TRAINED = ("v_head",)  # heads trained in full next to the adapters


def apply_lora(model: nn.Module, cfg: TrainingConfig) -> nn.Module:
    """Inject LoRA adapters into ``model`` (in place; returned for chaining) when ``cfg.lora_rank`` > 0;
    otherwise the model is returned untouched. Only adapter weights (and ``v_head``) require grad."""
    if cfg.lora_rank == 0:
        return model
    from peft import LoraConfig, inject_adapter_in_model

    lora_config = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                             target_modules=list(cfg.lora_target_modules), bias="none")
    # Adapters start in fp32 beside a bf16 base; DeepSpeed casts the module to its precision.
    model = inject_adapter_in_model(lora_config, model)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name or name.split(".")[0] in ALWAYS_TRAINED)
    return model


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """{module name: peft LoRA layer} of ``model`` (empty without adapters)."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # peft missing: no model can carry its adapters
        return {}
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def merged_weight(layer: nn.Module) -> torch.Tensor:
    """``W + Σ_adapters scale · B @ A`` of a peft LoRA linear (its parameters gathered by the caller)."""
    weight = layer.base_layer.weight.detach()
    if getattr(layer, "merged", False):  # merged in place already
        return weight
    out = weight.float()
    for adapter in layer.active_adapters:
        if adapter in layer.lora_A:
            out = out + layer.get_delta_weight(adapter).float()
    return out.to(weight.dtype)


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
