"""reward_model stage: through DeepSpeed ZeRO-2 on CPU, the conditional RM learns the synthetic preference
(held-out pairwise accuracy far above chance) and writes an InternLM2-Reward checkpoint that serves."""

from __future__ import annotations

import json

import pytest
import rlhf_synthetic as synth
import torch

from internlm2.core import InternLM2ForRewardModel, make_random_checkpoint, random_model
from internlm2.core.reward import RewardScorer
from internlm2.core.tokenizer import InternLM2Tokenizer
from internlm2.plugins.algorithms import preference
from internlm2.plugins.algorithms.models import reward_model_from_trunk
from internlm2.plugins.contract import StageConfigError, StageInputs, local_context
from internlm2.plugins.stages.reward_model import STAGE

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("rm")
    tokenizer = synth.make_tokenizer(root / "tokenizer")
    base = make_random_checkpoint(root / "base", preset="tiny", tokenizer=root / "tokenizer",
                                  **synth.tiny_config().to_dict())
    data = synth.write_jsonl(root / "prefs.jsonl", synth.preference_pairs(320, seed=1))
    held = synth.write_jsonl(root / "held.jsonl", synth.preference_pairs(48, seed=2))
    return {"root": root, "tokenizer": tokenizer, "base": base, "data": data, "held": held}


def test_reward_model_learns_preferences_and_serves(world, tmp_path):
    config = {"train_data": "input:prefs", "eval_data": "input:held", "lr": 2e-3, "min_lr_ratio": 0.5,
              "epochs": 1, "pairs_per_batch": 8, "warmup_steps": 2, "zero_stage": 2, "eval_every": 20}
    ctx = local_context(STAGE, config, tmp_path / "out", inputs=StageInputs(
        datasets={"prefs": world["data"], "held": world["held"]}, checkpoints={"base": world["base"]}))
    summary = STAGE.run(ctx)

    # Chance is 0.5 (and a zero-initialised v_head starts every pair tied).
    assert summary["eval_accuracy"] >= 0.85, summary
    assert summary["eval_chosen_score"] > summary["eval_rejected_score"]
    losses = [e["values"]["loss"] for e in ctx.channel.of_type("metrics") if "loss" in e["values"]]
    assert len(losses) == 40  # one epoch: 320 pairs / 8 per micro-batch
    assert sum(losses[-5:]) < sum(losses[:5])
    assert any("eval_accuracy" in e["values"] for e in ctx.channel.of_type("metrics"))

    final = tmp_path / "out" / "final"
    cfg = json.loads((final / "config.json").read_text())
    assert cfg["architectures"] == ["InternLM2ForRewardModel"]
    assert cfg["reward_token_id"] == world["tokenizer"].reward_token_id
    assert (tmp_path / "out" / "metrics.json").exists()
    assert {a["name"] for a in ctx.channel.of_type("artifact")} >= {"final", "metrics"}

    # It serves: the reward scorer on the loaded checkpoint ranks held-out pairs as training did.
    rm = InternLM2ForRewardModel.from_pretrained(final)
    scorer = RewardScorer(rm, InternLM2Tokenizer.from_pretrained(final))
    pairs = [preference.parse_pair(p) for p in synth.preference_pairs(16, seed=3)]
    condition = preference.DEFAULT_CONDITIONS["helpful"]
    chosen = scorer.score([p.prompt + p.chosen for p in pairs], condition=condition)
    rejected = scorer.score([p.prompt + p.rejected for p in pairs], condition=condition)
    assert sum(c > r for c, r in zip(chosen, rejected)) >= 13
    assert all(-5 < s < 5 for s in chosen + rejected)  # the log barrier keeps scores in bounds


def test_official_tokenizer_gives_reward_token_92527(official_tokenizer_path):
    tokenizer = InternLM2Tokenizer.from_pretrained(official_tokenizer_path)
    assert tokenizer.reward_token_id == 92527
    from internlm2.core import InternLM2Config

    lm = random_model(InternLM2Config.preset("tiny"), seed=0)
    rm = reward_model_from_trunk(lm, tokenizer.reward_token_id)
    assert rm.config.reward_token_id == 92527 and rm.config.architectures == ["InternLM2ForRewardModel"]
    assert rm.model is lm.model and torch.count_nonzero(rm.v_head.weight) == 0


def test_config_errors_name_the_field():
    with pytest.raises(StageConfigError) as err:
        STAGE.parse_config({"train_data": "x", "penalty_weight": -1})
    assert err.value.field == "config.penalty_weight"
    with pytest.raises(StageConfigError) as err:
        STAGE.parse_config({})
    assert err.value.field == "config.train_data"
    assert not STAGE.documentation_problems()
