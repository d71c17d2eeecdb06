"""Peak host (and device) memory of loading and of one training step, at real InternLM2 shapes, against
the planner's estimate.

    python benchmarks/bench_memory.py                      # 1.8B shapes, a random bf16 checkpoint in /tmp
    python benchmarks/bench_memory.py --json out.json      # also write the numbers

Every measurement runs in its own child process, which samples its anonymous resident memory
(``RssAnon``: the safetensors' page cache is file-backed and not counted) every 5 ms; the number
reported is peak minus the baseline taken after imports (and, for ZeRO-3, after the process group
starts). On CUDA it also reports ``torch.cuda.max_memory_allocated``.

Loading (full 1.8B):
  fp32-host   ``InternLM2ForCausalLM.from_pretrained(fp32, cpu)`` — what every rank did before
  bf16        ``trainer.load_causal_lm(path, cfg)`` with bf16 training, ZeRO-2 (on CUDA: on the GPU)
  zero3-1     the same under ZeRO-3 on 1 rank (the partition is the whole model)
  zero3-2     ZeRO-3 on 2 ranks (two processes on this machine): each holds half

One step (real widths — hidden 2048, FFN 8192, vocab 92,544 — but ``--step-layers`` decoder layers,
since 16 bytes/parameter of AdamW state for all 24 layers exceed this machine's memory): pretrain/sft
(packed LM loss), reward_model, dpo, each one DeepSpeed optimizer step at ZeRO-2 (bf16 if DeepSpeed
supports it on this device, else fp32), with the planner's estimate for the same configuration on one
device. PPO is the real stage (``stage.run``) for one iteration: actor and critic loaded and wrapped by
DeepSpeed, frozen reference and reward model, rollouts generated, one actor and one critic step, final/
exported — everything a PPO iteration holds at once. Then the planner's per-GPU estimates for 7B and 20B
on 8 x 80 GiB.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MIB = 2**20


def rss_anon_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    return 0


class PeakSampler:
    """Peak RssAnon (KiB) above the baseline at construction, sampled every 5 ms in a thread."""

    def __init__(self):
        self.base = rss_anon_kib()
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_anon_kib())
            time.sleep(0.005)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_anon_kib())
        return (self.peak - self.base) / 1024  # MiB


def write_random_checkpoint(directory: Path, preset: str, layers: int | None = None, seed: int = 0,
                            **config_overrides) -> Path:
    """A random checkpoint of ``preset``'s shapes in bf16, written one tensor at a time (never a full model
    in memory); ``layers`` (and ``config_overrides``) override the config."""
    import torch

    from internlm2.core import InternLM2Config, InternLM2ForCausalLM
    from internlm2.core.checkpoint import ShardedWriter

    if (directory / "config.json").exists():
        return directory
    overrides = {**config_overrides, **({"num_hidden_layers": layers} if layers else {})}
    config = InternLM2Config.preset(preset, **overrides)
    with torch.device("meta"):
        model = InternLM2ForCausalLM(config)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # drawing 2B normals on 2 CPU cores takes minutes
    g = torch.Generator(device).manual_seed(seed)
    writer = ShardedWriter(directory, config, "InternLM2ForCausalLM", torch.bfloat16, max_shard_bytes=2 * 2**30)
    for name, p in model.named_parameters():
        t = (torch.ones(p.shape) if name.endswith("norm.weight")
             else torch.randn(p.shape, generator=g, device=device) * 0.02)
        writer.add(name, t.to(torch.bfloat16))
        del t
    writer.close()
    return directory


def _training_config(zero: int, precision: str, **extra):
    from internlm2.plugins.trainer import TrainingConfig

    return TrainingConfig(zero_stage=zero, precision=precision, max_steps=1, checkpoint_every=0, tensorboard=False,
                          zero3_param_persistence_threshold=0, **extra)


def warm_up() -> None:
    """Pays the one-time library initialisation (~75 MB on CPU: lazy imports and registries the first
    model construction triggers, the same for any model size) before the baseline is taken."""
    import torch

    from internlm2.core import InternLM2Config, InternLM2ForCausalLM

    with torch.device("meta"):
        InternLM2ForCausalLM(InternLM2Config.preset("tiny"))


def child_load(ckpt: str, mode: str) -> dict:
    import torch

    from internlm2.core import InternLM2ForCausalLM
    from internlm2.plugins.trainer import init_distributed, load_causal_lm

    if mode.startswith("zero3"):
        init_distributed()
    warm_up()
    sampler = PeakSampler()
    if mode == "fp32-host":
        model = InternLM2ForCausalLM.from_pretrained(ckpt, dtype=torch.float32, device="cpu")
    elif mode == "bf16":
        model = load_causal_lm(ckpt, _training_config(2, "bf16"))
    else:
        model = load_causal_lm(ckpt, _training_config(3, "bf16"))
    peak = sampler.stop()
    held = sum(getattr(p, "ds_tensor", p).numel() * p.element_size() for p in model.parameters()) / MIB
    out = {"peak_host_mib": peak, "held_mib": held}
    if torch.cuda.is_available():
        out["peak_device_mib"] = torch.cuda.max_memory_allocated() / MIB
    return out


def _step_batch(kind: str, seq: int, vocab: int):
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (1, seq), generator=g)
    if kind == "lm":
        labels = ids.clone()
        labels[:, : seq // 4] = -100  # a prompt without loss, as SFT has
        return {"input_ids": ids, "labels": labels, "doc_ids": torch.zeros_like(ids),
                "position_ids": torch.arange(seq)[None]}
    pair = torch.randint(1, vocab, (2, seq), generator=g)
    mask = torch.ones(2, seq, dtype=torch.bool)
    if kind == "rm":
        return {"input_ids": pair, "padding_mask": mask}
    labels = pair.clone()
    labels[:, : seq // 2] = -100
    return {"input_ids": pair, "padding_mask": mask, "labels": labels,
            "ref_chosen": torch.tensor([-100.0]), "ref_rejected": torch.tensor([-110.0])}


def child_step(ckpt: str, stage: str, seq: int, precision: str) -> dict:
    import torch

    from internlm2.plugins.trainer import load_causal_lm, load_reward_model, packed_lm_loss
    from internlm2.plugins.trainer.deepspeed_loop import build_engine, init_distributed

    init_distributed()
    warm_up()
    cfg = _training_config(2, precision)
    sampler = PeakSampler()
    if stage == "reward_model":
        from internlm2.plugins.algorithms.reward_loss import reward_model_loss
        from internlm2.plugins.stages.reward_model import split_scores

        model = load_reward_model(ckpt, 92527, cfg)

        def loss_fn(m, b):
            return reward_model_loss(*split_scores(m, b)).loss

        batch = _step_batch("rm", seq, model.config.vocab_size)
    elif stage == "dpo":
        from internlm2.plugins.algorithms.dpo_loss import dpo_loss
        from internlm2.plugins.stages.dpo import pair_logprobs

        model = load_causal_lm(ckpt, cfg)

        def loss_fn(m, b):
            c, r = pair_logprobs(m, b)
            return dpo_loss(c, r, b["ref_chosen"], b["ref_rejected"]).loss

        batch = _step_batch("dpo", seq, model.config.vocab_size)
    else:
        model = load_causal_lm(ckpt, cfg)
        loss_fn = packed_lm_loss
        batch = _step_batch("lm", seq, model.config.vocab_size)
    engine = build_engine(model, loss_fn, cfg)
    batch = {k: v.to(engine.device) for k, v in batch.items()}
    out = engine(batch)
    loss = out[0] if isinstance(out, tuple) else out
    engine.backward(loss)
    engine.step()
    peak = sampler.stop()
    result = {"peak_host_mib": peak, "loss": float(loss), "bf16": bool(engine.bfloat16_enabled())}
    if torch.cuda.is_available():
        result["peak_device_mib"] = torch.cuda.max_memory_allocated() / MIB
    return result


PPO_PROMPT_TOKENS, PPO_NEW_TOKENS, PPO_ROLLOUTS = 64, 16, 2


def ppo_config(actor: str, reward_model: str, prompts: str, precision: str) -> dict:
    """One PPO iteration, actor updated in it (no critic warm-up), no pretraining mix."""
    return {"actor": actor, "reward_model": reward_model, "prompts": prompts, "max_steps": 1, "rounds": 1,
            "critic_warmup_iterations": 0, "rollout_batch_size": PPO_ROLLOUTS, "minibatch_size": PPO_ROLLOUTS,
            "max_prompt_length": PPO_PROMPT_TOKENS, "max_new_tokens": PPO_NEW_TOKENS, "ptx_coef": 0.0,
            "ptx_batch_size": 1, "ptx_seq_len": 8, "zero_stage": 2, "precision": precision,
            "checkpoint_every": 0, "tensorboard": False}


def child_ppo(actor: str, reward_model: str, workdir: str, precision: str) -> dict:
    import torch

    from internlm2.plugins.contract import StageInputs, local_context
    from internlm2.plugins.registry import get_stage

    warm_up()
    prompts = Path(workdir) / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Question {i}: tell me more."}) + "\n"
                               for i in range(PPO_ROLLOUTS)))
    stage = get_stage("ppo")
    ctx = local_context(stage, ppo_config(actor, reward_model, str(prompts), precision), Path(workdir) / "out",
                        inputs=StageInputs(checkpoints={"base": Path(actor)}))
    sampler = PeakSampler()
    metrics = stage.run(ctx)
    result = {"peak_host_mib": sampler.stop(), "rm_score": float(metrics.get("rm_score", float("nan")))}
    if torch.cuda.is_available():
        result["peak_device_mib"] = torch.cuda.max_memory_allocated() / MIB
    return result


def random_reward_model(directory: Path, preset: str, layers: int, tokenizer: Path, **overrides) -> Path:
    """A random InternLM2-Reward checkpoint (bf16) whose reward token is ``tokenizer``'s."""
    import torch

    from internlm2.core import make_random_checkpoint
    from internlm2.core.tokenizer import InternLM2Tokenizer

    if not (directory / "config.json").exists():
        make_random_checkpoint(directory, preset, reward=True, dtype=torch.bfloat16, tokenizer=tokenizer,
                               reward_token_id=InternLM2Tokenizer.from_pretrained(tokenizer).reward_token_id,
                               num_hidden_layers=layers, **overrides)
    return directory


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_child(args: list[str], world: int = 1, timeout: float = 900) -> list[dict]:
    """Runs this file with ``--child ...`` in ``world`` processes (one process group); their JSON results."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if world > 1:
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE=str(world),
                   LOCAL_WORLD_SIZE=str(world))
    procs = [subprocess.Popen([sys.executable, __file__, "--child", *args], cwd=REPO,
                              env={**env, **({"RANK": str(r), "LOCAL_RANK": str(r)} if world > 1 else {})},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(world)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        lines = [line for line in out.splitlines() if line.startswith("{")]
        if p.returncode != 0 or not lines:
            raise RuntimeError(f"child {args} failed ({p.returncode}): {err[-3000:]}")
        results.append(json.loads(lines[-1]))
    return results


def planner_rows(preset: str, num_gpus: int, gpu_gib: float) -> list[dict]:
    from internlm2.plugins.planner import plan_pipeline

    ck = {"gradient_checkpointing": True}
    stages = [
        {"name": "sft zero2", "stage": "sft", "config": {"zero_stage": 2, "max_length": 4096, **ck}},
        {"name": "sft zero3", "stage": "sft", "config": {"zero_stage": 3, "max_length": 4096, **ck}},
        {"name": "sft lora r16", "stage": "sft", "config": {"zero_stage": 2, "max_length": 4096, "lora_rank": 16,
                                                           **ck}},
        {"name": "reward_model zero3", "stage": "reward_model", "config": {"zero_stage": 3, **ck}},
        {"name": "dpo zero3", "stage": "dpo", "config": {"zero_stage": 3, "max_length": 2048, **ck}},
        {"name": "ppo zero3", "stage": "ppo", "config": {"zero_stage": 3, **ck}},
        {"name": "ppo zero3 frozen_offload", "stage": "ppo", "config": {"zero_stage": 3, "frozen_offload": True,
                                                                        **ck}},
        {"name": "long_context 32k zero3", "stage": "long_context", "config": {"zero_stage": 3, **ck}},
    ]
    plan = plan_pipeline(stages, num_gpus, gpu_gib, preset)
    return plan.to_dict()["stages"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="1_8b")
    ap.add_argument("--dir", default="/tmp/internlm2-bench-memory")
    ap.add_argument("--step-layers", type=int, default=1)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--skip-steps", action="store_true")
    ap.add_argument("--tokenizer", default=str(REPO.parent / "shared" / "reference-data" / "internlm2"),
                    help="folder with the official tokenizer.model, for PPO's prompts and rollouts (default: "
                    "../shared's; without it the PPO step is skipped)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", nargs="+", default=None)
    args = ap.parse_args()
    if args.child:
        kind, *rest = args.child
        result = (child_load(*rest) if kind == "load" else child_ppo(*rest) if kind == "ppo"
                  else child_step(rest[0], rest[1], int(rest[2]), rest[3]))
        print(json.dumps(result), flush=True)
        # Skip interpreter teardown, as the production launcher does: gloo's threads can abort a finished child.
        os._exit(0)

    import torch

    from internlm2.core import InternLM2Config
    from internlm2.plugins.planner import estimate_stage, model_shapes

    root = Path(args.dir)
    t0 = time.perf_counter()
    full = write_random_checkpoint(root / args.preset, args.preset)
    shapes = model_shapes(args.preset)
    bf16_mib = 2 * shapes.params / MIB
    largest = max(shapes.vocab * shapes.hidden, shapes.largest_layer) * 2 / MIB
    report: dict = {"preset": args.preset, "params": shapes.params, "bf16_weights_mib": bf16_mib,
                    "cuda": torch.cuda.is_available(), "load": {}, "step": {}}
    print(f"{args.preset}: {shapes.params:,} parameters, bf16 weights {bf16_mib:,.0f} MiB "
          f"(checkpoint ready in {time.perf_counter() - t0:.0f} s)")
    print(f"\n{'loading':<12}{'peak host MiB':>15}{'held MiB':>12}{'peak device MiB':>17}")
    for mode, world in (("fp32-host", 1), ("bf16", 1), ("zero3-1", 1), ("zero3-2", 2)):
        results = run_child(["load", str(full), mode], world=world)
        r = {"peak_host_mib": max(x["peak_host_mib"] for x in results),
             "held_mib": max(x["held_mib"] for x in results),
             "peak_device_mib": max(x.get("peak_device_mib", 0.0) for x in results)}
        report["load"][mode] = r
        print(f"{mode:<12}{r['peak_host_mib']:>15,.0f}{r['held_mib']:>12,.0f}{r['peak_device_mib']:>17,.0f}")

    if not args.skip_steps:
        small = write_random_checkpoint(root / f"{args.preset}-{args.step_layers}l", args.preset, args.step_layers)
        cfg = InternLM2Config.from_pretrained(small)
        precision = "bf16"
        print(f"\none optimizer step, {args.step_layers} layer(s) at {args.preset} widths, {args.seq} tokens, "
              f"ZeRO-2, 1 process")
        print(f"{'stage':<14}{'precision':>10}{'peak host MiB':>15}{'planned MiB':>13}{'peak device MiB':>17}")
        for stage in ("sft", "reward_model", "dpo"):
            try:
                r = run_child(["step", str(small), stage, str(args.seq), precision])[0]
            except RuntimeError as exc:  # bf16 unsupported by DeepSpeed here: fall back to fp32
                print(f"  ({stage} in bf16 failed: {str(exc).splitlines()[-1][:120]}; fp32)")
                precision = "fp32"
                r = run_child(["step", str(small), stage, str(args.seq), precision])[0]
            tokens_cfg = {"sft": {"max_length": args.seq}, "reward_model": {"batch_tokens": 2 * args.seq},
                          "dpo": {"pairs_per_batch": 1, "max_length": args.seq}}[stage]
            planned = estimate_stage({"stage": stage, "config": {"zero_stage": 2, "precision": precision,
                                                                 **tokens_cfg}, "model": cfg}, 1)
            r["planned_mib"] = (planned.total - planned.overhead) * 1024  # no CUDA context on the host
            report["step"][stage] = {**r, "precision": precision}
            print(f"{stage:<14}{precision:>10}{r['peak_host_mib']:>15,.0f}{r['planned_mib']:>13,.0f}"
                  f"{r.get('peak_device_mib', 0.0):>17,.0f}")
        ppo = ppo_step(args, root, small, cfg, precision)
        if ppo is not None:
            report["step"]["ppo"] = ppo

    for preset in ("7b", "20b"):
        rows = planner_rows(preset, 8, 80.0)
        report[f"plan_{preset}"] = rows
        print(f"\nplanner, {preset} on 8 x 80 GiB (GiB per GPU)")
        print(f"{'stage':<28}{'weights':>9}{'grads':>8}{'optim':>8}{'activ':>8}{'kv':>7}{'frozen':>8}{'buffers':>8}"
              f"{'total':>8}  fits")
        for s in rows:
            print(f"{s['name']:<28}{s['weights']:>9.1f}{s['grads']:>8.1f}{s['optimizer']:>8.1f}"
                  f"{s['activations']:>8.1f}{s['kv']:>7.1f}{s['frozen']:>8.1f}{s['buffers']:>8.1f}{s['total']:>8.1f}"
                  f"  {'yes' if s['fits'] else 'NO'}")
    print(f"\nlargest tensor {largest:,.0f} MiB; total {time.perf_counter() - t0:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


def ppo_step(args, root: Path, small: Path, cfg, precision: str) -> dict | None:
    """PPO, the stage itself, one iteration; the reward model (and so the critic) at the same widths. None
    when skipped; a failed child is reported, not raised, so a one-shot GPU session keeps its other numbers."""
    from internlm2.core.random_checkpoint import copy_tokenizer
    from internlm2.plugins.planner import estimate_stage

    if not (Path(args.tokenizer) / "tokenizer.model").exists():
        print(f"ppo: skipped (no tokenizer.model in {args.tokenizer}; the real shapes need the official "
              "92,544-token vocabulary: --tokenizer)")
        return None
    # The stage reads prompts and detokenises rollouts with the checkpoint's tokenizer: the model's vocabulary.
    copy_tokenizer(args.tokenizer, small)
    reward = random_reward_model(root / f"{args.preset}-{args.step_layers}l-reward", args.preset, args.step_layers,
                                 tokenizer=small)
    workdir = root / "ppo-run"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    try:
        r = run_child(["ppo", str(small), str(reward), str(workdir), precision])[0]
    except RuntimeError as exc:
        print(f"ppo: failed: {str(exc).splitlines()[-1][:200]}")
        return {"error": str(exc)[-2000:]}
    planned = estimate_stage({"stage": "ppo", "config": ppo_config(str(small), str(reward), "", precision),
                              "model": cfg}, 1)
    r["planned_mib"] = (planned.total - planned.overhead) * 1024
    print(f"{'ppo':<14}{precision:>10}{r['peak_host_mib']:>15,.0f}{r['planned_mib']:>13,.0f}"
          f"{r.get('peak_device_mib', 0.0):>17,.0f}")
    return {**r, "precision": precision}


if __name__ == "__main__":
    if not __import__("torch").cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main()
