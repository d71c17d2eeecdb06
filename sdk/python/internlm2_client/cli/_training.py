"""`internlm2 train stages|submit|status|watch|cancel|retry`."""

from __future__ import annotations

import argparse
import sys

from internlm2_client import TrainingClient
from internlm2_client.cli._common import (
    add_connection_options,
    client_kwargs,
    load_json_arg,
    print_json,
    wants_json,
)
from internlm2_client.types import Job, JobEvent, JobEventKind, JobState, StageSpec


def register(subparsers) -> None:
    train = subparsers.add_parser(
        "train",
        help="training jobs: stages, submit, plan, status, watch, cancel, retry",
        description="Submit and follow training pipelines on the training service.",
    )
    sub = train.add_subparsers(dest="train_command", metavar="COMMAND", required=True)

    p = sub.add_parser("stages", help="list installed stages (or show one stage's config schema)")
    p.add_argument("name", nargs="?", help="print this stage's config JSON Schema")
    add_connection_options(p)
    p.set_defaults(func=run_stages)

    p = sub.add_parser(
        "submit",
        help="submit a pipeline of stages",
        description="Submit a job. Stages run in the order given.",
    )
    p.add_argument(
        "--stage",
        action="append",
        default=[],
        metavar="NAME[=JSON|=@FILE]",
        help="a stage and its config (repeatable), e.g. --stage sft=@sft.json",
    )
    p.add_argument(
        "--pipeline",
        metavar="FILE",
        help='JSON file {"name", "labels", "stages": [{"stage", "config", "name"}]}',
    )
    p.add_argument("--name", default=None, help="display name")
    p.add_argument("--label", action="append", default=[], metavar="KEY=VALUE", help="label (repeatable)")
    p.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="[checkpoint:|dataset:]NAME=PATH",
        help='a named job input stages refer to as "input:NAME" (repeatable); without a kind prefix it is '
        'offered as both; "base" is the default model, e.g. --input checkpoint:base=/models/base',
    )
    p.add_argument("--idempotency-key", default="", help="resubmitting with the same key returns the first job")
    p.add_argument("--watch", action="store_true", help="follow the job until it ends")
    add_connection_options(p)
    p.set_defaults(func=run_submit)

    p = sub.add_parser(
        "plan",
        help="estimate a pipeline's per-GPU memory",
        description="Estimate each stage's memory per GPU (weights, gradients, optimizer, activations, KV, frozen "
        "models) on GPUs of the given size. Exit status 1 when a stage does not fit.",
    )
    p.add_argument("--stage", action="append", default=[], metavar="NAME[=JSON|=@FILE]", help="as for submit")
    p.add_argument("--pipeline", metavar="FILE", help="as for submit")
    p.add_argument("--gpus", type=int, default=8, help="GPUs per stage unless its launch config says (default 8)")
    p.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory of one GPU in GiB (default 80)")
    p.add_argument("--model", default="", help='model preset for stages naming no checkpoint, e.g. "7b"')
    add_connection_options(p)
    p.set_defaults(func=run_plan, name=None, label=[])

    p = sub.add_parser("status", help="show a job, or list jobs")
    p.add_argument("job_id", nargs="?", help="job to show; omitted: list jobs")
    p.add_argument(
        "--state",
        action="append",
        default=[],
        choices=[s.value for s in JobState if s.value != "unspecified"],
        help="(list) only jobs in this state (repeatable)",
    )
    p.add_argument("--limit", type=int, default=20, help="(list) most jobs to show")
    add_connection_options(p)
    p.set_defaults(func=run_status)

    p = sub.add_parser("watch", help="follow a job's progress until it ends")
    p.add_argument("job_id")
    p.add_argument("--after", type=int, default=0, metavar="SEQ", help="only events after this sequence number")
    add_connection_options(p)
    p.set_defaults(func=run_watch)

    p = sub.add_parser("cancel", help="cancel a job")
    p.add_argument("job_id")
    p.add_argument("--reason", default="", help="recorded on the job")
    add_connection_options(p)
    p.set_defaults(func=run_cancel)

    p = sub.add_parser(
        "retry",
        help="queue a FAILED or CANCELLED job again",
        description="Queue a failed or cancelled job again; its first unfinished stage resumes from its "
        "last committed checkpoint.",
    )
    p.add_argument("job_id")
    add_connection_options(p)
    p.set_defaults(func=run_retry)


class UsageError(ValueError):
    """A malformed argument: one line on stderr, exit status 2 (like argparse)."""


def parse_stage(text: str) -> StageSpec:
    """NAME, NAME=JSON or NAME=@FILE -> StageSpec."""
    name, sep, config = text.partition("=")
    return StageSpec(stage=name.strip(), config=_json(config, f"--stage {name.strip()}") if sep else {})


def _json(text: str, where: str):
    try:
        return load_json_arg(text)
    except ValueError as exc:  # json.JSONDecodeError
        raise UsageError(f"{where}: invalid JSON: {exc}") from None
    except OSError as exc:
        raise UsageError(f"{where}: cannot read {text[1:]!r}: {exc.strerror}") from None


def parse_inputs(items: list[str]) -> dict[str, dict[str, str]]:
    """``[checkpoint:|dataset:]NAME=PATH`` items -> {"checkpoints": {...}, "datasets": {...}}."""
    tables: dict[str, dict[str, str]] = {}
    for item in items:
        key, sep, path = item.partition("=")
        kind, colon, name = key.partition(":")
        if not colon:
            kind, name = "", kind
        if not sep or not name or not path or kind not in ("", "checkpoint", "dataset"):
            raise UsageError(f"--input {item}: expected [checkpoint:|dataset:]NAME=PATH")
        for table in ("checkpoints", "datasets") if not kind else (kind + "s",):
            tables.setdefault(table, {})[name] = path
    return tables


def _pipeline(args: argparse.Namespace) -> tuple[list, str, dict]:
    stages: list = []
    name, labels = "", {}
    if args.pipeline:
        spec = _json("@" + args.pipeline, f"--pipeline {args.pipeline}")
        if not isinstance(spec, dict):
            raise UsageError(f"--pipeline {args.pipeline}: expected a JSON object with stages")
        stages, name, labels = (
            list(spec.get("stages", [])),
            spec.get("name", ""),
            dict(spec.get("labels", {})),
        )
    stages += [parse_stage(s) for s in args.stage]
    for item in args.label:
        key, _, value = item.partition("=")
        labels[key] = value
    if not stages:
        raise SystemExit("internlm2 train submit: give --stage (repeatable) or --pipeline")
    return stages, args.name if args.name is not None else name, labels


def _job_line(job: Job) -> str:
    stage = job.stages[job.current_stage].name if job.stages else "-"
    return f"{job.job_id}  {job.state.value:<10} {job.progress * 100:5.1f}%  stage={stage}  {job.name}"


def _print_job(job: Job) -> None:
    print(_job_line(job))
    for s in job.stages:
        metrics = " ".join(f"{k}={v:.4g}" for k, v in sorted(s.metrics.items()))
        print(f"  - {s.name} ({s.stage}): {s.state.value} {s.progress * 100:.0f}% {metrics}".rstrip())
        if s.error:
            print(f"    error: {s.error}")
    for a in job.artifacts:
        print(f"  artifact {a.kind.value}: {a.uri}  [{a.stage}/{a.name}]")
    if job.error:
        print(f"  error: {job.error}")


def run_stages(args: argparse.Namespace) -> int:
    with TrainingClient(**client_kwargs(args, "training")) as client:
        stages = client.list_stages()
    if args.name:
        match = [s for s in stages if s.name == args.name]
        if not match:
            print(
                f"no stage named {args.name!r}; installed: {', '.join(s.name for s in stages)}",
                file=sys.stderr,
            )
            return 1
        print_json(match[0].config_schema if not wants_json(args) else match[0])
        return 0
    if wants_json(args):
        print_json(stages)
    else:
        for s in stages:
            print(f"{s.name:<20} {s.queue:<6} {s.version:<10} {s.description}")
    return 0


def run_submit(args: argparse.Namespace) -> int:
    try:
        stages, name, labels = _pipeline(args)
        inputs = parse_inputs(args.input)
    except UsageError as exc:
        print(f"internlm2 train submit: {exc}", file=sys.stderr)
        return 2
    with TrainingClient(**client_kwargs(args, "training")) as client:
        sub = client.submit_job(
            stages, idempotency_key=args.idempotency_key, name=name, labels=labels, inputs=inputs or None
        )
    if wants_json(args):
        print_json(sub)
    else:
        print(f"{'submitted' if sub.created else 'already submitted'}: {sub.job.job_id}")
    if args.watch:
        args.job_id, args.after = sub.job.job_id, 0
        return run_watch(args)
    return 0


def run_status(args: argparse.Namespace) -> int:
    with TrainingClient(**client_kwargs(args, "training")) as client:
        if args.job_id:
            job = client.get_job(args.job_id)
            print_json(job) if wants_json(args) else _print_job(job)
            return 0
        jobs = []
        for job in client.iter_jobs(states=args.state, page_size=min(args.limit, 100)):
            jobs.append(job)
            if len(jobs) >= args.limit:
                break
    if wants_json(args):
        print_json(jobs)
    else:
        for job in jobs:
            print(_job_line(job))
    return 0


def render_event(event: JobEvent, width: int = 30) -> str:
    """One line for an event; progress events get a bar: `sft [#####-----]  50.0% step 5/10`."""
    where = event.stage or "job"
    if event.kind is JobEventKind.PROGRESS:
        fraction = min(max(event.fraction or 0.0, 0.0), 1.0)
        filled = round(fraction * width)
        steps = f" step {event.step}/{event.total_steps}" if event.total_steps else ""
        bar = "#" * filled + "-" * (width - filled)
        return f"{where} [{bar}] {fraction * 100:5.1f}%{steps} {event.message}".rstrip()
    if event.kind is JobEventKind.STATE:
        return f"{where}: {event.state.value if event.state else '?'} {event.message}".rstrip()
    if event.kind is JobEventKind.METRICS:
        values = " ".join(f"{k}={v:.4g}" for k, v in sorted(event.metrics.items()))
        return f"{where} step {event.step}: {values}"
    if event.kind is JobEventKind.ARTIFACT and event.artifact:
        return f"{where}: artifact {event.artifact.kind.value} {event.artifact.uri}"
    if event.kind is JobEventKind.LOG:
        return f"{where} {event.level}: {event.message}"
    return f"{where}: {event.kind.value}"


def run_watch(args: argparse.Namespace) -> int:
    tty = sys.stdout.isatty() and not wants_json(args)
    with TrainingClient(**client_kwargs(args, "training")) as client:
        with client.watch_job(args.job_id, after_sequence=args.after) as events:
            bar_open = False
            for event in events:
                if wants_json(args):
                    print_json(event)
                    continue
                line = render_event(event)
                if tty and event.kind is JobEventKind.PROGRESS:  # redraw the bar in place
                    print("\r\x1b[2K" + line, end="", flush=True)
                    bar_open = True
                    continue
                if bar_open:
                    print()
                    bar_open = False
                print(line, flush=True)
            if bar_open:
                print()
        job = client.get_job(args.job_id)
    if not wants_json(args):
        _print_job(job)
    return 0 if job.state is JobState.SUCCEEDED else 1


def run_plan(args: argparse.Namespace) -> int:
    try:
        stages, _, _ = _pipeline(args)
    except UsageError as exc:
        print(f"internlm2 train plan: {exc}", file=sys.stderr)
        return 2
    with TrainingClient(**client_kwargs(args, "training")) as client:
        plan = client.plan_job(stages, num_gpus=args.gpus, gpu_memory_gib=args.gpu_memory_gib, model=args.model)
    if wants_json(args):
        print_json(plan)
        return 0 if plan.fits else 1
    cols = ("weights", "grads", "optimizer", "activations", "kv", "frozen", "other", "total")
    print(f"{'stage':<22}{'gpus':>5}" + "".join(f"{c:>12}" for c in cols) + "  fits")
    for s in plan.stages:
        values = "".join(f"{getattr(s, c + '_gib'):>12.2f}" for c in cols)
        print(f"{s.name:<22}{s.num_gpus:>5}{values}  {'yes' if s.fits else 'NO'}")
    print(f"(GiB per GPU on {plan.gpu_memory_gib:g} GiB GPUs)")
    for s in plan.stages:
        for note in s.notes:
            print(f"{s.name}: {note}")
    return 0 if plan.fits else 1


def run_retry(args: argparse.Namespace) -> int:
    with TrainingClient(**client_kwargs(args, "training")) as client:
        job = client.retry_job(args.job_id)
    print_json(job) if wants_json(args) else print(_job_line(job))
    return 0


def run_cancel(args: argparse.Namespace) -> int:
    with TrainingClient(**client_kwargs(args, "training")) as client:
        job = client.cancel_job(args.job_id, reason=args.reason)
    print_json(job) if wants_json(args) else print(_job_line(job))
    return 0
