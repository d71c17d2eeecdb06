"""Preference pairs tokenised once: prepare_data with ``format: preference`` writes int32 memory maps whose
ids equal what dpo and reward_model build from the JSONL (conditions, agent tool calls, the reward token),
read lazily through ``preference_rows``; the reward_model stage trains from the prepared folder."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from training_support import build_assets

from internlm2.core.tokenizer import InternLM2Tokenizer
from internlm2.plugins.algorithms import preference
from internlm2.plugins.contract import (
    ArtifactKind,
    ArtifactRef,
    StageConfigError,
    StageInputs,
    StageOutput,
    local_context,
)
from internlm2.plugins.data.preference_rows import PreferenceRowDataset, preference_rows
from internlm2.plugins.registry import get_stage

pytestmark = pytest.mark.timeout(60)

TOOL_CALL = '<|action_start|><|plugin|>\n{"name": "weather", "parameters": {"city": "velm"}}<|action_end|>\n'
PAIRS = [
    {"prompt": [{"role": "user", "content": "capital of zorbia?"}],
     "chosen": [{"role": "assistant", "content": "velm"}],
     "rejected": [{"role": "assistant", "content": "arno"}], "condition": "helpful"},
    {"prompt": [{"role": "user", "content": "weather in velm?"}],
     "chosen": [{"role": "assistant", "content": TOOL_CALL}],
     "rejected": [{"role": "assistant", "content": "no idea"}], "condition": "judge the tool use"},
    {"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "alpha beta?"}],
     "chosen": [{"role": "assistant", "content": "gamma"}],
     "rejected": [{"role": "assistant", "content": "delta delta delta"}]},
    # Contexts differ: the reward model can use it, DPO cannot (the same error from both paths).
    {"prompt": [{"role": "user", "content": "hi"}],
     "chosen": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "x"},
                {"role": "assistant", "content": "b"}],
     "rejected": [{"role": "assistant", "content": "c"}]},
]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_assets(tmp_path_factory.mktemp("assets"))


@pytest.fixture(scope="module")
def tok(assets):
    return InternLM2Tokenizer.from_pretrained(assets.base)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def prepare(assets, sources, out):
    stage = get_stage("prepare_data")
    ctx = local_context(stage, {"sources": [str(s) for s in sources], "format": "preference"}, out,
                        inputs=StageInputs(checkpoints={"base": assets.base}))
    return stage.run(ctx), out / "dataset"


def test_prepared_ids_equal_the_on_the_fly_ids(assets, tok, tmp_path):
    data = write_jsonl(tmp_path / "prefs.jsonl", PAIRS + PAIRS[:1])  # one exact duplicate
    result, folder = prepare(assets, [data], tmp_path / "out")
    assert result["pairs"] == len(PAIRS) and result["duplicates_removed"] == 1
    rid = tok.reward_token_id

    reward, info = preference_rows(tok, folder, "reward", reward_token_id=rid)
    assert info == {"pairs": len(PAIRS), "prepared": True} and isinstance(reward, PreferenceRowDataset)
    live, live_info = preference_rows(tok, data, "reward", reward_token_id=rid)
    assert not live_info["prepared"]
    for i, pair in enumerate(PAIRS):
        want = preference.reward_pair_ids(tok, preference.parse_pair(pair), rid, preference.DEFAULT_CONDITIONS)
        assert reward[i] == live[i] == want
    # The condition is the system prompt (the table's entry for a domain, else the string itself).
    assert preference.DEFAULT_CONDITIONS["helpful"] in tok.decode(reward[0][0]) and reward[0][0][-1] == rid
    assert "judge the tool use" in tok.decode(reward[1][1])

    dpo, _ = preference_rows(tok, folder, "dpo")
    for i, pair in enumerate(PAIRS[:3]):
        assert dpo[i] == preference.dpo_pair_ids(tok, preference.parse_pair(pair))
    # The agent-format tool call trains as the official special tokens, in both paths.
    chosen = dpo[1][1]
    for name in ("<|action_start|>", "<|plugin|>", "<|action_end|>"):
        assert chosen.count(tok.special_tokens[name]) == 1
    with pytest.raises(ValueError, match="share their context"):
        dpo[3]
    with pytest.raises(ValueError, match="share their context"):
        preference_rows(tok, data, "dpo")


def test_the_prepared_folder_is_read_memory_mapped(assets, tok, tmp_path):
    _, folder = prepare(assets, [write_jsonl(tmp_path / "p.jsonl", PAIRS[:3] * 1)], tmp_path / "out")
    tokens = np.load(folder / "tokens.npy", mmap_mode="r")
    assert isinstance(tokens, np.memmap) and tokens.dtype == np.int32
    assert np.load(folder / "lengths.npy").shape == (3, 5)
    rows = PreferenceRowDataset(folder, "dpo")
    assert isinstance(rows.tokens, np.memmap)  # pairs are sliced out of the map, never loaded whole
    assert sum(len(s) for s in rows[2]) == int(np.load(folder / "lengths.npy")[2, :3].sum())
    with pytest.raises(ValueError, match="conditions"):
        preference_rows(tok, folder, "reward", reward_token_id=1, conditions={"helpful": "other"})
    with pytest.raises(ValueError, match="default_condition"):
        preference_rows(tok, folder, "reward", reward_token_id=1, default_condition="helpful")
    with pytest.raises(ValueError, match="reward_token_id"):
        preference_rows(tok, folder, "reward")


def test_prepare_data_config_errors_name_the_field(assets, tmp_path):
    stage = get_stage("prepare_data")
    with pytest.raises(StageConfigError, match="format"):
        stage.parse_config({"sources": ["x.jsonl"], "format": "preferences"})
    with pytest.raises(StageConfigError, match="sources"):
        stage.parse_config({"sources": [], "format": "preference"})
    bad = write_jsonl(tmp_path / "bad.jsonl", [{**PAIRS[0], "chosen": [{"role": "robot", "content": "x"}]}])
    with pytest.raises(ValueError, match=r"bad.jsonl:1: chosen\[0\].role"):
        prepare(assets, [bad], tmp_path / "out")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("stage_name", ["reward_model", "dpo"])
def test_preference_stages_train_from_the_prepared_folder(assets, tmp_path, stage_name):
    records = [PAIRS[i % 3] | {"prompt": [{"role": "user", "content": f"question {i}"}]} for i in range(12)]
    _, folder = prepare(assets, [write_jsonl(tmp_path / "p.jsonl", records)], tmp_path / "prep")
    prepared = StageOutput("prepare_data", "prepare_data", tmp_path / "prep",
                           {"dataset": ArtifactRef("dataset", ArtifactKind.OTHER, folder)})
    stage = get_stage(stage_name)
    config = {"train_data": "stage:prepare_data", "eval_fraction": 0.25, "epochs": None, "max_steps": 2,
              "pairs_per_batch": 4, "zero_stage": 2, "checkpoint_every": 0, "tensorboard": False}
    ctx = local_context(stage, config, tmp_path / "out", inputs=StageInputs(
        checkpoints={"base": assets.base}, previous=(prepared,)))
    summary = stage.run(ctx)  # a JSONL reader would find no .jsonl in the folder: the ids came from the maps
    assert math.isfinite(summary["loss"]) and summary["skipped_pairs"] == 0
    assert "eval_accuracy" in summary  # the 3 held-out pairs were scored
    assert (tmp_path / "out" / "final" / "config.json").exists()
