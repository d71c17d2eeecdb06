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

Scale (7B on 8x80 GB): the actor and the critic are built where they train (``trainer.loading``: on the
meta device / under ``deepspeed.zero.Init``, no full host copy per rank) and trained under any ZeRO stage.
Under ZeRO-3 every forward of theirs goes through their engines (``engine_forward``: a weight read
outside the engine's forward is an empty partition), and rollouts run on a generation copy refreshed from
the partitions one module at a time before each batch (``RolloutEngine(weights_from=...)``, the hybrid
engine); below ZeRO-3 the engine samples from the actor module itself. The frozen reference and reward
model are held in the compute dtype (bf16 on CUDA); ``frozen_offload`` keeps them on the CPU and moves
each to the device only for its own forward. A reward-model update given as a checkpoint folder (e.g. an
``rm_patch`` stage's output) is loaded INTO the existing reward model — no second engine.

At scale the numbers are the whole run's: losses are token sums over the global count of response tokens
of the minibatch (all ranks), every logged metric is the mean over ranks, each rank draws its own ptx rows,
and the log-probs are those of the sampling distribution (logits / temperature).

The online loop: every iteration's rollouts (prompt, response, scores, KL, truncation) are appended to
``rollouts.jsonl`` (artifact ``rollouts``; ``rollout_token_kl`` adds the per-token KL). A round can be its
own pipeline stage: ``ppo`` (round 1) -> ``rm_patch`` (pairs from round 1's rollouts and a judge) -> ``ppo``
(round 2: ``actor: stage:<round 1>``, ``critic: stage:<round 1>/critic``, ``reward_model: stage:rm_patch``,
``reference`` the SFT model, ``critic_warmup_iterations: 0``).
"""

from __future__ import annotations

import json
import math
import random
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, ValidationInfo, field_validator

from internlm2.core import InternLM2ForCausalLM
from internlm2.core.checkpoint import load_weights_into
from internlm2.core.reward import RewardScorer

from ..algorithms import preference
from ..algorithms.datasets import PromptRecord, pack_texts, read_preference_pairs, read_prompts, read_texts
from ..algorithms.models import freeze, frozen_dtype, reward_model_from_checkpoint
from ..algorithms.ppo_experience import (
    Experience,
    actor_loss,
    critic_loss,
    critic_values,
    make_experience,
    policy_logprobs,
)
from ..algorithms.reward_loss import reward_model_loss
from ..algorithms.reward_shaping import penalize_truncated
from ..algorithms.rollout import Rollout, RolloutEngine, collate_rollouts
from ..algorithms.similarity import rouge_l_batch
from ..contract import ArtifactKind, Stage, StageCancelled, StageContext
from ..trainer import (
    apply_lora,
    build_engine,
    engine_forward,
    export_model,
    is_partitioned,
    load_causal_lm,
    load_reward_model,
    load_tokenizer,
    save_final_checkpoint,
    training_dtype,
)
from ..trainer.config import TrainingConfig
from ..trainer.distributed import any_rank, barrier, mean_across_ranks, sum_across_ranks
from ..trainer.tracking import MetricsTracker
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
    temperature: float = Field(1.0, gt=0, description="Rollout sampling temperature; the actor's and the "
                               "reference's log-probs are those of softmax(logits / temperature).")
    top_p: float = Field(0.9, gt=0, le=1, description="Rollout nucleus sampling (report: 0.9).")
    top_k: int = Field(0, ge=0, description="Rollout top-k (0 = off).")
    max_new_tokens: int = Field(256, ge=1, description="Longest response.")
    max_prompt_length: int = Field(1024, ge=1, description="Longer prompts are skipped.")
    rollout_kv_cache_mb: int | None = Field(None, ge=1, description="KV pool of the rollout engine; default: "
                                            "enough for the batch's full-length sequences.")
    truncation_penalty: float | None = Field(None, ge=0, description="Subtracted from the score of a response "
                                             "cut at max_new_tokens (it never closed its turn); null = none.")
    frozen_offload: bool = Field(False, description="Keep the reference and reward model on the CPU, each moved "
                                 "to the device only for its own forward (frees ~2 bytes/param x 2 per GPU).")
    rollout_token_kl: bool = Field(False, description="rollouts.jsonl also lists each response's per-token KL.")
    reward_updates: list[str] = Field(default_factory=list, description="Reward-model updates after round 1, "
                                      "2, ...: a checkpoint folder (e.g. an rm_patch stage's final) is loaded into "
                                      "the reward model in place; a preference JSONL is trained in (fast path, "
                                      "small models). Fewer than rounds-1 is fine.")
    reward_update_steps: int = Field(20, ge=1, description="Reward-model optimizer steps per update.")
    reward_update_lr: float = Field(1e-5, gt=0, le=1.0, description="Reward-model learning rate for updates.")
    reward_pairs_per_batch: int = Field(8, ge=1, description="Pairs per reward-model update micro-batch.")
    checkpoint_every: int = Field(10, ge=0, description="Save a resumable checkpoint every N iterations.")

    @field_validator("critic_warmup_iterations")
    @classmethod
    def _actor_must_train(cls, v: int, info: ValidationInfo) -> int:
        if "max_steps" in info.data and v >= info.data["max_steps"]:
            raise ValueError(f"{v} warm-up iterations leave none of max_steps={info.data['max_steps']} to the actor")
        return v


# ------------------------------------------------------------------------------------------------ losses
def actor_loss_fn(ptx_coef: float, clip: float, temperature: float):
    """Clipped policy loss, plus ``ptx_coef`` x the LM loss on the minibatch's pretraining rows if any."""

    def loss_fn(model, batch):
        pg = actor_loss(model, batch, clip, temperature)
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


def ptx_row_indices(step: int, rank: int, world_size: int, rows_per_step: int, num_rows: int) -> list[int]:
    """Pretraining rows of actor update ``step`` on ``rank``: the ranks of a step read disjoint rows
    (until the corpus wraps), so data parallelism sees world_size x the rows, not one set repeated."""
    first = (step * world_size + rank) * rows_per_step
    return [(first + i) % num_rows for i in range(rows_per_step)]


class Frozen:
    """A frozen model (reference, reward model) in the compute dtype; with ``offload`` it lives on the CPU
    and visits ``device`` only inside ``with frozen.on_device():``."""

    def __init__(self, model, device: torch.device, offload: bool):
        self.device, self.offload = torch.device(device), offload
        self.model = freeze(model.to("cpu" if offload else self.device))

    def on_device(self):
        frozen = self

        class _Visit:
            def __enter__(self):
                if frozen.offload:
                    frozen.model.to(frozen.device)
                return frozen.model

            def __exit__(self, *exc):
                if frozen.offload:
                    frozen.model.to("cpu")

        return _Visit()


def gather_rows(rows: list[dict]) -> list[dict]:
    """Every rank's rows on every rank (rank order); the rows themselves on one rank."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return rows
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, rows)
    return [r for part in out for r in part]


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

        # The trained pair, built where they train (partitioned under ZeRO-3) in the training dtype.
        # lora_rank > 0: adapters on the actor only (the critic, a new head on the RM, trains in full);
        # rollouts sample through the adapters, and final/ is written merged in the official layout.
        self.actor = apply_lora(load_causal_lm(actor_dir, cfg), cfg)
        self.critic = load_reward_model(critic_dir, None, cfg)
        if self.critic.config.vocab_size != self.actor.config.vocab_size:
            raise ValueError("critic: its vocabulary differs from the actor's; they must share a tokenizer")
        self.updates_per_iteration = cfg.ppo_epochs * math.ceil(
            cfg.rollout_batch_size * cfg.samples_per_prompt / cfg.minibatch_size)
        actor_steps = max(1, (cfg.max_steps - min(cfg.critic_warmup_iterations, cfg.max_steps))
                          * self.updates_per_iteration)
        common = {"gradient_accumulation_steps": 1, "micro_batch_size": cfg.minibatch_size}
        self.actor_engine = build_engine(self.actor, actor_loss_fn(cfg.ptx_coef, cfg.clip_ratio, cfg.temperature),
                                         cfg.model_copy(update={**common, "max_steps": actor_steps}))
        self.critic_engine = build_engine(self.critic, critic_loss_fn(cfg.value_clip), cfg.model_copy(update={
            **common, "lr": cfg.critic_lr, "max_steps": cfg.max_steps * self.updates_per_iteration}))
        self.device = self.actor_engine.device
        self.partitioned = any(is_partitioned(p) for p in self.actor.parameters())

        # The frozen pair, in the dtype the actor computes in (bf16 on CUDA), optionally parked on the CPU.
        dtype = frozen_dtype(cfg.precision, self.device)
        self.reference = Frozen(InternLM2ForCausalLM.from_pretrained(
            ctx.resolve(cfg.reference) if cfg.reference else actor_dir, device="cpu", dtype=dtype),
            self.device, cfg.frozen_offload)
        self.reward = Frozen(reward_model_from_checkpoint(rm_dir, None, device="cpu", dtype=dtype),
                             self.device, cfg.frozen_offload)
        if self.reward.model.config.vocab_size != self.actor.config.vocab_size:
            raise ValueError("reward_model: its vocabulary differs from the actor's; they must share a tokenizer")
        self.scorer = RewardScorer(self.reward.model, self.tokenizer)
        self.rollouts = self._rollout_engine()
        self.tracker = MetricsTracker(ctx, cfg)
        self.rollouts_path = ctx.output_dir / "rollouts.jsonl"
        self.history: list[dict[str, float]] = []
        self.start = 0

    # ---- setup -----------------------------------------------------------------------------------
    def _rollout_engine(self) -> RolloutEngine:
        cfg = self.cfg
        num_seqs = cfg.rollout_batch_size * cfg.samples_per_prompt
        max_len = cfg.max_prompt_length + cfg.max_new_tokens
        max_len = min(max_len, self.actor.config.max_position_embeddings)
        model, weights_from = self.actor, None
        if self.partitioned:  # hybrid engine: a generation copy refreshed from the partitions per batch
            with torch.device("meta"):
                model = InternLM2ForCausalLM(self.actor.config)
            model = model.to(training_dtype(cfg)).to_empty(device=self.device).eval().requires_grad_(False)
            weights_from = self.actor
        dtype = next(model.parameters()).dtype
        kv = (cfg.rollout_kv_cache_mb * 2**20 if cfg.rollout_kv_cache_mb
              else kv_cache_bytes(self.actor.config, num_seqs, max_len, dtype))
        return RolloutEngine(model, self.tokenizer, max_model_len=max_len, kv_cache_bytes=kv,
                             max_num_seqs=min(num_seqs, 256), weights_from=weights_from)

    def iterations_per_round(self) -> int:
        return math.ceil(self.cfg.max_steps / self.cfg.rounds)

    # ---- one iteration ---------------------------------------------------------------------------
    def sample_prompts(self, iteration: int) -> list[PromptRecord]:
        # Seeded by the iteration (and rank): a resumed run draws the same prompts.
        rng = random.Random(self.cfg.seed * 1_000_003 + iteration * 7919 + self.ctx.rank)
        return [rng.choice(self.records) for _ in range(self.cfg.rollout_batch_size)]

    def condition_of(self, record: PromptRecord) -> str | None:
        return preference.condition_prompt(record.condition or self.cfg.default_condition, self.cfg.conditions)

    def scores(self, records: Sequence[PromptRecord],
               rollouts: Sequence[Rollout]) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Per response: the RM score (+ weighted ROUGE-L to the reference; − ``truncation_penalty`` for a
        response cut at max_new_tokens), the RM scores alone, and the batch means for the log."""
        texts = [r.text for r in rollouts]
        sequences = [self.scorer.encode([*r.messages, {"role": "assistant", "content": t}], self.condition_of(r))
                     for r, t in zip(records, texts)]
        with self.reward.on_device():
            rm = torch.tensor(self.scorer.score_ids(sequences), dtype=torch.float32)
        stats = {"rm_score": float(rm.mean())}
        total = rm
        if self.cfg.alignment_weight > 0:
            sim = torch.tensor(rouge_l_batch(texts, [r.reference for r in records]), dtype=torch.float32)
            total = rm + self.cfg.alignment_weight * sim
            stats["rouge_l"] = float(sim.mean())
        total = penalize_truncated(total, torch.tensor([r.finish_reason == "length" for r in rollouts]),
                                   self.cfg.truncation_penalty)
        return total, rm, stats

    def experience(self, iteration: int) -> tuple[Experience, dict, list[dict]]:
        from internlm2.core.engine import SamplingParams

        cfg = self.cfg
        records = [r for r in self.sample_prompts(iteration) for _ in range(cfg.samples_per_prompt)]
        prompts = [self.tokenizer.encode_chat(r.messages, assistant_actions=True) for r in records]
        base_seed = cfg.seed + iteration * 65537 + self.ctx.rank * 4099  # reproducible on resume
        params = [SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                                 max_new_tokens=cfg.max_new_tokens, seed=(base_seed + i) % 2**62)
                  for i in range(len(prompts))]
        rollouts = self.rollouts.generate(prompts, params)
        scores, rm_scores, stats = self.scores(records, rollouts)
        batch = collate_rollouts(rollouts, self.tokenizer.pad_id, self.device)
        t = cfg.temperature
        old = engine_forward(self.actor_engine, lambda m, b: policy_logprobs(m, b, t), batch)
        values = engine_forward(self.critic_engine, lambda m, b: critic_values(m, b.input_ids, b.padding_mask), batch)
        with self.reference.on_device() as ref, torch.no_grad():
            ref_logprobs = policy_logprobs(ref, batch, t)
        exp = make_experience(batch, old, ref_logprobs, values, scores, cfg.kl_coef, cfg.gamma, cfg.lam,
                              cfg.score_clip, cfg.whiten_advantages)
        stats["truncated"] = sum(r.finish_reason == "length" for r in rollouts) / len(rollouts)
        return exp, stats, self.rollout_rows(iteration, records, rollouts, exp, rm_scores)

    def rollout_rows(self, iteration: int, records, rollouts, exp: Experience, rm_scores) -> list[dict]:
        """The JSONL rows of one iteration's rollouts: what round k's reward hacks look like."""
        mask = exp.mask
        kl = (exp.kl * mask).sum(1).tolist()
        shaped = (exp.rewards * mask).sum(1).tolist()
        rows = []
        for i, (record, rollout) in enumerate(zip(records, rollouts)):
            row = {"iteration": iteration + 1, "round": iteration // self.iterations_per_round() + 1,
                   "rank": self.ctx.rank, "prompt": record.messages, "condition": record.condition,
                   "reference": record.reference, "response": rollout.text,
                   "score": float(exp.scores[i]), "rm_score": float(rm_scores[i]), "kl": kl[i], "reward": shaped[i],
                   "response_tokens": len(rollout.response_ids), "truncated": rollout.finish_reason == "length"}
            if self.cfg.rollout_token_kl:
                row["token_kl"] = exp.kl[i][mask[i]].tolist()
            rows.append(row)
        return rows

    def ptx_batch(self, step: int) -> torch.Tensor | None:
        """Pretraining rows of actor update ``step``: each rank its own (rows offset by rank)."""
        if not self.ptx_rows:
            return None
        rows = [self.ptx_rows[i] for i in ptx_row_indices(step, self.ctx.rank, self.ctx.world_size,
                                                          self.cfg.ptx_batch_size, len(self.ptx_rows))]
        width = min(len(r) for r in rows)
        return torch.tensor([r[:width] for r in rows], device=self.device)

    def train_on(self, exp: Experience, iteration: int) -> dict[str, float]:
        cfg = self.cfg
        update_actor = iteration >= cfg.critic_warmup_iterations
        generator = torch.Generator().manual_seed(cfg.seed + iteration)
        sums: dict[str, float] = {}
        count = 0
        world = self.ctx.world_size
        for _ in range(cfg.ppo_epochs):
            for rows in exp.minibatches(cfg.minibatch_size, generator):
                batch = exp.minibatch(rows)
                # Token sums over the minibatch's response tokens on ALL ranks (DeepSpeed then averages
                # the gradients over ranks, hence x world): every token weighs the same wherever it is.
                tokens = sum_across_ranks(float(batch["action_mask"].sum()))
                batch["loss_denominator"] = torch.tensor(max(tokens, 1.0) / world, device=self.device)
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

    # ---- reward model updates between rounds ---------------------------------------------------------
    def update_reward_model(self, round_index: int) -> dict[str, float]:
        """Apply reward_updates[round_index]: patched weights loaded in place, or pairs trained in."""
        ref = self.cfg.reward_updates[round_index]
        source = self.ctx.resolve(ref, "checkpoint" if ref.startswith("stage:") else "dataset")
        if source.is_dir() and (source / "config.json").is_file():
            load_weights_into(self.reward.model, source)  # the same module, the same memory
            return {"rm_update_loaded": 1.0}
        return self.train_reward_pairs(source, round_index)

    def train_reward_pairs(self, source: Path, round_index: int) -> dict[str, float]:
        """The fast path for small models: a temporary engine trains the RM on the pairs, then it is frozen."""
        cfg = self.cfg
        pairs = read_preference_pairs(source)
        model = self.reward.model
        batches, _ = pair_batches(self.tokenizer, pairs, model.config.reward_token_id,
                                  conditions=cfg.conditions, default_condition=cfg.default_condition,
                                  max_length=cfg.max_prompt_length + cfg.max_new_tokens + 64,
                                  pairs_per_batch=cfg.reward_pairs_per_batch, batch_tokens=None)
        if not batches:
            raise ValueError(f"reward_updates[{round_index}]: no usable pair")

        def loss_fn(m, batch):
            chosen, rejected = split_scores(m, batch)
            out = reward_model_loss(chosen, rejected)
            return out.loss, {"accuracy": out.accuracy}

        with self.reward.on_device():
            model.requires_grad_(True).train()
            engine = build_engine(model, loss_fn, self.cfg.model_copy(update={
                "lr": cfg.reward_update_lr, "max_steps": cfg.reward_update_steps, "schedule": "constant",
                "zero_stage": min(cfg.zero_stage, 2), "gradient_accumulation_steps": 1,
                "micro_batch_size": cfg.reward_pairs_per_batch}))
            accuracy = 0.0
            for step in range(cfg.reward_update_steps):
                batch = {k: v.to(self.device) for k, v in batches[step % len(batches)].items()}
                loss, extras = engine(batch)
                engine.backward(loss)
                engine.step()
                accuracy = extras["accuracy"]
            engine.destroy()  # removes its gradient hooks; the optimizer state goes with it
            freeze(model)
        return {"rm_update_loss": float(loss.detach()), "rm_update_accuracy": accuracy, "rm_update_pairs": len(pairs)}

    # ---- rollouts artifact -----------------------------------------------------------------------
    def write_rollouts(self, rows: list[dict]) -> None:
        rows = gather_rows(rows)
        if self.ctx.is_main:
            with self.rollouts_path.open("a", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")

    def trim_rollouts(self) -> None:
        """On resume: keep only the rows of iterations before the checkpoint (later ones run again)."""
        if not (self.ctx.is_main and self.rollouts_path.exists()):
            return
        lines = self.rollouts_path.read_text(encoding="utf-8").splitlines()
        kept = [line for line in lines if line.strip() and json.loads(line)["iteration"] <= self.start]
        self.rollouts_path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    # ---- checkpoints -----------------------------------------------------------------------------
    def save(self, iteration: int) -> None:
        ctx = self.ctx
        tag = f"iter-{iteration:08d}"
        folder = ctx.checkpoint_dir / tag
        self.actor_engine.save_checkpoint(str(folder), tag="actor", save_latest=False)
        self.critic_engine.save_checkpoint(str(folder), tag="critic", save_latest=False)
        if ctx.is_main:
            if self.cfg.reward_updates:  # the RM changes between rounds: keep the current one
                self.reward.model.save_pretrained(folder / "reward_model")
            (folder / "state.json").write_text(json.dumps({"iteration": iteration, "history": self.history}))
        barrier()  # every rank's shards are on disk before the tag is committed
        ctx.commit_checkpoint(tag)
        if ctx.is_main:
            for old in sorted(p for p in ctx.checkpoint_dir.glob("iter-*") if p.is_dir())[:-self.cfg.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)

    def resume(self) -> None:
        latest = self.ctx.latest_checkpoint()
        if latest is None:
            if self.ctx.is_main and self.rollouts_path.exists():
                self.rollouts_path.unlink()  # a fresh run: rows of an attempt without a checkpoint go
            return
        self.actor_engine.load_checkpoint(str(latest), tag="actor")
        self.critic_engine.load_checkpoint(str(latest), tag="critic")
        if (latest / "reward_model").is_dir():
            load_weights_into(self.reward.model, latest / "reward_model")
        state = json.loads((latest / "state.json").read_text())
        self.start, self.history = int(state["iteration"]), list(state["history"])
        self.trim_rollouts()
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
            exp, stats, rows = self.experience(iteration)
            self.write_rollouts(rows)
            metrics.update(stats)
            metrics.update(exp.stats())
            metrics.update(self.train_on(exp, iteration))
            metrics = mean_across_ranks(metrics)  # the whole data-parallel batch, not rank 0's share
            metrics["round"] = float(iteration // per_round + 1)
            self.history.append({"step": iteration + 1, **metrics})
            ctx.report_progress(iteration + 1, cfg.max_steps, **metrics)
            self.tracker.log(iteration + 1, metrics)
            done = iteration + 1
            if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.max_steps:
                self.save(done)
        return self.finish()

    def close(self) -> None:
        """Releases the DeepSpeed engines (their gradient hooks and optimizer state) and the event log."""
        self.tracker.close()
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
        export_model(self.critic, ctx.output_dir / "critic", ctx.is_main)  # collective under ZeRO-3
        if ctx.is_main:
            self.tokenizer.save_pretrained(ctx.output_dir / "critic")
            ctx.add_artifact("critic", ctx.output_dir / "critic", ArtifactKind.CHECKPOINT)
            if self.rollouts_path.exists():
                ctx.add_artifact("rollouts", self.rollouts_path, ArtifactKind.OTHER)
            if self.cfg.reward_updates:
                self.reward.model.save_pretrained(ctx.output_dir / "reward_model")
                self.tokenizer.save_pretrained(ctx.output_dir / "reward_model")
                ctx.add_artifact("reward_model", ctx.output_dir / "reward_model", ArtifactKind.CHECKPOINT)
        barrier()
        return summary


def run(ctx: StageContext) -> dict[str, float]:
    """Run COOL RLHF online PPO rounds; write the actor (final/), the critic, the rollouts and any updated RM."""
    ppo = PPORun(ctx)
    try:
        return ppo.run()
    finally:
        ppo.close()


STAGE = Stage(
    name="ppo",
    description="COOL RLHF online PPO: actor from SFT, frozen reference, frozen conditional reward model, "
    "critic from the RM with a critic-only warm-up; any ZeRO stage (ZeRO-3 rollouts through a hybrid-engine "
    "weight gather); reward −β·KL + RM score (+ optional ROUGE-L to a reference answer), GAE (γ 1, λ 0.99), "
    "clipped policy/value losses, ptx loss (0.5); rounds with reward-model updates between them; every "
    "rollout written to rollouts.jsonl for the next round's reward-model patch.",
    config_model=PPOConfig,
    run=run,
)
