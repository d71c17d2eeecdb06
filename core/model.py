"""InternLM2, top to bottom, as the official ``modeling_internlm2.py`` computes it.

    tok_embeddings -> N x [attention_norm -> Attention(wqkv, RoPE, GQA) -> wo -> +residual
                           ffn_norm -> FeedForward(w2(silu(w1 x) * w3 x)) -> +residual]
                   -> norm -> output (untied LM head)   |   v_head (reward model)

Parameter names are the official ones so checkpoints load unchanged. ``wqkv`` rows are grouped per
KV head: for each of the Hkv groups, G query heads then one K head then one V head (G = Hq / Hkv).
RMSNorm runs in fp32. Normalisation, SwiGLU and RoPE go through ``internlm2.core.kernels`` (Triton on
CUDA, eager elsewhere); attention through an attention backend (``attention.py``), so the same model
serves training (dense/packed), simple cached decoding and the engine's paged KV cache.
Parallelism, compile and activation checkpointing are applied from outside.
"""

from __future__ import annotations

import torch
from torch import nn

from . import kernels
from .attention import AttentionBackend, DenseAttention
from .config import InternLM2Config
from .rope import RotaryEmbedding


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.rms_norm(x, self.weight, self.eps)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual) in one pass."""
        return kernels.add_rms_norm(x, residual, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, config: InternLM2Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.groups = config.num_kv_groups
        self.head_dim = config.head_dim
        self.wqkv = nn.Linear(
            config.hidden_size, (self.num_heads + 2 * self.num_kv_heads) * self.head_dim, bias=config.bias
        )
        self.wo = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=config.bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn: AttentionBackend) -> torch.Tensor:
        b, t, _ = x.shape
        qkv = self.wqkv(x).view(b, t, self.num_kv_heads, self.groups + 2, self.head_dim)
        q = qkv[:, :, :, : self.groups].reshape(b, t, self.num_heads, self.head_dim)  # (B, T, Hq, D)
        k = qkv[:, :, :, -2]  # (B, T, Hkv, D)
        v = qkv[:, :, :, -1]
        q, k = kernels.apply_rotary(q, k, cos, sin)
        out = attn(self.layer_idx, q, k, v)  # (B, T, Hq, D)
        return self.wo(out.reshape(b, t, self.num_heads * self.head_dim))


class FeedForward(nn.Module):
    def __init__(self, config: InternLM2Config):
        super().__init__()
        self.w1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.w3 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.w2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(kernels.swiglu(self.w1(x), self.w3(x)))


class DecoderLayer(nn.Module):
    def __init__(self, config: InternLM2Config, layer_idx: int):
        super().__init__()
        self.attention = Attention(config, layer_idx)
        self.feed_forward = FeedForward(config)
        self.attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        h: torch.Tensor,
        residual: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn: AttentionBackend,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (this layer's FFN output, the residual stream before adding it).

        The residual add is deferred into the next norm (``add_rms_norm``), which computes exactly
        the official ``residual + h`` followed by RMSNorm, in one kernel.
        """
        if residual is None:
            residual = h
            x = self.attention_norm(h)
        else:
            x, residual = self.attention_norm.add_forward(h, residual)
        h = self.attention(x, cos, sin, attn)
        x, residual = self.ffn_norm.add_forward(h, residual)
        return self.feed_forward(x), residual


class InternLM2Model(nn.Module):
    def __init__(self, config: InternLM2Config):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attn: AttentionBackend | None = None,
        rope_seq_len: int | torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final hidden states [B, T, H] (after ``norm``).

        ``position_ids`` default to 0..T-1. ``rope_seq_len`` is the sequence length dynamic NTK scales
        for (default: the largest position + 1, what the official model uses); a [B] tensor gives
        each row its own length.
        """
        h = self.tok_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        b, t = h.shape[:2]
        if position_ids is None:
            position_ids = torch.arange(t, device=h.device).expand(b, t)
        if rope_seq_len is None and self.rotary.scaling_type == "dynamic":
            rope_seq_len = int(position_ids.max()) + 1
        cos, sin = self.rotary(position_ids, h.dtype, rope_seq_len)
        attn = attn if attn is not None else DenseAttention()
        residual = None
        for layer in self.layers:
            h, residual = layer(h, residual, cos, sin, attn)
        h, _ = self.norm.add_forward(h, residual)
        return h


class InternLM2PreTrainedModel(nn.Module):
    """Shared construction, init and checkpoint I/O of the causal LM and the reward model."""

    config: InternLM2Config

    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """The official init: N(0, initializer_range) for linear and embedding weights, zero biases, unit norms."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                with torch.no_grad():
                    module.weight.normal_(0.0, std, generator=generator)
                    if getattr(module, "bias", None) is not None:
                        module.bias.zero_()
            elif isinstance(module, RMSNorm):
                with torch.no_grad():
                    module.weight.fill_(1.0)

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype | str | None = None, device: torch.device | str = "cpu",
                        config: InternLM2Config | None = None, strict: bool = True):
        from .checkpoint import load_pretrained

        return load_pretrained(cls, path, dtype=dtype, device=device, config=config, strict=strict)

    def save_pretrained(self, directory, max_shard_bytes: int = 5 * 2**30, safe_serialization: bool = True) -> None:
        from .checkpoint import save_pretrained

        save_pretrained(self, directory, max_shard_bytes=max_shard_bytes, safe_serialization=safe_serialization)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype


class InternLM2ForCausalLM(InternLM2PreTrainedModel):
    architecture = "InternLM2ForCausalLM"

    def __init__(self, config: InternLM2Config):
        super().__init__()
        self.config = config
        self.model = InternLM2Model(config)
        self.output = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.output.weight = self.model.tok_embeddings.weight

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.output(hidden)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attn: AttentionBackend | None = None,
        rope_seq_len: int | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [B, T, V] in the model's dtype."""
        return self.compute_logits(self.model(input_ids, position_ids, attn, rope_seq_len))

    def loss(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attn: AttentionBackend | None = None,
        reduction: str = "mean",
        ignore_index: int = -100,
    ) -> torch.Tensor:
        """Next-token cross-entropy; ``labels`` are already aligned with the outputs (label[t] is the
        target of position t). Goes through the fused linear + cross-entropy, never full fp32 logits."""
        hidden = self.model(input_ids, position_ids, attn)
        return kernels.fused_linear_cross_entropy(
            hidden.reshape(-1, hidden.shape[-1]), self.output.weight, labels.reshape(-1),
            ignore_index=ignore_index, reduction=reduction,
        )


class InternLM2ForRewardModel(InternLM2PreTrainedModel):
    """InternLM2-Reward: the trunk plus ``v_head`` (hidden -> 1, no bias).

    A conversation's score is v_head at the reward token (``reward_token_id``) appended after the
    chat-formatted conversation, as the official ``get_score`` does; see ``internlm2.core.reward``.
    """

    architecture = "InternLM2ForRewardModel"

    def __init__(self, config: InternLM2Config):
        super().__init__()
        self.config = config
        self.model = InternLM2Model(config)
        self.v_head = nn.Linear(config.hidden_size, 1, bias=False)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attn: AttentionBackend | None = None,
    ) -> torch.Tensor:
        """Per-token values [B, T] (fp32)."""
        return self.v_head(self.model(input_ids, position_ids, attn)).squeeze(-1).float()

    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Scores [B] read at each row's last real token (right padding), as the official forward does."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        values = self(input_ids, attn=DenseAttention(padding_mask=attention_mask.bool()))
        ends = attention_mask.long().cumsum(dim=1).argmax(dim=1, keepdim=True)
        return values.gather(1, ends).squeeze(1)


def model_class_for(config: InternLM2Config) -> type[InternLM2PreTrainedModel]:
    return InternLM2ForRewardModel if config.is_reward_model else InternLM2ForCausalLM
