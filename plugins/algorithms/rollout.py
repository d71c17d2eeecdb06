"""PPO rollouts through the shared inference engine (continuous batching over a paged KV cache).

The engine holds a reference to the actor module, so generation samples from the weights of the
latest optimizer step. Its prefix cache, though, keeps KV blocks computed with the weights of the time
they were filled: a rollout after an update that hit those blocks would condition on stale keys and
values. So :class:`RolloutEngine` keeps ONE engine for the whole run (the KV pool and, on CUDA, the decode
graphs are built once) with prefix caching ON — the samples of a prompt share its blocks within a batch —
and drops every cached prefix (``LLMEngine.reset_prefix_cache``) before each batch, when the weights
may have changed since the last one (tests/stages/test_rollout.py).

Under ZeRO-3 the actor's parameters are partitioned across ranks: there are no full weights to sample
from. Then the engine runs on its own generation copy of the model (built once, in the training dtype, on
the rank's device) and ``weights_from`` names the partitioned actor: before each batch its weights are
gathered one module at a time (``deepspeed.zero.GatheredParameters`` via the trainer's export walk; LoRA
layers merged) and copied into the copy, each gathered module freed before the next — the hybrid-engine
pattern of DeepSpeed-Chat / OpenRLHF. Every rank joins the gathers (they are collective).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .logprobs import IGNORE, right_pad, shifted_labels


@dataclass(frozen=True)
class Rollout:
    prompt_ids: list[int]
    response_ids: list[int]  # generated tokens, the finishing stop token included
    text: str  # the response text (stop token and special tokens dropped)
    finish_reason: str


class RolloutEngine:
    """Samples responses from a model (the actor's live module) with the shared ``LLMEngine``."""

    def __init__(self, model, tokenizer, max_model_len: int, kv_cache_bytes: int | None = None,
                 max_num_seqs: int = 64, block_size: int = 16, weights_from=None):
        from internlm2.core.engine import EngineConfig

        self.model = model
        self.weights_from = weights_from
        self.tokenizer = tokenizer
        self.config = EngineConfig(
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max(2048, max_model_len, max_num_seqs),
            block_size=block_size,
            kv_cache_bytes=kv_cache_bytes,
            enable_prefix_caching=True,
            max_model_len=max_model_len,
        )
        self._engine = self._build()

    def _build(self):
        from internlm2.core.engine import LLMEngine

        was_training = self.model.training
        engine = LLMEngine(self.model, self.tokenizer, self.config)
        self.model.train(was_training)  # LLMEngine switches the module to eval mode; the trainer owns it
        return engine

    @torch.no_grad()
    def sync_weights(self) -> int:
        """Copy the partitioned trained model's current weights into the generation copy (collective);
        returns the number of tensors copied (0 when the engine samples from the trained module itself)."""
        if self.weights_from is None:
            return 0
        from ..trainer.export import iter_export_tensors

        params = dict(self.model.named_parameters())
        copied = 0
        for name, tensor in iter_export_tensors(self.weights_from):
            params[name].copy_(tensor)
            copied += 1
        if copied != len(params):
            raise RuntimeError(f"hybrid engine: {copied} tensors from the trained model, the copy has {len(params)}")
        return copied

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], params) -> list[Rollout]:
        """One response per prompt (repeat a prompt to sample it several times), in prompt order.
        ``params``: one SamplingParams for all, or one per prompt. Every rank calls it (weight sync)."""
        self.sync_weights()
        self._engine.reset_prefix_cache()  # KV cached before the last optimizer step is stale
        outputs = self._engine.generate([list(p) for p in prompts], params)
        rollouts = []
        for prompt, out in zip(prompts, outputs):
            if out.error:
                raise RuntimeError(f"rollout failed: {out.error}")
            rollouts.append(Rollout(list(prompt), list(out.new_token_ids), out.new_text, out.finish_reason or ""))
        return rollouts


@dataclass(frozen=True)
class RolloutBatch:
    """Prompt + response rows, right-padded. ``action_mask[:, t]`` marks positions t whose next token
    ``input_ids[:, t + 1]`` is a response token (the actions); ``labels`` are those next tokens."""

    input_ids: torch.Tensor  # (B, T)
    padding_mask: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T), IGNORE off the actions
    action_mask: torch.Tensor  # (B, T) bool

    def to(self, device) -> RolloutBatch:
        return RolloutBatch(*(t.to(device) for t in (self.input_ids, self.padding_mask, self.labels,
                                                      self.action_mask)))

    def rows(self, index: torch.Tensor) -> RolloutBatch:
        return RolloutBatch(self.input_ids[index], self.padding_mask[index], self.labels[index],
                            self.action_mask[index])


def collate_rollouts(rollouts: Sequence[Rollout], pad_id: int, device=None) -> RolloutBatch:
    ids, padding = right_pad([r.prompt_ids + r.response_ids for r in rollouts], pad_id, device)
    targets, _ = right_pad([[0] * len(r.prompt_ids) + [1] * len(r.response_ids) for r in rollouts], 0, device)
    labels = shifted_labels(ids, targets.bool())
    return RolloutBatch(ids, padding, labels, labels != IGNORE)
