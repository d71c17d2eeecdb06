"""corpus_stats: statistics of a JSONL text corpus — a complete third-party stage in one file.

It uses only the public contract (``internlm2.plugins.contract``): a config model with documented
fields, ``run(ctx)`` that reports progress, honours cancellation and registers its report.
"""

from __future__ import annotations

import hashlib
import json
import statistics

from pydantic import Field

from internlm2.plugins.contract import ArtifactKind, Stage, StageConfig, StageContext


class CorpusStatsConfig(StageConfig):
    """Where the corpus is and which field holds the text."""

    data: list[str] = Field(..., min_length=1, description="JSONL files (paths or references input:NAME).")
    text_field: str = Field("text", description="Key of the text in each record.")


def run(ctx: StageContext) -> dict[str, float]:
    """Count documents, characters, words and exact duplicates; write report.json."""
    cfg: CorpusStatsConfig = ctx.config  # type: ignore[assignment]
    lengths: list[int] = []
    words = duplicates = 0
    seen: set[bytes] = set()
    for k, ref in enumerate(cfg.data):
        with open(ctx.resolve(ref, "dataset"), encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                ctx.raise_if_cancelled()
                text = json.loads(line)[cfg.text_field]
                digest = hashlib.sha256(text.encode()).digest()
                duplicates += digest in seen
                seen.add(digest)
                lengths.append(len(text))
                words += len(text.split())
        ctx.report_progress(k + 1, len(cfg.data), documents=len(lengths))
    report = {
        "documents": len(lengths), "characters": sum(lengths), "words": words, "duplicates": duplicates,
        "median_chars": statistics.median(lengths) if lengths else 0, "max_chars": max(lengths, default=0),
    }
    path = ctx.output_dir / "report.json"
    path.write_text(json.dumps(report, indent=1))
    ctx.add_artifact("report", path, ArtifactKind.EVAL_REPORT)
    return {k: float(v) for k, v in report.items()}


STAGE = Stage(
    name="corpus_stats",
    description="Statistics of a JSONL text corpus (documents, characters, words, exact duplicates); "
    "a third-party stage installed from its own package.",
    config_model=CorpusStatsConfig,
    run=run,
    queue="gpu",
)
