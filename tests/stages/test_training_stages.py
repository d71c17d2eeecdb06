"""The shared DeepSpeed loop and the pretrain / sft stages, in-process on CPU (DS_ACCELERATOR=cpu,
gloo, ZeRO-2 unless stated): loss goes down, checkpoints load and generate, training resumes from
its own checkpoint bit for bit, SFT exact match goes up, ZeRO-3 + activation checkpointing +
gradient accumulation train and consolidate."""

from __future__ import annotations

import json

import pytest
import torch
from training_support import build_assets, exact_match

from internlm2.core import InternLM2ForCausalLM, greedy_generate
from internlm2.core.tokenizer import InternLM2Tokenizer
from internlm2.plugins.contract import (
    ArtifactKind,
    ArtifactRef,
    MemoryChannel,
    StageCancelled,
    StageInputs,
    StageOutput,
    local_context,
)
from internlm2.plugins.registry import get_stage
from internlm2.plugins.stages.sft import answer_distribution_divergence

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_assets(tmp_path_factory.mktemp("assets"))


@pytest.fixture(scope="module")
def dataset(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepare")
    stage = get_stage("prepare_data")
    ctx = local_context(stage, {"sources": [str(assets.corpus)]}, out,
                        inputs=StageInputs(checkpoints={"base": assets.base}))
    stage.run(ctx)
    return StageOutput("prepare_data", "prepare_data", out,
                       {"dataset": ArtifactRef("dataset", ArtifactKind.OTHER, out / "dataset")})


def pretrain_inputs(assets, dataset) -> StageInputs:
    return StageInputs(checkpoints={"base": assets.base}, previous=(dataset,))


PRETRAIN = {"seq_len": 64, "micro_batch_size": 4, "lr": 3e-3, "warmup_steps": 2, "zero_stage": 2}


def test_pretrain_loss_goes_down_and_checkpoint_generates(assets, dataset, tmp_path):
    stage = get_stage("pretrain")
    ctx = local_context(stage, {**PRETRAIN, "max_steps": 16, "checkpoint_every": 8}, tmp_path,
                        inputs=pretrain_inputs(assets, dataset))
    result = stage.run(ctx)
    losses = [e["values"]["loss"] for e in ctx.channel.of_type("metrics")]
    assert len(losses) == 16
    assert result["loss"] < 0.75 * result["initial_loss"], losses
    progress = ctx.channel.of_type("progress")
    assert [p["step"] for p in progress] == list(range(1, 17)) and progress[-1]["fraction"] == 1.0
    arts = {a["name"]: a for a in ctx.channel.of_type("artifact")}
    assert arts["final"]["kind"] == "CHECKPOINT" and arts["metrics"]["kind"] == "OTHER"
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step-00000008"

    final = tmp_path / "final"
    assert {"config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json"} <= {
        p.name for p in final.iterdir()}
    model = InternLM2ForCausalLM.from_pretrained(final)
    tok = InternLM2Tokenizer.from_pretrained(final)
    base = InternLM2ForCausalLM.from_pretrained(assets.base)
    assert not torch.equal(model.output.weight, base.output.weight)
    out = greedy_generate(model, tok.encode("alpha beta gamma"), 6)
    assert len(out) == 6 and all(0 <= t < tok.vocab_size for t in out)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["steps"] == 16 and len(metrics["history"]) == 16


class CancelAtStep(MemoryChannel):
    """Requests cancel once progress reaches ``step`` (a job cancelled mid-stage)."""

    def __init__(self, step: int):
        super().__init__()
        self.step = step

    def emit(self, event):
        super().emit(event)
        if event["type"] == "progress" and event["step"] >= self.step:
            self.cancel()


def test_pretrain_resumes_from_its_last_checkpoint_exactly(assets, dataset, tmp_path):
    stage = get_stage("pretrain")
    config = {**PRETRAIN, "max_steps": 8, "checkpoint_every": 3}
    inputs = pretrain_inputs(assets, dataset)
    straight = local_context(stage, config, tmp_path / "straight", inputs=inputs)
    stage.run(straight)
    want = [e["values"]["loss"] for e in straight.channel.of_type("metrics")]

    # Attempt 0 is cancelled after step 5: its newest checkpoint is step 3.
    first = local_context(stage, config, tmp_path / "resumed", inputs=inputs, channel=CancelAtStep(5))
    with pytest.raises(StageCancelled):
        stage.run(first)
    assert first.latest_checkpoint().name == "step-00000003"
    assert not (tmp_path / "resumed" / "final").exists()

    second = local_context(stage, config, tmp_path / "resumed", inputs=inputs)
    stage.run(second)
    logs = [e["message"] for e in second.channel.of_type("log")]
    assert any("resumed from checkpoint step-00000003" in m for m in logs), logs
    got = [e["values"]["loss"] for e in second.channel.of_type("metrics") if "loss" in e["values"]]
    assert got == pytest.approx(want[3:], rel=1e-5, abs=1e-6)
    history = json.loads((tmp_path / "resumed" / "metrics.json").read_text())["history"]
    assert [h["step"] for h in history] == list(range(1, 9))


def test_sft_exact_match_goes_up_with_alignment_term(assets, tmp_path):
    tok = InternLM2Tokenizer.from_pretrained(assets.base)
    before = exact_match(InternLM2ForCausalLM.from_pretrained(assets.base), tok, assets.qa)
    stage = get_stage("sft")
    ctx = local_context(stage, {"data": str(assets.chat), "max_length": 64, "micro_batch_size": 2, "lr": 5e-3,
                                "max_steps": 60, "warmup_steps": 5, "alignment_weight": 0.2,
                                "checkpoint_every": 0, "schedule": "constant"},
                        tmp_path, inputs=StageInputs(checkpoints={"base": assets.base}))
    stage.run(ctx)
    metrics = [e["values"] for e in ctx.channel.of_type("metrics")]
    assert metrics[-1]["token_loss"] < 0.2 * metrics[0]["token_loss"]
    assert metrics[-1]["alignment"] < metrics[0]["alignment"]
    after = exact_match(InternLM2ForCausalLM.from_pretrained(tmp_path / "final"), tok, assets.qa)
    assert before <= 0.125 and after >= 0.75, (before, after)


def test_answer_distribution_divergence():
    targets = torch.tensor([1, 2, 2, 0])
    groups = torch.tensor([0, 0, 0, 1])
    # The model's mean distribution equals each sample's token histogram: divergence 0.
    probs = torch.tensor([[0, 1 / 3, 2 / 3], [0, 1 / 3, 2 / 3], [0, 1 / 3, 2 / 3], [1.0, 0, 0]])
    zero = answer_distribution_divergence(probs.clamp_min(1e-30).log(), targets, groups)
    assert zero.item() == pytest.approx(0.0, abs=1e-6)
    logits = torch.zeros(4, 3, requires_grad=True)
    for kind in ("kl", "js"):
        d = answer_distribution_divergence(torch.log_softmax(logits, -1), targets, groups, kind)
        assert d.item() > 0.05
        (grad,) = torch.autograd.grad(d, logits)
        assert grad.abs().sum() > 0


def test_zero3_with_activation_checkpointing_and_accumulation(assets, dataset, tmp_path):
    stage = get_stage("pretrain")
    ctx = local_context(stage, {**PRETRAIN, "zero_stage": 3, "gradient_checkpointing": True,
                                "gradient_accumulation_steps": 2, "micro_batch_size": 2, "max_steps": 6,
                                "checkpoint_every": 0},
                        tmp_path, inputs=pretrain_inputs(assets, dataset))
    result = stage.run(ctx)
    assert result["loss"] < result["initial_loss"]
    model = InternLM2ForCausalLM.from_pretrained(tmp_path / "final")  # consolidated full weights
    base = InternLM2ForCausalLM.from_pretrained(assets.base)
    assert model.output.weight.shape == base.output.weight.shape
    assert not torch.equal(model.model.layers[0].attention.wqkv.weight, base.model.layers[0].attention.wqkv.weight)
