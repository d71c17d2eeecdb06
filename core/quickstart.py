"""The core's smoke job: write a tiny random InternLM2 checkpoint in the official layout, load it back
and greedy-decode a few tokens, printing them. ``python -m internlm2.core.quickstart [--out DIR]``."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from .generate import greedy_generate
from .model import InternLM2ForCausalLM
from .random_checkpoint import make_random_checkpoint


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, help="where to write the checkpoint (default: a temp dir)")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    args = parser.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="internlm2-tiny-"))
    make_random_checkpoint(out, preset="tiny", seed=0)
    model = InternLM2ForCausalLM.from_pretrained(out)
    prompt = [1, 9843, 2028, 346]  # "<s>Hello world!" in the official vocabulary
    tokens = greedy_generate(model, prompt, args.max_new_tokens)
    print(f"checkpoint: {out} ({sorted(p.name for p in out.iterdir())})")
    print(f"prompt ids: {prompt}")
    print(f"greedy ids: {tokens}")


if __name__ == "__main__":
    main()
