"""Experiment tracking: the offline Weights & Biases run a stage writes with ``wandb: true``, read back
record by record from its ``.wandb`` file (issue 11)."""

from __future__ import annotations

import json
import struct
import sys

import pytest
from training_support import build_assets

from internlm2.plugins.contract import StageInputs, local_context
from internlm2.plugins.registry import get_stage
from internlm2.plugins.trainer import TrainingConfig
from internlm2.plugins.trainer.tracking import MetricsTracker

pytestmark = pytest.mark.timeout(240)


def read_wandb_records(path) -> list:
    """The protobuf records of an offline run file: W&B's LevelDB-style log (a 7-byte ':W&B' header, then
    32 KiB blocks of chunks, each a 7-byte (crc32, length, type) header and its bytes; types 1 = whole
    record, 2/3/4 = first/middle/last piece)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    records, pending, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def test_sft_writes_an_offline_wandb_run_with_every_step(tmp_path):
    assets = build_assets(tmp_path / "assets")
    stage = get_stage("sft")
    ctx = local_context(stage, {"data": str(assets.chat), "max_length": 32, "lr": 1e-3, "max_steps": 3,
                                "checkpoint_every": 0, "wandb": True, "wandb_project": "demo-project"},
                        tmp_path / "sft", inputs=StageInputs(checkpoints={"base": assets.base}))
    stage.run(ctx)
    logged = [m["values"] for m in ctx.channel.of_type("metrics")]
    assert any(a["name"] == "wandb" for a in ctx.channel.of_type("artifact"))
    (run_file,) = (tmp_path / "sft" / "wandb").glob("offline-run-*/run-*.wandb")

    records = read_wandb_records(run_file)
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert (run.project, run.run_group, run.job_type) == ("demo-project", ctx.job_id, "sft")
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["lr"] == 1e-3 and config["max_steps"] == 3
    history = [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    assert [h["_step"] for h in history] == [1, 2, 3]
    assert [h["loss"] for h in history] == pytest.approx([m["loss"] for m in logged])
    assert records[-1].WhichOneof("record_type") == "exit" and records[-1].exit.exit_code == 0


def test_wandb_without_the_package_fails_naming_the_field(tmp_path, monkeypatch):
    stage = get_stage("sft")
    ctx = local_context(stage, {"data": str(tmp_path / "chat.jsonl")}, tmp_path / "out")
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(ValueError, match=r"wandb: true needs the wandb package"):
        MetricsTracker(ctx, TrainingConfig(wandb=True, tensorboard=False))
