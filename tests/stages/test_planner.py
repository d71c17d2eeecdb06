"""The memory planner: per-GPU terms follow the ZeRO stage, offload, LoRA and GPU count; configurations that
cannot fit are refused with the field to change."""

from __future__ import annotations

import pytest

from internlm2.core import make_random_checkpoint
from internlm2.plugins.planner import GIB, check_fits, model_shapes, plan_pipeline


def sft(**config) -> dict:
    return {"stage": "sft", "config": {"max_length": 4096, "gradient_checkpointing": True, **config}}


def test_parameter_counts_match_the_released_shapes():
    # docs/MEMORY.md, from meta-device models of the presets
    assert model_shapes("1_8b").params == 1_889_110_016
    assert model_shapes("7b").params == 7_737_708_544
    assert model_shapes("20b").params == 19_861_149_696


def test_zero_stages_shard_what_they_promise():
    p = model_shapes("7b").params
    zero0, zero1, zero2, zero3 = plan_pipeline([sft(zero_stage=z) for z in range(4)], 8, 80, "7b").stages
    assert zero0.weights == pytest.approx(2 * p / GIB) and zero0.optimizer == pytest.approx(12 * p / GIB)
    # bf16 grads (sharded from ZeRO-2) + the fp32 copy of the rank's partition the optimizer step reads
    assert zero1.optimizer == pytest.approx(12 * p / 8 / GIB) and zero1.grads == pytest.approx((2 + 4 / 8) * p / GIB)
    assert zero2.grads == pytest.approx(6 * p / 8 / GIB)
    assert zero3.weights < zero2.weights / 4  # own eighth + one gathered layer
    assert zero0.total > zero1.total > zero2.total > zero3.total


def test_offload_lora_and_more_gpus_lower_the_gpu_share():
    base, offload, lora = plan_pipeline([sft(zero_stage=3), sft(zero_stage=3, offload_optimizer=True),
                                         sft(zero_stage=2, lora_rank=16)], 8, 80, "7b").stages
    assert offload.optimizer == 0 and offload.host_offload == pytest.approx(base.optimizer)
    assert lora.optimizer < 0.01 * base.optimizer * 8 and "LoRA" in lora.notes[0]
    on16 = plan_pipeline([sft(zero_stage=3, launch={"nproc_per_node": 8, "num_nodes": 2})], 8, 80, "7b").stages[0]
    assert on16.num_gpus == 16 and on16.optimizer == pytest.approx(base.optimizer / 2)


def test_refuses_what_cannot_fit_naming_the_field():
    with pytest.raises(ValueError, match=r"stages\[1\]\.config\.zero_stage: stage 'sft'"):
        check_fits([{"stage": "prepare_data", "config": {}}, sft(zero_stage=0)], 8, 80, "20b")
    ppo = {"stage": "ppo", "config": {"zero_stage": 3, "gradient_checkpointing": True}}
    with pytest.raises(ValueError, match=r"stages\[0\]\.config\.frozen_offload"):
        check_fits([ppo], 8, 40, "7b")
    plan = check_fits([{**ppo, "config": {**ppo["config"], "frozen_offload": True}}, sft(zero_stage=3)], 8, 80, "7b")
    assert plan.fits and plan.to_dict()["stages"][0]["fits"]
    with pytest.raises(ValueError, match="num_gpus"):
        plan_pipeline([sft()], 0, 80, "7b")


def test_model_shapes_come_from_the_stage_checkpoint(tmp_path):
    ckpt = make_random_checkpoint(tmp_path / "m", preset="tiny")
    plan = plan_pipeline([{"stage": "sft", "config": {"model": str(ckpt), "zero_stage": 0}},
                          {"stage": "prepare_data", "config": {}}], 1, 1.0)
    tiny = plan.stages[0]
    assert tiny.weights == pytest.approx(2 * model_shapes(str(ckpt)).params / GIB)
    assert plan.stages[1].total == 0 and "no model memory" in plan.stages[1].notes[0]
    assert "fits" in plan.table()


def test_training_config_errors_name_the_field():
    from internlm2.plugins.contract import StageConfigError
    from internlm2.plugins.registry import get_stage

    sft_stage = get_stage("sft")
    for bad, fld in (({"lora_rank": -1}, "config.lora_rank"),
                     ({"lora_target_modules": []}, "config.lora_target_modules"),
                     ({"zero3_param_persistence_threshold": -5}, "config.zero3_param_persistence_threshold")):
        with pytest.raises(StageConfigError) as err:
            sft_stage.parse_config({"data": "x.jsonl", **bad})
        assert err.value.field == fld
