"""Benchmark the fused kernels against eager PyTorch and torch.compile(eager).

    python benchmarks/bench_kernels.py                 # CUDA: InternLM2-7B shapes, bf16, Triton kernels
    python benchmarks/bench_kernels.py --device cpu    # small shapes, fp32 (no Triton on CPU: ratios only)

Per kernel and pass (forward, forward+backward): median time over repeats (CUDA events on GPU), the fused
path's speed-up over eager and over compiled eager, and its achieved bandwidth counted from the minimum
bytes the op must move. For fused_linear_cross_entropy (compute bound) also the peak extra memory of one
forward+backward: torch.cuda.max_memory_allocated on CUDA; on CPU the peak of live tensors allocated by
aten ops (a proxy, tracked with a dispatch mode; not available for compiled code).
Prints markdown tables.
"""

from __future__ import annotations

import argparse
import statistics
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from internlm2.core import kernels
from internlm2.core.kernels import reference


@dataclass(frozen=True)
class Shapes:
    tokens: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    ce_tokens: int


INTERNLM2_7B = Shapes(tokens=8192, hidden=4096, intermediate=14336, heads=32, kv_heads=8, head_dim=128,
                      vocab=92544, ce_tokens=8192)  # fmt: skip
CPU_SMALL = Shapes(tokens=512, hidden=512, intermediate=1408, heads=8, kv_heads=2, head_dim=64, vocab=8192,
                   ce_tokens=512)  # fmt: skip


# ------------------------------------------------------------------------------------------------ timing
class Timer:
    def __init__(self, device: torch.device, warmup: int, repeats: int):
        self.device, self.warmup, self.repeats = device, warmup, repeats

    def median_ms(self, fn: Callable[[], object]) -> float:
        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(self.repeats):
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)


class LiveBytes(TorchDispatchMode):
    """CPU peak-memory proxy: bytes of live tensors that aten ops allocate inside the mode (new storages
    only; a storage is counted until the tensor that introduced it dies)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._ptrs: set[int] = set()

    def _release(self, ptr: int, nbytes: int):
        self._ptrs.discard(ptr)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            ptr, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or ptr in self._ptrs:
                continue
            self._ptrs.add(ptr)
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(t, self._release, ptr, nbytes)
        return out


# --------------------------------------------------------------------------------------------- workloads
@dataclass
class Case:
    name: str
    fn: Callable  # the reference signature; the fused path is the dispatch function of the same name
    fused: Callable
    make_inputs: Callable[[], tuple]  # fresh inputs; floating ones are leaves that require grad
    n_grad: int  # how many leading inputs get gradients
    fwd_bytes: int
    bwd_bytes: int  # forward+backward


def _cases(s: Shapes, dtype: torch.dtype, device: torch.device) -> list[Case]:
    b = torch.tensor([], dtype=dtype).element_size()
    m, h, i = s.tokens, s.hidden, s.intermediate
    qk = m * (s.heads + s.kv_heads) * s.head_dim

    def leaf(*shape, scale=1.0):
        return (torch.randn(*shape, device=device, dtype=dtype) * scale).requires_grad_()

    def rope():
        pos = torch.arange(s.tokens, device=device, dtype=torch.float32)
        inv = 1.0 / (1e6 ** (torch.arange(0, s.head_dim, 2, device=device).float() / s.head_dim))
        emb = torch.cat([torch.outer(pos, inv)] * 2, -1)[None]  # [1, T, D]
        return emb.cos(), emb.sin()

    eps = 1e-5
    return [
        Case("rms_norm", lambda x, w: reference.rms_norm(x, w, eps), lambda x, w: kernels.rms_norm(x, w, eps),
             lambda: (leaf(m, h), leaf(h)), 2, 2 * m * h * b, 5 * m * h * b),
        Case("add_rms_norm", lambda x, r, w: reference.add_rms_norm(x, r, w, eps),
             lambda x, r, w: kernels.add_rms_norm(x, r, w, eps),
             lambda: (leaf(m, h), leaf(m, h), leaf(h)), 3, 4 * m * h * b, 8 * m * h * b),
        Case("swiglu", reference.swiglu, kernels.swiglu, lambda: (leaf(m, i), leaf(m, i)), 2,
             3 * m * i * b, 8 * m * i * b),
        Case("apply_rotary", reference.apply_rotary, kernels.apply_rotary,
             lambda: (leaf(1, m, s.heads, s.head_dim), leaf(1, m, s.kv_heads, s.head_dim), *rope()), 2,
             2 * qk * b, 4 * qk * b),
    ]  # fmt: skip


def _run_once(fn, inputs, n_grad, backward: bool):
    out = fn(*inputs)
    if backward:
        outs = out if isinstance(out, tuple) else (out,)
        torch.autograd.backward(list(outs), [torch.ones_like(o) for o in outs])
        for t in inputs[:n_grad]:
            t.grad = None


def _fmt(x: float | None, unit: str = "") -> str:
    return "n/a" if x is None else f"{x:.3f}{unit}"


def bench_elementwise(cases, timer: Timer, compile_: bool) -> list[str]:
    rows = ["| kernel | pass | eager ms | compile ms | fused ms | fused/eager speed-up | "
            "fused/compile speed-up | fused GB/s |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for case in cases:
        compiled = torch.compile(case.fn) if compile_ else None
        for backward, nbytes in ((False, case.fwd_bytes), (True, case.bwd_bytes)):
            inputs = case.make_inputs()
            grad_ctx = torch.enable_grad if backward else torch.no_grad

            def timed(fn, inputs=inputs, backward=backward, grad_ctx=grad_ctx, n_grad=case.n_grad):
                if fn is None:
                    return None
                with grad_ctx():
                    return timer.median_ms(lambda: _run_once(fn, inputs, n_grad, backward))

            eager, comp, fused = timed(case.fn), timed(compiled), timed(case.fused)
            rows.append(
                f"| {case.name} | {'fwd+bwd' if backward else 'fwd'} | {_fmt(eager)} | {_fmt(comp)} | "
                f"{_fmt(fused)} | {eager / fused:.2f}x | {_fmt(comp and comp / fused, 'x')} | "
                f"{nbytes / fused / 1e6:.1f} |"
            )
    return rows


def bench_cross_entropy(s: Shapes, dtype, device, timer: Timer, compile_: bool, chunk: int | None) -> list[str]:
    n, h, v = s.ce_tokens, s.hidden, s.vocab
    torch.manual_seed(0)
    hidden = torch.randn(n, h, device=device, dtype=dtype).requires_grad_()
    weight = (torch.randn(v, h, device=device, dtype=dtype) / h**0.5).requires_grad_()
    labels = torch.randint(0, v, (n,), device=device)
    labels[::7] = -100

    def plain(hd, w, lb):
        return reference.linear_cross_entropy(hd, w, lb)

    def fused(hd, w, lb):
        return kernels.fused_linear_cross_entropy(hd, w, lb, chunk_size=chunk)

    impls = {"eager (full logits)": plain, "compile (full logits)": torch.compile(plain) if compile_ else None,
             "fused (chunked)": fused}  # fmt: skip

    def step(fn):
        loss = fn(hidden, weight, labels)
        loss.backward()
        hidden.grad = weight.grad = None

    def peak_bytes(fn, compiled: bool):
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step(fn)
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - base
        if compiled:
            return None
        with LiveBytes() as tracker:
            step(fn)
        return tracker.peak

    rows = ["| fused_linear_cross_entropy | fwd+bwd ms | vs eager | peak extra memory MiB |", "|---|---|---|---|"]
    results = {}
    for name, fn in impls.items():
        if fn is None:
            continue
        ms = timer.median_ms(lambda fn=fn: step(fn))
        results[name] = (ms, peak_bytes(fn, compiled=name.startswith("compile")))
    eager_ms = results["eager (full logits)"][0]
    for name, (ms, peak) in results.items():
        mib = None if peak is None else peak / 2**20
        rows.append(f"| {name} | {ms:.3f} | {eager_ms / ms:.2f}x | {_fmt(mib)} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, help="rows (B*T) for the elementwise kernels and the CE")
    parser.add_argument("--chunk-size", type=int, default=None,
                        help="fused CE chunk rows (default: automatic on CUDA, tokens/4 on CPU)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--cpu-threads", type=int, default=1,
                        help="torch intra-op threads on CPU (1: stable numbers on a shared machine)")
    args = parser.parse_args()

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if not cuda:
        torch.set_num_threads(args.cpu_threads)
    shapes, dtype = (INTERNLM2_7B, torch.bfloat16) if cuda else (CPU_SMALL, torch.float32)
    if args.tokens:
        shapes = Shapes(**{**shapes.__dict__, "tokens": args.tokens, "ce_tokens": args.tokens})
    timer = Timer(device, warmup=5 if cuda else 3, repeats=args.repeats or 20)
    # The automatic chunk targets a 92k vocab; the small CPU vocab would fit in one chunk.
    chunk = args.chunk_size or (None if cuda else max(1, shapes.ce_tokens // 4))
    torch.manual_seed(0)
    with kernels.use_backend("auto"):
        path = kernels.active_path(torch.empty(0, device=device))
        print(f"device={device} dtype={dtype} fused path={path} ce chunk={chunk or 'auto'} "
              f"threads={torch.get_num_threads()} shapes={shapes}")
        if not cuda:
            print("(CPU: the elementwise 'fused' column is the eager reference — Triton needs CUDA — "
                  "so its ratios only show measurement noise; the CE rows compare chunked vs full logits.)")
        print()
        print("\n".join(bench_elementwise(_cases(shapes, dtype, device), timer, not args.no_compile)))
        print()
        print("\n".join(bench_cross_entropy(shapes, dtype, device, timer, not args.no_compile, chunk)))


if __name__ == "__main__":
    main()
