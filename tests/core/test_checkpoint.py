"""Checkpoint I/O: official layouts in and out, clear errors, and one copy of the weights while loading."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

from internlm2.core import (
    CheckpointError,
    InternLM2Config,
    InternLM2ForCausalLM,
    InternLM2ForRewardModel,
    make_random_checkpoint,
    random_model,
)

pytestmark = pytest.mark.timeout(180)


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def test_official_names_in_file(tmp_path):
    make_random_checkpoint(tmp_path, preset="tiny")
    names = set(load_file(tmp_path / "model.safetensors"))
    for expected in ("model.tok_embeddings.weight", "model.layers.0.attention.wqkv.weight",
                     "model.layers.1.attention.wo.weight", "model.layers.0.feed_forward.w1.weight",
                     "model.layers.0.feed_forward.w2.weight", "model.layers.0.feed_forward.w3.weight",
                     "model.layers.0.attention_norm.weight", "model.layers.0.ffn_norm.weight",
                     "model.norm.weight", "output.weight"):
        assert expected in names
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["InternLM2ForCausalLM"] and config["model_type"] == "internlm2"


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
@pytest.mark.parametrize("shard_bytes", [2**40, 2**20], ids=["single", "sharded"])
def test_round_trip_is_exact(tmp_path, safe, shard_bytes):
    model = random_model(InternLM2Config.preset("tiny"), seed=3)
    model.save_pretrained(tmp_path, max_shard_bytes=shard_bytes, safe_serialization=safe)
    index = tmp_path / ("model.safetensors.index.json" if safe else "pytorch_model.bin.index.json")
    assert index.exists() == (shard_bytes < 2**30)
    loaded = InternLM2ForCausalLM.from_pretrained(tmp_path)
    assert_same_weights(model, loaded)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(model(ids), loaded(ids))
    # and back out again, byte for byte the same tensors
    loaded.save_pretrained(tmp_path / "again", max_shard_bytes=shard_bytes, safe_serialization=safe)
    assert_same_weights(loaded, InternLM2ForCausalLM.from_pretrained(tmp_path / "again"))


def test_dtype_conversion_on_load(tmp_path):
    make_random_checkpoint(tmp_path, dtype=torch.bfloat16)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert InternLM2ForCausalLM.from_pretrained(tmp_path).dtype == torch.float32  # CPU default
    assert InternLM2ForCausalLM.from_pretrained(tmp_path, dtype="bfloat16").dtype == torch.bfloat16


def test_reward_model_round_trip(tmp_path):
    make_random_checkpoint(tmp_path, reward=True, seed=2)
    model = InternLM2ForRewardModel.from_pretrained(tmp_path)
    assert model.config.reward_token_id == 92527
    assert "v_head.weight" in load_file(tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"v_head\.weight"):
        InternLM2ForCausalLM.from_pretrained(tmp_path)  # a reward checkpoint is not a causal LM


def test_missing_unexpected_and_misshaped_tensors_fail_clearly(tmp_path):
    make_random_checkpoint(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    broken = dict(state)
    del broken["model.layers.1.ffn_norm.weight"]
    broken["model.layers.0.attention.extra.weight"] = torch.zeros(2)
    broken["output.weight"] = torch.zeros(3, 3)
    save_file(broken, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError) as err:
        InternLM2ForCausalLM.from_pretrained(tmp_path)
    message = str(err.value)
    assert "missing tensors (1): ['model.layers.1.ffn_norm.weight']" in message
    assert "model.layers.0.attention.extra.weight" in message
    assert "output.weight: checkpoint (3, 3)" in message


def test_missing_files_fail_clearly(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        InternLM2ForCausalLM.from_pretrained(tmp_path / "nope")
    make_random_checkpoint(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights in"):
        InternLM2ForCausalLM.from_pretrained(tmp_path)


MEASURE = textwrap.dedent("""
    import json, sys, threading, time
    import torch
    from internlm2.core import InternLM2ForCausalLM

    def anon_kb():
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1])

    base = anon_kb()
    peak = [base]
    done = threading.Event()
    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], anon_kb())
            time.sleep(0.0005)
    t = threading.Thread(target=sample); t.start()
    model = InternLM2ForCausalLM.from_pretrained(sys.argv[1], dtype=sys.argv[2])
    done.set(); t.join()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps({"peak_kb": peak[0] - base, "weights_kb": weights // 1024}))
""")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_loading_holds_one_copy_of_the_weights(tmp_path, dtype):
    """Peak anonymous memory while loading stays near one copy of the weights (not two)."""
    # ~190 MB of fp32 weights spread over several shards; big enough to dwarf allocator noise.
    make_random_checkpoint(tmp_path, preset="tiny", hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                           num_attention_heads=8, num_key_value_heads=2)
    InternLM2ForCausalLM.from_pretrained(tmp_path).save_pretrained(tmp_path, max_shard_bytes=64 * 2**20)
    out = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path), dtype], capture_output=True, text=True,
                         check=True, timeout=120)
    stats = json.loads(out.stdout.strip().splitlines()[-1])
    # one copy plus the largest tensor in flight (the 92,544 x 512 embedding/head) plus slack
    largest_kb = 92544 * 512 * 4 // 1024
    assert stats["peak_kb"] < stats["weights_kb"] + largest_kb + 40_000, stats
    assert stats["peak_kb"] < 1.6 * stats["weights_kb"] + 40_000, stats
