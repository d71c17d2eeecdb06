"""Sequence similarity to a reference answer, through the ``rouge-score`` library.

The seed's alignment loss, in PPO form: ROUGE-L F1 between the generated response and the sample's
reference answer is added (weighted) to the reward-model score. The default ``rouge-score`` tokenizer
keeps only [a-z0-9] runs, so Chinese text would score 0; :class:`MixedScriptTokenizer` keeps Latin
words and makes each CJK character a token, the usual granularity for Chinese ROUGE.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import cache

from rouge_score import rouge_scorer, tokenizers

# A CJK ideograph / kana / hangul character, or a run of letters and digits in any other script.
_TOKEN = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]|[^\W_]+")


class MixedScriptTokenizer(tokenizers.Tokenizer):
    """Lower-cased words for alphabetic scripts, single characters for CJK; punctuation dropped."""

    def tokenize(self, text: str) -> list[str]:
        return _TOKEN.findall(text.lower())


@cache
def rouge(types: tuple[str, ...] = ("rougeL",)) -> rouge_scorer.RougeScorer:
    return rouge_scorer.RougeScorer(list(types), tokenizer=MixedScriptTokenizer())


def rouge_l(hypothesis: str, reference: str) -> float:
    """ROUGE-L F1 in [0, 1]."""
    return rouge().score(reference, hypothesis)["rougeL"].fmeasure


def rouge_l_batch(hypotheses: Sequence[str], references: Sequence[str | None]) -> list[float]:
    """ROUGE-L F1 per pair; a missing reference (None or empty) scores 0 — no alignment signal."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    return [rouge_l(h, r) if r else 0.0 for h, r in zip(hypotheses, references)]
