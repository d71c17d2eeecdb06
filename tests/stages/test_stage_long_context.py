"""long_context stage: through DeepSpeed ZeRO-2 on CPU it writes the raised rope_theta and context length,
lowers the LM loss on long packed rows, sweeps needles into a heatmap PNG, and the checkpoint serves
prompts longer than the old context."""

from __future__ import annotations

import json
import random

import pytest
import rlhf_synthetic as synth

from internlm2.core import InternLM2ForCausalLM, make_random_checkpoint
from internlm2.core.engine import EngineConfig, LLMEngine, SamplingParams
from internlm2.core.tokenizer import InternLM2Tokenizer
from internlm2.plugins.algorithms.needle import DEFAULT_FILLER, NEEDLE
from internlm2.plugins.contract import StageConfigError, StageInputs, local_context
from internlm2.plugins.data.shards import ShardWriter
from internlm2.plugins.stages.long_context import STAGE

pytestmark = [pytest.mark.integration, pytest.mark.timeout(150)]


def long_documents(tokenizer, n: int, seed: int) -> list[list[int]]:
    """Filler documents of ~600 tokens, each with a needle sentence somewhere inside."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        parts = [DEFAULT_FILLER] * 6
        parts.insert(rng.randrange(len(parts)), NEEDLE.format(value=rng.randrange(10000, 100000)) + " ")
        docs.append([tokenizer.bos_id, *tokenizer.encode("".join(parts), add_bos=False), tokenizer.eos_id])
    return docs


def test_long_context_extends_the_window_and_draws_the_heatmap(tmp_path):
    tokenizer = synth.make_tokenizer(tmp_path / "tokenizer")
    base = make_random_checkpoint(tmp_path / "base", preset="tiny", tokenizer=tmp_path / "tokenizer",
                                  **synth.tiny_config(max_position_embeddings=256).to_dict())
    writer = ShardWriter(tmp_path / "shards", shard_tokens=4096)
    for doc in long_documents(tokenizer, 24, seed=0):
        writer.add(doc)
    writer.close(tokenizer=str(tmp_path / "tokenizer"))

    config = {"data": str(tmp_path / "shards"), "rope_theta": 1_000_000, "context_length": 1024, "seq_len": 512,
              "lr": 3e-3, "max_steps": 12, "micro_batch_size": 2, "zero_stage": 2,
              "needle_lengths": [256, 512, 1024, 4096], "needle_depths": [0.0, 0.5, 1.0], "needles_per_cell": 1}
    ctx = local_context(STAGE, config, tmp_path / "out", inputs=StageInputs(checkpoints={"base": base}))
    summary = STAGE.run(ctx)

    assert summary["loss"] < summary["initial_loss"] - 1.0, summary
    final = tmp_path / "out" / "final"
    cfg = json.loads((final / "config.json").read_text())
    assert cfg["rope_theta"] == 1_000_000 and cfg["max_position_embeddings"] == 1024
    assert json.loads((base / "config.json").read_text())["rope_theta"] == 10000.0

    needle = json.loads((tmp_path / "out" / "needle.json").read_text())
    assert needle["lengths"] == [256, 512, 1024]  # 4096 is beyond the new window
    assert len(needle["retrieval"]) == 3 and all(len(row) == 3 for row in needle["retrieval"])
    assert all(lp < 0 for row in needle["logprob"] for lp in row)
    png = tmp_path / "out" / "needle_heatmap.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    artifacts = {a["name"] for a in ctx.channel.of_type("artifact")}
    assert {"final", "metrics", "needle", "needle_heatmap"} <= artifacts
    assert "needle_retrieval" in json.loads((tmp_path / "out" / "metrics.json").read_text())["final"]

    # Serves a prompt longer than the old 256-token window.
    model = InternLM2ForCausalLM.from_pretrained(final)
    tok = InternLM2Tokenizer.from_pretrained(final)
    prompt = long_documents(tok, 1, seed=5)[0][:-1][:700]
    assert len(prompt) > 256
    engine = LLMEngine(model, tok, EngineConfig(max_num_seqs=1, max_model_len=1024))
    out = engine.generate([prompt], SamplingParams(temperature=0.0, max_new_tokens=4, ignore_eos=True))
    assert out[0].finished and len(out[0].new_token_ids) == 4


def test_long_context_config_validation():
    with pytest.raises(StageConfigError) as err:
        STAGE.parse_config({"needle_depths": [0.5, 1.5]})
    assert err.value.field == "config.needle_depths"
    assert not STAGE.documentation_problems()
