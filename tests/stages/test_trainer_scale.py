"""The trainer's scale pieces on CPU: loss normalised by the global target count, LoRA (peft) with merged
export, loading straight into ZeRO-3 partitions, TensorBoard events."""

from __future__ import annotations

import pytest
import torch
from training_support import build_assets

from internlm2.core import InternLM2Config, InternLM2ForCausalLM, random_model
from internlm2.core.tokenizer import InternLM2Tokenizer
from internlm2.plugins.contract import StageInputs, local_context
from internlm2.plugins.data.formats import load_chat
from internlm2.plugins.data.packing import pack_samples
from internlm2.plugins.data.tokenize import tokenize_chat
from internlm2.plugins.registry import get_stage
from internlm2.plugins.trainer import TrainingConfig, apply_lora, export_model, is_partitioned, load_causal_lm

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_assets(tmp_path_factory.mktemp("assets"))


def sft_first_step(assets, out, **config) -> dict:
    stage = get_stage("sft")
    ctx = local_context(stage, {"data": str(assets.chat), "max_length": 32, "lr": 1e-3, "max_steps": 1,
                                "shuffle": False, "checkpoint_every": 0, "tensorboard": False, **config},
                        out, inputs=StageInputs(checkpoints={"base": assets.base}))
    stage.run(ctx)
    return ctx.channel.of_type("metrics")[0]["values"]


def test_accumulating_uneven_micro_batches_equals_the_single_big_batch(assets, tmp_path):
    """Two micro-batches with different numbers of assistant tokens, accumulated, give the gradient of the
    one batch holding both: every token weighs 1 / (all target tokens of the step), not 1 / (its micro-batch's)."""
    tok = InternLM2Tokenizer.from_pretrained(assets.base)
    rows, _ = pack_samples([tokenize_chat(tok, c) for c in load_chat(assets.chat)], 32, tok.pad_id)
    counts = [sum(label != -100 for label in row.labels) for row in rows[:2]]
    assert counts[0] != counts[1], counts  # the case a per-micro-batch mean gets wrong

    accumulated = sft_first_step(assets, tmp_path / "a", micro_batch_size=1, gradient_accumulation_steps=2)
    single = sft_first_step(assets, tmp_path / "b", micro_batch_size=2, gradient_accumulation_steps=1)
    assert accumulated["grad_norm"] == pytest.approx(single["grad_norm"], rel=1e-4)
    assert accumulated["loss"] == pytest.approx(single["loss"], rel=1e-5)


def test_lora_export_is_merged_and_gives_the_peft_models_logits(tmp_path):
    torch.manual_seed(0)
    model = random_model(InternLM2Config.preset("tiny"), seed=1)
    base_embed = model.model.tok_embeddings.weight.clone()
    model = apply_lora(model, TrainingConfig(lora_rank=4, lora_alpha=8))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():  # lora_B starts at zero; make the adapters matter
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        want = model(ids)
    export_model(model, tmp_path / "merged", is_main=True)
    merged = InternLM2ForCausalLM.from_pretrained(tmp_path / "merged")  # strict: official names only
    with torch.no_grad():
        got = merged(ids)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert torch.equal(merged.model.tok_embeddings.weight, base_embed)


def test_sft_with_lora_trains_adapters_only_and_exports_merged(assets, tmp_path):
    stage = get_stage("sft")
    ctx = local_context(stage, {"data": str(assets.chat), "max_length": 64, "micro_batch_size": 2, "lr": 5e-3,
                                "max_steps": 8, "checkpoint_every": 0, "lora_rank": 8, "lora_alpha": 16},
                        tmp_path, inputs=StageInputs(checkpoints={"base": assets.base}))
    result = stage.run(ctx)
    assert result["loss"] < result["initial_loss"]
    final = InternLM2ForCausalLM.from_pretrained(tmp_path / "final")
    base = InternLM2ForCausalLM.from_pretrained(assets.base)
    assert not torch.equal(final.model.layers[0].attention.wqkv.weight, base.model.layers[0].attention.wqkv.weight)
    assert torch.equal(final.model.tok_embeddings.weight, base.model.tok_embeddings.weight)  # frozen
    assert torch.equal(final.output.weight, base.output.weight)
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    assert (tmp_path / "metrics.png").read_bytes()[:4] == b"\x89PNG"


def test_zero3_loading_fills_partitions_with_the_checkpoint(assets):
    cfg = TrainingConfig(zero_stage=3, zero3_param_persistence_threshold=0)
    model = load_causal_lm(assets.base, cfg)
    params = dict(model.named_parameters())
    assert all(is_partitioned(p) for p in params.values())
    reference = InternLM2ForCausalLM.from_pretrained(assets.base)
    import deepspeed

    for name, want in reference.named_parameters():
        p = params[name]
        assert p.ds_numel == want.numel() and p.numel() == 0 and p.dtype == torch.float32  # fp32 training on CPU
        with deepspeed.zero.GatheredParameters([p]):
            assert torch.equal(p.data, want.data), name
