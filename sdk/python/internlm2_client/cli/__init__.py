"""The `internlm2` command line (entry point `internlm2_client.cli:main`).

Client commands (generate, chat, tokenize, score, train, health) use only the SDK;
platform commands (serve, up, demo) import the platform lazily (see _platform.py).
"""

from __future__ import annotations

import argparse
import sys

from internlm2_client import __version__
from internlm2_client.cli import _health, _inference, _platform, _reward, _tokenizer, _training
from internlm2_client.cli._common import add_connection_options
from internlm2_client.errors import InternLM2Error

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="internlm2", description="Serve, query and train InternLM2 models on the InternLM2 platform."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    add_connection_options(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in (_inference, _tokenizer, _reward, _training, _health, _platform):
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs one command; returns the process exit code (1 = the server refused, 130 = Ctrl-C)."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except InternLM2Error as e:
        where = f" [request {e.request_id}]" if e.request_id else ""
        print(f"internlm2 {args.command}: {e}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `internlm2 ... | head`
        return 0
