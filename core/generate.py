"""Plain greedy decoding with a contiguous KV cache: the reference the engine is tested against,
and the core's own quick check. Serving goes through ``internlm2.core.engine``."""

from __future__ import annotations

import torch

from .attention import KVCache


@torch.inference_mode()
def greedy_generate(model, prompt_ids: list[int], max_new_tokens: int, stop_ids: tuple[int, ...] = ()) -> list[int]:
    """New token ids after ``prompt_ids`` (stops after emitting a stop id)."""
    if not prompt_ids:
        raise ValueError("prompt_ids: must not be empty")
    cache = KVCache.for_model(model, 1, len(prompt_ids) + max_new_tokens)
    ids = torch.tensor([prompt_ids], device=model.device)
    positions = torch.arange(len(prompt_ids), device=model.device)[None]
    out: list[int] = []
    for _ in range(max_new_tokens):
        logits = model(ids, positions, attn=cache, rope_seq_len=int(positions[0, -1]) + 1)
        cache.advance(ids.shape[1])
        token = int(logits[0, -1].argmax())
        out.append(token)
        if token in stop_ids:
            break
        ids = torch.tensor([[token]], device=model.device)
        positions = positions[:, -1:] + 1
    return out
