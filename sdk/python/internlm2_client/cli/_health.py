"""`internlm2 health`: grpc.health.v1 check for container healthchecks (exit 0 = SERVING)."""

from __future__ import annotations

import argparse
import sys

from internlm2_client import check_health
from internlm2_client.cli._common import add_connection_options, client_kwargs, print_json, wants_json
from internlm2_client.errors import InternLM2Error


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "health",
        help="check a server's grpc.health.v1 status (exit 0 when SERVING)",
        description="Ask HOST:PORT for the health of SERVICE ('' = the whole server). Exit 0 when SERVING, "
        "1 when not serving or unreachable.",
    )
    p.add_argument(
        "--service",
        default="",
        metavar="NAME",
        help="service name, e.g. internlm2.v1.InferenceService (default: '' = the server)",
    )
    add_connection_options(p)
    p.set_defaults(func=run, timeout_default=5.0)


def run(args: argparse.Namespace) -> int:
    kwargs = client_kwargs(args, "tokenizer")
    address = kwargs.pop("address")
    kwargs.pop("timeout")
    timeout = getattr(args, "timeout", None) or args.timeout_default
    try:
        status = check_health(address, args.service, timeout=timeout, retry=None, **kwargs)
        error = ""
    except InternLM2Error as e:
        status, error = (
            "UNREACHABLE" if e.code.name in ("UNAVAILABLE", "DEADLINE_EXCEEDED") else "ERROR",
            str(e),
        )
    if wants_json(args):
        print_json({"address": address, "service": args.service, "status": status, "error": error})
    else:
        print(
            f"{address} {args.service or '(server)'}: {status}" + (f" ({error})" if error else ""),
            file=sys.stdout if status == "SERVING" else sys.stderr,
        )
    return 0 if status == "SERVING" else 1
