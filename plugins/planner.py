"""The memory planner: per-GPU memory of a training pipeline on N GPUs, and the refusal of what cannot fit.

    plan_pipeline(stages, num_gpus, gpu_memory_gib) -> Plan       (Plan.fits, Plan.to_dict())
    check_fits(stages, num_gpus, gpu_memory_gib)     -> Plan, or ValueError naming the stage's field

``stages`` are the pipeline's stage specs as the job carries them: ``{"stage": "sft", "name"?: ...,
"config": {...}}``; the model's shapes come from ``config.model`` (a checkpoint folder with config.json),
a ``"model"`` key of the spec (a preset name "1_8b" / "7b" / "20b", an ``InternLM2Config`` or its dict),
or the ``model=`` argument. GPUs per stage: ``config.launch.nproc_per_node x num_nodes`` when set,
else ``num_gpus``.

Per GPU, in GiB, for a model of P parameters (T trainable: P, or the LoRA adapters), bf16 training:

    weights      2P        (ZeRO-3: 2P/N + the gathered working set; offload_params: 0 on the GPU)
    grads        2T        (ZeRO-2/3: 2T/N), plus the fp32 copy of this rank's gradient partition that the
                           optimizer step reads, 4T (ZeRO-1+: /N) — measured by bench_memory, not in the
                           usual 16-bytes-per-parameter count
    optimizer    12T       fp32 master + Adam m, v (ZeRO-1+: /N; offload_optimizer: 0 on the GPU)
    activations  per micro-batch of t tokens: with gradient checkpointing L x 2tH (each layer's input)
                 + one layer recomputed (34tH), without L x 34tH (Korthikanti et al. 2022, flash/SDPA
                 attention: no t^2 scores); plus the fused linear-CE's chunk and fp32 head grad (4VH)
    kv           generation's KV cache (PPO rollouts, eval): sequences x tokens x 2 L Hkv D x 2 bytes
    frozen       PPO's reference and reward model (bf16, whole on every GPU; 0 with frozen_offload)
    buffers      20% of weights + grads + optimizer + activations: DeepSpeed's flat buffers and
                 allocator fragmentation — the gap bench_memory measured between the terms above and the
                 peak of a real step at 1.8B widths (measured / terms = 1.18 for the LM stages, 1.33 for
                 the reward model)
    overhead     1.5 GiB: CUDA context, NCCL and allocator slack

fp32 training (``precision: fp32``) doubles weights and grads (and needs no fp32 gradient copy). A reward
model (and PPO's critic) has no output head: P - VH parameters, no fused-CE terms. PPO trains two models
(actor and critic) and holds the two frozen ones; rollout KV comes on top.
The numbers are estimates for admission control (benchmarks/bench_memory.py checks them against
measurements at 1.8B shapes); ``Plan.fits`` keeps a 5% margin.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

GIB = 2**30
OVERHEAD_GIB = 1.5
BUFFERS_FRACTION = 0.2  # calibrated against bench_memory's measured steps (see the module docstring)
MARGIN = 0.95  # a plan fits when its total is within 95% of the GPU's memory
FUSED_CE_CHUNK_BYTES = 256 * 2**20
TRAINING_STAGES = {"pretrain", "sft", "reward_model", "dpo", "long_context", "ppo"}


@dataclass
class StageMemory:
    """Per-GPU memory of one stage (GiB)."""

    name: str
    stage: str
    num_gpus: int
    weights: float = 0.0
    grads: float = 0.0
    optimizer: float = 0.0
    activations: float = 0.0
    kv: float = 0.0
    frozen: float = 0.0
    buffers: float = 0.0
    overhead: float = OVERHEAD_GIB
    host_offload: float = 0.0  # moved to host memory per rank (optimizer / parameter offload)
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return (self.weights + self.grads + self.optimizer + self.activations + self.kv + self.frozen
                + self.buffers + self.overhead)

    def add_buffers(self) -> StageMemory:
        self.buffers = BUFFERS_FRACTION * (self.weights + self.grads + self.optimizer + self.activations)
        return self

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total": self.total}


@dataclass
class Plan:
    stages: list[StageMemory]
    num_gpus: int
    gpu_memory_gib: float

    def stage_fits(self, s: StageMemory) -> bool:
        return s.total <= MARGIN * self.gpu_memory_gib

    @property
    def fits(self) -> bool:
        return all(self.stage_fits(s) for s in self.stages)

    def to_dict(self) -> dict[str, Any]:
        return {"num_gpus": self.num_gpus, "gpu_memory_gib": self.gpu_memory_gib, "fits": self.fits,
                "stages": [{**s.to_dict(), "fits": self.stage_fits(s)} for s in self.stages]}

    def table(self) -> str:
        """A plain-text table (the CLI prints it)."""
        cols = ("weights", "grads", "optimizer", "activations", "kv", "frozen", "buffers", "total")
        lines = [f"{'stage':<22}{'gpus':>5}" + "".join(f"{c:>12}" for c in cols) + "  fits"]
        for s in self.stages:
            values = [getattr(s, c) if c != "total" else s.total for c in cols]
            lines.append(f"{s.name:<22}{s.num_gpus:>5}" + "".join(f"{v:>12.2f}" for v in values)
                         + f"  {'yes' if self.stage_fits(s) else 'NO'}")
        lines.append(f"(GiB per GPU; {self.gpu_memory_gib:g} GiB GPUs, fits = total <= {MARGIN:.0%} of it)")
        return "\n".join(lines)


@dataclass(frozen=True)
class Shapes:
    params: int
    layers: int
    hidden: int
    vocab: int
    kv_bytes_per_token: int  # bf16 K and V of every layer
    largest_layer: int  # parameters of one decoder layer (ZeRO-3's gathered working set)
    intermediate: int


def model_shapes(model: Any) -> Shapes:
    """Shapes of a preset name, an InternLM2Config, its dict, or a checkpoint folder / config.json."""
    from internlm2.core import InternLM2Config

    if isinstance(model, str) and not Path(model).exists():
        config = InternLM2Config.preset(model)
    elif isinstance(model, (str, Path)):
        path = Path(model)
        config = InternLM2Config.from_pretrained(path if path.is_dir() else path.parent)
    elif isinstance(model, Mapping):
        config = InternLM2Config.from_dict(dict(model))
    else:
        config = model
    h, i, layers, v = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    d = config.head_dim
    attn = h * (config.num_attention_heads + 2 * config.num_key_value_heads) * d + config.num_attention_heads * d * h
    layer = attn + 3 * h * i + 2 * h
    params = layers * layer + 2 * v * h + h
    kv = layers * 2 * config.num_key_value_heads * d * 2
    return Shapes(params, layers, h, v, kv, layer, i)


def _lora_params(shapes: Shapes, rank: int, targets: Sequence[str]) -> int:
    """Adapter parameters: r x (in + out) per targeted linear per layer."""
    h, inter = shapes.hidden, shapes.intermediate
    dims = {"wqkv": (h, h), "wo": (h, h), "w1": (h, inter), "w3": (h, inter), "w2": (inter, h)}  # wqkv: ~(H, H+)
    return shapes.layers * sum(rank * sum(dims[t]) for t in targets if t in dims)


def _tokens_per_micro_batch(stage: str, cfg: Mapping[str, Any]) -> int:
    mbs = int(cfg.get("micro_batch_size", 1))
    if stage == "pretrain":
        return mbs * int(cfg.get("seq_len", 2048))
    if stage == "sft":
        return mbs * int(cfg.get("max_length", 2048))
    if stage == "long_context":
        return mbs * int(cfg.get("seq_len") or cfg.get("context_length", 32768))
    if stage == "reward_model":
        return int(cfg.get("batch_tokens") or 2 * int(cfg.get("pairs_per_batch", 8)) * int(cfg.get("max_length", 2048)))
    if stage == "dpo":
        return 2 * int(cfg.get("pairs_per_batch", 4)) * int(cfg.get("max_length", 2048))
    if stage == "ppo":
        seq = int(cfg.get("max_prompt_length", 1024)) + int(cfg.get("max_new_tokens", 256))
        ptx = int(cfg.get("ptx_batch_size", 4)) * int(cfg.get("ptx_seq_len", 512))
        return max(int(cfg.get("minibatch_size", 8)) * seq, ptx)
    return 0


def _trained(s: StageMemory, shapes: Shapes, cfg: Mapping[str, Any], n: int, tokens: int,
             with_activations: bool = True, lm_head: bool = True) -> None:
    """Adds one trained model's weights, grads, optimizer state (and activations) to ``s``; ``lm_head``
    False for a reward model / critic (v_head instead of the [V, H] output layer)."""
    zero = int(cfg.get("zero_stage", 2))
    fp32 = cfg.get("precision") == "fp32"
    wbytes = 4 if fp32 else 2
    p = shapes.params if lm_head else shapes.params - shapes.vocab * shapes.hidden + shapes.hidden
    rank = int(cfg.get("lora_rank", 0) or 0)
    targets = cfg.get("lora_target_modules", ["wqkv", "wo", "w1", "w2", "w3"])
    t = _lora_params(shapes, rank, targets) if rank else p
    weights = wbytes * p
    if zero == 3:
        weights = wbytes * p / n + 2 * wbytes * shapes.largest_layer  # own shard + gathered layer (+ prefetch)
        if cfg.get("offload_params"):
            s.host_offload += wbytes * p / n / GIB
            weights = 2 * wbytes * shapes.largest_layer
    grads = wbytes * t / (n if zero >= 2 else 1)
    if not fp32:
        grads += 4 * t / (n if zero >= 1 else 1)  # fp32 gradient partition of the optimizer step
    optimizer = 12 * t / (n if zero >= 1 else 1)
    if cfg.get("offload_optimizer"):
        s.host_offload += optimizer / GIB
        optimizer = 0.0
    h = shapes.hidden
    if cfg.get("gradient_checkpointing"):
        act = shapes.layers * 2 * tokens * h + 34 * tokens * h
    else:
        act = shapes.layers * 34 * tokens * h
    if lm_head:
        act += FUSED_CE_CHUNK_BYTES + 4 * shapes.vocab * h  # fused CE chunk + fp32 head-gradient accumulator
    s.weights += weights / GIB
    s.grads += grads / GIB
    s.optimizer += optimizer / GIB
    if with_activations:
        s.activations += act / GIB
    if rank:
        s.notes.append(f"LoRA r={rank}: {t:,} trainable parameters")


def estimate_stage(spec: Mapping[str, Any], num_gpus: int, model: Any = None) -> StageMemory:
    """Per-GPU memory of one stage spec (see the module docstring)."""
    stage = str(spec.get("stage", ""))
    cfg = dict(spec.get("config") or {})
    launch = cfg.get("launch") or {}
    n = int(launch.get("nproc_per_node", 0) or 0) * int(launch.get("num_nodes", 1) or 1) or num_gpus
    s = StageMemory(name=str(spec.get("name") or stage), stage=stage, num_gpus=n)
    source = spec.get("model")
    if source is None and isinstance(cfg.get("model"), str) and Path(cfg["model"]).exists():
        source = cfg["model"]
    source = source if source is not None else model
    if source is None or stage not in TRAINING_STAGES | {"eval"}:
        s.overhead = 0.0
        s.notes.append("no model memory (data stage or unknown model)")
        return s
    shapes = model_shapes(source)
    tokens = _tokens_per_micro_batch(stage, cfg)
    if stage == "eval":
        s.weights = 2 * shapes.params / GIB
        seqs = min(64, int(cfg.get("batch_size", 8)) * 8)
        s.kv = seqs * int(cfg.get("max_length", 4096)) * shapes.kv_bytes_per_token / GIB
        return s.add_buffers()
    if stage == "ppo":
        _trained(s, shapes, cfg, n, tokens)  # actor
        # critic (the reward model's shape); it steps after the actor, so their activations never coexist
        _trained(s, shapes, {**cfg, "lora_rank": 0}, n, tokens, with_activations=False, lm_head=False)
        frozen = 0.0 if cfg.get("frozen_offload") else 2 * 2 * shapes.params / GIB
        s.frozen = frozen
        seqs = int(cfg.get("rollout_batch_size", 16)) * int(cfg.get("samples_per_prompt", 1))
        seq = int(cfg.get("max_prompt_length", 1024)) + int(cfg.get("max_new_tokens", 256))
        s.kv = (cfg.get("rollout_kv_cache_mb") or 0) / 1024 or seqs * seq * shapes.kv_bytes_per_token / GIB
        if int(cfg.get("zero_stage", 2)) == 3:
            # rollouts gather the actor whole for generation (hybrid engine), then free it
            s.kv += 2 * shapes.params / GIB
            s.notes.append("ZeRO-3 actor gathered for rollouts: +1 bf16 copy during generation")
        return s.add_buffers()
    _trained(s, shapes, cfg, n, tokens, lm_head=stage != "reward_model")
    if stage == "dpo":
        s.notes.append("reference log-probs precomputed before training (reference freed)")
    return s.add_buffers()


def plan_pipeline(stages: list[dict], num_gpus: int, gpu_memory_gib: float, model: Any = None) -> Plan:
    """Per-stage per-GPU memory of ``stages`` on ``num_gpus`` GPUs of ``gpu_memory_gib`` each."""
    if num_gpus < 1:
        raise ValueError("num_gpus: must be >= 1")
    if not 0 < gpu_memory_gib < float("inf"):  # NaN included
        raise ValueError("gpu_memory_gib: must be a finite number > 0")
    return Plan([estimate_stage(spec, num_gpus, model) for spec in stages], num_gpus, gpu_memory_gib)


def check_fits(stages: list[dict], num_gpus: int, gpu_memory_gib: float, model: Any = None) -> Plan:
    """The plan, or ValueError naming the first stage that cannot fit (``stages[i].config.zero_stage``) and
    what would make it fit."""
    plan = plan_pipeline(stages, num_gpus, gpu_memory_gib, model)
    for i, s in enumerate(plan.stages):
        if plan.stage_fits(s):
            continue
        cfg = dict(stages[i].get("config") or {})
        if int(cfg.get("zero_stage", 2)) < 3:
            fix, fld = "use zero_stage 3", "zero_stage"
        elif s.stage == "ppo" and s.frozen > 0:
            fix, fld = "set frozen_offload (reference and reward model on the CPU)", "frozen_offload"
        elif not cfg.get("gradient_checkpointing") and s.activations > 0.2 * s.total:
            fix, fld = "turn on gradient_checkpointing", "gradient_checkpointing"
        elif not cfg.get("offload_optimizer"):
            fix, fld = "set offload_optimizer", "offload_optimizer"
        else:
            fix, fld = "use more GPUs or a smaller micro_batch_size", "micro_batch_size"
        raise ValueError(f"stages[{i}].config.{fld}: stage {s.name!r} needs {s.total:.1f} GiB per GPU on "
                         f"{s.num_gpus} GPU(s) of {gpu_memory_gib:g} GiB; {fix}")
    return plan


if __name__ == "__main__":  # python -m internlm2.plugins.planner stages.json NUM_GPUS GPU_GIB [MODEL]
    import sys

    specs = json.loads(Path(sys.argv[1]).read_text())
    print(plan_pipeline(specs, int(sys.argv[2]), float(sys.argv[3]), sys.argv[4] if len(sys.argv) > 4 else None)
          .table())
