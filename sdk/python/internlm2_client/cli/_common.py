"""Pieces every CLI command shares: connection options, client construction, output."""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import os
import sys
from typing import Any

from internlm2_client import _channel

TOKEN_ENV = "INTERNLM2_AUTH_TOKEN"


def add_connection_options(parser: argparse.ArgumentParser, *, suppress: bool = True) -> None:
    """The global client options. Added to the root parser and again to every client
    subcommand, with SUPPRESS defaults so `internlm2 --json generate ...` and
    `internlm2 generate ... --json` both work and neither overwrites the other."""
    d = argparse.SUPPRESS if suppress else None
    g = parser.add_argument_group("connection")
    g.add_argument(
        "--address",
        default=d,
        metavar="HOST:PORT",
        help="server address (default: 127.0.0.1 and the service's default port)",
    )
    g.add_argument("--token", default=d, help=f"bearer token (default: ${TOKEN_ENV})")
    g.add_argument("--timeout", type=float, default=d, metavar="S", help="deadline of each call in seconds")
    g.add_argument("--json", action="store_true", default=d, help="print machine-readable JSON")
    g.add_argument("--tls", action="store_true", default=d, help="use TLS (system root certificates)")
    g.add_argument("--ca-cert", default=d, metavar="FILE", help="CA bundle (PEM) of the server; implies TLS")
    g.add_argument("--client-cert", default=d, metavar="FILE", help="client certificate (PEM) for mTLS")
    g.add_argument("--client-key", default=d, metavar="FILE", help="client private key (PEM) for mTLS")
    g.add_argument("--server-name", default=d, metavar="NAME", help="expected server certificate name")


def client_kwargs(args: argparse.Namespace, service: str) -> dict[str, Any]:
    """Keyword arguments of a client (TokenizerClient(...) etc.) from the parsed options."""
    return {
        "address": getattr(args, "address", None) or _channel.default_address(service),
        "token": getattr(args, "token", None) or os.environ.get(TOKEN_ENV) or None,
        "timeout": getattr(args, "timeout", None),
        "tls": bool(getattr(args, "tls", False)),
        "root_certificates": getattr(args, "ca_cert", None),
        "client_certificate": getattr(args, "client_cert", None),
        "client_key": getattr(args, "client_key", None),
        "server_name": getattr(args, "server_name", None),
    }


def wants_json(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "json", False))


def to_jsonable(value: Any) -> Any:
    """Dataclasses (nested), tuples, datetimes and str-enums -> JSON-compatible values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if isinstance(value, _dt.datetime):
        return value.isoformat()
    if isinstance(value, str):
        return str(value)  # StrEnum -> its plain value
    return value


def print_json(value: Any, *, stream=None) -> None:
    print(json.dumps(to_jsonable(value), ensure_ascii=False), file=stream or sys.stdout, flush=True)


def load_json_arg(text: str) -> Any:
    """A JSON value given inline, or as @path to a file holding it."""
    if text.startswith("@"):
        with open(text[1:], encoding="utf-8") as f:
            return json.load(f)
    return json.loads(text)
