"""The model against independent references: HF LlamaForCausalLM on the same weights, the official
dynamic-NTK formula, and itself (packed vs separate, cached vs full, batched vs single)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from hf_reference import to_llama
from internlm2.core import (
    PRESETS,
    ConfigError,
    DenseAttention,
    InternLM2Config,
    KVCache,
    doc_ids_from_lengths,
    positions_from_doc_ids,
    random_model,
)

pytestmark = pytest.mark.timeout(120)


def tiny(**overrides) -> InternLM2Config:
    base = dict(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=3,
                num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256,
                rope_theta=1e6, rms_norm_eps=1e-5, bias=False)
    base.update(overrides)
    return InternLM2Config(**base)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"bias": True},
        {"num_key_value_heads": 8},  # MHA
        {"num_key_value_heads": 1},  # MQA
        {"rope_scaling": {"type": "linear", "factor": 2.0}},
    ],
    ids=["gqa", "bias", "mha", "mqa", "linear-rope"],
)
def test_logits_match_llama(overrides):
    model = random_model(tiny(**overrides), seed=1)
    llama = to_llama(model)
    ids = torch.randint(0, 512, (2, 37), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(ids)
        theirs = llama(input_ids=ids).logits
    assert ours.shape == (2, 37, 512)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    # The comparison is sensitive: shifting wqkv's rows by one head (a wrong grouping) must break it.
    with torch.no_grad():
        for layer in model.model.layers:
            w = layer.attention.wqkv.weight
            w.copy_(w.roll(model.config.head_dim, dims=0))
        assert (model(ids) - theirs).abs().max() > 1e-3


def official_dynamic_ntk_cos_sin(dim, base, max_pos, factor, seq_len):
    """InternLM2DynamicNTKScalingRotaryEmbedding._set_cos_sin_cache, written out from the official code."""
    if seq_len > max_pos:
        base = base * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))
    t = torch.arange(seq_len, dtype=inv_freq.dtype)
    freqs = torch.einsum("i,j->ij", t, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


@pytest.mark.parametrize("seq_len", [40, 64, 100])
def test_dynamic_ntk_matches_official_formula(seq_len):
    cfg = tiny(max_position_embeddings=64, rope_scaling={"type": "dynamic", "factor": 2.0})
    model = random_model(cfg)
    positions = torch.arange(seq_len)[None]
    cos, sin = model.model.rotary(positions, torch.float32, seq_len)
    ref_cos, ref_sin = official_dynamic_ntk_cos_sin(cfg.head_dim, cfg.rope_theta, 64, 2.0, seq_len)
    torch.testing.assert_close(cos[0], ref_cos, atol=1e-6, rtol=0)
    torch.testing.assert_close(sin[0], ref_sin, atol=1e-6, rtol=0)
    scaled = seq_len > 64
    plain_cos, _ = official_dynamic_ntk_cos_sin(cfg.head_dim, cfg.rope_theta, 10**9, 2.0, seq_len)
    assert (not torch.allclose(cos[0], plain_cos, atol=1e-6)) == scaled


def test_dynamic_ntk_logits_past_max_positions_match_llama():
    cfg = tiny(max_position_embeddings=32, rope_theta=10000.0, rope_scaling={"type": "dynamic", "factor": 2.0})
    model = random_model(cfg, seed=3)
    llama = to_llama(model)
    ids = torch.randint(0, 512, (1, 80), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), llama(input_ids=ids).logits, atol=1e-4, rtol=0)
        # and scaling really kicked in: the same ids with plain RoPE give other logits
        plain = random_model(cfg.replace(rope_scaling=None), seed=3)
        assert (plain(ids) - model(ids)).abs().max() > 1e-3


def test_packed_forward_equals_separate_forwards():
    model = random_model(tiny(), seed=4)
    lengths = [5, 11, 7, 9]
    docs = [torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(n)) for n in lengths]
    packed = torch.cat(docs)[None]
    doc_ids = doc_ids_from_lengths(lengths, packed.shape[1])
    positions = positions_from_doc_ids(doc_ids)
    assert positions[0, :7].tolist() == [0, 1, 2, 3, 4, 0, 1]
    with torch.no_grad():
        out = model(packed, positions, attn=DenseAttention(doc_ids=doc_ids))[0]
        start = 0
        for doc in docs:
            alone = model(doc[None])[0]
            torch.testing.assert_close(out[start : start + len(doc)], alone, atol=1e-5, rtol=0)
            start += len(doc)


def test_kv_cache_decoding_equals_full_forward():
    model = random_model(tiny(), seed=5)
    ids = torch.randint(0, 512, (3, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache.for_model(model, 3, 24)
        pieces = [model(ids[:, :10], torch.arange(10).expand(3, 10), attn=cache)]
        cache.advance(10)
        for t in range(10, 24):
            pieces.append(model(ids[:, t : t + 1], torch.tensor([[t]] * 3), attn=cache))
            cache.advance(1)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=0)


def test_left_padded_batch_decoding_equals_single():
    model = random_model(tiny(), seed=6)
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
    width = 6
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    valid = torch.tensor([[False] * (width - len(p)) + [True] * len(p) for p in prompts])
    positions = (valid.long().cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        cache = KVCache.for_model(model, 2, width + 1)
        cache.padding_mask = torch.cat([valid, torch.ones(2, 1, dtype=torch.bool)], dim=1)
        logits = model(ids, positions, attn=cache)
        for row, p in enumerate(prompts):
            alone = model(torch.tensor([p]))[0, -1]
            torch.testing.assert_close(logits[row, -1], alone, atol=1e-5, rtol=0)


def test_reward_batched_equals_single():
    cfg = tiny(reward_token_id=500, architectures=["InternLM2ForRewardModel"])
    model = random_model(cfg, seed=7, reward=True)
    seqs = [[1, 5, 6, 500], [1, 7, 8, 9, 10, 11, 500], [1, 2, 500]]
    width = max(map(len, seqs))
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = True
    with torch.no_grad():
        batched = model.score(ids, mask)
        for i, s in enumerate(seqs):
            single = model.score(torch.tensor([s]))
            # by hand: v_head at the last (reward) token
            by_hand = model.v_head(model.model(torch.tensor([s])))[0, -1, 0]
            torch.testing.assert_close(batched[i], single[0], atol=1e-5, rtol=0)
            torch.testing.assert_close(single[0], by_hand, atol=1e-6, rtol=0)


def test_official_config_reads_unchanged(reference_data):
    raw = json.loads((reference_data / "internlm2-chat-7b" / "config.json").read_text())
    cfg = InternLM2Config.from_pretrained(reference_data / "internlm2-chat-7b")
    assert (cfg.hidden_size, cfg.num_key_value_heads, cfg.rope_theta, cfg.vocab_size) == (4096, 8, 1000000, 92544)
    written = cfg.to_dict()
    for key, value in raw.items():  # every official key is kept, unchanged
        assert written[key] == value, key


def count_params(cfg: InternLM2Config) -> int:
    with torch.device("meta"):
        from internlm2.core import InternLM2ForCausalLM

        return sum(p.numel() for p in InternLM2ForCausalLM(cfg).parameters())


@pytest.mark.parametrize("name,billions", [("1_8b", 1.889), ("7b", 7.738), ("20b", 19.861)])
def test_presets_have_released_sizes(name, billions):
    assert math.isclose(count_params(InternLM2Config.preset(name)) / 1e9, billions, abs_tol=0.002)
    assert PRESETS[f"{name}-reward"]["reward_token_id"] == 92527


@pytest.mark.parametrize(
    "overrides,field",
    [
        ({"hidden_size": 65}, "hidden_size"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"vocab_size": 0}, "vocab_size"),
        ({"rope_scaling": {"type": "yarn", "factor": 2.0}}, "rope_scaling.type"),
        ({"rope_scaling": {"type": "dynamic", "factor": 0.5}}, "rope_scaling.factor"),
        ({"rms_norm_eps": -1.0}, "rms_norm_eps"),
        ({"torch_dtype": "int8"}, "torch_dtype"),
        ({"model_type": "llama"}, "model_type"),
    ],
)
def test_invalid_config_names_the_field(overrides, field):
    data = tiny().to_dict() | overrides
    with pytest.raises(ConfigError) as err:
        InternLM2Config.from_dict(data)
    assert err.value.field == field
    assert field in str(err.value)
