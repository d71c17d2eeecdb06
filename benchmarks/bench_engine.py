"""Engine benchmark: decode speed vs the memory roofline, throughput and TTFT vs HF transformers.

One run measures, on the same random weights:
  - HBM (or host memory) bandwidth with a large device-to-device copy, and from it the batch-1 decode
    roofline: tok/s <= bandwidth / bytes of weights read per token (everything but the embedding table);
  - batch-1 decode tok/s of the engine and of HF ``LlamaForCausalLM.generate`` (the InternLM2 weights with
    wqkv de-interleaved, as tests/hf_reference.py maps them), and the engine's share of the roofline;
  - throughput (generated tok/s) for N concurrent requests of fixed in/out length and for a mixed-length
    set, engine vs HF static-batch generate (HF must run every row to the longest output);
  - time to first token of a long prompt alone and while the other requests decode;
  - the engine's CPU overhead per step (scheduler + input building + update) next to the step time;
  - batch invariance: greedy tokens of requests alone vs inside the full batch.

GPU (default when CUDA is present): InternLM2-7B shapes, random bf16 weights.
    python benchmarks/bench_engine.py
CPU fallback (ratios only; small shapes):
    python benchmarks/bench_engine.py --device cpu --preset tiny
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # hf_reference: the wqkv de-interleaving shared with the tests

from internlm2.core import InternLM2Config, InternLM2ForCausalLM  # noqa: E402
from internlm2.core.engine import EngineConfig, LLMEngine, SamplingParams  # noqa: E402


# ---- setup -------------------------------------------------------------------------------------------
def build_model(cfg: InternLM2Config, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """Random weights (the official init), built directly on the device in the target dtype."""
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = InternLM2ForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    model.init_weights(torch.Generator(device=device).manual_seed(seed))
    return model.eval()


def build_hf(model):
    """transformers' LlamaForCausalLM carrying the same weights."""
    from transformers import LlamaForCausalLM

    from hf_reference import deinterleave_wqkv, llama_config

    cfg = model.config
    prev = torch.get_default_dtype()
    torch.set_default_dtype(model.dtype)
    try:
        with torch.device(model.device):
            llama = LlamaForCausalLM(llama_config(cfg))
    finally:
        torch.set_default_dtype(prev)
    ours = model.state_dict()
    state = {"model.embed_tokens.weight": ours["model.tok_embeddings.weight"],
             "model.norm.weight": ours["model.norm.weight"], "lm_head.weight": ours["output.weight"]}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        q, k, v = deinterleave_wqkv(ours[p + "attention.wqkv.weight"], cfg)
        state.update({
            p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k, p + "self_attn.v_proj.weight": v,
            p + "self_attn.o_proj.weight": ours[p + "attention.wo.weight"],
            p + "mlp.gate_proj.weight": ours[p + "feed_forward.w1.weight"],
            p + "mlp.up_proj.weight": ours[p + "feed_forward.w3.weight"],
            p + "mlp.down_proj.weight": ours[p + "feed_forward.w2.weight"],
            p + "input_layernorm.weight": ours[p + "attention_norm.weight"],
            p + "post_attention_layernorm.weight": ours[p + "ffn_norm.weight"],
        })
    missing, unexpected = llama.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    return llama.eval()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_bandwidth(device, nbytes: int) -> float:
    """Bytes/s of a device-to-device copy (read + write counted)."""
    x = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    sync(device)
    iters = 10
    t = time.perf_counter()
    for _ in range(iters):
        y.copy_(x)
    sync(device)
    return 2 * nbytes * iters / (time.perf_counter() - t)


def weight_bytes_per_token(model) -> int:
    emb = model.model.tok_embeddings.weight
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return total - emb.numel() * emb.element_size()  # one embedding row per token is negligible


def random_prompts(lengths, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


# ---- HF baselines --------------------------------------------------------------------------------
@torch.inference_mode()
def hf_generate_time(llama, prompts: list[list[int]], new_tokens: int, device) -> float:
    """Wall time of one static-batch greedy generate of exactly ``new_tokens`` per row (left padded)."""
    width = max(len(p) for p in prompts)
    pad = llama.config.pad_token_id or 0
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    sync(device)
    t = time.perf_counter()
    llama.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                   do_sample=False, pad_token_id=pad)
    sync(device)
    return time.perf_counter() - t


def hf_decode_tok_s(llama, prompt, new_tokens, device) -> float:
    """Batch-1 decode rate: (generate N) - (generate 1) isolates the decode steps from the prefill."""
    hf_generate_time(llama, [prompt], 2, device)  # warm up
    one = hf_generate_time(llama, [prompt], 1, device)
    many = hf_generate_time(llama, [prompt], new_tokens, device)
    return (new_tokens - 1) / (many - one)


# ---- engine runs ---------------------------------------------------------------------------------
def greedy(n, **kw):
    return SamplingParams(temperature=0.0, max_new_tokens=n, ignore_eos=True, **kw)


def engine_run(engine: LLMEngine, prompts, params):
    """(outputs, wall seconds, step-time breakdown of this run). Starts from a cold prefix cache."""
    engine.reset_prefix_cache()
    before = engine.stats()
    t = time.perf_counter()
    outs = engine.generate(prompts, params)
    wall = time.perf_counter() - t
    after = engine.stats()
    steps = after.num_steps - before.num_steps
    per_step = {k: (getattr(after, k) - getattr(before, k)) / max(1, steps) * 1e3
                for k in ("schedule_time_s", "prepare_time_s", "execute_time_s", "update_time_s")}
    per_step["steps"] = steps
    return outs, wall, per_step


def ttft_under_load(engine: LLMEngine, long_prompt, background, bg_tokens) -> float:
    for i, p in enumerate(background):
        engine.add_request(f"bg{i}", p, greedy(bg_tokens))
    # Let every background request reach decoding first.
    while engine.stats().num_waiting or any(
        r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.running
    ):
        engine.step()
    engine.reset_prefix_cache()  # the long prompt ran before: make it compute from scratch
    engine.add_request("long", long_prompt, greedy(1))
    ttft = None
    while engine.has_unfinished():
        for o in engine.step():
            if o.request_id == "long" and o.finished:
                ttft = o.metrics.first_token_time
                for i in range(len(background)):
                    engine.abort(f"bg{i}")
    engine.step()
    return ttft


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--preset", default=None, help="model shapes (default: 7b on CUDA, tiny on CPU)")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--concurrency", type=int, default=None, help="default: 64 on CUDA, 16 on CPU")
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=None, help="default: 128 on CUDA, 32 on CPU")
    ap.add_argument("--decode-tokens", type=int, default=None, help="batch-1 decode length (default 256/64)")
    ap.add_argument("--long-prompt", type=int, default=None, help="TTFT prompt length (default 2048/512)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (CPU runs only)")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    gpu = device.type == "cuda"
    preset = args.preset or ("7b" if gpu else "tiny")
    dtype = getattr(torch, args.dtype or ("bfloat16" if gpu else "float32"))
    conc = args.concurrency or (64 if gpu else 16)
    out_len = args.output_len or (128 if gpu else 32)
    dec_tokens = args.decode_tokens or (256 if gpu else 64)
    long_len = args.long_prompt or (2048 if gpu else 512)
    if not gpu:
        torch.set_num_threads(args.threads)
    cfg = InternLM2Config.preset(preset, max_position_embeddings=max(4096, long_len + 64))
    res: dict = {"device": torch.cuda.get_device_name(device) if gpu else "cpu", "preset": preset,
                 "dtype": str(dtype).replace("torch.", ""), "concurrency": conc, "input_len": args.input_len,
                 "output_len": out_len, "long_prompt": long_len, "torch": torch.__version__}

    t = time.perf_counter()
    model = build_model(cfg, device, dtype)
    res["model_build_s"] = round(time.perf_counter() - t, 1)
    wbytes = weight_bytes_per_token(model)
    bw = measure_bandwidth(device, (2 << 30) if gpu else (256 << 20))
    res["weights_gb_per_token"] = wbytes / 1e9
    res["bandwidth_gb_s"] = bw / 1e9
    res["roofline_tok_s"] = bw / wbytes

    vocab = cfg.vocab_size
    fixed = random_prompts([args.input_len] * conc, vocab, seed=1)
    g = torch.Generator().manual_seed(2)
    mixed_in = torch.randint(16, 4 * args.input_len + 1, (conc,), generator=g).tolist()
    mixed_out = torch.randint(8, 2 * out_len + 1, (conc,), generator=g).tolist()
    mixed = random_prompts(mixed_in, vocab, seed=3)
    decode_prompt = random_prompts([args.input_len], vocab, seed=4)[0]
    long_prompt = random_prompts([long_len], vocab, seed=5)[0]

    # ---- HF baseline first, then free it so the engine's KV pool gets the memory.
    if not args.skip_hf:
        llama = build_hf(model)
        hf_generate_time(llama, fixed[:2], 4, device)  # warm up
        res["hf_decode_tok_s"] = hf_decode_tok_s(llama, decode_prompt, min(dec_tokens, 64 if gpu else dec_tokens),
                                                 device)
        res["hf_fixed_tok_s"] = conc * out_len / hf_generate_time(llama, fixed, out_len, device)
        res["hf_mixed_tok_s"] = sum(mixed_out) / hf_generate_time(llama, mixed, max(mixed_out), device)
        res["hf_ttft_long_s"] = hf_generate_time(llama, [long_prompt], 1, device)
        del llama
        if gpu:
            torch.cuda.empty_cache()

    # ---- the engine
    t = time.perf_counter()
    ecfg = EngineConfig(max_num_seqs=max(conc, 8), max_num_batched_tokens=2048,
                        max_model_len=cfg.max_position_embeddings)
    engine = LLMEngine(model, None, ecfg)
    res["engine_init_s"] = round(time.perf_counter() - t, 1)
    st = engine.stats()
    res["kv_blocks"] = st.num_total_blocks
    engine.generate(fixed[:4], greedy(8))  # warm up (Triton JIT, allocator)

    outs, wall, _ = engine_run(engine, [decode_prompt], greedy(dec_tokens))
    itl = outs[0].metrics.inter_token_latencies
    res["engine_decode_tok_s"] = 1.0 / statistics.mean(itl)
    res["engine_decode_roofline_share"] = res["engine_decode_tok_s"] / res["roofline_tok_s"]
    alone = outs[0].new_token_ids

    outs, wall, per_step = engine_run(engine, fixed, greedy(out_len))
    res["engine_fixed_tok_s"] = conc * out_len / wall
    res["engine_fixed_step_ms"] = per_step
    res["engine_fixed_ttft_p50_s"] = statistics.median(o.metrics.first_token_time for o in outs)

    _outs_m, wall, per_step = engine_run(engine, mixed, [greedy(n) for n in mixed_out])
    res["engine_mixed_tok_s"] = sum(mixed_out) / wall
    res["engine_mixed_step_ms"] = per_step

    # Batch invariance: the decode prompt alone vs inside a full batch.
    batch = [decode_prompt, *fixed[:conc - 1]]
    outs_b, _, _ = engine_run(engine, batch, greedy(dec_tokens))
    same = next((i for i, (a, b) in enumerate(zip(alone, outs_b[0].new_token_ids)) if a != b), len(alone))
    res["batch_invariance_identical_prefix"] = f"{same}/{len(alone)}"

    _, wall, _ = engine_run(engine, [long_prompt], greedy(1))
    res["engine_ttft_long_alone_s"] = wall
    res["engine_ttft_long_under_load_s"] = ttft_under_load(engine, long_prompt, fixed[: conc - 1], 4 * out_len)

    if "hf_fixed_tok_s" in res:
        res["speedup_fixed"] = res["engine_fixed_tok_s"] / res["hf_fixed_tok_s"]
        res["speedup_mixed"] = res["engine_mixed_tok_s"] / res["hf_mixed_tok_s"]
        res["speedup_decode_b1"] = res["engine_decode_tok_s"] / res["hf_decode_tok_s"]
    report(res)
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    return res


def report(r: dict) -> None:
    def f(x, nd=1):
        return "-" if x is None else (f"{x:,.{nd}f}" if isinstance(x, float) else str(x))

    print(f"\n# bench_engine: {r['device']}, preset {r['preset']}, {r['dtype']}, torch {r['torch']}")
    print(f"weights/token {r['weights_gb_per_token']:.3f} GB, copy bandwidth {r['bandwidth_gb_s']:.0f} GB/s, "
          f"batch-1 roofline {r['roofline_tok_s']:.1f} tok/s; KV pool {r['kv_blocks']} blocks")
    n, lp = r["concurrency"], r["long_prompt"]
    rows = [  # (metric, HF, engine, engine / HF, decimals)
        ("batch-1 decode, tok/s", r.get("hf_decode_tok_s"), r["engine_decode_tok_s"], r.get("speedup_decode_b1"), 1),
        (f"{n} x {r['input_len']} in / {r['output_len']} out, generated tok/s", r.get("hf_fixed_tok_s"),
         r["engine_fixed_tok_s"], r.get("speedup_fixed"), 1),
        (f"{n} mixed-length requests, generated tok/s", r.get("hf_mixed_tok_s"), r["engine_mixed_tok_s"],
         r.get("speedup_mixed"), 1),
        (f"TTFT {lp}-token prompt alone, s", r.get("hf_ttft_long_s"), r["engine_ttft_long_alone_s"], None, 3),
        (f"TTFT {lp}-token prompt, {n - 1} requests decoding, s", None, r["engine_ttft_long_under_load_s"], None, 3),
    ]
    print("\n| metric | HF transformers | engine | engine / HF |\n|---|---|---|---|")
    for name, hf, eng, ratio, nd in rows:
        print(f"| {name} | {f(hf, nd)} | {f(eng, nd)} | {f(ratio, 2)} |")
    print(f"\nbatch-1 decode share of roofline: {100 * r['engine_decode_roofline_share']:.1f}%")
    for key in ("engine_fixed_step_ms", "engine_mixed_step_ms"):
        s = r[key]
        cpu = s["schedule_time_s"] + s["prepare_time_s"] + s["update_time_s"]
        print(f"{key[7:12]} run: {s['steps']} steps; per step ms: schedule {s['schedule_time_s']:.3f}, "
              f"input build {s['prepare_time_s']:.3f}, execute (incl. build) {s['execute_time_s']:.3f}, "
              f"update+output {s['update_time_s']:.3f}; engine CPU overhead {cpu:.3f} ms = "
              f"{100 * cpu / (s['schedule_time_s'] + s['execute_time_s'] + s['update_time_s']):.1f}% of the step")
    print(f"batch invariance (greedy, alone vs in a batch of {r['concurrency']}): identical first "
          f"{r['batch_invariance_identical_prefix']} tokens")


if __name__ == "__main__":
    main()
