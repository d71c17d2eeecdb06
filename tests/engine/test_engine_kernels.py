"""Engine building blocks on their own: the Triton paged-decode kernel against its PyTorch reference
(Triton interpreter on CPU), the paged backend against dense attention, and the block pool's ref counts,
prefix hashing and LRU eviction."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from internlm2.core.attention import sdpa
from internlm2.core.config import InternLM2Config
from internlm2.core.engine.block_manager import BlockManager
from internlm2.core.engine.kv_cache import PagedKVCache
from internlm2.core.engine.paged_attention import (
    AttentionMetadata,
    PagedAttention,
    PrefillChunk,
)
from internlm2.core.engine.params import SamplingParams
from internlm2.core.engine.request import Request

pytestmark = pytest.mark.timeout(90)

KERNEL_CHECK = textwrap.dedent(
    """
    import torch
    from internlm2.core.engine.paged_attention import decode_attention_reference
    from internlm2.core.engine.triton_decode import paged_decode

    torch.manual_seed(0)
    worst = 0.0
    cases = [(4, 1, torch.float32, 1, torch.int32), (8, 2, torch.float32, 3, torch.int64),
             (4, 4, torch.float16, 2, torch.int32)]
    for hq, hkv, dtype, splits, len_dtype in cases:
        d, bs, nb = 16, 16, 12
        q = torch.randn(3, hq, d).to(dtype)
        kc = torch.randn(nb, bs, hkv, d).to(dtype)
        vc = torch.randn(nb, bs, hkv, d).to(dtype)
        tables = torch.tensor([[3, 1, 7, 0, 11], [2, 5, 0, 0, 0], [9, 8, 6, 4, 10]], dtype=torch.int32)
        lens = torch.tensor([40, 17, 65], dtype=len_dtype)
        out = paged_decode(q, kc, vc, tables, lens, d ** -0.5, splits).float()
        ref = decode_attention_reference(q.float(), kc.float(), vc.float(), tables, lens, 5)
        worst = max(worst, (out - ref).abs().max().item() / (3e-3 if dtype == torch.float16 else 1e-5))
    print("WORST", worst)

    # The engine end to end on the Triton decode path (eager mixed steps and the graph input path).
    torch.set_num_threads(1)
    from internlm2.core import InternLM2Config, greedy_generate, random_model
    from internlm2.core.engine import EngineConfig, LLMEngine, SamplingParams

    model = random_model(InternLM2Config.preset("tiny"), seed=0)
    engine = LLMEngine(model, None, EngineConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=256))
    engine.runner.use_triton = engine.runner.attn.use_triton = True
    engine.runner.capture_graphs([1, 2, 4], emulate=True)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 90000, (n,), generator=g).tolist() for n in (5, 21, 40)]
    params = [SamplingParams(temperature=0.0, max_new_tokens=n, ignore_eos=True) for n in (4, 8, 6)]
    outs = engine.generate(prompts, params)
    print("ENGINE", all(o.new_token_ids == greedy_generate(model, p, sp.max_new_tokens)
                        for p, sp, o in zip(prompts, params, outs)))
    """
)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_paged_decode_matches_reference_under_the_interpreter():
    """The kernel alone, then inside the engine (which must reproduce greedy_generate)."""
    # The interpreter must be switched on before Triton is first imported: a fresh process.
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", KERNEL_CHECK], env=env, capture_output=True, text=True, timeout=80)
    assert res.returncode == 0, res.stderr[-3000:]
    worst = float(res.stdout.split("WORST")[-1].split()[0])
    assert worst <= 1.0, f"error {worst} x tolerance"
    assert res.stdout.split("ENGINE")[-1].strip() == "True"


def test_paged_backend_matches_dense_attention_for_a_mixed_batch():
    torch.manual_seed(0)
    hq, hkv, d, bs = 4, 2, 8, 4
    cfg = InternLM2Config(vocab_size=16, hidden_size=hq * d, intermediate_size=8, num_hidden_layers=1,
                          num_attention_heads=hq, num_key_value_heads=hkv)
    kv = PagedKVCache(cfg, num_blocks=16, block_size=bs, dtype=torch.float32, device=torch.device("cpu"))
    backend = PagedAttention(kv, hq, use_triton=False)
    # Four sequences; their blocks are scattered through the pool. Seq 0 decodes its 9th token, seqs 1
    # and 2 prefill 6 fresh tokens each (one batched SDPA call), seq 3 runs a chunk after 5 cached tokens.
    lens, ctx = [9, 6, 6, 11], [8, 0, 0, 5]
    tables = [[5, 2, 9], [7, 0], [13, 14], [1, 12, 3]]
    ks = [torch.randn(n, hkv, d) for n in lens]
    vs = [torch.randn(n, hkv, d) for n in lens]
    qs = [torch.randn(n, hq, d) for n in lens]
    for s in range(4):  # the context already in the pool
        for p in range(ctx[s]):
            kv.k[0, tables[s][p // bs], p % bs] = ks[s][p]
            kv.v[0, tables[s][p // bs], p % bs] = vs[s][p]
    new = [list(range(c, n)) for c, n in zip(ctx, lens)]
    slots = [tables[s][p // bs] * bs + p % bs for s in range(4) for p in new[s]]
    backend.metadata = AttentionMetadata(
        slot_mapping=torch.tensor(slots), num_decodes=1,
        decode_block_tables=torch.tensor([tables[0]], dtype=torch.int32),
        decode_seq_lens=torch.tensor([9], dtype=torch.int32), decode_max_blocks=3,
        prefills=[PrefillChunk(1, 6, 0, count=2), PrefillChunk(13, 6, 5, row=0)],
        prefill_block_tables=torch.tensor([tables[3]]),
    )
    q = torch.cat([qs[s][new[s]] for s in range(4)])[None]
    k = torch.cat([ks[s][new[s]] for s in range(4)])[None]
    v = torch.cat([vs[s][new[s]] for s in range(4)])[None]
    out = backend(0, q, k, v)[0]
    dense = [sdpa(qs[s][None], ks[s][None], vs[s][None], None, causal=True)[0][new[s]] for s in range(4)]
    torch.testing.assert_close(out, torch.cat(dense), rtol=1e-5, atol=1e-5)
    # The new tokens' K/V landed in their slots.
    torch.testing.assert_close(kv.k[0].view(-1, hkv, d)[slots], k[0])


def _request(rid, tokens):
    return Request(rid, tokens, SamplingParams(max_new_tokens=4), frozenset([2]))


def test_block_pool_prefix_sharing_ref_counts_and_lru_eviction():
    bm = BlockManager(num_blocks=6, block_size=2, enable_prefix_caching=True, reserve_blocks=0)
    a = _request("a", [1, 2, 3, 4, 5])
    assert bm.allocate_slots(a, 5) and a.block_ids == [0, 1, 2] and bm.num_free_blocks == 3
    a.num_computed_tokens = 5
    bm.cache_computed_blocks(a)  # its two full blocks are registered: [1, 2] and [1, 2 | 3, 4]
    b = _request("b", [1, 2, 3, 4, 9, 9, 9])
    hits = bm.get_computed_blocks(b)
    assert [h.block_id for h in hits] == [0, 1]
    assert bm.allocate_slots(b, 3, hits) and b.block_ids == [0, 1, 3, 4]
    assert [x.ref_cnt for x in hits] == [2, 2] and bm.num_free_blocks == 1
    # Sharing only the first block hits only it: each hash chains its parent's.
    c = _request("c", [1, 2, 4, 3, 0])
    assert [h.block_id for h in bm.get_computed_blocks(c)] == [0]
    # All or nothing: 3 blocks asked for, 1 free.
    assert not bm.allocate_slots(c, 5)
    assert c.block_ids == [] and bm.num_free_blocks == 1
    bm.free(a)
    assert [x.ref_cnt for x in hits] == [1, 1] and bm.num_free_blocks == 2
    bm.free(b)
    assert bm.num_free_blocks == bm.num_total_blocks == 6
    # Freed blocks keep their KV and stay findable; a sequence's tail is freed (so evicted) first.
    e = _request("e", [1, 2, 3, 4, 0])
    assert [h.block_id for h in bm.get_computed_blocks(e)] == [0, 1]
    d = _request("d", [7] * 10)
    assert bm.allocate_slots(d, 8) and sorted(d.block_ids) == [2, 3, 4, 5]  # uncached, least recent first
    assert [h.block_id for h in bm.get_computed_blocks(e)] == [0, 1]
    d.num_computed_tokens = 8
    assert bm.allocate_slots(d, 2) and d.block_ids[-1] == 1  # evicts the prefix's tail before its root
    assert [h.block_id for h in bm.get_computed_blocks(e)] == [0]
    assert bm.num_free_blocks == 1 and bm.usage == pytest.approx(5 / 6)
