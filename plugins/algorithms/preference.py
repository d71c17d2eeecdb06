"""Preference pairs -> token ids for the conditional reward model and for DPO.

A pair is the XTuner-compatible record ``{"prompt": [messages], "chosen": [assistant message(s)],
"rejected": [...], "condition": "code"}`` (OpenAI-style messages). ``condition`` is COOL RLHF's domain:
a key of the condition table (-> its system prompt) or, if it is not a key, the system prompt itself.

Reward model: the whole conversation (condition system prompt + prompt + answer) is rendered with the
chat template and the reward token is appended — exactly what ``RewardScorer.encode`` does when the
model serves, so the score is trained where it is read.

DPO: the prompt is rendered with the generation prompt (``<|im_start|>assistant\\n``) and each answer is
encoded on its own and closed with ``<|im_end|>`` — the token sequence the policy itself emits when it
generates, which ``encode_chat`` of the whole conversation does not always give (BPE merges the text
across the template's newline).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from internlm2.core.reward import with_condition
from internlm2.core.tokenizer.specials import IM_END

from .logprobs import right_pad, shifted_labels

# COOL RLHF steers one reward model with a per-domain system prompt (InternLM2 report, Fig. 8 contrasts
# it with LLaMA-2's separate helpful/safe RMs). The report does not publish its prompts; these are ours.
DEFAULT_CONDITIONS: dict[str, str] = {
    "helpful": "You are a reward model judging helpfulness: prefer answers that follow the instruction "
               "fully, correctly and clearly.",
    "harmless": "You are a reward model judging safety: prefer answers that avoid harm, refuse dangerous "
                "requests politely and stay honest.",
    "code": "You are a reward model judging code: prefer correct, runnable, idiomatic and well-explained "
            "code.",
    "math": "You are a reward model judging mathematics: prefer correct final answers with sound reasoning.",
    "writing": "You are a reward model judging writing: prefer fluent, creative text that fits the request.",
    "summarization": "You are a reward model judging summaries: prefer faithful, concise and complete ones.",
}


@dataclass(frozen=True)
class PreferencePair:
    prompt: list[dict]
    chosen: list[dict]
    rejected: list[dict]
    condition: str | None = None


def _messages(value: Any, where: str) -> list[dict]:
    if not isinstance(value, list) or not all(isinstance(m, Mapping) for m in value):
        raise ValueError(f"{where}: must be a list of messages")
    return [dict(m) for m in value]


def parse_pair(record: Mapping[str, Any], where: str = "pair") -> PreferencePair:
    """Validate one preference record; errors name the field (``pairs[3].chosen``)."""
    for key in ("prompt", "chosen", "rejected"):
        if key not in record:
            raise ValueError(f"{where}.{key}: missing")
    condition = record.get("condition")
    if condition is not None and not isinstance(condition, str):
        raise ValueError(f"{where}.condition: must be a string")
    pair = PreferencePair(
        _messages(record["prompt"], f"{where}.prompt"),
        _messages(record["chosen"], f"{where}.chosen"),
        _messages(record["rejected"], f"{where}.rejected"),
        condition or None,
    )
    for key in ("chosen", "rejected"):
        answer = getattr(pair, key)
        if not answer or answer[-1].get("role") != "assistant":
            raise ValueError(f"{where}.{key}: must end with an assistant message")
    return pair


def condition_prompt(condition: str | None, table: Mapping[str, str]) -> str | None:
    """The system prompt of a condition: the table's entry for a domain key, else the string itself."""
    if not condition:
        return None
    return table.get(condition, condition)


def reward_sequence(tokenizer, messages: Sequence[dict], condition: str | None,
                    reward_token_id: int) -> list[int]:
    """Conversation ids + the reward token, as served (``RewardScorer.encode``)."""
    ids = tokenizer.encode_chat(with_condition(messages, condition), add_generation_prompt=False,
                                assistant_actions=True)
    return [*ids, reward_token_id]


def reward_pair_ids(tokenizer, pair: PreferencePair, reward_token_id: int,
                    conditions: Mapping[str, str]) -> tuple[list[int], list[int]]:
    system = condition_prompt(pair.condition, conditions)
    return (reward_sequence(tokenizer, pair.prompt + pair.chosen, system, reward_token_id),
            reward_sequence(tokenizer, pair.prompt + pair.rejected, system, reward_token_id))


def response_ids(tokenizer, answer: Sequence[dict]) -> list[int]:
    """The last assistant message as the policy emits it: its text's tokens, then ``<|im_end|>``."""
    from ..data.tokenize import assistant_content_ids

    im_end = tokenizer.special_tokens[IM_END]
    last = answer[-1]
    return [*assistant_content_ids(tokenizer, last.get("content") or "", last.get("tool_calls") or ()), im_end]


def dpo_pair_ids(tokenizer, pair: PreferencePair) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids ending in the generation prompt, chosen response ids, rejected response ids).

    Earlier assistant turns of a multi-turn answer belong to the context, not to the scored response.
    """
    prompt = tokenizer.encode_chat(pair.prompt, add_generation_prompt=True)
    chosen_ctx = tokenizer.encode_chat(pair.prompt + pair.chosen[:-1], add_generation_prompt=True)
    rejected_ctx = tokenizer.encode_chat(pair.prompt + pair.rejected[:-1], add_generation_prompt=True)
    if chosen_ctx != prompt or rejected_ctx != prompt:
        raise ValueError("chosen/rejected: DPO pairs must share their context; only the last assistant "
                         "message may differ")
    return prompt, response_ids(tokenizer, pair.chosen), response_ids(tokenizer, pair.rejected)


# ------------------------------------------------------------------------------------------------ batches
@dataclass(frozen=True)
class RewardBatch:
    """Chosen rows then rejected rows: ids [2N, T], padding_mask [2N, T]."""

    input_ids: torch.Tensor
    padding_mask: torch.Tensor

    @property
    def num_pairs(self) -> int:
        return self.input_ids.shape[0] // 2


def collate_reward(pairs: Sequence[tuple[list[int], list[int]]], pad_id: int, device=None) -> RewardBatch:
    rows = [c for c, _ in pairs] + [r for _, r in pairs]
    ids, mask = right_pad(rows, pad_id, device)
    return RewardBatch(ids, mask)


@dataclass(frozen=True)
class DPOBatch:
    """Chosen rows then rejected rows: ids, padding_mask and labels (response tokens only) [2N, T]."""

    input_ids: torch.Tensor
    padding_mask: torch.Tensor
    labels: torch.Tensor

    @property
    def num_pairs(self) -> int:
        return self.input_ids.shape[0] // 2


def collate_dpo(items: Sequence[tuple[list[int], list[int], list[int]]], pad_id: int,
                device=None) -> DPOBatch:
    rows, targets = [], []
    for prompt, chosen, _ in items:
        rows.append(prompt + chosen)
        targets.append([0] * len(prompt) + [1] * len(chosen))
    for prompt, _, rejected in items:
        rows.append(prompt + rejected)
        targets.append([0] * len(prompt) + [1] * len(rejected))
    ids, mask = right_pad(rows, pad_id, device)
    target_mask = right_pad(targets, 0, device)[0].bool()
    return DPOBatch(ids, mask, shifted_labels(ids, target_mask))


def plan_batches(lengths: Sequence[int], max_items: int, max_tokens: int | None = None,
                 rows_per_item: int = 2) -> list[list[int]]:
    """Group item indices (in the given order) into micro-batches of at most ``max_items`` items and,
    when ``max_tokens`` is set, at most that many padded tokens (rows x longest row) — the report's
    constant-token RM batches. An item longer than the budget gets a batch of its own."""
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i, n in enumerate(lengths):
        grown = max(longest, n)
        over_tokens = max_tokens is not None and rows_per_item * (len(current) + 1) * grown > max_tokens
        if current and (len(current) >= max_items or over_tokens):
            batches.append(current)
            current, grown = [], n
        current.append(i)
        longest = grown
    if current:
        batches.append(current)
    return batches
