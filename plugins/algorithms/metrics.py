"""Evaluation metrics: perplexity, BLEU (sacrebleu), ROUGE (rouge-score), task accuracy.

Text metrics come from the maintained libraries, never re-implemented here: sacrebleu's corpus BLEU
(its tokenizer choice — "13a" for English, "zh" for Chinese — is a parameter) and rouge-score's
F1 averaged over the corpus, with the CJK-aware tokenizer of :mod:`.similarity`.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Sequence

import sacrebleu
import torch

from .logprobs import IGNORE, right_pad, shifted_labels, token_logprobs
from .similarity import rouge


@torch.no_grad()
def perplexity(model, sequences: Sequence[Sequence[int]], batch_size: int = 8,
               target_masks: Sequence[Sequence[bool]] | None = None) -> dict[str, float]:
    """exp(mean next-token NLL) over all predicted tokens of ``sequences`` (token ids).

    ``target_masks`` (same shapes) limits the scored tokens, e.g. to assistant turns. Returns
    {"perplexity", "nll", "tokens"}.
    """
    total_nll, total_tokens = 0.0, 0
    device = next(model.parameters()).device
    for start in range(0, len(sequences), batch_size):
        batch = sequences[start : start + batch_size]
        ids, padding = right_pad(batch, device=device)
        targets = padding
        if target_masks is not None:
            targets = right_pad(target_masks[start : start + batch_size], device=device)[0].bool() & padding
        # The first token has no context to be predicted from; shifted_labels never scores it.
        labels = shifted_labels(ids, targets)
        total_nll -= float(token_logprobs(model, ids, labels, padding).sum())
        total_tokens += int((labels != IGNORE).sum())
    mean = total_nll / max(total_tokens, 1)
    return {"perplexity": math.exp(min(mean, 700.0)), "nll": mean, "tokens": total_tokens}


def bleu(hypotheses: Sequence[str], references: Sequence[str], tokenize: str = "13a") -> float:
    """sacrebleu corpus BLEU (0-100), one reference per hypothesis."""
    return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)], tokenize=tokenize).score)


def rouge_scores(hypotheses: Sequence[str], references: Sequence[str],
                 types: tuple[str, ...] = ("rouge1", "rouge2", "rougeL")) -> dict[str, float]:
    """Mean F1 of each ROUGE type over the pairs (0-1)."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    scorer = rouge(tuple(types))
    totals = dict.fromkeys(types, 0.0)
    for hyp, ref in zip(hypotheses, references):
        for name, score in scorer.score(ref, hyp).items():
            totals[name] += score.fmeasure
    n = max(len(hypotheses), 1)
    return {name: total / n for name, total in totals.items()}


def normalize_answer(text: str) -> str:
    """NFKC, case-folded, punctuation dropped, whitespace collapsed — the usual exact-match normalisation."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = "".join(ch for ch in text if not unicodedata.category(ch).startswith("P"))
    return re.sub(r"\s+", " ", text).strip()


def answer_matches(prediction: str, answer: str, mode: str = "exact") -> bool:
    """"exact": normalised strings equal; "contains": the normalised answer occurs in the prediction."""
    pred, gold = normalize_answer(prediction), normalize_answer(answer)
    if mode == "exact":
        return pred == gold
    if mode == "contains":
        return bool(gold) and gold in pred
    raise ValueError(f"match: must be 'exact' or 'contains', got {mode!r}")


def accuracy(predictions: Sequence[str], answers: Sequence[str], mode: str = "exact") -> float:
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions but {len(answers)} answers")
    if not answers:
        return 0.0
    return sum(answer_matches(p, a, mode) for p, a in zip(predictions, answers)) / len(answers)
