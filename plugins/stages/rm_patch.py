"""rm_patch: close COOL RLHF's online loop — patch the reward model against the reward hacks of the last
PPO round (InternLM2 report §4.2.2: "Fast Path", 20-100 targeted preference pairs per round).

    rollouts.jsonl of a ppo stage (its ``rollouts`` artifact) -> pairs -> reward_model training -> final/

Where the pairs come from (the judge is pluggable):

- ``judge: "package.module:function"`` — ``function(row) -> float``, the true quality of a rollout row
  (``row["prompt"]`` messages, ``row["response"]``, ``row.get("reference")``, ``row.get("condition")``),
  e.g. a checker, a rule, a stronger model. Responses to the same prompt become pairs (better one
  chosen) and, where a row carries a reference answer the judge rates higher, (reference, response).
  Pairs the reward model got WRONG in the rollouts (it scored the worse response at least as high:
  a reward hack) come first, then the rest by the judge's margin; at most ``max_pairs``.
- ``train_data``: a preference JSONL written from the rollouts by people (or anything else).

The pairs are written to ``pairs.jsonl`` (artifact ``pairs``) and trained into ``reward_model`` with the
reward_model stage's own loop and losses (any ZeRO stage, LoRA), which writes the patched
InternLM2-Reward checkpoint as ``final/``. The next PPO round reads it (``reward_model: stage:rm_patch``),
or a running PPO loads it in place (``reward_updates``).
"""

from __future__ import annotations

import importlib
import json
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from pydantic import Field, ValidationInfo, field_validator

from ..contract import ArtifactKind, Stage, StageContext
from ..data.formats import read_jsonl
from . import reward_model


class RMPatchConfig(reward_model.RewardModelConfig):
    """Reward-model patch from a PPO round's rollouts; the RewardModelConfig fields set its training."""

    reward_model: str = Field(..., description="The reward model to patch (e.g. stage:reward_model).")
    rollouts: str = Field(..., description="A ppo stage's rollouts JSONL (e.g. stage:ppo/rollouts).")
    round: int | None = Field(None, ge=1, description="Use the rollouts of this PPO round; default: the last one.")
    judge: str | None = Field(None, validate_default=True, description="Import path 'package.module:function' "
                              "of the judge, function(rollout row) -> float (higher = better).")
    train_data: str | None = Field(None, description="Preference JSONL made from the rollouts (used as well as, "
                                   "or instead of, the judge's pairs).")
    max_pairs: int = Field(100, ge=1, description="Most judge pairs per patch (report: 20-100 per round).")
    margin: float = Field(0.0, ge=0, description="A pair needs the judge to prefer its chosen side by more than this.")
    eval_fraction: float = Field(0.0, ge=0, lt=1, description="Share of the pairs held out (few pairs: none).")

    @field_validator("judge")
    @classmethod
    def _needs_a_judge(cls, v: str | None, info: ValidationInfo) -> str | None:
        # train_data is declared before judge (inherited), so it is already in info.data.
        if v is None and info.data.get("train_data") is None:
            raise ValueError("give a judge (import path) or train_data (a preference file), or both")
        return v


def load_judge(path: str) -> Callable[[dict], float]:
    """``package.module:function`` -> the function; errors name the ``judge`` field."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ValueError(f"judge: must look like 'package.module:function', got {path!r}")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"judge: cannot import {path!r}: {exc}") from None
    if not callable(fn):
        raise ValueError(f"judge: {path!r} is not callable")
    return fn


def read_rollouts(path, round_: int | None) -> list[dict[str, Any]]:
    rows = [row for _, row in read_jsonl(path)]
    if not rows:
        raise ValueError(f"rollouts: {path} holds no rollout")
    wanted = round_ if round_ is not None else max(int(r.get("round", 1)) for r in rows)
    picked = [r for r in rows if int(r.get("round", 1)) == wanted]
    if not picked:
        raise ValueError(f"round: no rollout of round {wanted} in {path}")
    return picked


def _record(row: dict, chosen: str, rejected: str) -> dict[str, Any]:
    return {"prompt": row["prompt"], "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}], "condition": row.get("condition")}


def judge_pairs(rows: list[dict], judge: Callable[[dict], float], max_pairs: int,
                margin: float = 0.0) -> tuple[list[dict], int]:
    """Preference records from judged rollouts (module docstring); returns (records, how many were hacks)."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        groups[json.dumps([row["prompt"], row.get("condition")], sort_keys=True)].append(row)
    candidates = []  # (is_hack, how wrong the RM was or the judge's margin, record)
    seen: set[tuple[str, str, str]] = set()
    for group in groups.values():
        judged = [(judge(row), row) for row in group]
        for i, (a_score, a) in enumerate(judged):
            for b_score, b in judged[i + 1:]:
                if abs(a_score - b_score) <= margin or a["response"] == b["response"]:
                    continue
                (good_score, good), (bad_score, bad) = sorted([(a_score, a), (b_score, b)], key=lambda x: -x[0])
                rm_gap = bad["rm_score"] - good["rm_score"]  # > 0: the RM preferred the worse response
                candidates.append((rm_gap >= 0, rm_gap if rm_gap >= 0 else good_score - bad_score,
                                   _record(good, good["response"], bad["response"])))
        for score, row in judged:
            reference = row.get("reference")
            if reference and reference != row["response"]:
                ref_score = judge({**row, "response": reference})
                if ref_score - score > margin:
                    # The RM never scored the reference here, so these count as plain corrections.
                    candidates.append((False, ref_score - score, _record(row, reference, row["response"])))
    candidates.sort(key=lambda c: (not c[0], -c[1]))
    records, hacks = [], 0
    for is_hack, _, record in candidates:
        key = (json.dumps(record["prompt"], sort_keys=True), record["chosen"][0]["content"],
               record["rejected"][0]["content"])
        if key in seen:
            continue
        seen.add(key)
        records.append(record)
        hacks += is_hack
        if len(records) == max_pairs:
            break
    return records, hacks


def run(ctx: StageContext) -> dict[str, float]:
    """Build the patch pairs, then train them into the reward model (the reward_model stage's loop)."""
    cfg: RMPatchConfig = ctx.config  # type: ignore[assignment]
    records: list[dict] = []
    hacks = 0
    if cfg.judge is not None:
        rows = read_rollouts(ctx.resolve(cfg.rollouts, "dataset"), cfg.round)
        records, hacks = judge_pairs(rows, load_judge(cfg.judge), cfg.max_pairs, cfg.margin)
        ctx.log(f"{len(rows)} rollouts judged: {len(records)} pairs, {hacks} of them reward hacks")
    if cfg.train_data is not None:
        records += [row for _, row in read_jsonl(ctx.resolve(cfg.train_data, "dataset"))]
    if not records:
        raise ValueError("judge: no pair from the rollouts (every response judged alike) and no train_data")
    pairs_path = ctx.output_dir / "pairs.jsonl"
    if ctx.is_main:
        pairs_path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
        ctx.add_artifact("pairs", pairs_path, ArtifactKind.OTHER)
    from ..trainer.distributed import barrier

    barrier()
    ctx.config = cfg.model_copy(update={"model": cfg.reward_model, "train_data": str(pairs_path)})
    try:
        summary = reward_model.run(ctx)
    finally:
        ctx.config = cfg
    return {**summary, "patch_pairs": float(len(records)), "patch_hacks": float(hacks)}


STAGE = Stage(
    name="rm_patch",
    description="COOL RLHF fast path between PPO rounds: preference pairs from the last round's rollouts (a "
    "pluggable judge ranks responses; the reward model's mistakes — reward hacks — first, or a labelled "
    "preference file), trained into the reward model with the reward_model stage's losses; writes the "
    "patched InternLM2-Reward checkpoint.",
    config_model=RMPatchConfig,
    run=run,
)
