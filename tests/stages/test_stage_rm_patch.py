"""The online RLHF loop as pipeline stages: ppo (round 1) writes its rollouts -> rm_patch builds pairs from
them with a pluggable judge (reward hacks first) and trains them into the reward model -> ppo (round 2)
continues the actor and critic of round 1 against the patched reward model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import rlhf_synthetic as synth
import torch

from internlm2.core import InternLM2ForCausalLM, InternLM2ForRewardModel
from internlm2.plugins.contract import (
    ArtifactKind,
    ArtifactRef,
    StageConfigError,
    StageInputs,
    StageOutput,
    local_context,
)
from internlm2.plugins.registry import get_stage
from internlm2.plugins.stages.rm_patch import STAGE as RM_PATCH
from internlm2.plugins.stages.rm_patch import judge_pairs, load_judge

# CPU DeepSpeed runs; the shared 2-core machine can be slow
pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def apple_judge(row: dict) -> float:
    """The task's truth in the synthetic world: more apples is better."""
    return float(row["response"].split().count("apple"))


def row(prompt: str, response: str, rm_score: float, reference: str | None = None) -> dict:
    return {"prompt": [{"role": "user", "content": prompt}], "condition": "helpful", "response": response,
            "rm_score": rm_score, "reference": reference, "round": 1}


def test_judge_pairs_put_reward_hacks_first_and_respect_the_cap():
    rows = [row("a", "apple apple", 0.0), row("a", "banana", 2.0),  # the RM preferred the worse: a hack
            row("b", "apple", 1.0), row("b", "cherry", -1.0),  # the RM agreed with the judge
            row("c", "grape", 0.5, reference="apple apple apple")]  # the reference is better
    pairs, hacks = judge_pairs(rows, apple_judge, max_pairs=10)
    assert hacks == 1 and len(pairs) == 3
    assert pairs[0]["chosen"][0]["content"] == "apple apple" and pairs[0]["rejected"][0]["content"] == "banana"
    assert {p["chosen"][0]["content"] for p in pairs[1:]} == {"apple", "apple apple apple"}
    assert all(p["condition"] == "helpful" and p["prompt"][0]["role"] == "user" for p in pairs)
    assert judge_pairs(rows, apple_judge, max_pairs=1)[0] == pairs[:1]
    assert pairs[1]["chosen"][0]["content"] == "apple apple apple"  # then by the judge's margin (3 over 1)
    assert judge_pairs(rows, apple_judge, max_pairs=10, margin=1.5)[0] == pairs[:2]


def test_rm_patch_config_and_judge_errors_name_the_field():
    with pytest.raises(StageConfigError) as err:
        RM_PATCH.parse_config({"reward_model": "rm", "rollouts": "r.jsonl"})
    assert err.value.field == "config.judge"
    for bad in ("nocolon", "no_such_module_xyz:fn", "json:no_such_attr"):
        with pytest.raises(ValueError, match=r"^judge: "):
            load_judge(bad)
    assert not RM_PATCH.documentation_problems()
    assert get_stage("rm_patch") is not None  # registered through the internlm2.stages entry point


def output_of(name: str, stage: str, ctx) -> StageOutput:
    arts = {a["name"]: ArtifactRef(a["name"], ArtifactKind(a["kind"]), Path(a["path"]))
            for a in ctx.channel.of_type("artifact")}
    return StageOutput(name, stage, ctx.output_dir, arts)


def rm_accuracy(path, tokenizer_dir, pairs) -> float:
    from internlm2.core.reward import RewardScorer
    from internlm2.core.tokenizer import InternLM2Tokenizer
    from internlm2.plugins.algorithms.preference import DEFAULT_CONDITIONS

    scorer = RewardScorer(InternLM2ForRewardModel.from_pretrained(path).eval(),
                          InternLM2Tokenizer.from_pretrained(tokenizer_dir))
    wins = 0
    for p in pairs:
        chosen, rejected = scorer.score([p["prompt"] + p["chosen"], p["prompt"] + p["rejected"]],
                                        DEFAULT_CONDITIONS[p["condition"]])
        wins += chosen > rejected
    return wins / len(pairs)


def test_ppo_round_rm_patch_ppo_round(tmp_path):
    tokenizer = synth.make_tokenizer(tmp_path / "tokenizer")
    actor = synth.quick_sft(tokenizer)
    rm = synth.quick_reward_model(tokenizer, actor, steps=10)  # a weak judge of apples: room to patch
    synth.save_model(actor, tmp_path / "tokenizer", tmp_path / "sft")
    synth.save_model(rm, tmp_path / "tokenizer", tmp_path / "rm")
    synth.write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p, "condition": "helpful"} for p in synth.PROMPTS])
    ppo = get_stage("ppo")
    common = {"prompts": str(tmp_path / "prompts.jsonl"), "rollout_batch_size": 4, "samples_per_prompt": 3,
              "minibatch_size": 6, "lr": 1e-3, "critic_lr": 1e-3, "max_new_tokens": 8, "max_prompt_length": 64,
              "top_p": 1.0, "checkpoint_every": 0, "zero_stage": 2, "rounds": 1}
    inputs = StageInputs(checkpoints={"base": tmp_path / "sft"})
    round1 = local_context(ppo, {**common, "reward_model": str(tmp_path / "rm"), "max_steps": 2,
                                 "critic_warmup_iterations": 0}, tmp_path / "ppo1", inputs=inputs, name="ppo1")
    ppo.run(round1)
    rollouts = [json.loads(line) for line in (tmp_path / "ppo1" / "rollouts.jsonl").read_text().splitlines()]
    assert len(rollouts) == 2 * 4 * 3

    inputs = StageInputs(checkpoints=inputs.checkpoints, previous=(output_of("ppo1", "ppo", round1),))
    patch = local_context(RM_PATCH, {"reward_model": str(tmp_path / "rm"), "rollouts": "stage:ppo1/rollouts",
                                     "judge": f"{__name__}:apple_judge", "max_pairs": 40, "epochs": 4,
                                     "lr": 1e-4, "pairs_per_batch": 8, "zero_stage": 2, "checkpoint_every": 0},
                          tmp_path / "patch", inputs=inputs, name="rm_patch")
    summary = RM_PATCH.run(patch)
    pairs = [json.loads(line) for line in (tmp_path / "patch" / "pairs.jsonl").read_text().splitlines()]
    assert summary["patch_pairs"] == len(pairs) > 0
    assert all(apple_judge({"response": p["chosen"][0]["content"]}) > apple_judge(
        {"response": p["rejected"][0]["content"]}) for p in pairs)
    before = rm_accuracy(tmp_path / "rm", tmp_path / "tokenizer", pairs)
    after = rm_accuracy(tmp_path / "patch" / "final", tmp_path / "tokenizer", pairs)
    assert after > before, (before, after)  # the patch fixed reward-model mistakes of round 1

    inputs = StageInputs(checkpoints=inputs.checkpoints,
                         previous=(*inputs.previous, output_of("rm_patch", "rm_patch", patch)))
    round2 = local_context(ppo, {**common, "actor": "stage:ppo1", "critic": "stage:ppo1/critic",
                                 "reference": str(tmp_path / "sft"), "reward_model": "stage:rm_patch",
                                 "max_steps": 1, "critic_warmup_iterations": 0}, tmp_path / "ppo2",
                           inputs=inputs, name="ppo2")
    ppo.run(round2)
    history = json.loads((tmp_path / "ppo2" / "metrics.json").read_text())["history"]
    assert abs(history[0]["kl"]) > 1e-4  # round 2's actor starts from round 1's, not from SFT
    assert InternLM2ForCausalLM.from_pretrained(tmp_path / "ppo2" / "final") is not None
    patched = dict(InternLM2ForRewardModel.from_pretrained(tmp_path / "patch" / "final").named_parameters())
    original = dict(InternLM2ForRewardModel.from_pretrained(tmp_path / "rm").named_parameters())
    assert any(not torch.equal(patched[n], original[n]) for n in original)
