"""Every training stage under ZeRO-3 with REAL partitioning (DeepSpeed on CPU, gloo).

Tiny models stay under DeepSpeed's default ``stage3_param_persistence_threshold`` (1e5 elements), so
nothing would be partitioned and the 7B code path would never run; these tests set it to 0 and keep the
gather/prefetch buckets small, check the loop's report that every parameter is partitioned (its data
gone, only the ``ds_tensor`` partition left), and that each stage writes a ``final/`` that loads and
carries the trained weights. DPO's and the reward model's held-out evaluation and long_context's needle
sweep read weights during evaluation — outside the engine's forward those are empty partitions.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import rlhf_synthetic as synth
import torch
from test_stage_long_context import long_documents

from internlm2.core import InternLM2ForCausalLM, InternLM2ForRewardModel, make_random_checkpoint
from internlm2.plugins.contract import StageInputs, local_context
from internlm2.plugins.data.shards import ShardWriter
from internlm2.plugins.registry import get_stage

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

# Forces the 7B path on a tiny model: every parameter partitioned, gathered and released per module.
ZERO3 = {"zero_stage": 3, "zero3_param_persistence_threshold": 0, "zero3_max_live_parameters": 20_000,
         "zero3_prefetch_bucket_size": 5_000, "zero_bucket_size": 20_000, "checkpoint_every": 0}


def assert_all_partitioned(ctx) -> None:
    logs = [e["message"] for e in ctx.channel.of_type("log")]
    line = next(m for m in logs if m.startswith("ZeRO-3:"))
    partitioned, total = map(int, re.match(r"ZeRO-3: (\d+) of (\d+) parameters partitioned", line).groups())
    assert partitioned == total > 0, line


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("zero3")
    tokenizer = synth.make_tokenizer(root / "tokenizer")
    base = make_random_checkpoint(root / "base", preset="tiny", tokenizer=root / "tokenizer",
                                  **synth.tiny_config(max_position_embeddings=256).to_dict())
    prefs = synth.write_jsonl(root / "prefs.jsonl", synth.preference_pairs(32, seed=1))
    held = synth.write_jsonl(root / "held.jsonl", synth.preference_pairs(8, seed=2))
    chat = synth.write_jsonl(root / "chat.jsonl", [{"messages": p["prompt"] + p["chosen"]}
                                                   for p in synth.preference_pairs(16, seed=3)])
    writer = ShardWriter(root / "shards", shard_tokens=4096)
    for doc in long_documents(tokenizer, 8, seed=0):
        writer.add(doc)
    writer.close(tokenizer=str(root / "tokenizer"))
    return {"root": root, "base": base, "prefs": prefs, "held": held, "chat": chat, "shards": root / "shards"}


def run_stage(name: str, config: dict, world, out):
    stage = get_stage(name)
    ctx = local_context(stage, {**ZERO3, **config}, out, inputs=StageInputs(checkpoints={"base": world["base"]}))
    summary = stage.run(ctx)
    assert_all_partitioned(ctx)
    return ctx, summary


def changed(model, base) -> bool:
    a = model.model.layers[0].attention.wqkv.weight
    b = base.model.layers[0].attention.wqkv.weight
    return a.shape == b.shape and not torch.equal(a, b)


def test_sft_under_zero3_partitioned(world, tmp_path):
    _, summary = run_stage("sft", {"data": str(world["chat"]), "max_length": 128, "micro_batch_size": 2,
                                   "lr": 3e-3, "max_steps": 4, "gradient_accumulation_steps": 2,
                                   "gradient_checkpointing": True}, world, tmp_path)
    assert summary["loss"] < summary["initial_loss"]
    model = InternLM2ForCausalLM.from_pretrained(tmp_path / "final")
    assert changed(model, InternLM2ForCausalLM.from_pretrained(world["base"]))
    assert (tmp_path / "metrics.png").read_bytes()[:4] == b"\x89PNG"


def test_dpo_under_zero3_evaluates_and_writes_final(world, tmp_path):
    ctx, summary = run_stage("dpo", {"train_data": str(world["prefs"]), "eval_data": str(world["held"]),
                                     "lr": 1e-3, "max_steps": 4, "pairs_per_batch": 4, "eval_every": 2}, world,
                             tmp_path)
    # the held-out evaluation ran mid-training and at the end, through the engine
    assert {"eval_margin", "eval_accuracy", "eval_loss"} <= set(summary)
    # the reference (its own ZeRO-3 inference engine) scores exactly as the untrained policy: loss log 2
    first = next(e["values"] for e in ctx.channel.of_type("metrics") if "loss" in e["values"])
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-4) and first["margin"] == pytest.approx(0, abs=1e-4)
    assert sum("eval_margin" in e["values"] for e in ctx.channel.of_type("metrics")) >= 2
    model = InternLM2ForCausalLM.from_pretrained(tmp_path / "final")
    assert changed(model, InternLM2ForCausalLM.from_pretrained(world["base"]))


def test_reward_model_under_zero3_evaluates_and_writes_final(world, tmp_path):
    _, summary = run_stage("reward_model", {"train_data": str(world["prefs"]), "eval_data": str(world["held"]),
                                            "lr": 1e-3, "epochs": None, "max_steps": 4, "pairs_per_batch": 8,
                                            "eval_every": 2}, world, tmp_path)
    assert "eval_accuracy" in summary
    rm = InternLM2ForRewardModel.from_pretrained(tmp_path / "final")
    assert torch.count_nonzero(rm.v_head.weight) > 0  # the zero head trained, and was gathered on export


def test_long_context_under_zero3_sweeps_needles(world, tmp_path):
    _, summary = run_stage("long_context", {"data": str(world["shards"]), "context_length": 512, "seq_len": 256,
                                            "lr": 3e-3, "max_steps": 3, "micro_batch_size": 2,
                                            "needle_lengths": [128, 256], "needle_depths": [0.0, 1.0],
                                            "needles_per_cell": 1}, world, tmp_path)
    assert 0.0 <= summary["needle_retrieval"] <= 1.0
    needle = json.loads((tmp_path / "needle.json").read_text())
    assert all(lp < 0 for row in needle["logprob"] for lp in row)
    cfg = json.loads((tmp_path / "final" / "config.json").read_text())
    assert cfg["max_position_embeddings"] == 512
    assert changed(InternLM2ForCausalLM.from_pretrained(tmp_path / "final"),
                   InternLM2ForCausalLM.from_pretrained(world["base"]))


def test_reward_model_with_lora_under_zero3_exports_merged(world, tmp_path):
    """LoRA adapters on partitioned base weights: only adapters and v_head train, and the export gathers
    each wrapped linear and writes W + scale * B @ A under the official name."""
    run_stage("reward_model", {"train_data": str(world["prefs"]), "lr": 5e-3, "epochs": None,
                                        "max_steps": 3, "pairs_per_batch": 8, "eval_fraction": 0.1,
                                        "lora_rank": 4, "lora_alpha": 8}, world, tmp_path)
    rm = InternLM2ForRewardModel.from_pretrained(tmp_path / "final")  # strict: no lora_* names left
    base = InternLM2ForCausalLM.from_pretrained(world["base"])
    assert torch.count_nonzero(rm.v_head.weight) > 0
    assert not torch.equal(rm.model.layers[0].feed_forward.w1.weight, base.model.layers[0].feed_forward.w1.weight)
    assert torch.equal(rm.model.tok_embeddings.weight, base.model.tok_embeddings.weight)  # frozen, not adapted


def test_eval_under_zero3_matches_the_whole_model(world, tmp_path):
    """Perplexity, generation and needles of a partitioned model equal rank 0's whole-model evaluation."""
    data = synth.write_jsonl(tmp_path / "ppl.jsonl", [{"text": "the grass is green and the sky is blue"}] * 3)
    gen = synth.write_jsonl(tmp_path / "gen.jsonl", [{"prompt": p["prompt"], "reference": "apple banana"}
                                                     for p in synth.preference_pairs(3, seed=7)])
    config = {"perplexity_data": str(data), "generation_data": str(gen), "max_new_tokens": 6,
              "needle_lengths": [128], "needle_depths": [0.0, 1.0], "needles_per_cell": 1}
    stage = get_stage("eval")
    inputs = StageInputs(checkpoints={"base": world["base"]})
    whole = stage.run(local_context(stage, config, tmp_path / "whole", inputs=inputs))
    ctx = local_context(stage, {**config, "zero_stage": 3, "zero3_param_persistence_threshold": 0},
                        tmp_path / "zero3", inputs=inputs)
    parted = stage.run(ctx)
    assert_all_partitioned(ctx)
    assert parted["perplexity"] == pytest.approx(whole["perplexity"], rel=1e-4)
    assert parted["needle_retrieval"] == whole["needle_retrieval"]
    report = json.loads((tmp_path / "zero3" / "eval_report.json").read_text())
    want = json.loads((tmp_path / "whole" / "eval_report.json").read_text())
    assert [e["prediction"] for e in report["generation"]["examples"]] == \
        [e["prediction"] for e in want["generation"]["examples"]]
