"""eval stage: perplexity, BLEU, ROUGE, accuracy and the needle grid land in eval_report.json with plots,
and they tell a fruit-list SFT model from the random model it started as."""

from __future__ import annotations

import json
import random

import pytest
import rlhf_synthetic as synth

from internlm2.core import random_model
from internlm2.plugins.algorithms import metrics
from internlm2.plugins.contract import StageConfigError, StageInputs, local_context
from internlm2.plugins.stages.eval import STAGE

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    tokenizer = synth.make_tokenizer(root / "tokenizer")
    synth.save_model(synth.quick_sft(tokenizer, steps=40), root / "tokenizer", root / "sft")
    synth.save_model(random_model(synth.tiny_config(), seed=0), root / "tokenizer", root / "random")
    rng = random.Random(3)
    chats = [{"messages": [{"role": "user", "content": rng.choice(synth.PROMPTS)},
                           {"role": "assistant", "content": synth.fruit_answer(rng, 1, 5)}]} for _ in range(12)]
    synth.write_jsonl(root / "ppl.jsonl", [*chats, {"text": "The grass is green. The sky is blue."}])
    gen = [{"prompt": p, "reference": "apple banana cherry grape", "answer": "banana"} for p in synth.PROMPTS]
    synth.write_jsonl(root / "gen.jsonl", gen)
    return root


def evaluate(models, which: str, out):
    config = {"perplexity_data": str(models / "ppl.jsonl"), "generation_data": str(models / "gen.jsonl"),
              "match": "contains", "max_new_tokens": 12, "needle_lengths": [128, 256], "needle_depths": [0.0, 1.0],
              "needles_per_cell": 1}
    ctx = local_context(STAGE, config, out, inputs=StageInputs(checkpoints={"base": models / which}))
    summary = STAGE.run(ctx)
    return summary, json.loads((out / "eval_report.json").read_text()), ctx


def test_eval_report_has_every_metric_and_plots(models, tmp_path):
    summary, report, ctx = evaluate(models, "sft", tmp_path / "sft")
    base_summary, _, _ = evaluate(models, "random", tmp_path / "random")

    assert {"perplexity", "bleu", "rouge1", "rouge2", "rougeL", "accuracy", "needle_retrieval"} <= set(summary)
    assert report["perplexity"]["records"] == 13 and report["perplexity"]["tokens"] > 50
    # The SFT model knows fruit lists: lower perplexity and more overlap with fruit references.
    assert summary["perplexity"] < base_summary["perplexity"] / 5, (summary, base_summary)
    assert summary["rouge1"] > base_summary["rouge1"] and summary["rouge1"] > 0.1
    gen = report["generation"]
    preds = [e["prediction"] for e in gen["examples"]]
    assert len(preds) == len(synth.PROMPTS)
    assert summary["accuracy"] == pytest.approx(metrics.accuracy(preds, ["banana"] * len(preds), "contains"))
    assert summary["bleu"] == pytest.approx(metrics.bleu(preds, [e["reference"] for e in gen["examples"]]))
    assert len(report["needle"]["retrieval"]) == 2
    for name in ("metrics.png", "needle_heatmap.png"):
        assert (tmp_path / "sft" / name).read_bytes()[:4] == b"\x89PNG"
    kinds = {a["name"]: a["kind"] for a in ctx.channel.of_type("artifact")}
    assert kinds["report"] == "EVAL_REPORT" and "metrics_plot" in kinds and "needle_heatmap" in kinds


def test_eval_config_validation():
    with pytest.raises(StageConfigError) as err:
        STAGE.parse_config({"match": "fuzzy"})
    assert err.value.field == "config.match"
    assert not STAGE.documentation_problems()
