"""Structured-output benchmark: what grammar-constrained decoding costs per token, vs unconstrained, in one run.

Same engine, weights, prompt, batch size and seeds; only the requests' ``structured_output`` changes:
  - unconstrained        B rows, ``ignore_eos``, L tokens each (the baseline)
  - regex                B rows constrained to ``[a-z ]*`` (a random model rarely picks EOS among the allowed
                         tokens, so nearly all run L tokens like the baseline)
  - json_schema          B rows constrained to an object of short strings, integers, an enum, an array
  - mixed                B/2 regex rows + B/2 unconstrained rows in one batch
Reported per decode step (wall time of the steps in which every sequence decodes, prefill excluded), per
token of those steps, and as overhead vs the baseline (rounds interleave the cases; best round each).
On a shared, loaded machine that difference is noisy, so the grammar work itself is also timed inside
the same run: filling the bitmasks (xgrammar, per constrained row) and applying them to the logits, per
constrained token. Plus the one-time set-up (importing xgrammar, the vocabulary tables), compiling a new
schema, and a cached compile. The official tokenizer's
92,544-token vocabulary makes the bitmasks full size.

    python benchmarks/bench_structured.py                    # CPU, tiny preset, B=8, L=64
    python benchmarks/bench_structured.py --device cuda --preset 1_8b
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import internlm2.core.engine.structured as structured_module
from internlm2.core import InternLM2Config, random_model
from internlm2.core.engine import EngineConfig, LLMEngine, SamplingParams, StructuredOutput
from internlm2.core.tokenizer import InternLM2Tokenizer

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO.parent / "shared" / "reference-data" / "internlm2" / "tokenizer.model"

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "city": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "kind": {"enum": ["person", "company", "place"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4},
    },
    "required": ["name", "city", "age", "kind", "tags"],
    "additionalProperties": False,
}


class Timed:
    """Wraps a function, summing its wall time and the rows (first argument's length) it served."""

    def __init__(self, fn):
        self.fn, self.seconds, self.rows = fn, 0.0, 0

    def __call__(self, *args):
        start = time.perf_counter()
        self.rows += len(args[0])
        try:
            return self.fn(*args)
        finally:
            self.seconds += time.perf_counter() - start


def decode_steps(engine: LLMEngine, prompt: list[int], params: list[SamplingParams]) -> tuple[float, int]:
    """Total wall time and row count of the pure-decode steps (every scheduled sequence runs one token)."""
    for i, p in enumerate(params):
        engine.add_request(f"bench-{i}-{time.monotonic_ns()}", prompt, p)
    wall = rows = 0
    while engine.has_unfinished():
        sched_rows = len(engine.scheduler.running)
        decoding = all(r.num_tokens - r.num_computed_tokens == 1 for r in engine.scheduler.running)
        pure = decoding and not engine.scheduler.waiting and sched_rows
        start = time.perf_counter()
        engine.step()
        if pure:
            wall += time.perf_counter() - start
            rows += sched_rows
    return wall, rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--tokenizer", default=str(TOKENIZER))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tok = InternLM2Tokenizer.from_pretrained(args.tokenizer)
    cfg = InternLM2Config.preset(args.preset)
    model = random_model(cfg, seed=0).to(args.device)
    engine = LLMEngine(model, tok, EngineConfig(max_num_seqs=max(8, args.batch), block_size=16))
    prompt = tok.encode("Describe one entity as a JSON record:")
    b, n = args.batch, args.tokens
    regex = StructuredOutput(regex="[a-z ]*")
    schema = StructuredOutput(json_schema=json.dumps(SCHEMA))

    t0 = time.perf_counter()
    engine.structured.compile(StructuredOutput(regex="[a-z ]*"))  # imports xgrammar, builds its vocabulary
    setup = time.perf_counter() - t0
    t0 = time.perf_counter()
    engine.structured.compile(schema)
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    engine.structured.compile(schema)
    cached = time.perf_counter() - t0

    def free(i):
        return SamplingParams(seed=i, max_new_tokens=n, ignore_eos=True)

    cases = {
        "unconstrained": [free(i) for i in range(b)],
        "regex": [SamplingParams(seed=i, max_new_tokens=n, structured_output=regex) for i in range(b)],
        "json_schema": [SamplingParams(seed=i, max_new_tokens=4 * n, structured_output=schema) for i in range(b)],
        "mixed (half regex)": [
            SamplingParams(seed=i, max_new_tokens=n, structured_output=regex) if i % 2 else free(i) for i in range(b)
        ],
    }
    fill = engine.structured.bitmask = Timed(engine.structured.bitmask)
    apply = structured_module.apply_bitmask = Timed(structured_module.apply_bitmask)
    decode_steps(engine, prompt, cases["unconstrained"][:2])  # warm-up
    per_token: dict[str, float] = {}
    counts: dict[str, int] = {}
    # Rounds interleave the cases, so load drifting on a shared machine hits them alike; best of the rounds.
    for _ in range(args.repeats):
        for name, params in cases.items():
            wall, rows = decode_steps(engine, prompt, params)
            per_token[name] = min(per_token.get(name, float("inf")), wall / rows)
            counts[name] = rows
    base = per_token["unconstrained"]
    print(f"device={args.device} preset={args.preset} vocab={cfg.vocab_size} batch={b} tokens={n} "
          f"threads={args.threads} repeats={args.repeats} (best round per case; pure-decode steps only)")
    print("| case | decode tokens | us / token | us / step | vs unconstrained |")
    print("|---|---:|---:|---:|---:|")
    for name, value in per_token.items():
        print(f"| {name} | {counts[name]} | {value * 1e6:.0f} | {value * b * 1e6:.0f} | "
              f"{value / base:.2f}x (+{(value - base) * 1e6:.0f} us/token) |")
    print(f"\ngrammar work per constrained token, timed in the same run: fill {fill.seconds / fill.rows * 1e6:.0f} us"
          f" + apply {apply.seconds / fill.rows * 1e6:.0f} us ({fill.rows} constrained tokens)")
    print(f"one-time set-up (import xgrammar, vocabulary tables): {setup:.2f} s; "
          f"compile a new JSON schema: {cold * 1e3:.1f} ms; cached: {cached * 1e3:.3f} ms")


if __name__ == "__main__":
    main()
