"""SFT packing benchmark: best-fit decreasing (plugins/data/packing.pack_lengths, one bisection over the
distinct remaining capacities per sample) against the first-fit packer it replaced (one scan over every open
row per sample), on the same synthetic lengths in the same run.

    python benchmarks/bench_packing.py                       # 5k .. 200k samples, max_len 2048
    python benchmarks/bench_packing.py --first-fit-max 50000 # first-fit only up to this count (it is quadratic)

Prints one JSON line per sample count: seconds, rows, fill (tokens / row capacity) for both packers.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from internlm2.plugins.data.packing import pack_lengths


def first_fit(lengths: list[int], max_len: int) -> int:
    """The previous packer's placement rule: the first open row with room, in sample order."""
    room: list[int] = []
    for n in lengths:
        n = min(n, max_len)
        for b, free in enumerate(room):
            if n <= free:
                room[b] -= n
                break
        else:
            room.append(max_len - n)
    return len(room)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[5_000, 20_000, 50_000, 200_000])
    parser.add_argument("--max-len", type=int, default=2048)
    parser.add_argument("--first-fit-max", type=int, default=50_000)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    for n in args.counts:
        # SFT-like lengths: log-normal around ~300 tokens, clipped to [16, 2 x max_len].
        lengths = np.clip(rng.lognormal(5.7, 0.8, n), 16, 2 * args.max_len).astype(int).tolist()
        tokens = sum(min(x, args.max_len) for x in lengths)
        t0 = time.perf_counter()
        rows = len(pack_lengths(lengths, args.max_len))
        bfd_s = time.perf_counter() - t0
        out = {"samples": n, "best_fit_decreasing_s": round(bfd_s, 3), "rows": rows,
               "fill": round(tokens / (rows * args.max_len), 4)}
        if n <= args.first_fit_max:
            t0 = time.perf_counter()
            ff_rows = first_fit(lengths, args.max_len)
            out.update(first_fit_s=round(time.perf_counter() - t0, 3), first_fit_rows=ff_rows,
                       first_fit_fill=round(tokens / (ff_rows * args.max_len), 4))
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
