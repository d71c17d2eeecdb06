"""Two data-parallel ranks (two processes, gloo, DeepSpeed ZeRO-3 on CPU with every parameter partitioned). SFT:
each rank holds half of every parameter, and the step's gradient equals one rank's gradient over the
same rows in one batch — the loss is normalised by the target tokens of BOTH ranks (all-reduced before
the backward), and the logged loss is the mean over both ranks, not rank 0's share."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_trainer_scale import sft_first_step
from training_support import build_assets, free_port

from internlm2.core.tokenizer import InternLM2Tokenizer
from internlm2.plugins.data.formats import load_chat
from internlm2.plugins.data.packing import pack_samples
from internlm2.plugins.data.tokenize import tokenize_chat

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]

ZERO3 = {"zero_stage": 3, "zero3_param_persistence_threshold": 0, "zero3_max_live_parameters": 20_000,
         "zero3_prefetch_bucket_size": 5_000, "zero_bucket_size": 20_000}
COMMON = {"max_length": 32, "lr": 1e-3, "max_steps": 1, "shuffle": False, "checkpoint_every": 0,
          "tensorboard": False}


def run_two_ranks(base, data, out, config: dict, stage: str = "sft") -> list[dict]:
    """Both ranks' JSON lines of tests/stages/two_rank_sft.py (two processes, one gloo group)."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2",
           "LOCAL_WORLD_SIZE": "2"}
    script = Path(__file__).with_name("two_rank_sft.py")
    procs = [subprocess.Popen([sys.executable, str(script), str(base), str(data), str(out), json.dumps(config), stage],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    outputs = []
    for p in procs:
        out_text, err = p.communicate(timeout=360)
        assert p.returncode == 0, err[-3000:]
        outputs.append(json.loads([line for line in out_text.splitlines() if line.startswith("{")][-1]))
    return outputs


def test_two_ranks_partition_and_normalise_globally(tmp_path):
    assets = build_assets(tmp_path / "assets")
    tok = InternLM2Tokenizer.from_pretrained(assets.base)
    rows, _ = pack_samples([tokenize_chat(tok, c) for c in load_chat(assets.chat)], 32, tok.pad_id)
    counts = [int((row.labels != -100).sum()) for row in rows[:2]]
    assert counts[0] != counts[1], counts  # rank 0 and rank 1 see different numbers of targets

    outputs = run_two_ranks(assets.base, assets.chat, tmp_path / "out", {**COMMON, **ZERO3, "micro_batch_size": 1})
    rank0 = next(o for o in outputs if o["rank"] == 0)
    line = next(m for m in rank0["logs"] if m.startswith("ZeRO-3:"))
    parts, total, held, numel = map(int, re.match(
        r"ZeRO-3: (\d+) of (\d+) parameters partitioned; rank 0 holds (\d+) of (\d+) elements", line).groups())
    assert parts == total > 0
    assert numel / 2 <= held < numel / 2 + 2 * total  # half of each parameter (+ padding to an even split)
    assert (tmp_path / "out" / "final" / "model.safetensors").exists()

    single = sft_first_step(assets, tmp_path / "single", micro_batch_size=2, gradient_accumulation_steps=1)
    two = rank0["metrics"][0]
    assert two["grad_norm"] == pytest.approx(single["grad_norm"], rel=1e-4)
    assert two["loss"] == pytest.approx(single["loss"], rel=1e-5)


def test_two_rank_dpo_with_uneven_shards_and_a_partitioned_reference(tmp_path):
    """5 micro-batches over 2 ranks (3 and 2): the reference's collective forwards stay in step (the short
    rank repeats one), its log-probs equal the untrained policy's (first loss log 2), final/ is written."""
    import math

    import rlhf_synthetic as synth

    from internlm2.core import make_random_checkpoint

    synth.make_tokenizer(tmp_path / "tokenizer")
    base = make_random_checkpoint(tmp_path / "base", preset="tiny", tokenizer=tmp_path / "tokenizer",
                                  **synth.tiny_config().to_dict())
    data = synth.write_jsonl(tmp_path / "prefs.jsonl", synth.preference_pairs(20, seed=1, condition=None))
    config = {**ZERO3, "lr": 1e-3, "max_steps": 2, "pairs_per_batch": 4, "eval_fraction": 0.0, "epochs": None,
              "checkpoint_every": 0, "tensorboard": False}
    outputs = run_two_ranks(base, data, tmp_path / "out", config, stage="dpo")
    rank0 = next(o for o in outputs if o["rank"] == 0)
    assert rank0["metrics"][0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert (tmp_path / "out" / "final" / "model.safetensors").exists()
