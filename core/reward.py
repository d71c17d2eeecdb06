"""Reward scoring the way InternLM2-Reward's ``get_score`` does it.

A conversation is rendered with the chat template (no generation prompt), encoded, and the reward
token (``reward_token_id``, 92527 for the released models) is appended; the score is ``v_head`` at that
token. COOL RLHF's conditional reward model reads a per-domain system prompt: ``condition`` is put
in front of the conversation as a system message.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .model import InternLM2ForRewardModel


def with_condition(conversation: Sequence[dict], condition: str | None) -> list[dict]:
    messages = list(conversation)
    if condition:
        messages = [{"role": "system", "content": condition}, *messages]
    return messages


class RewardScorer:
    def __init__(self, model: InternLM2ForRewardModel, tokenizer, max_batch_tokens: int = 16384):
        if model.config.reward_token_id is None:
            raise ValueError("reward_token_id: the reward model's config.json does not set it")
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_tokens = max_batch_tokens

    def encode(self, conversation: Sequence[dict], condition: str | None = None) -> list[int]:
        # get_score reads an assistant's tool call (official agent format) as its special tokens; user and
        # environment text stays text.
        ids = self.tokenizer.encode_chat(with_condition(conversation, condition), add_generation_prompt=False,
                                         assistant_actions=True)
        return [*ids, self.model.config.reward_token_id]

    @torch.inference_mode()
    def score_ids(self, sequences: list[list[int]]) -> list[float]:
        """Scores for already-encoded sequences (each ending in the reward token), batched with right padding."""
        scores: list[float] = [0.0] * len(sequences)
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
        start = 0
        while start < len(order):
            end = start + 1
            while end < len(order) and len(sequences[order[end]]) * (end - start + 1) <= self.max_batch_tokens:
                end += 1
            batch = [sequences[i] for i in order[start:end]]
            width = max(len(s) for s in batch)
            ids = torch.full((len(batch), width), self.tokenizer.pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.bool)
            for row, seq in enumerate(batch):
                ids[row, : len(seq)] = torch.tensor(seq)
                mask[row, : len(seq)] = True
            values = self.model.score(ids.to(self.model.device), mask.to(self.model.device))
            for i, value in zip(order[start:end], values.tolist()):
                scores[i] = value
            start = end
        return scores

    def score(self, conversations: Sequence[Sequence[dict]], condition: str | None = None) -> list[float]:
        return self.score_ids([self.encode(c, condition) for c in conversations])
