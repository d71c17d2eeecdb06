"""prepare_data: tokenise corpora ONCE into memory-mapped shards, dropping exact duplicates.

Sources are ``{"text": ...}`` JSONL files, plain ``.txt`` files (one document each) or folders of
them (recursively, sorted). Each document becomes ``<s> text </s>``; a document whose text was seen
before (BLAKE2b-128 of the UTF-8 text) is dropped. Output: the token-shard folder
``output_dir/dataset`` (FORMATS.md), registered as the artifact ``dataset``, which ``pretrain`` and
``long_context`` read and pack.

``format: chat``: ``{"messages"}`` JSONL (FORMATS.md) is tokenised with the SFT loss mask and packed
best-fit decreasing (O(n log n)) into int32 rows of ``max_length`` (``input_ids``/``labels``/``doc_ids``
memory maps); ``sft`` given that folder as its data reads the rows on every rank without tokenising or
packing again.

``format: preference``: ``{"prompt", "chosen", "rejected", "condition"?}`` JSONL (FORMATS.md) is tokenised
once for both preference stages — DPO's prompt/response ids and the reward model's conditioned sequences
(default condition table) — into int32 memory maps (``data.preference_rows``); ``dpo`` and
``reward_model`` given that folder as train_data/eval_data read the ids without tokenising again.

Resume: the output is deterministic; a finished folder (meta.json present) is reused, a partial one
is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Literal

from pydantic import Field

from ..contract import ArtifactKind, Stage, StageConfig, StageContext
from ..data.formats import check_chat, check_preference, check_text, read_jsonl
from ..data.preference_rows import write_preference_rows
from ..data.shards import ShardWriter, write_packed_rows
from ..data.tokenize import tokenize_chat, tokenize_text


class PrepareDataConfig(StageConfig):
    """Which corpora to tokenise, with which tokenizer, and how to shard them."""

    sources: list[str] = Field(..., min_length=1, description="JSONL ({\"text\"} or {\"messages\"}) / .txt "
                               "files or folders; paths or references (input:NAME).")
    format: Literal["text", "chat", "preference"] = Field(
        "text", description="text: token shards (pretrain, long_context); chat: SFT rows packed once (sft reads "
        "the folder); preference: pairs tokenised once for dpo and reward_model (they read the folder).")
    max_length: int = Field(2048, ge=16, description="format chat: tokens per packed row (sft's max_length).")
    tokenizer: str | None = Field(None, description="Checkpoint or tokenizer folder (path or reference); "
                                  "default: the previous stage's checkpoint or the job input 'base'.")
    dedup: bool = Field(True, description="Drop documents whose exact text was already seen.")
    min_chars: int = Field(1, ge=1, description="Drop documents shorter than this many characters.")
    shard_tokens: int = Field(1 << 26, ge=1024, description="Tokens per shard file (about).")


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.suffix in (".jsonl", ".txt") and p.is_file())
    return [path]


def _digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def _conversations(path: Path):
    for where, record in read_jsonl(path):
        yield check_chat(record, where)


def _prepare_chat(ctx: StageContext, cfg: PrepareDataConfig, tok, files: list[Path], out: Path) -> dict[str, float]:
    samples, seen = [], set()
    dups = 0
    for k, path in enumerate(files):
        for messages in _conversations(path):
            ctx.raise_if_cancelled()
            if cfg.dedup:
                digest = _digest(json.dumps(messages, sort_keys=True, ensure_ascii=False))
                if digest in seen:
                    dups += 1
                    continue
                seen.add(digest)
            samples.append(tokenize_chat(tok, messages))
        ctx.report_progress(k + 1, len(files), conversations=len(samples), duplicates=dups)
    if not samples:
        raise ValueError("sources: no conversation to prepare")
    meta = write_packed_rows(out, samples, cfg.max_length, tok.pad_id, duplicates_removed=dups,
                             sources=[str(f) for f in files])
    ctx.log(f"{meta['num_samples']} conversations packed into {meta['num_rows']} rows of {cfg.max_length} "
            f"(fill {meta['fill']:.1%}), {dups} duplicates removed")
    return {"conversations": float(meta["num_samples"]), "rows": float(meta["num_rows"]),
            "fill": float(meta["fill"]), "duplicates_removed": float(dups)}


def _prepare_preference(ctx: StageContext, cfg: PrepareDataConfig, tok, files: list[Path],
                        out: Path) -> dict[str, float]:
    from ..algorithms.preference import DEFAULT_CONDITIONS, parse_pair

    pairs, seen = [], set()
    dups = 0
    for k, path in enumerate(files):
        for where, record in read_jsonl(path):
            ctx.raise_if_cancelled()
            pair = parse_pair(check_preference(record, where), where)
            if cfg.dedup:
                digest = _digest(json.dumps(pair.__dict__, sort_keys=True, ensure_ascii=False))
                if digest in seen:
                    dups += 1
                    continue
                seen.add(digest)
            pairs.append(pair)
        ctx.report_progress(k + 1, len(files), pairs=len(pairs), duplicates=dups)
    if not pairs:
        raise ValueError("sources: no preference pair to prepare")
    meta = write_preference_rows(out, tok, pairs, DEFAULT_CONDITIONS, duplicates_removed=dups,
                                 sources=[str(f) for f in files])
    ctx.log(f"{meta['num_pairs']} preference pairs tokenised once ({meta['num_tokens']} tokens), "
            f"{dups} duplicates removed, {len(meta['dpo_errors'])} unusable for DPO")
    return {"pairs": float(meta["num_pairs"]), "tokens": float(meta["num_tokens"]),
            "duplicates_removed": float(dups)}


def _documents(path: Path):
    if path.suffix == ".txt":
        yield path.read_text(encoding="utf-8")
        return
    for where, record in read_jsonl(path):
        yield check_text(record, where)


def run(ctx: StageContext) -> dict[str, float]:
    """Tokenise, deduplicate and shard every source; registers the ``dataset`` artifact."""
    cfg: PrepareDataConfig = ctx.config  # type: ignore[assignment]
    out = ctx.output_dir / "dataset"
    if (out / "meta.json").is_file():
        ctx.log("dataset already complete from an earlier attempt; reusing it")
        ctx.add_artifact("dataset", out, ArtifactKind.OTHER)
        return {}
    if not ctx.is_main:
        return {}
    from ..trainer.lm import load_tokenizer

    tok_path = ctx.resolve(cfg.tokenizer) if cfg.tokenizer else ctx.resolve_model(None)
    tok = load_tokenizer(tok_path)
    files = [f for src in cfg.sources for f in _files(ctx.resolve(src, "dataset"))]
    if out.exists():
        shutil.rmtree(out)
    if cfg.format in ("chat", "preference"):
        prepare = _prepare_chat if cfg.format == "chat" else _prepare_preference
        result = prepare(ctx, cfg, tok, files, out)
        ctx.add_artifact("dataset", out, ArtifactKind.OTHER)
        return result
    writer = ShardWriter(out, cfg.shard_tokens)
    seen: set[bytes] = set()
    docs = dups = short = 0
    for k, path in enumerate(files):
        for text in _documents(path):
            ctx.raise_if_cancelled()
            if len(text) < cfg.min_chars:
                short += 1
                continue
            if cfg.dedup:
                digest = _digest(text)
                if digest in seen:
                    dups += 1
                    continue
                seen.add(digest)
            writer.add(tokenize_text(tok, text))
            docs += 1
        ctx.report_progress(k + 1, len(files), documents=docs, duplicates=dups)
    meta = writer.close(duplicates_removed=dups, too_short=short, tokenizer=str(tok_path),
                        sources=[str(f) for f in files])
    ctx.log(f"{meta['num_docs']} documents, {meta['num_tokens']} tokens, {dups} duplicates removed")
    ctx.add_artifact("dataset", out, ArtifactKind.OTHER)
    return {"documents": float(meta["num_docs"]), "tokens": float(meta["num_tokens"]),
            "duplicates_removed": float(dups)}


STAGE = Stage(
    name="prepare_data",
    description="Tokenise text/code/long-document corpora into memory-mapped token shards with exact-"
    "duplicate removal (pretrain and long_context pack them into fixed-length rows), chat data into "
    "SFT rows packed once (best-fit decreasing) that sft reads memory-mapped, or preference pairs into "
    "token ids that dpo and reward_model read memory-mapped.",
    config_model=PrepareDataConfig,
    run=run,
    queue="gpu",
)
