"""An independent reference: transformers' LlamaForCausalLM carrying our weights.

InternLM2 is Llama with a packed, per-KV-group interleaved ``wqkv``; de-interleaving it into
q_proj/k_proj/v_proj and renaming the rest gives a Llama model that must compute the same logits.
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from internlm2.core import InternLM2Config


def llama_config(cfg: InternLM2Config) -> LlamaConfig:
    rope = {"rope_type": "default", "rope_theta": float(cfg.rope_theta)}
    if cfg.rope_scaling:
        rope = {"rope_type": cfg.rope_scaling["type"], "factor": float(cfg.rope_scaling["factor"]),
                "rope_theta": float(cfg.rope_theta)}
    kwargs = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps, attention_bias=cfg.bias, mlp_bias=False,
        tie_word_embeddings=cfg.tie_word_embeddings, pad_token_id=cfg.pad_token_id,
    )
    try:  # transformers >= 5 keeps RoPE settings in rope_parameters
        return LlamaConfig(**kwargs, rope_parameters=rope)
    except TypeError:
        scaling = None if rope["rope_type"] == "default" else {"type": rope["rope_type"], "factor": rope["factor"]}
        return LlamaConfig(**kwargs, rope_theta=cfg.rope_theta, rope_scaling=scaling)


def deinterleave_wqkv(w: torch.Tensor, cfg: InternLM2Config) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """wqkv rows [(Hkv * (G + 2)) * D] -> q [Hq * D], k [Hkv * D], v [Hkv * D] (rows; works for bias too)."""
    g, d, hkv = cfg.num_kv_groups, cfg.head_dim, cfg.num_key_value_heads
    grouped = w.reshape(hkv, g + 2, d, *w.shape[1:])
    q = grouped[:, :g].reshape(hkv * g * d, *w.shape[1:])
    k = grouped[:, g].reshape(hkv * d, *w.shape[1:])
    v = grouped[:, g + 1].reshape(hkv * d, *w.shape[1:])
    return q, k, v


def to_llama(model) -> LlamaForCausalLM:
    cfg = model.config
    llama = LlamaForCausalLM(llama_config(cfg)).to(model.dtype)
    ours = model.state_dict()
    state = {
        "model.embed_tokens.weight": ours["model.tok_embeddings.weight"],
        "model.norm.weight": ours["model.norm.weight"],
        "lm_head.weight": ours["output.weight"],
    }
    for i in range(cfg.num_hidden_layers):
        src, dst = f"model.layers.{i}.", f"model.layers.{i}."
        for kind in ("weight", "bias") if cfg.bias else ("weight",):
            q, k, v = deinterleave_wqkv(ours[src + f"attention.wqkv.{kind}"], cfg)
            state[dst + f"self_attn.q_proj.{kind}"] = q
            state[dst + f"self_attn.k_proj.{kind}"] = k
            state[dst + f"self_attn.v_proj.{kind}"] = v
            state[dst + f"self_attn.o_proj.{kind}"] = ours[src + f"attention.wo.{kind}"]
        state[dst + "mlp.gate_proj.weight"] = ours[src + "feed_forward.w1.weight"]
        state[dst + "mlp.up_proj.weight"] = ours[src + "feed_forward.w3.weight"]
        state[dst + "mlp.down_proj.weight"] = ours[src + "feed_forward.w2.weight"]
        state[dst + "input_layernorm.weight"] = ours[src + "attention_norm.weight"]
        state[dst + "post_attention_layernorm.weight"] = ours[src + "ffn_norm.weight"]
    missing, unexpected = llama.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert all("rotary" in m for m in missing), missing
    return llama.eval()
