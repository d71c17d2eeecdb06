"""eval: perplexity, BLEU, ROUGE, task accuracy and needle-in-a-haystack of a checkpoint; a JSON report
and plots.

    perplexity_data   {"text"} records (BOS + text + EOS, every token scored) or {"messages"} chats (the
                      assistant turns scored, as SFT trains them)
    generation_data   {"prompt": text | messages, "reference"?: text, "answer"?: text}: greedy answers
                      through the shared engine; BLEU (sacrebleu) and ROUGE-1/2/L (rouge-score) against
                      the reference (or the answer), accuracy against the answer (exact or contains)
    needle_lengths    the needle-in-a-haystack grid (lengths x depths), as long_context draws it

Writes ``eval_report.json`` (EVAL_REPORT artifact "report"), ``metrics.png`` and ``needle_heatmap.png``.
No training. ``zero_stage: 0`` (default): rank 0 holds the whole model and evaluates alone. ``zero_stage: 3``:
the checkpoint is loaded straight into ZeRO-3 partitions over all launched ranks (each holds 1/N) and
every rank runs perplexity, generation and the needle sweep inside a forward-only DeepSpeed engine's
forward, which gathers each module as it runs (and frees it after): a model larger than one device
evaluates, at the price of gathering every layer on every decoding step.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from internlm2.core import InternLM2ForCausalLM

from ..algorithms import metrics
from ..algorithms.datasets import prompt_messages, read_jsonl
from ..algorithms.needle import DEFAULT_FILLER, evaluate_grid, plot_heatmap
from ..contract import ArtifactKind, Stage, StageConfig, StageContext
from ..data.tokenize import IGNORE, tokenize_chat, tokenize_text
from ..trainer import (
    TrainingConfig,
    engine_forward,
    inference_engine,
    is_partitioned,
    load_causal_lm,
    load_tokenizer,
)


class EvalConfig(StageConfig):
    """What to evaluate a checkpoint on."""

    model: str | None = Field(None, description="Checkpoint to evaluate; default: the previous stage's.")
    perplexity_data: str | None = Field(None, description="JSONL of {text} or {messages} records for perplexity.")
    generation_data: str | None = Field(None, description="JSONL of {prompt, reference?, answer?} records for "
                                        "BLEU, ROUGE and accuracy.")
    match: Literal["exact", "contains"] = Field("exact", description="Accuracy: normalised answer equals the "
                                                "prediction, or occurs in it.")
    bleu_tokenize: str = Field("13a", description="sacrebleu tokenizer: 13a (English), zh, intl, char, ...")
    max_new_tokens: int = Field(128, ge=1, description="Longest generated answer.")
    max_length: int = Field(4096, ge=8, description="Sequences are cut to this many tokens for perplexity.")
    batch_size: int = Field(8, ge=1, description="Sequences per perplexity forward.")
    max_samples: int | None = Field(None, ge=1, description="Use at most this many records of each dataset.")
    needle_lengths: list[int] = Field(default_factory=list, description="Needle-in-a-haystack context lengths "
                                      "(empty = skip the sweep).")
    needle_depths: list[float] = Field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0],
                                       description="Needle depths (fractions of the context).")
    needles_per_cell: int = Field(2, ge=1, description="Needles scored per grid cell.")
    report_examples: int = Field(20, ge=0, description="Generated examples copied into the report.")
    zero_stage: Literal[0, 3] = Field(0, description="0: rank 0 evaluates the whole model; 3: the model is "
                                      "partitioned over the launched ranks (ZeRO-3 inference), every rank joins.")
    zero3_param_persistence_threshold: int = Field(100_000, ge=0, description="ZeRO-3: parameters with fewer "
                                                   "elements stay whole on every rank (0 partitions all).")


def perplexity_section(model, tokenizer, path: Path, cfg: EvalConfig) -> dict:
    sequences, masks = [], []
    for where, record in read_jsonl(path)[: cfg.max_samples]:
        if "messages" in record:
            ids, targets = tokenize_chat(tokenizer, record["messages"])
            mask = [t != IGNORE for t in targets]
        elif isinstance(record.get("text"), str):
            ids = tokenize_text(tokenizer, record["text"])
            mask = [True] * len(ids)
        else:
            raise ValueError(f"{where}: a perplexity record needs 'text' or 'messages'")
        sequences.append(ids[: cfg.max_length])
        masks.append(mask[: cfg.max_length])
    return {**metrics.perplexity(model, sequences, cfg.batch_size, masks), "records": len(sequences)}


def generation_section(model, tokenizer, path: Path, cfg: EvalConfig) -> dict:
    from internlm2.core.engine import EngineConfig, LLMEngine, SamplingParams

    records = read_jsonl(path)[: cfg.max_samples]
    window = model.config.max_position_embeddings
    prompts, references, answers = [], [], []
    skipped = 0
    for where, record in records:
        ids = tokenizer.encode_chat(prompt_messages(record, where))
        if len(ids) + cfg.max_new_tokens > window:
            skipped += 1  # would not fit the context with room for the answer
            continue
        prompts.append(ids)
        references.append(record.get("reference", record.get("answer")))
        answers.append(record.get("answer"))
    out: dict = {"records": len(prompts), "skipped_too_long": skipped}
    if not prompts:
        return out
    longest = max(len(p) for p in prompts) + cfg.max_new_tokens
    engine = LLMEngine(model, tokenizer, EngineConfig(max_num_seqs=min(64, len(prompts)),
                                                      max_num_batched_tokens=max(2048, longest),
                                                      max_model_len=longest))
    outputs = engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=cfg.max_new_tokens))
    predictions = [o.new_text for o in outputs]
    scored = [(p, r) for p, r in zip(predictions, references) if r]
    if scored:
        hyps, refs = [p for p, _ in scored], [r for _, r in scored]
        out["bleu"] = metrics.bleu(hyps, refs, cfg.bleu_tokenize)
        out.update(metrics.rouge_scores(hyps, refs))
    graded = [(p, a) for p, a in zip(predictions, answers) if a]
    if graded:
        out["accuracy"] = metrics.accuracy([p for p, _ in graded], [a for _, a in graded], cfg.match)
    out["examples"] = [{"prompt": tokenizer.decode(p, skip_special_tokens=True), "prediction": pred,
                        "reference": ref, "answer": ans}
                       for p, pred, ref, ans in list(zip(prompts, predictions, references, answers))[
                           : cfg.report_examples]]
    return out


def plot_metrics(scores: dict[str, float], path: Path) -> Path:
    """A bar chart of the 0-1 metrics (BLEU is divided by 100)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(scores)
    fig, ax = plt.subplots(figsize=(1.0 + 1.1 * len(names), 3.2))
    bars = ax.bar(names, [scores[n] for n in names], color="#4c72b0")
    ax.bar_label(bars, fmt="%.3f", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_title("Generation metrics")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _zero3_model(model_dir: Path, cfg: EvalConfig):
    """(partitioned model, call(fn) running fn(model) inside the inference engine's forward)."""
    train_cfg = TrainingConfig(zero_stage=3, max_steps=1, checkpoint_every=0,
                               zero3_param_persistence_threshold=cfg.zero3_param_persistence_threshold)
    model = load_causal_lm(model_dir, train_cfg).eval()
    engine = inference_engine(model, train_cfg)

    def call(fn):
        return engine_forward(engine, lambda m, _batch: fn(m))

    return model, call


def run(ctx: StageContext) -> dict[str, float]:
    """Evaluate a checkpoint; write eval_report.json and the plots."""
    cfg: EvalConfig = ctx.config
    if cfg.zero_stage == 0 and not ctx.is_main:
        return {}
    model_dir = ctx.resolve_model(cfg.model)
    tokenizer = load_tokenizer(model_dir)
    if cfg.zero_stage == 3:
        model, call = _zero3_model(model_dir, cfg)
        params = list(model.parameters())
        ctx.log(f"ZeRO-3: {sum(map(is_partitioned, params))} of {len(params)} parameters partitioned over "
                f"{ctx.world_size} rank(s)")
    else:
        model = InternLM2ForCausalLM.from_pretrained(model_dir, device=ctx.device).eval()

        def call(fn):
            return fn(model)
    report: dict = {"model": str(model_dir)}
    summary: dict[str, float] = {}
    total = sum(bool(x) for x in (cfg.perplexity_data, cfg.generation_data, cfg.needle_lengths))
    done = 0

    with torch.no_grad():
        if cfg.perplexity_data:
            path = ctx.resolve(cfg.perplexity_data, "dataset")
            report["perplexity"] = call(lambda m: perplexity_section(m, tokenizer, path, cfg))
            summary["perplexity"] = report["perplexity"]["perplexity"]
            done += 1
            ctx.report_progress(done, total, "perplexity", perplexity=summary["perplexity"])
        ctx.raise_if_cancelled()
        if cfg.generation_data:
            path = ctx.resolve(cfg.generation_data, "dataset")
            # under ZeRO-3 inside the engine's forward: modules gathered as the paged engine runs them
            gen = call(lambda m: generation_section(m, tokenizer, path, cfg))
            report["generation"] = gen
            scores = {k: gen[k] for k in ("bleu", "rouge1", "rouge2", "rougeL", "accuracy") if k in gen}
            summary.update(scores)
            done += 1
            ctx.report_progress(done, total, "generation", **scores)
            if scores and ctx.is_main:
                plotted = {k: v / 100 if k == "bleu" else v for k, v in scores.items()}
                ctx.add_artifact("metrics_plot", plot_metrics(plotted, ctx.output_dir / "metrics.png"))
        ctx.raise_if_cancelled()
        lengths = [n for n in cfg.needle_lengths if n <= model.config.max_position_embeddings]
        if lengths:
            grid = call(lambda m: evaluate_grid(
                m, lambda t: tokenizer.encode(t, add_bos=False, allow_special=False), lengths, cfg.needle_depths,
                tokenizer.bos_id, cfg.needles_per_cell, 0, DEFAULT_FILLER, lambda i, n: ctx.raise_if_cancelled()))
            report["needle"] = grid.to_dict()
            summary["needle_retrieval"] = grid.mean_retrieval
            if ctx.is_main:
                ctx.add_artifact("needle_heatmap", plot_heatmap(grid, ctx.output_dir / "needle_heatmap.png"))
            done += 1
            ctx.report_progress(done, total, "needle", needle_retrieval=grid.mean_retrieval)

    report["summary"] = summary
    if not ctx.is_main:
        return summary
    path = ctx.output_dir / "eval_report.json"
    path.write_text(json.dumps(report, indent=1, ensure_ascii=False))
    ctx.add_artifact("report", path, ArtifactKind.EVAL_REPORT)
    return summary


STAGE = Stage(
    name="eval",
    description="Evaluate a checkpoint: perplexity ({text} or chat records), BLEU (sacrebleu) and ROUGE "
    "(rouge-score) of greedy answers against references, task accuracy on held-out answers, and a "
    "needle-in-a-haystack grid; writes eval_report.json plus metrics and heatmap plots.",
    config_model=EvalConfig,
    run=run,
    queue="gpu",
)
