"""`internlm2 score`: reward scores of responses or whole conversations."""

from __future__ import annotations

import argparse
import json

from internlm2_client import RewardClient
from internlm2_client.cli._common import add_connection_options, client_kwargs, print_json, wants_json


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "score",
        help="score responses with the reward model",
        description="Score --response(s) to --prompt (two or more are ranked), or the conversations in "
        "--file "
        "(a JSON list of conversations, or JSON Lines with one conversation per line).",
    )
    p.add_argument("--prompt", help="the user message the responses answer")
    p.add_argument("--system", help="system message placed before the prompt")
    p.add_argument("--response", action="append", default=[], help="a candidate response (repeatable)")
    p.add_argument("--file", help="conversations to score (each a list of {role, content})")
    p.add_argument("--condition", help="conditional-reward system prompt (COOL RLHF)")
    add_connection_options(p)
    p.set_defaults(func=run)


def _read_conversations(path: str) -> list[list[dict]]:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = [json.loads(line) for line in text.splitlines() if line.strip()]
    if data and isinstance(data[0], dict):  # a single conversation
        data = [data]
    return data


def run(args: argparse.Namespace) -> int:
    if bool(args.file) == bool(args.prompt):
        raise SystemExit("internlm2 score: give either --prompt with --response, or --file")
    with RewardClient(**client_kwargs(args, "reward")) as client:
        if args.file:
            scores = client.score(_read_conversations(args.file), condition=args.condition)
            print_json(scores) if wants_json(args) else print("\n".join(f"{s:.6f}" for s in scores))
            return 0
        if not args.response:
            raise SystemExit("internlm2 score: --prompt needs at least one --response")
        prompt = [{"role": "system", "content": args.system}] if args.system else []
        prompt.append({"role": "user", "content": args.prompt})
        if len(args.response) == 1:
            conv = [*prompt, {"role": "assistant", "content": args.response[0]}]
            score = client.score([conv], condition=args.condition)[0]
            print_json({"score": score}) if wants_json(args) else print(f"{score:.6f}")
            return 0
        ranking = client.rank(prompt, args.response, condition=args.condition)
        if wants_json(args):
            print_json(ranking)
        else:
            for place, idx in enumerate(ranking.order, 1):
                print(f"{place}. [{ranking.scores[idx]:+.4f}] #{idx} {args.response[idx][:70]!r}")
    return 0
