"""Activation (gradient) checkpointing applied from outside the model.

Each decoder layer's ``forward`` is replaced on the instance by a ``torch.utils.checkpoint`` call
of the original: parameter names (and so checkpoints) are unchanged, and the model file knows
nothing about it.
"""

from __future__ import annotations

from torch import nn
from torch.utils.checkpoint import checkpoint


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Checkpoint every ``model.model.layers[i]``; idempotent. Returns the number of layers wrapped."""
    layers = model.model.layers
    for layer in layers:
        if getattr(layer, "_activation_checkpointed", False):
            continue
        inner = layer.forward

        def forward(*args, _inner=inner, **kwargs):
            # Non-reentrant: works with inputs that do not require grad and with non-tensor args
            # (the attention backend object).
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        layer.forward = forward
        layer._activation_checkpointed = True
    return len(layers)
