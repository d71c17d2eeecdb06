"""The InternLM2 model core shared by every service and training stage.

    config      InternLM2Config: official config.json fields, presets, validation
    model       InternLM2ForCausalLM / InternLM2ForRewardModel (official parameter names)
    rope        RoPE: default, linear, dynamic NTK
    attention   attention backends: dense/packed, contiguous KV cache (the engine adds paged)
    kernels     fused Triton kernels with eager fallbacks behind one dispatch point
    checkpoint  from_pretrained / save_pretrained in the official Hugging Face layout
    tokenizer   the InternLM2 SentencePiece tokenizer, ChatML template, tool calls, streaming decode
    reward      get_score-style reward scoring
    engine      continuous batching over a paged KV cache (serving and RLHF rollouts)

Names are resolved on first use so that ``internlm2.core.tokenizer`` (the tokenizer service's only
need) does not pay for importing torch.
"""

if __name__ != "internlm2.core":  # imported as a top-level `core` from the repository root
    raise ImportError(
        f"this folder is the package internlm2.core; import internlm2.core (not {__name__!r}): a second copy "
        "of the same modules would hold different classes and registries"
    )

from importlib import import_module

_EXPORTS = {
    "DenseAttention": "attention",
    "KVCache": "attention",
    "doc_ids_from_lengths": "attention",
    "positions_from_doc_ids": "attention",
    "CheckpointError": "checkpoint",
    "PRESETS": "config",
    "REWARD_TOKEN_ID": "config",
    "ConfigError": "config",
    "InternLM2Config": "config",
    "greedy_generate": "generate",
    "InternLM2ForCausalLM": "model",
    "InternLM2ForRewardModel": "model",
    "InternLM2Model": "model",
    "model_class_for": "model",
    "make_random_checkpoint": "random_checkpoint",
    "random_model": "random_checkpoint",
    "RewardScorer": "reward",
    "InternLM2Tokenizer": "tokenizer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'internlm2.core' has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
