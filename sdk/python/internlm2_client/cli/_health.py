"""`internlm2 health`: grpc.health.v1 check for container healthchecks (exit 0 = SERVING), or, with ``--url``,
an HTTP readiness check (the gateway's ``/ready``: 200 once every backend it fronts is SERVING)."""

from __future__ import annotations

import argparse
import ssl
import sys
import urllib.error
import urllib.request

from internlm2_client import check_health
from internlm2_client.cli._common import add_connection_options, client_kwargs, print_json, wants_json
from internlm2_client.errors import InternLM2Error


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "health",
        help="check a server's grpc.health.v1 status (exit 0 when SERVING)",
        description="Ask HOST:PORT for the health of SERVICE ('' = the whole server). Exit 0 when SERVING, "
        "1 when not serving or unreachable. With --url, GET that URL instead (e.g. the gateway's "
        "http://HOST:8000/ready): exit 0 on HTTP 200.",
    )
    p.add_argument(
        "--service",
        default="",
        metavar="NAME",
        help="service name, e.g. internlm2.v1.InferenceService (default: '' = the server)",
    )
    p.add_argument(
        "--url",
        default=None,
        metavar="URL",
        help="HTTP(S) readiness URL to GET instead of a gRPC health check (--ca-cert, --client-cert, "
        "--client-key and --timeout apply)",
    )
    add_connection_options(p)
    p.set_defaults(func=run, timeout_default=5.0)


def _http_status(args: argparse.Namespace, timeout: float) -> tuple[str, str]:
    """(SERVING | NOT_SERVING | UNREACHABLE, detail) of GET args.url."""
    context = None
    if args.url.startswith("https://"):
        context = ssl.create_default_context(cafile=getattr(args, "ca_cert", None) or None)
        if getattr(args, "client_cert", None):
            context.load_cert_chain(args.client_cert, getattr(args, "client_key", None) or None)
    try:
        with urllib.request.urlopen(args.url, timeout=timeout, context=context) as response:
            return ("SERVING" if response.status == 200 else "NOT_SERVING"), ""
    except urllib.error.HTTPError as e:  # answered, not ready: the body says why (the gateway's backends)
        return "NOT_SERVING", f"HTTP {e.code}: {e.read(2000).decode('utf-8', 'replace').strip()}"
    except (urllib.error.URLError, OSError) as e:
        return "UNREACHABLE", str(getattr(e, "reason", e))


def run(args: argparse.Namespace) -> int:
    timeout = getattr(args, "timeout", None) or args.timeout_default
    if args.url:
        return _report(args, args.url, _http_status(args, timeout))
    kwargs = client_kwargs(args, "tokenizer")
    address = kwargs.pop("address")
    kwargs.pop("timeout")
    try:
        status = check_health(address, args.service, timeout=timeout, retry=None, **kwargs)
        error = ""
    except InternLM2Error as e:
        status, error = (
            "UNREACHABLE" if e.code.name in ("UNAVAILABLE", "DEADLINE_EXCEEDED") else "ERROR",
            str(e),
        )
    return _report(args, address, (status, error))


def _report(args: argparse.Namespace, address: str, result: tuple[str, str]) -> int:
    status, error = result
    if wants_json(args):
        print_json({"address": address, "service": args.service, "status": status, "error": error})
    else:
        print(
            f"{address} {args.service or '(server)'}: {status}" + (f" ({error})" if error else ""),
            file=sys.stdout if status == "SERVING" else sys.stderr,
        )
    return 0 if status == "SERVING" else 1
