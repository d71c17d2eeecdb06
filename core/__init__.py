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
"""

from .attention import DenseAttention, KVCache, doc_ids_from_lengths, positions_from_doc_ids
from .checkpoint import CheckpointError
from .config import PRESETS, REWARD_TOKEN_ID, ConfigError, InternLM2Config
from .generate import greedy_generate
from .model import InternLM2ForCausalLM, InternLM2ForRewardModel, InternLM2Model, model_class_for
from .random_checkpoint import make_random_checkpoint, random_model

__all__ = [
    "PRESETS",
    "REWARD_TOKEN_ID",
    "CheckpointError",
    "ConfigError",
    "DenseAttention",
    "InternLM2Config",
    "InternLM2ForCausalLM",
    "InternLM2ForRewardModel",
    "InternLM2Model",
    "InternLM2Tokenizer",
    "KVCache",
    "RewardScorer",
    "doc_ids_from_lengths",
    "greedy_generate",
    "make_random_checkpoint",
    "model_class_for",
    "positions_from_doc_ids",
    "random_model",
]


def __getattr__(name: str):
    # The tokenizer and reward scorer pull in sentencepiece; import them on first use.
    if name == "InternLM2Tokenizer":
        from .tokenizer import InternLM2Tokenizer

        return InternLM2Tokenizer
    if name == "RewardScorer":
        from .reward import RewardScorer

        return RewardScorer
    raise AttributeError(name)
