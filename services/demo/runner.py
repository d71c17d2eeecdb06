"""``internlm2 demo``: InternLM2's full chain on one machine, measured.

    1. stack      ``LocalStack``: embedded Redis, the four services and a Celery worker
    2. data       the synthetic sorting task (task.py), a pretraining corpus and a SentencePiece tokenizer
                  of the official format trained on them (or ``--tokenizer``)
    3. train      ONE job through the SDK: prepare_data -> pretrain -> sft -> reward_model -> ppo -> eval,
                  progress printed from WatchJob
    4. serve      every stage's checkpoint behind its own inference server; the same held-out questions
                  asked of each through the SDK; answers scored by the reward service on the trained RM
    5. report     a table per stage (loss, task accuracy, mean reward, perplexity, sample answers),
                  report.json, curves.png — all in ``--output``; the stack is stopped
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from argparse import Namespace
from pathlib import Path

from .evaluate import StageServer, evaluate_policy, reward_accuracy
from .report import plot_curves, render_table
from .sizes import SIZES, DemoSize
from .task import CONDITION, make_data

POLICY_STAGES = ("pretrain", "sft", "ppo")


def say(text: str) -> None:
    print(text, flush=True)


def build_pipeline(size: DemoSize, base: Path, data, eval_questions: Path) -> list[dict]:
    common = {"zero_stage": 2, "checkpoint_every": 0, "micro_batch_size": size.batch_size}
    return [
        {"stage": "prepare_data", "config": {"sources": [str(data.corpus)], "tokenizer": str(base)}},
        {"stage": "pretrain", "config": {**common, "model": str(base), "data": "stage:prepare_data",
                                         "seq_len": size.seq_len, "max_steps": size.pretrain_steps,
                                         "lr": 3e-3, "warmup_steps": 10, "min_lr_ratio": 0.1}},
        {"stage": "sft", "config": {**common, "model": "stage:pretrain", "data": str(data.sft),
                                    "max_length": size.seq_len, "max_steps": size.sft_steps, "lr": 2e-3,
                                    "warmup_steps": 10, "min_lr_ratio": 0.1}},
        {"stage": "reward_model", "config": {"model": "stage:sft", "train_data": str(data.preferences),
                                             "eval_fraction": 0.1, "max_length": 2 * size.seq_len,
                                             "epochs": 1, "lr": 1e-3, "pairs_per_batch": 8,
                                             "zero_stage": 2, "checkpoint_every": 0,
                                             "default_condition": CONDITION}},
        {"stage": "ppo", "config": {"actor": "stage:sft", "reward_model": "stage:reward_model",
                                    "prompts": str(data.prompts), "max_steps": size.ppo_steps, "rounds": 1,
                                    "critic_warmup_iterations": size.ppo_steps // 8,
                                    "rollout_batch_size": size.ppo_prompts, "minibatch_size": 8,
                                    "max_new_tokens": 16, "lr": 2e-5, "critic_lr": 1e-4,
                                    "ptx_coef": 0.0, "checkpoint_every": 0, "default_condition": CONDITION}},
        {"stage": "eval", "config": {"model": "stage:ppo", "generation_data": str(eval_questions),
                                     "perplexity_data": str(eval_questions.with_name("heldout_chat.jsonl")),
                                     "max_new_tokens": 16, "max_length": size.seq_len,
                                     "needle_lengths": [size.seq_len, 2 * size.seq_len], "needles_per_cell": 1}},
    ]


def reward_trend(curves: list[dict]) -> tuple[float, float] | None:
    """Mean reward-model score of PPO's rollouts over the first and the last quarter of its iterations."""
    scores = [c["rm_score"] for c in curves if c["stage"] == "ppo" and "rm_score" in c]
    quarter = len(scores) // 4
    if not quarter:
        return None
    return sum(scores[:quarter]) / quarter, sum(scores[-quarter:]) / quarter


def watch(client, job_id: str) -> list[dict]:
    """Print progress until the job ends; returns the metric events (for the curves)."""
    curves: list[dict] = []
    shown: dict[str, int] = {}
    for event in client.watch_job(job_id):
        kind = event.kind.value
        if kind == "metrics" and event.metrics:
            curves.append({"stage": event.stage, "step": event.step, **event.metrics})
        elif kind == "progress" and event.fraction is not None:
            decile = int(event.fraction * 10)  # a line per 10% of a stage, not per step
            if shown.get(event.stage, -1) < decile:
                shown[event.stage] = decile
                loss = next((c["loss"] for c in reversed(curves) if c["stage"] == event.stage and "loss" in c), None)
                say(f"  {event.stage:<13} {event.fraction * 100:5.1f}%  step {event.step}/{event.total_steps}"
                    + (f"  loss {loss:.3f}" if loss is not None else ""))
        elif kind == "state":
            say(f"  {event.stage or 'job':<13} {event.state.value if event.state else ''} {event.message}".rstrip())
        if event.is_terminal:
            break
    return curves


def run(args: Namespace) -> int:
    from internlm2.core import make_random_checkpoint
    from internlm2.core.tokenizer import InternLM2Tokenizer, train_tokenizer
    from internlm2_client import RewardClient, TrainingClient

    from ..local_stack import LocalStack

    size = SIZES[getattr(args, "size", "small") or "small"]
    out = Path(getattr(args, "output", None) or "demo-output").resolve()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    started = time.monotonic()
    num_heldout = getattr(args, "questions", None) or size.num_heldout

    say(f"[1/5] data and tokenizer -> {out}")
    data = make_data(out / "data", num_train=size.num_train, num_heldout=num_heldout)
    eval_questions = out / "data" / "heldout.jsonl"
    eval_questions.write_text("".join(
        json.dumps({"prompt": q.messages(), "reference": q.answer}) + "\n" for q in data.heldout))
    eval_questions.with_name("heldout_chat.jsonl").write_text("".join(
        json.dumps({"messages": q.messages(q.answer)}) + "\n" for q in data.heldout))
    if getattr(args, "tokenizer", None):
        tokenizer = InternLM2Tokenizer.from_pretrained(args.tokenizer)
        tokenizer.save_pretrained(out / "tokenizer")
    else:
        tokenizer = train_tokenizer(data.texts, out / "tokenizer", vocab_size=size.vocab_size)
    base = make_random_checkpoint(out / "models" / "base", preset="tiny", tokenizer=out / "tokenizer",
                                  vocab_size=tokenizer.vocab_size, **size.model_overrides())
    init_rm = make_random_checkpoint(out / "models" / "reward-init", preset="tiny", reward=True, seed=1,
                                     tokenizer=out / "tokenizer", vocab_size=tokenizer.vocab_size,
                                     reward_token_id=tokenizer.reward_token_id, **size.model_overrides())

    say("[2/5] starting the local stack (Redis, 4 services, 1 worker) ...")
    stack_args = Namespace(model=str(base), reward_model=str(init_rm), host=getattr(args, "host", "127.0.0.1"),
                           device=getattr(args, "device", None), dtype=getattr(args, "dtype", None),
                           redis_url=getattr(args, "redis_url", None), work_dir=str(out / "stack"), json=False)
    stack = LocalStack(stack_args)
    code = 1
    servers: list[StageServer] = []
    try:
        stack.prepare_models()
        stack.start_redis()
        stack.start_processes()
        stack.wait_ready()
        endpoints = stack.endpoints()
        for name in ("tokenizer", "inference", "reward", "training"):
            say(f"  {name:<10} {endpoints[name]['address']}")

        say("[3/5] one training job: prepare_data -> pretrain -> sft -> reward_model -> ppo -> eval")
        training = TrainingClient(endpoints["training"]["address"])
        submission = training.submit_job(build_pipeline(size, base, data, eval_questions), name="demo",
                                         idempotency_key=f"demo-{out}-{time.time_ns()}")
        job_id = submission.job.job_id
        say(f"  job {job_id}")
        curves = watch(training, job_id)
        job = training.get_job(job_id)
        if job.state.value != "succeeded":
            failed = [s for s in job.stages if s.error]
            raise RuntimeError(f"job {job_id} ended {job.state.value}: "
                               + "; ".join(f"{s.name}: {s.error}" for s in failed))
        stages = {s.name: s for s in job.stages}
        checkpoints = {name: Path(next(a.uri for a in s.artifacts if a.name == "final"))
                       for name, s in stages.items() if any(a.name == "final" for a in s.artifacts)}

        say("[4/5] serving every stage's checkpoint and asking the held-out questions ...")
        judge_path = Path(args.reward_model) if getattr(args, "reward_model", None) else checkpoints["reward_model"]
        judge = StageServer.start("reward", judge_path, stack.work_dir / "logs", stack.host)
        servers.append(judge)
        rewards = RewardClient(judge.address)
        rows = []
        policies = [("base", base)] + [(n, checkpoints[n]) for n in POLICY_STAGES if n in checkpoints]
        if getattr(args, "model", None):
            policies.append(("--model", Path(args.model)))
        for name, path in policies:
            server = StageServer.start("inference", path, stack.work_dir / "logs", stack.host)
            servers.append(server)
            result = evaluate_policy(server.address, rewards, data.heldout, CONDITION)
            server.stop()
            metrics = stages[name].metrics if name in stages else {}
            # PPO has no single "loss": its row shows the actor's (policy + ptx) loss.
            rows.append({"stage": name, "loss": metrics.get("loss", metrics.get("actor_loss")), **result})
            say(f"  {name:<13} accuracy {result['accuracy']:.2f} (digits {result['digit_accuracy']:.2f}, "
                f"largest first {result['descending']:.2f})  "
                f"reward {result['mean_reward']:+.3f}  answer perplexity {result['perplexity']:.2f}")
        rm_acc = reward_accuracy(rewards, data.heldout, CONDITION)
        rm_loss = stages["reward_model"].metrics.get("loss") if "reward_model" in stages else None
        rows.append({"stage": "reward_model", "loss": rm_loss, "pairwise_accuracy": rm_acc})
        say(f"  {'reward_model':<13} held-out pairwise accuracy {rm_acc:.2f}")
        trend = reward_trend(curves)
        if trend:
            say(f"  {'ppo':<13} rollout reward-model score, first quarter of the iterations {trend[0]:+.3f}"
                f" -> last quarter {trend[1]:+.3f}")

        say("[5/5] report")
        report = {
            "job_id": job_id,
            "size": getattr(args, "size", "small"),
            "seconds": round(time.monotonic() - started, 1),
            "rows": rows,
            "stage_metrics": {name: dict(s.metrics) for name, s in stages.items()},
            "checkpoints": {k: str(v) for k, v in checkpoints.items()},
            "eval_artifacts": [a.uri for a in stages["eval"].artifacts] if "eval" in stages else [],
            "curves": curves,
            "ppo_reward_trend": trend,
        }
        (out / "report.json").write_text(json.dumps(report, indent=2))
        plot_curves(curves, out / "curves.png")
        table = render_table(rows)
        (out / "report.md").write_text(table + "\n")
        say("\n" + table)
        say(f"\nEverything is in {out} (report.json, report.md, curves.png, data/, tokenizer/, models/, stack/)."
            f" Took {report['seconds']:.0f}s.")
        code = 0
    except KeyboardInterrupt:
        say("interrupted")
        code = 130
    except Exception as exc:  # the message is the user's answer; logs are in the output folder
        print(f"internlm2 demo: {exc}", file=sys.stderr, flush=True)
        code = 1
    finally:
        for server in servers:
            server.stop()
        say("stopping the local stack ...")
        clean = stack.stop()
        say("stopped." if clean else "stopped (some processes had to be killed).")
    return code
