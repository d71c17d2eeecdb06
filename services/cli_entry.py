"""``internlm2 serve SERVICE ...``: the CLI's entry into the platform (``serve(args)``).

The SDK's CLI parses the flags (docs/HELPERS.md) and calls ``serve`` with the namespace;
``args.service`` picks the server. Returns the process exit code: 0 after a clean shutdown, 1 when
the server failed, 2 for a usage problem (missing model, bad TLS flags) reported before any port
is opened.
"""

from __future__ import annotations

import importlib
import sys

SERVERS = {
    "tokenizer": "internlm2.services.tokenizer.server",
    "inference": "internlm2.services.inference.server",
    "reward": "internlm2.services.reward.server",
    "training": "internlm2.services.training.server",
    "worker": "internlm2.services.worker",
}


def serve(args) -> int:
    service = getattr(args, "service", None)
    if service not in SERVERS:
        print(f"internlm2 serve: unknown service {service!r}; choose one of {', '.join(SERVERS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(SERVERS[service])
    try:
        return module.serve(args)
    except ValueError as exc:  # a usage problem found while building the server: missing model, bad flags
        print(f"internlm2 serve {service}: {exc}", file=sys.stderr)
        return 2
