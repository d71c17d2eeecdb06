"""ppo stage: COOL RLHF online PPO through DeepSpeed ZeRO-2 on CPU raises the mean reward of a tiny actor
whose reward model prefers "apple"; critic warm-up, ptx loss, ROUGE-L alignment reward, the reward-model
fast path between rounds, the rollouts artifact and the checkpoints (actor serves through the engine) are all
exercised. A ZeRO-3 run with every parameter partitioned (persistence threshold 0) takes the 7B code path:
engine forwards, rollouts from a hybrid-engine copy gathered from the partitions, a patched reward model
loaded in place, the exported final/ and critic/."""

from __future__ import annotations

import json
import random

import pytest
import rlhf_synthetic as synth
import torch

from internlm2.core import InternLM2ForCausalLM, InternLM2ForRewardModel
from internlm2.core.engine import EngineConfig, LLMEngine, SamplingParams
from internlm2.core.tokenizer import InternLM2Tokenizer
from internlm2.plugins.contract import MemoryChannel, StageCancelled, StageConfigError, StageInputs, local_context
from internlm2.plugins.stages.ppo import STAGE, PPORun, ptx_row_indices

# CPU DeepSpeed runs; the shared 2-core machine can be slow
pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("ppo")
    tokenizer = synth.make_tokenizer(root / "tokenizer")
    actor = synth.quick_sft(tokenizer)
    rm = synth.quick_reward_model(tokenizer, actor)
    synth.save_model(actor, root / "tokenizer", root / "sft")
    synth.save_model(rm, root / "tokenizer", root / "rm")
    prompts = [{"prompt": p, "reference": "apple apple apple apple", "condition": "helpful"} for p in synth.PROMPTS]
    synth.write_jsonl(root / "prompts.jsonl", prompts)
    # In-distribution "pretraining" text: the ptx term keeps the actor close to it without fighting PPO.
    synth.write_jsonl(root / "pretrain.jsonl", [{"text": synth.fruit_answer(random.Random(i), 1, 8)}
                                                for i in range(40)])
    synth.write_jsonl(root / "rm_patch.jsonl", synth.preference_pairs(24, seed=7))
    return root


def test_ppo_raises_the_reward_and_serves(world, tmp_path):
    config = {
        "reward_model": str(world / "rm"), "prompts": str(world / "prompts.jsonl"),
        "pretrain_data": str(world / "pretrain.jsonl"), "ptx_coef": 0.5, "ptx_batch_size": 2, "ptx_seq_len": 32,
        "reward_updates": [str(world / "rm_patch.jsonl")], "reward_update_steps": 3, "reward_update_lr": 1e-4,
        "max_steps": 14, "rounds": 2, "critic_warmup_iterations": 2, "rollout_batch_size": 16,
        "minibatch_size": 8, "ppo_epochs": 2, "lr": 1e-3, "critic_lr": 1e-3, "max_grad_norm": 0.0,
        "whiten_advantages": True, "top_p": 1.0,
        "max_new_tokens": 12, "max_prompt_length": 64, "alignment_weight": 0.5, "checkpoint_every": 7,
        "zero_stage": 2,
    }
    ctx = local_context(STAGE, config, tmp_path / "out", inputs=StageInputs(checkpoints={"base": world / "sft"}))
    summary = STAGE.run(ctx)

    history = json.loads((tmp_path / "out" / "metrics.json").read_text())["history"]
    assert len(history) == 14
    scores = [h["score"] for h in history]
    # Critic warm-up: the actor is untouched for 2 iterations, then PPO moves it towards the RM's taste.
    assert [h["actor_updated"] for h in history[:3]] == [0.0, 0.0, 1.0]
    assert summary["score_last"] > summary["score_first"] + 1.0, scores
    assert history[-1]["rm_score"] > history[0]["rm_score"]
    assert history[-1]["rouge_l"] > history[0]["rouge_l"]  # the reference answer is all apples
    assert history[-1]["kl"] > 0 and "ptx_loss" in history[-1]
    assert "rm_update_loss" in history[7] and history[7]["round"] == 2.0  # fast path after round 1
    assert not any("rm_update_loss" in h for h in history[:7] + history[8:])
    assert (tmp_path / "out" / "checkpoints" / "latest").read_text() == "iter-00000007"

    artifacts = {a["name"]: a for a in ctx.channel.of_type("artifact")}
    assert {"final", "critic", "reward_model", "metrics", "rollouts"} <= set(artifacts)
    rows = [json.loads(line) for line in (tmp_path / "out" / "rollouts.jsonl").read_text().splitlines()]
    assert len(rows) == 14 * 16 and [r["iteration"] for r in rows[::16]] == list(range(1, 15))
    assert {r["round"] for r in rows[:7 * 16]} == {1} and {r["round"] for r in rows[7 * 16:]} == {2}
    for h in (history[0], history[-1]):  # the artifact holds what the metrics summarise
        mine = [r for r in rows if r["iteration"] == h["step"]]
        assert sum(r["score"] for r in mine) / 16 == pytest.approx(h["score"], abs=1e-4)
        assert sum(r["kl"] for r in mine) / 16 == pytest.approx(h["kl"], abs=1e-4)
    assert rows[-1]["prompt"][0]["role"] == "user" and isinstance(rows[-1]["response"], str)
    critic = InternLM2ForRewardModel.from_pretrained(tmp_path / "out" / "critic")
    assert critic.config.reward_token_id == InternLM2Tokenizer.from_pretrained(world / "rm").reward_token_id
    actor = InternLM2ForCausalLM.from_pretrained(tmp_path / "out" / "final")
    tok = InternLM2Tokenizer.from_pretrained(tmp_path / "out" / "final")
    engine = LLMEngine(actor, tok, EngineConfig(max_num_seqs=4, max_model_len=96))
    outs = engine.generate([tok.encode_chat([{"role": "user", "content": p}]) for p in synth.PROMPTS[:4]],
                           SamplingParams(temperature=0.0, max_new_tokens=12))
    assert sum(o.new_text.count("apple") for o in outs) >= 6, [o.new_text for o in outs]


def test_ppo_config_rejects_missing_fields():
    with pytest.raises(StageConfigError) as err:
        STAGE.parse_config({"prompts": "p"})
    assert err.value.field == "config.reward_model"
    with pytest.raises(StageConfigError) as err:
        STAGE.parse_config({"reward_model": "rm", "prompts": "p", "max_steps": 20})  # warm-up 50 >= 20
    assert err.value.field == "config.critic_warmup_iterations"
    assert not STAGE.documentation_problems()


class CancelAfter(MemoryChannel):
    """Requests cancellation once progress reaches ``step`` (a worker told to stop mid-stage)."""

    def __init__(self, step: int):
        super().__init__()
        self.step = step

    def emit(self, event):
        super().emit(event)
        if event["type"] == "progress" and event["step"] >= self.step:
            self.cancel()


def test_ppo_stops_on_cancel_and_resumes_from_its_checkpoint(world, tmp_path):
    config = {"reward_model": str(world / "rm"), "prompts": str(world / "prompts.jsonl"), "max_steps": 5,
              "rounds": 1, "critic_warmup_iterations": 1, "rollout_batch_size": 4, "minibatch_size": 4,
              "lr": 1e-3, "critic_lr": 1e-3, "max_new_tokens": 6, "max_prompt_length": 64,
              "checkpoint_every": 2, "zero_stage": 2}
    inputs = StageInputs(checkpoints={"base": world / "sft"})
    first = local_context(STAGE, config, tmp_path / "out", inputs=inputs, channel=CancelAfter(3))
    with pytest.raises(StageCancelled):
        STAGE.run(first)
    tag = (tmp_path / "out" / "checkpoints" / "latest").read_text()
    assert tag in ("iter-00000002", "iter-00000004")
    assert not (tmp_path / "out" / "final").exists()

    second = local_context(STAGE, config, tmp_path / "out", inputs=inputs)
    STAGE.run(second)
    assert any("resumed from " + tag in e["message"] for e in second.channel.of_type("log"))
    resumed_at = int(tag.split("-")[1])
    progress = [e["step"] for e in second.channel.of_type("progress")]
    assert progress == list(range(resumed_at + 1, 6))  # only the iterations after the checkpoint ran again
    history = json.loads((tmp_path / "out" / "metrics.json").read_text())["history"]
    assert [h["step"] for h in history] == [1, 2, 3, 4, 5]
    # The restored actor is the trained one, not the SFT start (which would give a KL of exactly 0).
    assert abs(history[resumed_at]["kl"]) > 1e-4
    assert (tmp_path / "out" / "final" / "config.json").exists()


def test_ppo_under_zero3_partitions_gathers_for_rollouts_and_exports(world, tmp_path):
    config = {"reward_model": str(world / "rm"), "prompts": str(world / "prompts.jsonl"), "max_steps": 3,
              "rounds": 2, "critic_warmup_iterations": 1, "rollout_batch_size": 4, "minibatch_size": 4,
              "lr": 1e-3, "critic_lr": 1e-3, "max_new_tokens": 4, "max_prompt_length": 64, "top_p": 1.0,
              "temperature": 0.7, "truncation_penalty": 3.0, "checkpoint_every": 0, "zero_stage": 3,
              "zero3_param_persistence_threshold": 0, "frozen_offload": True,
              "reward_updates": [str(world / "rm")]}  # a checkpoint folder: loaded into the RM in place
    ctx = local_context(STAGE, config, tmp_path / "out", inputs=StageInputs(checkpoints={"base": world / "sft"}))
    ppo = PPORun(ctx)
    try:
        assert ppo.partitioned and all(p.numel() == 0 for p in ppo.actor.parameters())
        assert all(p.numel() == 0 for p in ppo.critic.parameters())
        reward_model = ppo.reward.model
        summary = ppo.run()
        assert ppo.reward.model is reward_model  # the patch went into the same module
        # The generation copy, refreshed from the partitions, is the trained actor (as exported).
        ppo.rollouts.sync_weights()
        copy = dict(ppo.rollouts.model.named_parameters())
    finally:
        ppo.close()
    history = json.loads((tmp_path / "out" / "metrics.json").read_text())["history"]
    assert [h["actor_updated"] for h in history] == [0.0, 1.0, 1.0] and history[-1]["kl"] != 0.0
    assert history[2].get("rm_update_loaded") == 1.0 and "ptx_loss" not in history[-1]
    final = InternLM2ForCausalLM.from_pretrained(tmp_path / "out" / "final")
    start = InternLM2ForCausalLM.from_pretrained(world / "sft")
    moved = 0
    for name, p in final.named_parameters():
        torch.testing.assert_close(copy[name].float(), p.float())
        moved += not torch.equal(p, dict(start.named_parameters())[name])
    assert moved > 0  # the actor trained, and the copy followed it
    critic = InternLM2ForRewardModel.from_pretrained(tmp_path / "out" / "critic")
    assert critic.v_head.weight.shape[-1] == critic.config.hidden_size
    rows = [json.loads(line) for line in (tmp_path / "out" / "rollouts.jsonl").read_text().splitlines()]
    assert len(rows) == 3 * 4
    cut = [r for r in rows if r["truncated"]]
    assert cut  # 4 new tokens: most answers are cut, and lose the penalty
    assert all(r["score"] == pytest.approx(r["rm_score"] - 3.0 * r["truncated"], abs=1e-5) for r in rows)
    assert summary["score_last"] == pytest.approx(history[-1]["score"])



def test_ppo_actor_with_lora_trains_only_adapters_and_exports_merged(world, tmp_path):
    config = {"reward_model": str(world / "rm"), "prompts": str(world / "prompts.jsonl"), "max_steps": 2,
              "critic_warmup_iterations": 1, "rollout_batch_size": 4, "minibatch_size": 4, "lr": 1e-2,
              "critic_lr": 1e-3, "max_new_tokens": 4, "max_prompt_length": 64, "checkpoint_every": 0,
              "lora_rank": 4, "lora_target_modules": ["wqkv", "w2"]}
    ctx = local_context(STAGE, config, tmp_path / "out", inputs=StageInputs(checkpoints={"base": world / "sft"}))
    ppo = PPORun(ctx)
    try:
        trained = {n for n, p in ppo.actor.named_parameters() if p.requires_grad}
        assert trained and all("lora_" in n for n in trained)
        assert all(p.requires_grad for p in ppo.critic.parameters())  # the critic trains in full
        ppo.run()
    finally:
        ppo.close()
    history = json.loads((tmp_path / "out" / "metrics.json").read_text())["history"]
    assert [h["actor_updated"] for h in history] == [0.0, 1.0]
    final = dict(InternLM2ForCausalLM.from_pretrained(tmp_path / "out" / "final").named_parameters())
    start = dict(InternLM2ForCausalLM.from_pretrained(world / "sft").named_parameters())
    assert final.keys() == start.keys()  # merged back under the official names
    changed = {n for n in final if not torch.equal(final[n], start[n])}
    assert changed and all(n.endswith(("wqkv.weight", "w2.weight")) for n in changed)

def test_ptx_rows_differ_across_ranks_within_a_step():
    world = 4
    seen = [i for rank in range(world) for i in ptx_row_indices(7, rank, world, 2, 1000)]
    assert len(set(seen)) == len(seen) == 8  # disjoint across ranks
    assert ptx_row_indices(8, 0, world, 2, 1000)[0] == max(seen) + 1  # the next step continues after them
    assert ptx_row_indices(0, 0, 1, 3, 2) == [0, 1, 0]  # a short corpus wraps
