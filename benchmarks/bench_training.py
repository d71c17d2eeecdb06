"""Training benchmark: SFT tokens/s and MFU, and PPO rollout tokens/s, ours vs plain HF transformers.

One run, the same random weights (rebuilt from one seed for every measurement), two comparisons:

1. SFT training step (forward + backward + AdamW step, gradient clipping 1.0), packed rows of ``--seq``
   tokens (several documents per row; lengths uniform in ``--doc-len``):
     - ours: ``InternLM2ForCausalLM`` through ``plugins.trainer.packed_lm_loss`` — the stages' loss: doc-ids
       attention (a token sees only its own document), positions restarting at every document, labels -100
       across document boundaries, the fused linear + cross-entropy (never [N, V] logits), the Triton kernels
       on CUDA. ``--deepspeed`` adds the same through ``plugins.trainer.build_engine`` (DeepSpeed ZeRO-2,
       one rank), which is what the training stages actually run.
     - baseline: transformers' ``LlamaForCausalLM`` on the same weights (wqkv de-interleaved, as
       tests/hf_reference.py maps them), sdpa attention, HF's own loss (``labels=input_ids``: full logits,
       upcast to fp32). It gets the *same token rows* as plain causal rows (positions 0..T-1, no document
       mask): HF's sdpa path has no document masking short of a dense 4-D mask, and plain causal rows let it
       use its fastest kernel (flash), so the baseline is not handicapped; it computes at least as much
       attention as ours.
   tok/s counts input tokens (rows x seq x accumulation) per optimizer step, warmup steps excluded.
   MFU = model FLOPs per token x tok/s / peak dense bf16 FLOP/s of the GPU, two ways:
     "MFU 6N"      6 N, N = parameters doing matmuls (all but the input embedding table, a lookup; the
                   LM head counts). The issue's anchor (HF 29.8k tok/s = MFU 0.31 on an H100, N = 1.70e9 for
                   the 1.8B shapes) is this one.
     "MFU +attn"   6 N + 12 L d T (PaLM appendix B: attention scores and values over the full T x T, T = the
                   row length), although causal and document masks leave less work than that.
   Activation-checkpoint recomputation is not counted (model FLOPs, not hardware FLOPs).
   Precision on CUDA: bf16 weights and gradients, fp32 master weights and fp32 AdamW states, no autocast
   (``MasterWeightAdamW`` below for the plain loops; DeepSpeed's bf16 mode does the same). fp32 on CPU.
   Peak memory: ``torch.cuda.max_memory_allocated`` while each built run trains (weights, gradients,
   optimizer state, activations; not the transient copies of its construction); not measured on CPU.

2. PPO rollout: generated tokens/s for ``--prompts`` random prompts of ``--prompt-len`` tokens, exactly
   ``--gen-len`` new tokens each, temperature 1, top_p 0.9, top_k off:
     - ours: ``plugins.algorithms.rollout.RolloutEngine`` (the PPO stage's wrapper of ``LLMEngine``: continuous
       batching, paged KV cache, CUDA graphs; ignore_eos), once with one seed per request as the stage sets
       them and once with the engine's one generator (the gap is the cost of per-request sampling noise);
     - baseline: HF ``generate(do_sample=True, temperature=1, top_p=0.9, top_k=0)``, min_new_tokens = max.

GPU (default when CUDA is present): InternLM2-1.8B shapes, 4k packed rows, bf16; 64 prompts x 256 in / 256 out.
    python benchmarks/bench_training.py [--deepspeed] [--activation-checkpointing] [--micro-batch 1 --accum 8]
CPU fallback (small shapes, fp32; only the ratios mean anything):
    python benchmarks/bench_training.py --device cpu --deepspeed
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import build_hf, build_model, sync  # (it also puts tests/ on sys.path)

from internlm2.core import InternLM2Config, InternLM2ForCausalLM, kernels
from internlm2.core.attention import doc_ids_from_lengths, positions_from_doc_ids

# Dense (no sparsity) bf16 tensor-core peak per GPU, matched by substring of the device name, first hit wins.
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989.4e12),  # SXM
    ("H200", 989.4e12),
    ("A100", 312e12),
)

# CPU fallback shapes: InternLM2 proportions (d_ff = 4 d, GQA 2:1, head_dim 64) at a size a CPU trains
# in seconds. The vocabulary is cut to 8192 so the LM head keeps roughly its 1.8B share of the FLOPs
# (the real 92544 would make it ~85% of this tiny model and the benchmark a cross-entropy benchmark).
CPU_SHAPES = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=8192)


# ---- setup -------------------------------------------------------------------------------------------
def peak_flops(device: torch.device, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS if key in name), None)


def matmul_params(model) -> int:
    """N of the 6N rule: every parameter but the input embedding table (a gather, no FLOPs)."""
    emb = model.model.tok_embeddings.weight.numel()
    return sum(p.numel() for p in model.parameters()) - emb


def train_flops_per_token(cfg: InternLM2Config, n: int, seq: int) -> tuple[float, float]:
    """(6 N, 6 N + 12 L d T) training FLOPs per token."""
    return 6.0 * n, 6.0 * n + 12.0 * cfg.num_hidden_layers * cfg.hidden_size * seq


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


# ---- data --------------------------------------------------------------------------------------------
def packed_batch(rows: int, seq: int, vocab: int, doc_len: tuple[int, int], seed: int,
                 device: torch.device) -> dict[str, torch.Tensor]:
    """One packed micro-batch as ``packed_lm_loss`` takes it: input_ids, labels (the next token; -100 where
    it belongs to another document and at the row's end), doc_ids, position_ids (restarting per document)."""
    g = torch.Generator().manual_seed(seed)
    lengths = []
    for _ in range(rows):
        row, total = [], 0
        while total < seq:
            n = min(int(torch.randint(doc_len[0], doc_len[1] + 1, (), generator=g)), seq - total)
            row.append(n)
            total += n
        lengths.append(row)
    tokens = torch.randint(3, vocab, (rows, seq + 1), generator=g)
    doc_ids = doc_ids_from_lengths(lengths, seq)  # (B, T)
    labels = tokens[:, 1:].clone()
    labels[:, :-1].masked_fill_(doc_ids[:, 1:] != doc_ids[:, :-1], -100)
    labels[:, -1] = -100
    batch = {"input_ids": tokens[:, :-1], "labels": labels, "doc_ids": doc_ids,
             "position_ids": positions_from_doc_ids(doc_ids)}
    return {k: v.to(device) for k, v in batch.items()}


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n, length), generator=g).tolist()


# ---- optimiser ---------------------------------------------------------------------------------------
class MasterWeightAdamW:
    """AdamW over fp32 master copies of half-precision parameters, with gradient-norm clipping.

    ``step()`` upcasts each parameter's gradient into its master, clips, steps torch's AdamW (fused on
    CUDA) in fp32, copies the masters back into the parameters and drops every gradient. fp32 parameters
    are their own masters. The same recipe as DeepSpeed's bf16 mode, so the plain loops and the DeepSpeed
    run hold the same optimizer state (2 + 4 + 4 + 4 bytes per parameter besides the gradients).
    """

    def __init__(self, params, lr: float, max_grad_norm: float, device: torch.device):
        self.params = [p for p in params if p.requires_grad]
        self.masters = [p if p.dtype == torch.float32 else p.detach().float().requires_grad_(True)
                        for p in self.params]
        self.max_grad_norm = max_grad_norm
        fused = {"fused": True} if device.type == "cuda" else {"foreach": True}
        self.opt = torch.optim.AdamW(self.masters, lr=lr, betas=(0.9, 0.95), weight_decay=0.0, **fused)

    @torch.no_grad()
    def step(self) -> None:
        for p, m in zip(self.params, self.masters):
            if m is not p and p.grad is not None:
                m.grad, p.grad = p.grad.float(), None  # frees each bf16 gradient as its fp32 copy appears
        if self.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.masters, self.max_grad_norm, foreach=True)
        self.opt.step()
        for p, m in zip(self.params, self.masters):
            if m is not p:
                p.copy_(m)  # round the fp32 master to the bf16 weight
        self.opt.zero_grad(set_to_none=True)


# ---- measurements ------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    name: str
    tok_s: float | None = None
    step_s: float | None = None
    peak_mem_gib: float | None = None
    first_loss: float | None = None
    mfu_6n: float | None = None
    mfu_attn: float | None = None
    error: str | None = None  # "OOM" when the run did not fit


def median_step_s(step: Callable[[], None], warmup: int, steps: int, device: torch.device) -> float:
    """Median seconds of one ``step`` over ``steps`` timed calls after ``warmup`` untimed ones (Triton JIT,
    allocator, DeepSpeed buckets), each synchronised on CUDA at both ends. The median, not the mean, so a
    noisy neighbour on a shared CPU moves one sample, not the result."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        sync(device)
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_train(name: str, build: Callable[[], tuple[Callable[[], None], list[torch.Tensor]]],
              tokens_per_step: int, args, device: torch.device) -> TrainResult:
    """Builds a run (its model, optimizer and step function) with the peak-memory counter reset, times it,
    and frees it. A CUDA out-of-memory is reported, not raised, so the other runs still report."""
    free(device)
    res = TrainResult(name)
    try:
        step, losses = build()
        if device.type == "cuda":  # count from the built run (weights included), not the construction's copies
            torch.cuda.reset_peak_memory_stats(device)
        res.step_s = median_step_s(step, args.warmup, args.steps, device)
        res.tok_s = tokens_per_step / res.step_s
        res.first_loss = float(losses[0])
        res.peak_mem_gib = peak_memory_gib(device)
        getattr(step, "close", lambda: None)()
    except torch.OutOfMemoryError:
        res.error = "OOM"
        res.peak_mem_gib = peak_memory_gib(device)
    free(device)
    return res


def plain_loop(model, loss_of, batches, args, device):
    """(step function, first-micro-batch losses): accumulate over ``batches``, then one optimizer step."""
    model.train()
    opt = MasterWeightAdamW(model.parameters(), lr=1e-5, max_grad_norm=1.0, device=device)
    losses: list[torch.Tensor] = []

    def step() -> None:
        for i, batch in enumerate(batches):
            loss = loss_of(model, batch)
            (loss / len(batches)).backward()
            if i == 0:
                losses.append(loss.detach())
        opt.step()

    return step, losses


def enable_hf_checkpointing(llama) -> None:
    """HF's own activation checkpointing (non-reentrant), under its transformers-5 name when present."""
    kwargs = {"use_reentrant": False}
    if hasattr(llama, "activation_checkpointing_enable"):
        llama.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        llama.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def hf_loss(llama, batch):
    """HF's own causal-LM loss: full [B, T, V] logits, shifted labels, fp32 cross-entropy."""
    return llama(input_ids=batch["input_ids"], labels=batch["input_ids"], use_cache=False).loss


def ours_loss(model, batch):
    from internlm2.plugins.trainer import packed_lm_loss

    return packed_lm_loss(model, batch)[0]


def sft_runs(cfg: InternLM2Config, args, device: torch.device, dtype: torch.dtype) -> list[TrainResult]:
    batches = [packed_batch(args.micro_batch, args.seq, cfg.vocab_size, tuple(args.doc_len), seed=100 + i,
                            device=device) for i in range(args.accum)]
    tokens_per_step = args.micro_batch * args.seq * args.accum
    results = []

    def hf():
        ours = build_model(cfg, device, dtype, seed=args.seed)
        llama = build_hf(ours)
        del ours
        llama.set_attn_implementation("sdpa")
        if args.activation_checkpointing:
            enable_hf_checkpointing(llama)
        return plain_loop(llama, hf_loss, batches, args, device)

    def ours():
        from internlm2.plugins.trainer import apply_activation_checkpointing

        model = build_model(cfg, device, dtype, seed=args.seed)
        if args.activation_checkpointing:
            apply_activation_checkpointing(model)
        return plain_loop(model, ours_loss, batches, args, device)

    def ours_deepspeed():
        from internlm2.plugins.trainer import TrainingConfig, build_engine, packed_lm_loss

        model = build_model(cfg, device, dtype, seed=args.seed).train()
        tcfg = TrainingConfig(lr=1e-5, schedule="constant", zero_stage=2, micro_batch_size=args.micro_batch,
                              gradient_accumulation_steps=args.accum, max_grad_norm=1.0, checkpoint_every=0,
                              gradient_checkpointing=args.activation_checkpointing)
        engine = build_engine(model, packed_lm_loss, tcfg)
        losses: list[torch.Tensor] = []

        def step() -> None:
            for i, batch in enumerate(batches):  # DeepSpeed steps the optimizer at the accumulation boundary
                loss, _ = engine(batch)
                engine.backward(loss)
                engine.step()
                if i == 0:
                    losses.append(loss.detach())

        step.close = getattr(engine, "destroy", lambda: None)  # drop DeepSpeed's hooks and buffers
        return step, losses

    if not args.skip_hf:
        results.append(run_train("HF LlamaForCausalLM (sdpa, HF loss)", hf, tokens_per_step, args, device))
    results.append(run_train("internlm2 (packed, fused linear-CE)", ours, tokens_per_step, args, device))
    if args.deepspeed:
        results.append(run_train("internlm2 + DeepSpeed ZeRO-2", ours_deepspeed, tokens_per_step, args, device))
    return results


def rollout_runs(cfg: InternLM2Config, args, device: torch.device, dtype: torch.dtype) -> dict:
    """Generated tok/s of HF generate and of the PPO stage's RolloutEngine on the same prompts."""
    from internlm2.core.engine import SamplingParams
    from internlm2.plugins.algorithms.rollout import RolloutEngine

    free(device)
    prompts = random_prompts(args.prompts, args.prompt_len, cfg.vocab_size, seed=7)
    out_len = args.gen_len
    res: dict = {}
    model = build_model(cfg, device, dtype, seed=args.seed)

    if not args.skip_hf:
        llama = build_hf(model)

        @torch.inference_mode()
        def hf_generate(rows: list[list[int]], n: int) -> float:
            ids = torch.tensor(rows, device=device)
            sync(device)
            start = time.perf_counter()
            out = llama.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                 temperature=1.0, top_p=0.9, top_k=0, max_new_tokens=n, min_new_tokens=n,
                                 pad_token_id=cfg.pad_token_id)
            sync(device)
            assert out.shape == (len(rows), len(rows[0]) + n), out.shape
            return time.perf_counter() - start

        hf_generate(prompts[:4], 4)  # warm up
        res["hf_s"] = statistics.median(hf_generate(prompts, out_len) for _ in range(args.repeats))
        res["hf_tok_s"] = len(prompts) * out_len / res["hf_s"]
        del llama
        free(device)

    rollouts = RolloutEngine(model, None, max_model_len=args.prompt_len + out_len,
                             max_num_seqs=max(8, len(prompts)))

    def params(n: int, seed0: int | None) -> list[SamplingParams]:
        return [SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=n, ignore_eos=True,
                               seed=None if seed0 is None else seed0 + i) for i in range(len(prompts))]

    rollouts.generate(prompts[:4], params(4, 0)[:4])  # warm up
    # Seeded as the PPO stage seeds its rollouts, then unseeded. Both draw counter-based noise for the whole
    # batch in one pass (core/engine/sampler.py), so the two rows should agree; a gap means a regression.
    def engine_generate(seed0: int | None) -> float:
        sync(device)
        start = time.perf_counter()
        outs = rollouts.generate(prompts, params(out_len, seed0))
        sync(device)
        assert all(len(o.response_ids) == out_len for o in outs), [len(o.response_ids) for o in outs]
        return time.perf_counter() - start

    for key, seed0 in (("engine", 1000), ("engine_unseeded", None)):
        res[f"{key}_s"] = statistics.median(engine_generate(seed0) for _ in range(args.repeats))
        res[f"{key}_tok_s"] = len(prompts) * out_len / res[f"{key}_s"]
        if "hf_tok_s" in res:
            res[f"{key}_speedup"] = res[f"{key}_tok_s"] / res["hf_tok_s"]
    return res


# ---- main --------------------------------------------------------------------------------------------
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--preset", default="1_8b", help="model shapes (CPU: shrunk to CPU_SHAPES unless --full-size)")
    ap.add_argument("--full-size", action="store_true", help="on CPU, keep the preset's real shapes")
    ap.add_argument("--seq", type=int, default=None, help="packed row length (default 4096 GPU / 512 CPU)")
    ap.add_argument("--doc-len", type=int, nargs=2, metavar=("MIN", "MAX"), default=None,
                    help="document lengths packed into a row (default 256 2048 GPU / 32 256 CPU)")
    ap.add_argument("--micro-batch", type=int, default=None, help="packed rows per micro-batch (default 1 / 2)")
    ap.add_argument("--accum", type=int, default=None, help="micro-batches per optimizer step (default 8 / 1)")
    ap.add_argument("--steps", type=int, default=None, help="timed optimizer steps; the median is reported (default 5)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed optimizer steps first (default 2 / 1)")
    ap.add_argument("--activation-checkpointing", action="store_true", help="recompute decoder layers (both)")
    ap.add_argument("--deepspeed", action="store_true", help="also time our path through DeepSpeed ZeRO-2")
    ap.add_argument("--peak-tflops", type=float, default=None, help="peak dense bf16 TFLOP/s for MFU "
                    "(default: looked up from the GPU's name)")
    ap.add_argument("--prompts", type=int, default=None, help="rollout prompts (default 64 / 16)")
    ap.add_argument("--prompt-len", type=int, default=None, help="rollout prompt tokens (default 256 / 64)")
    ap.add_argument("--gen-len", type=int, default=None, help="rollout generated tokens (default 256 / 64)")
    ap.add_argument("--repeats", type=int, default=3, help="rollout timings per run (the median is reported)")
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--skip-rollout", action="store_true")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--seed", type=int, default=0, help="weights seed (every run rebuilds from it)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (CPU runs only)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    gpu = args.device.startswith("cuda")

    def default(name, on_gpu, on_cpu):
        if getattr(args, name) is None:
            setattr(args, name, on_gpu if gpu else on_cpu)

    default("seq", 4096, 512)
    default("doc_len", [256, 2048], [32, 256])
    default("micro_batch", 1, 2)
    default("accum", 8, 1)
    default("steps", 5, 5)
    default("warmup", 2, 1)
    default("prompts", 64, 16)
    default("prompt_len", 256, 64)
    default("gen_len", 256, 64)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    if gpu:
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if gpu else torch.float32
    overrides = {} if gpu or args.full_size else dict(CPU_SHAPES)
    overrides["max_position_embeddings"] = max(32768, args.seq, args.prompt_len + args.gen_len)
    cfg = InternLM2Config.preset(args.preset, **overrides)

    with torch.device("meta"):
        n = matmul_params(InternLM2ForCausalLM(cfg))
    flops_6n, flops_attn = train_flops_per_token(cfg, n, args.seq)
    peak = peak_flops(device, args.peak_tflops)
    probe = torch.empty(1, device=device)
    r: dict = {
        "device": torch.cuda.get_device_name(device) if gpu else f"cpu ({torch.get_num_threads()} threads)",
        "torch": torch.__version__, "transformers": __import__("transformers").__version__,
        "preset": args.preset, "shapes": {k: getattr(cfg, k) for k in CPU_SHAPES},
        "dtype": str(dtype).removeprefix("torch."), "kernels": kernels.active_path(probe),
        "matmul_params": n, "flops_per_token_6n": flops_6n, "flops_per_token_attn": flops_attn,
        "peak_flops": peak, "args": {k: v for k, v in vars(args).items() if k != "json"},
    }
    del probe
    if not args.skip_train:
        sample = packed_batch(args.micro_batch, args.seq, cfg.vocab_size, tuple(args.doc_len), 100, device)
        r["docs_per_row"] = statistics.mean(int(d.max()) + 1 for d in sample["doc_ids"])
        r["target_fraction"] = float((sample["labels"] != -100).float().mean())
        runs = sft_runs(cfg, args, device, dtype)
        for run in runs:
            if run.tok_s is not None and peak:
                run.mfu_6n = run.tok_s * flops_6n / peak
                run.mfu_attn = run.tok_s * flops_attn / peak
        r["train"] = [asdict(run) for run in runs]
    if not args.skip_rollout:
        r["rollout"] = rollout_runs(cfg, args, device, dtype)
    report(r, args)
    if args.json:
        args.json.write_text(json.dumps(r, indent=2) + "\n")
    return r


def report(r: dict, args) -> None:
    def f(x, fmt=",.1f"):
        return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)

    s = r["shapes"]
    print(f"\n# bench_training: {r['device']}; torch {r['torch']}, transformers {r['transformers']}")
    print(f"shapes: preset {r['preset']}" + ("" if args.device.startswith("cuda") or args.full_size
                                             else " shrunk for CPU") +
          f": hidden {s['hidden_size']}, ffn {s['intermediate_size']}, layers {s['num_hidden_layers']}, "
          f"heads {s['num_attention_heads']}/{s['num_key_value_heads']} kv, vocab {s['vocab_size']}; "
          f"N (matmul params) = {r['matmul_params'] / 1e6:,.1f}M; {r['dtype']}; kernels: {r['kernels']}")
    if "train" in r:
        prec = ("bf16 weights/grads, fp32 master weights + AdamW states, no autocast" if r["dtype"] == "bfloat16"
                else "fp32 weights, fp32 AdamW")
        print(f"\n## SFT training step: {args.micro_batch} x {args.seq}-token packed rows "
              f"(~{r['docs_per_row']:.1f} docs/row, doc lengths {args.doc_len[0]}-{args.doc_len[1]}) x "
              f"{args.accum} accumulation = {args.micro_batch * args.seq * args.accum:,} tokens/step; {prec}; "
              f"activation checkpointing {'on' if args.activation_checkpointing else 'off'}; "
              f"median of {args.steps} timed steps after {args.warmup} warmup")
        peak = r["peak_flops"]
        peak_text = f"{peak / 1e12:,.1f} TFLOP/s" if peak else "unknown for this device (--peak-tflops sets it)"
        print(f"MFU peak: {peak_text}; FLOPs/token: 6N = {r['flops_per_token_6n']:.3e}, "
              f"6N + 12·L·d·T = {r['flops_per_token_attn']:.3e} (T = {args.seq})")
        hf = next((x for x in r["train"] if x["name"].startswith("HF") and x["tok_s"]), None)
        print("\n| run | tok/s | step s | MFU 6N | MFU +attn | peak mem GiB | first loss | tok/s vs HF |")
        print("|---|---|---|---|---|---|---|---|")
        for x in r["train"]:
            ratio = x["tok_s"] / hf["tok_s"] if hf and x["tok_s"] else None
            tok = x["error"] or f(x["tok_s"], ",.0f")
            print(f"| {x['name']} | {tok} | {f(x['step_s'], '.3f')} | {f(x['mfu_6n'], '.3f')} | "
                  f"{f(x['mfu_attn'], '.3f')} | {f(x['peak_mem_gib'], '.1f')} | {f(x['first_loss'], '.3f')} | "
                  f"{f(ratio, '.2f')} |")
        if args.device.startswith("cuda"):
            print("\nissue anchors (H100, 1.8B, 4k packed): HF loop 29.8k tok/s, MFU 0.31 (6N); target ours >= 0.5")
    if "rollout" in r:
        x = r["rollout"]
        print(f"\n## PPO rollout: {args.prompts} prompts x {args.prompt_len} in / {args.gen_len} out, "
              f"temperature 1, top_p 0.9, top_k off, every row exactly {args.gen_len} new tokens; "
              f"median of {args.repeats} runs")
        print("\n| run | generated tok/s | wall s | vs HF |\n|---|---|---|---|")
        if "hf_tok_s" in x:
            print(f"| HF generate (sampling) | {f(x['hf_tok_s'])} | {f(x['hf_s'], '.2f')} | 1.00 |")
        for key, name in (("engine", "RolloutEngine, per-request seeds (as the PPO stage)"),
                          ("engine_unseeded", "RolloutEngine, unseeded")):
            print(f"| {name} | {f(x[key + '_tok_s'])} | {f(x[key + '_s'], '.2f')} | "
                  f"{f(x.get(key + '_speedup'), '.2f')} |")


if __name__ == "__main__":
    main()
