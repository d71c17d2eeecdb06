"""ppo: COOL RLHF's online PPO (InternLM2 report, arXiv 2403.17297, §4.2; settings in
shared/research/training.md §1.5).

Four models of the same family: the actor (from SFT, trained under DeepSpeed), a frozen reference (the
actor's starting weights), the frozen conditional reward model, and the critic (initialised from the
reward model, trained under DeepSpeed). One iteration:

    prompts -> rollouts through the shared engine (the actor's live weights)
            -> score = RM(condition system prompt + prompt + response) [+ w·ROUGE-L(response, reference)]
            -> per-token reward −β·KL(actor‖ref), the score on the last token; GAE (γ 1, λ 0.99)
            -> ppo_epochs x minibatches: clipped policy loss (+ ptx_coef x pretraining LM loss) on the actor,
               clipped value loss on the critic

The critic trains alone for the first ``critic_warmup_iterations`` (the report's 50): its objective
differs from both the SFT model's and the RM's, so actor updates against an untrained critic are
unstable. ``max_steps`` iterations are split into ``rounds``; between rounds the reward model is patched
from the next ``reward_updates`` preference set (the report's fast path: 20-100 targeted pairs per
round against the reward hacks seen), with the reward-model loss, then frozen again.

Rollouts (``algorithms.rollout``): ONE engine for the whole stage, built on the DeepSpeed actor module
(ZeRO <= 2 keeps its full weights in place, so every rollout samples from the latest step), prefix caching
on within a batch and reset before the next (a block cached before an optimizer step is stale).
Memory: actor + critic under DeepSpeed (ZeRO-1/2, optimizer offload optional); reference and RM
frozen in the training dtype on the same device; the KV pool from ``rollout_kv_cache_mb`` (default: one
batch of full-length sequences), never a fraction of free memory that training still needs.
"""

from __future__ import annotations

import json
import math
import random
import shutil
from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import Field, ValidationInfo, field_validator

from internlm2.core import InternLM2ForCausalLM
from internlm2.core.reward import RewardScorer

from ..algorithms import preference
from ..algorithms.datasets import PromptRecord, pack_texts, read_preference_pairs, read_prompts, read_texts
from ..algorithms.models import freeze, reward_model_from_checkpoint
from ..algorithms.ppo_experience import Experience, actor_loss, critic_loss, make_experience
from ..algorithms.reward_loss import reward_model_loss
from ..algorithms.rollout import RolloutEngine, collate_rollouts
from ..algorithms.similarity import rouge_l_batch
from ..contract import ArtifactKind, Stage, StageCancelled, StageContext
from ..trainer import build_engine, load_causal_lm, load_tokenizer, save_final_checkpoint
from ..trainer.config import TrainingConfig
from ..trainer.distributed import any_rank, barrier
from .reward_model import pair_batches, split_scores


class PPOConfig(TrainingConfig):
    """COOL RLHF online PPO. The TrainingConfig fields (lr, schedule, zero_stage, ...) are the actor's;
    ``max_steps`` counts PPO iterations (one rollout batch each)."""

    actor: str | None = Field(None, description="SFT checkpoint the actor starts from; default: the previous "
                              "stage's checkpoint.")
    reference: str | None = Field(None, description="Frozen reference policy; default: the actor's start.")
    reward_model: str = Field(..., description="Conditional reward model checkpoint (InternLM2-Reward layout).")
    critic: str | None = Field(None, description="Critic start; default: the reward model (COOL RLHF).")
    prompts: str = Field(..., description="Prompt JSONL: {prompt: text | messages, reference?: answer text, "
                         "condition?: RM domain}.")
    pretrain_data: str | None = Field(None, description="Pretraining JSONL {text} for the ptx loss; null = none.")
    lr: float = Field(1e-6, gt=0, le=1.0, description="Actor learning rate (report: 1e-6).")
    critic_lr: float = Field(5e-6, gt=0, le=1.0, description="Critic learning rate (report: 5e-6).")
    schedule: Literal["cosine", "linear", "constant"] = Field("constant", description="LR schedule of actor "
                                                              "and critic over their optimizer steps.")
    max_steps: int = Field(400, ge=1, description="PPO iterations in total (report: ~400 over 3 rounds).")
    rounds: int = Field(3, ge=1, description="Online rounds; the reward model may be updated between them.")
    critic_warmup_iterations: int = Field(50, ge=0, validate_default=True,
                                          description="First iterations train the critic only (report: 50).")
    rollout_batch_size: int = Field(16, ge=1, description="Prompts per iteration (per rank).")
    samples_per_prompt: int = Field(1, ge=1, description="Responses sampled per prompt.")
    ppo_epochs: int = Field(1, ge=1, description="Passes over each rollout batch.")
    minibatch_size: int = Field(8, ge=1, description="Rollouts per optimizer step (actor and critic).")
    kl_coef: float = Field(0.01, ge=0, description="β of the per-token KL(actor‖ref) penalty (report: 0.01).")
    gamma: float = Field(1.0, gt=0, le=1, description="GAE discount γ.")
    lam: float = Field(0.99, ge=0, le=1, description="GAE λ (report: 0.99).")
    clip_ratio: float = Field(0.2, gt=0, description="ε of the clipped policy loss.")
    value_clip: float | None = Field(0.2, gt=0, description="ε of the clipped value loss (null = unclipped).")
    whiten_advantages: bool = Field(False, description="Normalise advantages per batch (the report does not).")
    score_clip: float | None = Field(None, gt=0, description="Clip sequence scores to ±this before the KL term.")
    ptx_coef: float = Field(0.5, ge=0, description="Weight of the pretraining LM loss on the actor (report: 0.5).")
    ptx_batch_size: int = Field(4, ge=1, description="Pretraining rows per actor step.")
    ptx_seq_len: int = Field(512, ge=8, description="Tokens per pretraining row.")
    alignment_weight: float = Field(0.0, ge=0, description="Weight of ROUGE-L(response, the prompt's reference) "
                                    "added to the score (the seed's alignment loss; 0 = off).")
    conditions: dict[str, str] = Field(default_factory=lambda: dict(preference.DEFAULT_CONDITIONS),
                                       description="Condition (domain) -> RM system prompt.")
    default_condition: str | None = Field(None, description="RM condition of prompts that name none.")
    temperature: float = Field(1.0, gt=0, description="Rollout sampling temperature.")
    top_p: float = Field(0.9, gt=0, le=1, description="Rollout nucleus sampling (report: 0.9).")
    top_k: int = Field(0, ge=0, description="Rollout top-k (0 = off).")
    max_new_tokens: int = Field(256, ge=1, description="Longest response.")
    max_prompt_length: int = Field(1024, ge=1, description="Longer prompts are skipped.")
    rollout_kv_cache_mb: int | None = Field(None, ge=1, description="KV pool of the rollout engine; default: "
                                            "enough for the batch's full-length sequences.")
    reward_updates: list[str] = Field(default_factory=list, description="Preference sets patching the reward "
                                      "model after round 1, 2, ... (fast path); fewer than rounds-1 is fine.")
    reward_update_steps: int = Field(20, ge=1, description="Reward-model optimizer steps per update.")
    reward_update_lr: float = Field(1e-5, gt=0, le=1.0, description="Reward-model learning rate for updates.")
    reward_pairs_per_batch: int = Field(8, ge=1, description="Pairs per reward-model update micro-batch.")
    checkpoint_every: int = Field(10, ge=0, description="Save a resumable checkpoint every N iterations.")

    @field_validator("zero_stage")
    @classmethod
    def _zero3_unsupported(cls, v: int) -> int:
        if v == 3:
            raise ValueError("ppo needs zero_stage <= 2: rollouts read the actor's full weights in place")
        return v

    @field_validator("critic_warmup_iterations")
    @classmethod
    def _actor_must_train(cls, v: int, info: ValidationInfo) -> int:
        if "max_steps" in info.data and v >= info.data["max_steps"]:
            raise ValueError(f"{v} warm-up iterations leave none of max_steps={info.data['max_steps']} to the actor")
        return v


# ------------------------------------------------------------------------------------------------ losses
def actor_loss_fn(ptx_coef: float, clip: float):
    """Clipped policy loss, plus ``ptx_coef`` x the LM loss on the minibatch's pretraining rows if any."""

    def loss_fn(model, batch):
        pg = actor_loss(model, batch, clip)
        extras = {"policy_loss": float(pg.loss.detach()), "clip_fraction": pg.clip_fraction, "approx_kl": pg.approx_kl}
        loss = pg.loss
        if "ptx_ids" in batch:
            ptx = model.loss(batch["ptx_ids"][:, :-1], batch["ptx_ids"][:, 1:])
            loss = loss + ptx_coef * ptx
            extras["ptx_loss"] = float(ptx.detach())
        return loss, extras

    return loss_fn


def critic_loss_fn(clip: float | None):
    """Clipped value loss of the critic on a minibatch."""

    def loss_fn(model, batch):
        out = critic_loss(model, batch, clip)
        return out.loss, {"value_clip_fraction": out.clip_fraction}

    return loss_fn


def kv_cache_bytes(config, num_seqs: int, max_len: int, dtype: torch.dtype, block_size: int = 16) -> int:
    """K and V of every layer for ``num_seqs`` sequences of ``max_len`` tokens (+ a partial block each)."""
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim
    return per_token * torch.finfo(dtype).bits // 8 * num_seqs * (max_len + block_size)


# ------------------------------------------------------------------------------------------------ the loop
class PPORun:
    """State of one PPO stage run: models, engines, data, history; ``run()`` drives the iterations."""

    def __init__(self, ctx: StageContext):
        self.ctx = ctx
        self.cfg: PPOConfig = ctx.config
        cfg = self.cfg
        actor_dir = ctx.resolve_model(cfg.actor)
        self.tokenizer = load_tokenizer(actor_dir)
        rm_dir = ctx.resolve(cfg.reward_model)
        critic_dir = ctx.resolve(cfg.critic) if cfg.critic else rm_dir

        self.records = [r for r in read_prompts(ctx.resolve(cfg.prompts, "dataset"))
                        if len(self.tokenizer.encode_chat(r.messages)) <= cfg.max_prompt_length]
        if not self.records:
            raise ValueError(f"prompts: none fits max_prompt_length={cfg.max_prompt_length}")
        self.ptx_rows = []
        if cfg.pretrain_data and cfg.ptx_coef > 0:
            self.ptx_rows = pack_texts(self.tokenizer, read_texts(ctx.resolve(cfg.pretrain_data, "dataset")),
                                       cfg.ptx_seq_len + 1)

        # The trained pair: fp32 on the CPU, DeepSpeed moves them, casts them and keeps fp32 masters.
        self.actor = load_causal_lm(actor_dir)
        self.critic = reward_model_from_checkpoint(critic_dir, None, device="cpu", dtype=torch.float32).train()
        if self.critic.config.vocab_size != self.actor.config.vocab_size:
            raise ValueError("critic: its vocabulary differs from the actor's; they must share a tokenizer")
        self.updates_per_iteration = cfg.ppo_epochs * math.ceil(
            cfg.rollout_batch_size * cfg.samples_per_prompt / cfg.minibatch_size)
        actor_steps = max(1, (cfg.max_steps - min(cfg.critic_warmup_iterations, cfg.max_steps))
                          * self.updates_per_iteration)
        common = {"gradient_accumulation_steps": 1, "micro_batch_size": cfg.minibatch_size}
        self.actor_engine = build_engine(self.actor, actor_loss_fn(cfg.ptx_coef, cfg.clip_ratio),
                                         cfg.model_copy(update={**common, "max_steps": actor_steps}))
        self.critic_engine = build_engine(self.critic, critic_loss_fn(cfg.value_clip), cfg.model_copy(update={
            **common, "lr": cfg.critic_lr, "max_steps": cfg.max_steps * self.updates_per_iteration}))
        self.device = self.actor_engine.device

        # The frozen pair, in the dtype the actor now computes in, on its device.
        dtype = self.actor.dtype
        self.reference = freeze(InternLM2ForCausalLM.from_pretrained(
            ctx.resolve(cfg.reference) if cfg.reference else actor_dir, device=self.device, dtype=dtype))
        self.reward_model = freeze(reward_model_from_checkpoint(rm_dir, None, device=self.device, dtype=dtype))
        if self.reward_model.config.vocab_size != self.actor.config.vocab_size:
            raise ValueError("reward_model: its vocabulary differs from the actor's; they must share a tokenizer")
        self.scorer = RewardScorer(self.reward_model, self.tokenizer)
        self.rollouts = self._rollout_engine()
        self.history: list[dict[str, float]] = []
        self.start = 0

    # ---- setup -----------------------------------------------------------------------------------
    def _rollout_engine(self) -> RolloutEngine:
        cfg = self.cfg
        num_seqs = cfg.rollout_batch_size * cfg.samples_per_prompt
        max_len = cfg.max_prompt_length + cfg.max_new_tokens
        max_len = min(max_len, self.actor.config.max_position_embeddings)
        kv = (cfg.rollout_kv_cache_mb * 2**20 if cfg.rollout_kv_cache_mb
              else kv_cache_bytes(self.actor.config, num_seqs, max_len, self.actor.dtype))
        return RolloutEngine(self.actor, self.tokenizer, max_model_len=max_len, kv_cache_bytes=kv,
                             max_num_seqs=min(num_seqs, 256))

    def iterations_per_round(self) -> int:
        return math.ceil(self.cfg.max_steps / self.cfg.rounds)

    # ---- one iteration ---------------------------------------------------------------------------
    def sample_prompts(self, iteration: int) -> list[PromptRecord]:
        # Seeded by the iteration (and rank): a resumed run draws the same prompts.
        rng = random.Random(self.cfg.seed * 1_000_003 + iteration * 7919 + self.ctx.rank)
        return [rng.choice(self.records) for _ in range(self.cfg.rollout_batch_size)]

    def condition_of(self, record: PromptRecord) -> str | None:
        return preference.condition_prompt(record.condition or self.cfg.default_condition, self.cfg.conditions)

    def scores(self, records: Sequence[PromptRecord], texts: Sequence[str]) -> tuple[torch.Tensor, dict]:
        """RM score (+ weighted ROUGE-L to the reference) per response, and their means for the log."""
        sequences = [self.scorer.encode([*r.messages, {"role": "assistant", "content": t}], self.condition_of(r))
                     for r, t in zip(records, texts)]
        rm = torch.tensor(self.scorer.score_ids(sequences), dtype=torch.float32)
        stats = {"rm_score": float(rm.mean())}
        total = rm
        if self.cfg.alignment_weight > 0:
            sim = torch.tensor(rouge_l_batch(texts, [r.reference for r in records]), dtype=torch.float32)
            total = rm + self.cfg.alignment_weight * sim
            stats["rouge_l"] = float(sim.mean())
        return total, stats

    def experience(self, iteration: int) -> tuple[Experience, dict]:
        from internlm2.core.engine import SamplingParams

        cfg = self.cfg
        records = [r for r in self.sample_prompts(iteration) for _ in range(cfg.samples_per_prompt)]
        prompts = [self.tokenizer.encode_chat(r.messages) for r in records]
        base_seed = cfg.seed + iteration * 65537 + self.ctx.rank * 4099  # reproducible on resume
        params = [SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                                 max_new_tokens=cfg.max_new_tokens, seed=(base_seed + i) % 2**62)
                  for i in range(len(prompts))]
        rollouts = self.rollouts.generate(prompts, params)
        scores, stats = self.scores(records, [r.text for r in rollouts])
        batch = collate_rollouts(rollouts, self.tokenizer.pad_id, self.device)
        exp = make_experience(self.actor, self.reference, self.critic, batch, scores, cfg.kl_coef, cfg.gamma,
                              cfg.lam, cfg.score_clip, cfg.whiten_advantages)
        stats["truncated"] = sum(r.finish_reason == "length" for r in rollouts) / len(rollouts)
        return exp, stats

    def ptx_batch(self, step: int) -> torch.Tensor | None:
        if not self.ptx_rows:
            return None
        n = self.cfg.ptx_batch_size
        rows = [self.ptx_rows[(step * n + i) % len(self.ptx_rows)] for i in range(n)]
        width = min(len(r) for r in rows)
        return torch.tensor([r[:width] for r in rows], device=self.device)

    def train_on(self, exp: Experience, iteration: int) -> dict[str, float]:
        cfg = self.cfg
        update_actor = iteration >= cfg.critic_warmup_iterations
        generator = torch.Generator().manual_seed(cfg.seed + iteration)
        sums: dict[str, float] = {}
        count = 0
        for _ in range(cfg.ppo_epochs):
            for rows in exp.minibatches(cfg.minibatch_size, generator):
                batch = exp.minibatch(rows)
                if update_actor:
                    ptx = self.ptx_batch(iteration * self.updates_per_iteration + count)
                    actor_batch = batch if ptx is None else {**batch, "ptx_ids": ptx}
                    loss, extras = self.actor_engine(actor_batch)
                    self.actor_engine.backward(loss)
                    self.actor_engine.step()
                    extras = {**extras, "actor_loss": float(loss.detach())}
                else:
                    extras = {}
                value_loss, value_extras = self.critic_engine(batch)
                self.critic_engine.backward(value_loss)
                self.critic_engine.step()
                for k, v in {**extras, **value_extras, "value_loss": float(value_loss.detach())}.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
                count += 1
        out = {k: v / max(count, 1) for k, v in sums.items()}
        out["actor_updated"] = float(update_actor)
        return out

    # ---- reward model fast path ------------------------------------------------------------------
    def update_reward_model(self, round_index: int) -> dict[str, float]:
        """Patch the RM with reward_updates[round_index] (pairs from the hacks of the round just done)."""
        cfg = self.cfg
        pairs = read_preference_pairs(self.ctx.resolve(cfg.reward_updates[round_index], "dataset"))
        batches, _ = pair_batches(self.tokenizer, pairs, self.reward_model.config.reward_token_id,
                                  conditions=cfg.conditions, default_condition=cfg.default_condition,
                                  max_length=cfg.max_prompt_length + cfg.max_new_tokens + 64,
                                  pairs_per_batch=cfg.reward_pairs_per_batch, batch_tokens=None)
        if not batches:
            raise ValueError(f"reward_updates[{round_index}]: no usable pair")

        def loss_fn(model, batch):
            chosen, rejected = split_scores(model, batch)
            out = reward_model_loss(chosen, rejected)
            return out.loss, {"accuracy": out.accuracy}

        self.reward_model.requires_grad_(True).train()
        engine = build_engine(self.reward_model, loss_fn, self.cfg.model_copy(update={
            "lr": cfg.reward_update_lr, "max_steps": cfg.reward_update_steps, "schedule": "constant",
            "gradient_accumulation_steps": 1, "micro_batch_size": cfg.reward_pairs_per_batch}))
        accuracy = 0.0
        for step in range(cfg.reward_update_steps):
            batch = {k: v.to(self.device) for k, v in batches[step % len(batches)].items()}
            loss, extras = engine(batch)
            engine.backward(loss)
            engine.step()
            accuracy = extras["accuracy"]
        engine.destroy()  # removes its gradient hooks; the optimizer state goes with it
        freeze(self.reward_model)
        return {"rm_update_loss": float(loss.detach()), "rm_update_accuracy": accuracy, "rm_update_pairs": len(pairs)}

    # ---- checkpoints -----------------------------------------------------------------------------
    def save(self, iteration: int) -> None:
        ctx = self.ctx
        tag = f"iter-{iteration:08d}"
        folder = ctx.checkpoint_dir / tag
        self.actor_engine.save_checkpoint(str(folder), tag="actor", save_latest=False)
        self.critic_engine.save_checkpoint(str(folder), tag="critic", save_latest=False)
        if ctx.is_main:
            if self.cfg.reward_updates:  # the RM changes between rounds: keep the current one
                self.reward_model.save_pretrained(folder / "reward_model")
            (folder / "state.json").write_text(json.dumps({"iteration": iteration, "history": self.history}))
        barrier()  # every rank's shards are on disk before the tag is committed
        ctx.commit_checkpoint(tag)
        if ctx.is_main:
            for old in sorted(p for p in ctx.checkpoint_dir.glob("iter-*") if p.is_dir())[:-self.cfg.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)

    def resume(self) -> None:
        latest = self.ctx.latest_checkpoint()
        if latest is None:
            return
        self.actor_engine.load_checkpoint(str(latest), tag="actor")
        self.critic_engine.load_checkpoint(str(latest), tag="critic")
        if (latest / "reward_model").is_dir():
            from internlm2.core.checkpoint import iter_tensors, weight_files

            state = dict(iter_tensors(weight_files(latest / "reward_model")))
            self.reward_model.load_state_dict(state)
        state = json.loads((latest / "state.json").read_text())
        self.start, self.history = int(state["iteration"]), list(state["history"])
        self.ctx.log(f"resumed from {latest.name} (iteration {self.start})")

    # ---- driver ----------------------------------------------------------------------------------
    def run(self) -> dict[str, float]:
        cfg, ctx = self.cfg, self.ctx
        self.resume()
        per_round = self.iterations_per_round()
        for iteration in range(self.start, cfg.max_steps):
            if any_rank(ctx.should_cancel()):
                raise StageCancelled(f"stage {ctx.name} cancelled at iteration {iteration}")
            metrics: dict[str, float] = {}
            if iteration and iteration % per_round == 0:
                round_index = iteration // per_round - 1
                if round_index < len(cfg.reward_updates):
                    metrics.update(self.update_reward_model(round_index))
                    ctx.log(f"reward model updated after round {round_index + 1}")
            exp, stats = self.experience(iteration)
            metrics.update(stats)
            metrics.update(exp.stats())
            metrics.update(self.train_on(exp, iteration))
            metrics["round"] = float(iteration // per_round + 1)
            self.history.append({"step": iteration + 1, **metrics})
            ctx.report_progress(iteration + 1, cfg.max_steps, **metrics)
            done = iteration + 1
            if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.max_steps:
                self.save(done)
        return self.finish()

    def close(self) -> None:
        """Releases the DeepSpeed engines (their gradient hooks and optimizer state)."""
        for engine in (self.actor_engine, self.critic_engine):
            engine.destroy()

    def finish(self) -> dict[str, float]:
        ctx = self.ctx
        scores = [h["score"] for h in self.history]
        k = max(1, min(5, len(scores) // 3))
        summary = {**(self.history[-1] if self.history else {}),
                   "score_first": sum(scores[:k]) / k if scores else 0.0,
                   "score_last": sum(scores[-k:]) / k if scores else 0.0}
        summary.pop("step", None)
        doc = {"stage": ctx.stage, "name": ctx.name, "steps": self.cfg.max_steps, "resumed_from": self.start,
               "final": summary, "history": self.history}
        save_final_checkpoint(ctx, self.actor, self.tokenizer, doc)
        if ctx.is_main:
            self.critic.save_pretrained(ctx.output_dir / "critic")
            self.tokenizer.save_pretrained(ctx.output_dir / "critic")
            ctx.add_artifact("critic", ctx.output_dir / "critic", ArtifactKind.CHECKPOINT)
            if self.cfg.reward_updates:
                self.reward_model.save_pretrained(ctx.output_dir / "reward_model")
                self.tokenizer.save_pretrained(ctx.output_dir / "reward_model")
                ctx.add_artifact("reward_model", ctx.output_dir / "reward_model", ArtifactKind.CHECKPOINT)
        return summary


def run(ctx: StageContext) -> dict[str, float]:
    """Run COOL RLHF online PPO rounds; write the actor (final/), the critic and any updated reward model."""
    ppo = PPORun(ctx)
    try:
        return ppo.run()
    finally:
        ppo.close()


STAGE = Stage(
    name="ppo",
    description="COOL RLHF online PPO: actor from SFT, frozen reference, frozen conditional reward model, "
    "critic from the RM with a critic-only warm-up; rollouts through the shared engine; reward −β·KL + RM "
    "score (+ optional ROUGE-L to a reference answer), GAE (γ 1, λ 0.99), clipped policy/value losses, ptx "
    "loss (0.5); several rounds with reward-model fast-path updates between them.",
    config_model=PPOConfig,
    run=run,
)
