"""Prefill throughput of our InternLM2 vs HF transformers' LlamaForCausalLM on the same random weights.

GPU (default when CUDA is present): InternLM2-7B shapes, bf16, a 2k-token prompt, batch 1.
CPU (``--device cpu``): a reduced shape (``--preset``/overrides) in fp32 — only the ratio means anything there.
Both models run in this process on the same weights; the table reports tokens/s and the ratio.

    python benchmarks/bench_model.py                       # CUDA, 7B shapes
    python benchmarks/bench_model.py --device cpu --layers 4 --hidden 1024 --seq 2048
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from hf_reference import to_llama
from internlm2.core import InternLM2Config, random_model


def timed(fn, device: str, repeats: int) -> float:
    """Median seconds of ``fn()`` after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", default="7b")
    parser.add_argument("--layers", type=int)
    parser.add_argument("--hidden", type=int)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    overrides = {}
    if args.layers:
        overrides["num_hidden_layers"] = args.layers
    if args.hidden:
        heads = args.hidden // 128
        overrides.update(hidden_size=args.hidden, intermediate_size=int(args.hidden * 3.5),
                         num_attention_heads=heads, num_key_value_heads=max(1, heads // 4))
    config = InternLM2Config.preset(args.preset, **overrides)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    with torch.device(args.device):
        model = random_model(config).to(dtype)
    llama = to_llama(model).to(args.device)
    ids = torch.randint(0, config.vocab_size, (1, args.seq), device=args.device)

    @torch.inference_mode()
    def ours():
        # Prefill as the engine does it: hidden states for all tokens, logits for the last one only.
        model.compute_logits(model.model(ids)[:, -1:])

    @torch.inference_mode()
    def theirs():
        llama(input_ids=ids, use_cache=False, logits_to_keep=1)

    t_ours = timed(ours, args.device, args.repeats)
    t_hf = timed(theirs, args.device, args.repeats)
    name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    params = sum(p.numel() for p in model.parameters()) / 1e9
    print(f"device: {name}; torch {torch.__version__}; {dtype}; {params:.2f}B params; "
          f"layers={config.num_hidden_layers} hidden={config.hidden_size}; prompt {args.seq} tokens, batch 1\n")
    print("| model | prefill ms | tokens/s | vs HF |")
    print("|---|---|---|---|")
    print(f"| HF LlamaForCausalLM | {t_hf * 1e3:.1f} | {args.seq / t_hf:,.0f} | 1.00x |")
    print(f"| internlm2.core | {t_ours * 1e3:.1f} | {args.seq / t_ours:,.0f} | {t_hf / t_ours:.2f}x |")


if __name__ == "__main__":
    main()
