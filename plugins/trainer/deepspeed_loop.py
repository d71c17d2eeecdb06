"""The DeepSpeed training loop every training stage shares.

    run_deepspeed_training(ctx, model, batches, loss_fn, config, tokenizer=...) -> TrainResult

per optimizer step: cancel check (agreed across ranks) -> gradient_accumulation_steps x
[forward through the loss module, engine.backward, engine.step] -> progress + metrics to the context
-> every ``checkpoint_every`` steps a DeepSpeed checkpoint in ``ctx.checkpoint_dir`` (resumed from
on the next attempt, with the data position and the metric history). At the end, the official
layout in ``ctx.output_dir / "final"`` (ZeRO-3 weights gathered first), tokenizer files, and
``ctx.output_dir / "metrics.json"``; both registered as artifacts.

Lower-level pieces for stages with several models (PPO): :func:`init_distributed`,
:func:`deepspeed_config`, :func:`build_engine`, :func:`save_final_checkpoint`.

``batches`` is indexable by the global micro-batch index (a Sequence, cycled, or a callable
``i -> batch``): micro-batch ``i`` is the same on every attempt, which is what makes resume exact.
On several ranks each rank passes its own shard (``ctx.rank``/``ctx.world_size``).
``loss_fn(model, batch)`` returns a scalar loss or ``(loss, {name: value})``; it runs inside the
engine's forward, so ZeRO-3 has every parameter it touches gathered. Evaluation during and after
training goes through the engine too (``TrainResult.forward(fn, batch)``, the ``forward`` argument
of ``on_step``): under ZeRO-3 a weight read outside the engine's forward is an empty partition.

Token-level losses are normalised by the GLOBAL number of target tokens of the optimizer step: with
``count_targets`` the loop counts the targets of all ``gradient_accumulation_steps`` micro-batches,
all-reduces the count over the data-parallel ranks first, and hands each micro-batch
``batch["loss_denominator"]`` = global count / (accumulation steps x ranks), which undoes DeepSpeed's
own averaging — so the gradient is that of (sum of token losses) / (all target tokens of the step),
whatever the split into micro-batches and ranks (``lm.packed_lm_loss`` reads it). Logged metrics are
means over all ranks, not rank 0's.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..contract import ArtifactKind, StageCancelled, StageContext
from .activation_checkpointing import apply_activation_checkpointing
from .config import TrainingConfig, uses_bf16
from .distributed import any_rank, barrier, mean_across_ranks, sum_across_ranks
from .export import export_model
from .loading import is_partitioned
from .tracking import MetricsTracker

Batch = Any
LossFn = Callable[[nn.Module, Batch], "torch.Tensor | tuple[torch.Tensor, Mapping[str, Any]]"]


@dataclass
class TrainResult:
    steps: int
    final_metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    checkpoint: Path | None = None  # the final checkpoint folder (None when not saved)
    resumed_from: int = 0  # the step training restarted at (0 = from scratch)
    engine: Any = field(default=None, repr=False, compare=False)  # the DeepSpeed engine (still live)

    def forward(self, fn: Callable[[nn.Module, Batch], Any], batch: Batch = None) -> Any:
        """``fn(model, batch)`` without gradients inside the engine's forward (ZeRO-3 gathers what
        ``fn`` touches); every rank must call it under ZeRO-3."""
        return engine_forward(self.engine, fn, batch)

    @property
    def initial_loss(self) -> float:
        """The loss of the first logged step (NaN when nothing was logged)."""
        return self.history[0]["loss"] if self.history else float("nan")


def _deepspeed():
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    return deepspeed


def init_distributed() -> None:
    """Initialise torch.distributed through DeepSpeed (gloo on CPU, nccl on CUDA); idempotent.
    Without a launcher's environment it starts a one-process group on a free local port."""
    deepspeed = _deepspeed()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                               verbose=False)


def deepspeed_config(cfg: TrainingConfig) -> dict[str, Any]:
    """The DeepSpeed JSON for ``cfg`` (concrete values only: no "auto")."""
    on_cuda = torch.cuda.is_available()
    bf16 = uses_bf16(cfg)
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.zero_stage >= 2:
        zero.update(contiguous_gradients=True, overlap_comm=on_cuda, reduce_scatter=True,
                    reduce_bucket_size=cfg.zero_bucket_size, allgather_bucket_size=cfg.zero_bucket_size)
    if cfg.zero_stage == 3:
        # final/ is written by export.export_model (a module at a time), not by DeepSpeed's
        # save_16bit_model, which gathers the whole model on rank 0.
        zero.update(stage3_param_persistence_threshold=cfg.zero3_param_persistence_threshold,
                    stage3_max_live_parameters=cfg.zero3_max_live_parameters,
                    stage3_prefetch_bucket_size=cfg.zero3_prefetch_bucket_size,
                    stage3_gather_16bit_weights_on_model_save=False)
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_cuda}
    if cfg.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_cuda}
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "gradient_clipping": cfg.max_grad_norm,
        "bf16": {"enabled": bf16},
        "zero_optimization": zero,
        "optimizer": {"type": "AdamW", "params": {
            "lr": cfg.lr, "betas": list(cfg.betas), "eps": cfg.eps, "weight_decay": cfg.weight_decay,
            # torch's AdamW unless offloading (then DeepSpeed's CPU Adam, a compiled op).
            "torch_adam": not cfg.offload_optimizer}},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def lr_lambda(cfg: TrainingConfig) -> Callable[[int], float]:
    """LR multiplier of optimizer step s: linear warmup, then cosine/linear decay to min_lr_ratio."""

    def fn(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        span = max(1, cfg.max_steps - cfg.warmup_steps)
        t = min(1.0, (step - cfg.warmup_steps) / span)
        decay = 0.5 * (1 + math.cos(math.pi * t)) if cfg.schedule == "cosine" else 1 - t
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay

    return fn


class LossModule(nn.Module):
    """The module DeepSpeed wraps: ``forward(batch)`` = ``loss_fn(model, batch)``; ``forward(batch, fn)``
    runs another function of the model (evaluation) inside the same forward."""

    def __init__(self, model: nn.Module, loss_fn: LossFn):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Batch, fn: Callable[[nn.Module, Batch], Any] | None = None):
        return (fn or self.loss_fn)(self.model, batch)


def engine_forward(engine, fn: Callable[[nn.Module, Batch], Any], batch: Batch = None) -> Any:
    """``fn(model, batch)`` with no gradients, inside ``engine``'s forward (so ZeRO-3 gathers every
    parameter ``fn`` uses through the module hooks, and the output head registered as external).
    Collective under ZeRO-3: every rank calls it the same number of times."""
    with torch.no_grad():
        return engine(_to_device(batch, engine.device), fn=fn)


def build_engine(model: nn.Module, loss_fn: LossFn, cfg: TrainingConfig,
                 parameters: Sequence[nn.Parameter] | None = None):
    """``deepspeed.initialize`` on ``LossModule(model, loss_fn)``; returns the engine. Only
    ``parameters`` (default: those requiring grad) are optimised."""
    deepspeed = _deepspeed()
    init_distributed()
    if cfg.gradient_checkpointing:
        apply_activation_checkpointing(model)
    module = LossModule(model, loss_fn)
    if cfg.zero_stage == 3 and hasattr(model, "output"):
        # The fused linear-CE reads output.weight without calling output.forward: gather it with
        # the wrapper's forward.
        deepspeed.zero.register_external_parameter(module, model.output.weight)
    params = list(parameters) if parameters is not None else [p for p in module.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(
        model=module, model_parameters=params, config=deepspeed_config(cfg),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg)),
    )
    return engine


def inference_engine(model: nn.Module, cfg: TrainingConfig):
    """A forward-only DeepSpeed engine over ``model`` (no optimizer): under ZeRO-3 each rank keeps its
    partition and :func:`engine_forward` gathers module by module (ZeRO-Inference). For evaluating a
    model too large for one device."""
    deepspeed = _deepspeed()
    init_distributed()
    model.requires_grad_(False)
    module = LossModule(model, lambda m, b: None)
    if cfg.zero_stage == 3 and hasattr(model, "output"):
        deepspeed.zero.register_external_parameter(module, model.output.weight)
    config = {k: v for k, v in deepspeed_config(cfg).items() if k not in ("optimizer", "gradient_clipping")}
    engine, _, _, _ = deepspeed.initialize(model=module, config=config)
    engine.eval()  # DeepSpeedEngine.eval returns None
    return engine


def _to_device(batch: Batch, device: torch.device) -> Batch:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _batch_getter(batches: Sequence[Batch] | Callable[[int], Batch]) -> Callable[[int], Batch]:
    if callable(batches) and not isinstance(batches, Sequence):
        return batches
    if len(batches) == 0:
        raise ValueError("batches: no training data")
    return lambda i: batches[i % len(batches)]


def _scalar(v: Any) -> float:
    return float(v.detach().float().mean().item()) if isinstance(v, torch.Tensor) else float(v)


def run_deepspeed_training(
    ctx: StageContext,
    model: nn.Module,
    batches: Sequence[Batch] | Callable[[int], Batch],
    loss_fn: LossFn,
    config: TrainingConfig,
    *,
    tokenizer: Any = None,
    save_final: bool = True,
    final_name: str = "final",
    extra_metrics: Mapping[str, Any] | None = None,
    on_step: Callable[[int, dict[str, float], Callable], None] | None = None,
    count_targets: Callable[[Batch], int] | None = None,
) -> TrainResult:
    """Train ``model`` for ``config.max_steps`` optimizer steps (see the module docstring).

    Raises StageCancelled at a step boundary once the job is cancelled. ``tokenizer`` (anything
    with ``save_pretrained``) is written beside the final weights. ``on_step(step, metrics, forward)``
    runs after each optimizer step on every rank (evaluation hooks; ``forward(fn, batch)`` is
    :func:`engine_forward` on this engine). ``count_targets(batch)``: the target tokens of a
    micro-batch, for the global normalisation (module docstring). Returns the TrainResult on every rank.
    """
    torch.manual_seed(config.seed)
    engine = build_engine(model, loss_fn, config)
    device = engine.device
    get_batch = _batch_getter(batches)
    accum = config.gradient_accumulation_steps
    tracker = MetricsTracker(ctx, config)

    def forward(fn, batch=None):
        return engine_forward(engine, fn, batch)

    ctx.log(f"DeepSpeed ZeRO-{config.zero_stage} on {ctx.world_size} rank(s), device {device}, "
            f"{'bf16' if engine.bfloat16_enabled() else 'fp32'}")
    if config.zero_stage == 3:
        params = list(model.parameters())
        held = sum(p.ds_tensor.numel() for p in params if hasattr(p, "ds_tensor"))
        ctx.log(f"ZeRO-3: {sum(map(is_partitioned, params))} of {len(params)} parameters partitioned; "
                f"rank {ctx.rank} holds {held} of {sum(getattr(p, 'ds_numel', p.numel()) for p in params)} elements")
    start, history = 0, []
    resume = ctx.latest_checkpoint()
    if resume is not None:
        _, client = engine.load_checkpoint(str(ctx.checkpoint_dir), tag=resume.name)
        start, history = int(client["step"]), list(client.get("history", []))
        ctx.log(f"resumed from checkpoint {resume.name} (step {start})")
        ctx.log_metrics(start, resumed_from_step=start)

    metrics: dict[str, float] = {}
    for step in range(start, config.max_steps):
        if any_rank(ctx.should_cancel()):
            raise StageCancelled(f"stage {ctx.name} cancelled at step {step}")
        t0 = time.perf_counter()
        sums: dict[str, float] = {}
        tokens = 0
        micro = [get_batch(step * accum + j) for j in range(accum)]
        if count_targets is not None:
            # sum over ranks first: every rank divides by the same global count
            total = sum_across_ranks(float(sum(count_targets(b) for b in micro)))
            denominator = torch.tensor(max(total, 1.0) / (accum * ctx.world_size))
            micro = [{**b, "loss_denominator": denominator} for b in micro]
        for batch in micro:
            batch = _to_device(batch, device)
            out = engine(batch)
            loss, extra = (out if isinstance(out, tuple) else (out, {}))
            engine.backward(loss)
            engine.step()
            sums["loss"] = sums.get("loss", 0.0) + _scalar(loss)
            for k, v in extra.items():
                sums[k] = sums.get(k, 0.0) + _scalar(v)
            if isinstance(batch, Mapping) and isinstance(batch.get("input_ids"), torch.Tensor):
                tokens += batch["input_ids"].numel()
        elapsed = time.perf_counter() - t0
        metrics = mean_across_ranks({k: v / accum for k, v in sums.items()})
        metrics["lr"] = float(engine.get_lr()[0])
        norm = engine.get_global_grad_norm()
        if norm is not None:
            metrics["grad_norm"] = _scalar(norm)
        if tokens:
            metrics["tokens_per_s"] = tokens * ctx.world_size / max(elapsed, 1e-9)
        history.append({"step": step + 1, **metrics})
        ctx.report_progress(step + 1, config.max_steps, **metrics)
        tracker.log(step + 1, metrics)
        if on_step is not None:
            on_step(step + 1, metrics, forward)
        if config.checkpoint_every and (step + 1) % config.checkpoint_every == 0 and step + 1 < config.max_steps:
            _save_resumable(ctx, engine, step + 1, history, config.keep_checkpoints)

    tracker.close()
    final_metrics = {**metrics, **{k: _scalar(v) for k, v in (extra_metrics or {}).items()}}
    checkpoint = None
    if save_final:
        doc = {"stage": ctx.stage, "name": ctx.name, "steps": config.max_steps, "resumed_from": start,
               "final": final_metrics, "history": history}
        checkpoint = save_final_checkpoint(ctx, model, tokenizer, doc, name=final_name)
    return TrainResult(config.max_steps, final_metrics, history, checkpoint, start, engine)


def _save_resumable(ctx: StageContext, engine, step: int, history: list, keep: int) -> None:
    tag = f"step-{step:08d}"
    engine.save_checkpoint(str(ctx.checkpoint_dir), tag=tag, client_state={"step": step, "history": history})
    barrier()
    ctx.commit_checkpoint(tag)
    if ctx.is_main:
        old = sorted(p for p in ctx.checkpoint_dir.glob("step-*") if p.is_dir())[:-keep]
        for path in old:
            shutil.rmtree(path, ignore_errors=True)


def save_final_checkpoint(ctx: StageContext, model: nn.Module, tokenizer: Any, metrics_doc: dict[str, Any],
                          zero3: bool | None = None, name: str = "final") -> Path:
    """Write ``model`` in the official layout (+ tokenizer files) to ``ctx.output_dir / name``,
    ``metrics.json`` and ``metrics.png`` (the history's curves) beside it; register them as artifacts.
    Call on every rank: ZeRO-3 partitions are gathered a module at a time and LoRA adapters merged
    (``export.export_model``; ``zero3`` is detected from the parameters and kept for old callers)."""
    del zero3
    out = ctx.output_dir / name
    tmp = ctx.output_dir / f".{name}.tmp"
    if ctx.is_main and tmp.exists():
        shutil.rmtree(tmp)
    barrier()
    export_model(model, tmp, ctx.is_main)
    if ctx.is_main:
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)  # readers never see a half-written checkpoint
        metrics_path = ctx.output_dir / "metrics.json"
        metrics_path.write_text(json.dumps(metrics_doc, indent=1, allow_nan=True))
        ctx.add_artifact(name, out, ArtifactKind.CHECKPOINT)
        ctx.add_artifact("metrics", metrics_path, ArtifactKind.OTHER)
        history = metrics_doc.get("history") or []
        if history:
            from .tracking import plot_history

            ctx.add_artifact("metrics_plot", plot_history(history, ctx.output_dir / "metrics.png",
                                                          title=f"{ctx.stage}: {ctx.name}"), ArtifactKind.OTHER)
    barrier()
    return out
