"""dpo stage: through DeepSpeed ZeRO-2 on CPU, the implicit-reward margin rises on training and held-out
pairs, and the policy checkpoint loads and generates through the engine."""

from __future__ import annotations

import pytest
import rlhf_synthetic as synth
import torch

from internlm2.core import InternLM2ForCausalLM, make_random_checkpoint
from internlm2.core.engine import EngineConfig, LLMEngine, SamplingParams
from internlm2.core.tokenizer import InternLM2Tokenizer
from internlm2.plugins.algorithms import preference
from internlm2.plugins.algorithms.logprobs import right_pad, sequence_logprobs, shifted_labels
from internlm2.plugins.contract import StageInputs, local_context
from internlm2.plugins.stages.dpo import STAGE

pytestmark = [pytest.mark.integration, pytest.mark.timeout(150)]


def response_logprob(model, tokenizer, pair: dict, key: str) -> float:
    p = preference.parse_pair(pair)
    prompt, chosen, rejected = preference.dpo_pair_ids(tokenizer, p)
    answer = chosen if key == "chosen" else rejected
    ids, mask = right_pad([prompt + answer])
    labels = shifted_labels(ids, torch.tensor([[False] * len(prompt) + [True] * len(answer)]))
    with torch.no_grad():
        return float(sequence_logprobs(model, ids, labels, mask)[0])


def test_dpo_raises_the_margin_and_serves(tmp_path):
    tokenizer = synth.make_tokenizer(tmp_path / "tokenizer")
    base = make_random_checkpoint(tmp_path / "base", preset="tiny", tokenizer=tmp_path / "tokenizer",
                                  **synth.tiny_config().to_dict())
    data = synth.write_jsonl(tmp_path / "prefs.jsonl", synth.preference_pairs(160, seed=4, condition=None))
    held = synth.write_jsonl(tmp_path / "held.jsonl", synth.preference_pairs(24, seed=5, condition=None))
    config = {"train_data": str(data), "eval_data": str(held), "beta": 0.1, "lr": 1e-3, "max_steps": 30,
              "pairs_per_batch": 4, "zero_stage": 2, "schedule": "constant"}
    ctx = local_context(STAGE, config, tmp_path / "out", inputs=StageInputs(checkpoints={"base": base}))
    summary = STAGE.run(ctx)

    assert summary["eval_margin"] > 0.5, summary
    assert summary["eval_accuracy"] >= 0.8
    margins = [e["values"]["margin"] for e in ctx.channel.of_type("metrics") if "margin" in e["values"]]
    assert len(margins) == 30
    assert sum(margins[-5:]) / 5 > sum(margins[:5]) / 5 + 0.3

    # The checkpoint serves: it loads, prefers the chosen answers more than the start did, and generates.
    start = InternLM2ForCausalLM.from_pretrained(base)
    policy = InternLM2ForCausalLM.from_pretrained(tmp_path / "out" / "final")
    tok = InternLM2Tokenizer.from_pretrained(tmp_path / "out" / "final")
    pair = synth.preference_pairs(1, seed=9, condition=None)[0]
    gap_start = response_logprob(start, tok, pair, "chosen") - response_logprob(start, tok, pair, "rejected")
    gap_final = response_logprob(policy, tok, pair, "chosen") - response_logprob(policy, tok, pair, "rejected")
    assert gap_final > gap_start
    engine = LLMEngine(policy, tok, EngineConfig(max_num_seqs=2, max_model_len=128))
    out = engine.generate([tok.encode_chat(pair["prompt"])], SamplingParams(temperature=0.0, max_new_tokens=8))
    assert out[0].finished and 1 <= len(out[0].new_token_ids) <= 8
    assert tokenizer.vocab_size == tok.vocab_size
