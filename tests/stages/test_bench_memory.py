"""The memory benchmark's loader path on a small model: a training model loads without a full host copy.

Each load runs in its own process (benchmarks/bench_memory.py ``run_child``) that samples its anonymous
resident memory. A bf16 training load must stay under one bf16 copy + the largest tensor + slack — the
old path (fp32 on the host, what every rank did) takes twice the bf16 copy and fails that bound — and
under ZeRO-3 on 2 ranks each rank stays under half a copy + the largest tensor + slack. The PPO step (the
real stage, one iteration) stays within the planner's estimate.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_memory

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

SLACK_MIB = 40  # allocator slack, DeepSpeed's bookkeeping


def test_training_loads_hold_one_bf16_copy_at_most(tmp_path):
    ckpt = bench_memory.write_random_checkpoint(
        tmp_path / "ckpt", "tiny", layers=4, hidden_size=512, intermediate_size=1408, vocab_size=32000,
        num_attention_heads=8, num_key_value_heads=2)
    from internlm2.core import InternLM2ForCausalLM

    model = InternLM2ForCausalLM.from_pretrained(ckpt, dtype="bf16")
    copy_mib = sum(p.numel() for p in model.parameters()) * 2 / 2**20
    largest_mib = max(p.numel() for p in model.parameters()) * 2 / 2**20
    del model
    assert copy_mib > 80  # big enough for the bounds below to mean something

    old = bench_memory.run_child(["load", str(ckpt), "fp32-host"])[0]
    bf16 = bench_memory.run_child(["load", str(ckpt), "bf16"])[0]
    bound = copy_mib + largest_mib + SLACK_MIB
    assert bf16["peak_host_mib"] < bound, (bf16, bound)
    assert old["peak_host_mib"] > bound, (old, bound)  # the fp32 host copy the training loaders no longer make

    ranks = bench_memory.run_child(["load", str(ckpt), "zero3-2"], world=2)
    for r in ranks:
        assert r["held_mib"] == pytest.approx(copy_mib / 2, rel=0.02)
        assert r["peak_host_mib"] < copy_mib / 2 + largest_mib + SLACK_MIB, (r, copy_mib)


def test_one_ppo_iteration_stays_within_the_planners_estimate(tmp_path):
    """The benchmark's PPO child runs the real stage for one iteration (rollouts, an actor and a critic step,
    the frozen reference and reward model, export); the planner must not promise less than that holds."""
    from internlm2.core import InternLM2Config
    from internlm2.core.random_checkpoint import copy_tokenizer
    from internlm2.core.tokenizer import train_tokenizer
    from internlm2.plugins.planner import estimate_stage

    tok = train_tokenizer([f"Question {i}: tell me more about the number {i}." for i in range(400)],
                          tmp_path / "tokenizer", vocab_size=320)
    dims = dict(hidden_size=512, intermediate_size=1408, vocab_size=tok.vocab_size, num_attention_heads=8,
                num_key_value_heads=2)
    actor = bench_memory.write_random_checkpoint(tmp_path / "actor", "tiny", layers=2, **dims)
    copy_tokenizer(tmp_path / "tokenizer", actor)
    reward = bench_memory.random_reward_model(tmp_path / "reward", "tiny", 2, tokenizer=actor, **dims)
    (tmp_path / "run").mkdir()
    result = bench_memory.run_child(["ppo", str(actor), str(reward), str(tmp_path / "run"), "fp32"])[0]
    plan = estimate_stage({"stage": "ppo", "config": bench_memory.ppo_config(str(actor), str(reward), "", "fp32"),
                           "model": InternLM2Config.from_pretrained(actor)}, 1)
    planned_mib = (plan.total - plan.overhead) * 1024
    # An upper bound that is not absurdly loose (measured 0.66 of it here; 0.81 at 1.8B widths).
    assert 0.4 * planned_mib < result["peak_host_mib"] <= planned_mib, (result, planned_mib)
    assert (tmp_path / "run" / "out" / "final" / "config.json").exists()
