"""LLMEngine on CPU with tiny random checkpoints: exactness against full forwards, batching, prefix cache,
preemption, chunked prefill, cancellation, sampling, logprobs, overload and validation."""

from __future__ import annotations

import pytest
import torch

from internlm2.core import InternLM2Config, greedy_generate, random_model
from internlm2.core.config import ConfigError
from internlm2.core.engine import (
    EngineConfig,
    EngineOverloadedError,
    InvalidRequestError,
    LLMEngine,
    SamplingParams,
)

pytestmark = pytest.mark.timeout(120)

GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def model():
    return random_model(InternLM2Config.preset("tiny"), seed=0)


def prompts_of(lengths, seed=0, vocab=92544):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


@torch.inference_mode()
def argmax_loop(model, prompt, n):
    """The plainest reference: a full forward over everything so far, argmax, repeat."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def engine(model, **kw):
    kw.setdefault("block_size", 4)
    return LLMEngine(model, None, EngineConfig(**kw))


def test_greedy_equals_full_forward_argmax_and_greedy_generate(model):
    eng = engine(model, max_num_seqs=4, max_num_batched_tokens=64)
    prompts = prompts_of([1, 7, 16, 23])
    outs = eng.generate(prompts, SamplingParams(max_new_tokens=10, **GREEDY))
    for p, o in zip(prompts, outs):
        assert o.new_token_ids == argmax_loop(model, p, 10)
        assert o.new_token_ids == greedy_generate(model, p, 10)
        assert (o.finished, o.finish_reason, o.prompt_tokens, o.completion_tokens) == (True, "length", len(p), 10)


def test_32_concurrent_mixed_lengths_equal_one_at_a_time(model):
    lengths = [1 + (7 * i) % 45 for i in range(32)]
    prompts = prompts_of(lengths, seed=1)
    params = [SamplingParams(max_new_tokens=2 + (5 * i) % 13, **GREEDY) for i in range(32)]
    batched = engine(model, max_num_seqs=32, max_num_batched_tokens=96, enable_prefix_caching=False)
    outs = batched.generate(prompts, params)
    alone = engine(model, max_num_seqs=1, max_num_batched_tokens=64, enable_prefix_caching=False)
    for p, sp, o in zip(prompts, params, outs):
        assert o.new_token_ids == alone.generate([p], sp)[0].new_token_ids
        assert o.new_token_ids == greedy_generate(model, p, sp.max_new_tokens)
    st = batched.stats()
    assert st.num_steps < sum(sp.max_new_tokens for sp in params)  # requests really shared steps
    assert st.num_free_blocks == st.num_total_blocks


def test_decode_graph_input_path_pads_and_matches(model):
    """The CUDA-graph decode path (static buffers, padding rows into the scratch block), replayed eagerly."""
    eng = engine(model, max_num_seqs=8, max_num_batched_tokens=64)
    eng.runner.capture_graphs([1, 2, 4, 8], emulate=True)
    prompts = prompts_of([3, 9, 14, 20, 26], seed=15)
    params = [SamplingParams(max_new_tokens=n, **GREEDY) for n in (3, 6, 9, 12, 15)]  # batch shrinks 5 -> 1
    outs = eng.generate(prompts, params)
    for p, sp, o in zip(prompts, params, outs):
        assert o.new_token_ids == greedy_generate(model, p, sp.max_new_tokens)
    assert eng.runner.graph_sizes == [1, 2, 4, 8]


def test_prefix_cache_hits_skip_the_shared_prefill(model):
    shared = prompts_of([40], seed=2)[0]
    a, b = shared + prompts_of([5], seed=3)[0], shared + prompts_of([7], seed=4)[0]
    sp = SamplingParams(max_new_tokens=6, **GREEDY)
    eng = engine(model, max_num_seqs=4, max_num_batched_tokens=64)
    out_a = eng.generate([a], sp)[0]
    before = eng.stats()
    out_b = eng.generate([b], sp)[0]
    after = eng.stats()
    assert after.prefix_cache_hit_tokens - before.prefix_cache_hit_tokens == 40  # 10 full blocks of 4
    assert after.num_computed_prompt_tokens - before.num_computed_prompt_tokens == len(b) - 40
    assert out_b.metrics.num_cached_tokens == 40
    cold = engine(model, max_num_seqs=4, max_num_batched_tokens=64, enable_prefix_caching=False)
    assert out_a.new_token_ids == cold.generate([a], sp)[0].new_token_ids
    assert out_b.new_token_ids == cold.generate([b], sp)[0].new_token_ids
    # The same prompt again: everything but the block holding its last token comes from the cache.
    again = eng.generate([a], sp)[0]
    assert again.new_token_ids == out_a.new_token_ids
    assert again.metrics.num_cached_tokens == (len(a) - 1) // 4 * 4
    # After a weight update the cached KV is stale: reset_prefix_cache makes the next request recompute.
    assert eng.reset_prefix_cache() > 0
    assert eng.generate([a], sp)[0].metrics.num_cached_tokens == 0


def test_kv_budget_too_small_completes_everything_through_preemption(model):
    prompts = prompts_of([10, 12, 9, 14, 11, 13], seed=5)
    sp = SamplingParams(max_new_tokens=20, **GREEDY)
    # 12 blocks of 4 = 48 tokens: any one request fits (<= 34 tokens), all six together never do.
    eng = engine(model, max_num_seqs=6, max_num_batched_tokens=64, num_gpu_blocks=12)
    outs = eng.generate(prompts, sp)
    st = eng.stats()
    assert st.num_preemptions > 0
    assert st.num_free_blocks == st.num_total_blocks == 12
    for p, o in zip(prompts, outs):
        assert o.finish_reason == "length"
        assert o.new_token_ids == greedy_generate(model, p, 20)
    assert any(o.metrics.num_preemptions for o in outs)


def test_chunked_prefill_matches_unchunked_and_never_stalls_decodes(model):
    prompts = prompts_of([50, 3, 37], seed=6)
    sp = SamplingParams(max_new_tokens=8, **GREEDY)
    whole = engine(model, max_num_seqs=4, max_num_batched_tokens=256).generate(prompts, sp)
    chunked_engine = engine(model, max_num_seqs=4, max_num_batched_tokens=8)
    chunked = chunked_engine.generate(prompts, sp)
    assert [o.new_token_ids for o in chunked] == [o.new_token_ids for o in whole]

    # A decoding request gets a token in every step while a long prompt is prefilled in chunks.
    eng = engine(model, max_num_seqs=4, max_num_batched_tokens=8)
    eng.add_request("short", prompts[1], SamplingParams(max_new_tokens=30, **GREEDY))
    eng.step()
    eng.add_request("long", prompts_of([80], seed=7)[0], SamplingParams(max_new_tokens=2, **GREEDY))
    long_first_token_step = None
    for i in range(12):
        outs = {o.request_id: o for o in eng.step()}
        assert len(outs["short"].new_token_ids) == 1
        if "long" in outs and long_first_token_step is None:
            long_first_token_step = i
    assert long_first_token_step is not None and long_first_token_step >= 80 // 8 - 1


def test_abort_frees_blocks_at_once(model):
    eng = engine(model, max_num_seqs=4, max_num_batched_tokens=64)
    prompts = prompts_of([30, 20, 25], seed=8)
    for i, p in enumerate(prompts):
        eng.add_request(f"r{i}", p, SamplingParams(max_new_tokens=50, **GREEDY))
    eng.step()
    eng.step()
    used = eng.stats().num_total_blocks - eng.stats().num_free_blocks
    assert used >= sum(-(-len(p) // 4) for p in prompts)
    assert eng.abort("r1")
    assert eng.stats().num_free_blocks == eng.stats().num_total_blocks - (used - 20 // 4 - 1)
    assert eng.abort("r0") and eng.abort("r2")
    assert not eng.abort("r2") and not eng.abort("nope")
    st = eng.stats()
    assert st.num_free_blocks == st.num_total_blocks and st.num_running == 0
    final = {o.request_id: o for o in eng.step()}
    assert set(final) == {"r0", "r1", "r2"}
    assert all(o.finished and o.finish_reason == "cancelled" for o in final.values())
    assert not eng.has_unfinished()


def test_waiting_request_can_be_aborted(model):
    eng = engine(model, max_num_seqs=1, max_num_batched_tokens=64)
    eng.add_request("a", prompts_of([5])[0], SamplingParams(max_new_tokens=5, **GREEDY))
    eng.add_request("b", prompts_of([5])[0], SamplingParams(max_new_tokens=5, **GREEDY))
    eng.step()
    assert eng.stats().num_waiting == 1
    assert eng.abort("b")
    assert eng.stats().num_waiting == 0


def test_seeds_reproduce_and_differ(model):
    prompt = prompts_of([12], seed=9)[0]
    others = prompts_of([4, 30, 17], seed=10)

    def run(seed, with_others):
        eng = engine(model, max_num_seqs=4, max_num_batched_tokens=64)
        sp = SamplingParams(temperature=1.0, seed=seed, max_new_tokens=16, ignore_eos=True)
        batch = [prompt] + (others if with_others else [])
        params = [sp] + [SamplingParams(temperature=0.8, max_new_tokens=9, ignore_eos=True)] * (len(batch) - 1)
        return eng.generate(batch, params)[0].new_token_ids

    a = run(123, False)
    assert run(123, True) == a  # same seed, alone or in a batch
    assert run(124, False) != a
    assert a != greedy_generate(model, prompt, 16)  # temperature 1 on a near-flat distribution


@pytest.mark.parametrize("truncation", [dict(top_k=1), dict(min_p=1.0), dict(top_p=1e-6)])
def test_truncation_to_the_top_token_is_greedy(model, truncation):
    prompt = prompts_of([9], seed=11)[0]
    eng = engine(model, max_num_seqs=2, max_num_batched_tokens=64)
    sp = SamplingParams(temperature=1.3, max_new_tokens=8, ignore_eos=True, **truncation)
    assert eng.generate([prompt], sp)[0].new_token_ids == greedy_generate(model, prompt, 8)


@torch.inference_mode()
def test_penalties_match_a_reference_loop(model):
    # A prompt that already holds its own greedy continuation, so the penalties must change the output.
    for seed in range(100, 150):
        p = prompts_of([6], seed=seed)[0]
        t1 = greedy_generate(model, p, 1)[0]
        prompt = [t1, *p]
        if greedy_generate(model, prompt, 1)[0] == t1:
            break
    kw = dict(repetition_penalty=1.7, presence_penalty=0.4, frequency_penalty=0.3)
    out = engine(model, max_num_seqs=2, max_num_batched_tokens=64).generate(
        [prompt], SamplingParams(max_new_tokens=8, **kw, **GREEDY)
    )[0]
    ids, gen = list(prompt), []
    for _ in range(8):
        logits = model(torch.tensor([ids]))[0, -1].float()
        seen = torch.tensor(sorted(set(ids)))
        vals = logits[seen]
        logits[seen] = torch.where(vals > 0, vals / 1.7, vals * 1.7)
        for t in set(gen):
            logits[t] -= 0.3 * gen.count(t) + 0.4
        gen.append(int(logits.argmax()))
        ids.append(gen[-1])
    assert out.new_token_ids == gen
    assert gen[0] != t1


@torch.inference_mode()
@pytest.mark.parametrize("budget", [256, 8])
def test_prompt_logprobs_equal_log_softmax_of_full_forward(model, budget):
    prompt = prompts_of([29], seed=13)[0]
    eng = engine(model, max_num_seqs=2, max_num_batched_tokens=budget)
    out = eng.generate([prompt], SamplingParams(max_new_tokens=3, prompt_logprobs=3, logprobs=2, **GREEDY))[0]
    ref = torch.log_softmax(model(torch.tensor([prompt + out.new_token_ids]))[0].float(), dim=-1)
    assert [e.token_id for e in out.prompt_logprobs] == prompt[1:]
    for i, e in enumerate(out.prompt_logprobs):
        assert e.logprob == pytest.approx(float(ref[i, prompt[i + 1]]), abs=1e-4)
        top_v, top_i = ref[i].topk(3)
        assert [t for t, _ in e.top] == top_i.tolist()
        assert [v for _, v in e.top] == pytest.approx(top_v.tolist(), abs=1e-4)
    assert len(out.logprobs) == 3
    for j, e in enumerate(out.logprobs):
        row = ref[len(prompt) - 1 + j]
        assert e.token_id == out.new_token_ids[j] == e.top[0][0]  # greedy: the chosen token is the top one
        assert e.logprob == pytest.approx(float(row.max()), abs=1e-4)
        assert len(e.top) == 2
    # A prefix-cache hit must not cut prompt logprobs short.
    again = eng.generate([prompt], SamplingParams(max_new_tokens=1, prompt_logprobs=0, **GREEDY))[0]
    assert len(again.prompt_logprobs) == len(prompt) - 1 and all(e.top == [] for e in again.prompt_logprobs)


def test_stop_token_ids_and_min_new_tokens(model):
    prompt = prompts_of([8], seed=14)[0]
    greedy = greedy_generate(model, prompt, 12)
    eng = engine(model, max_num_seqs=2, max_num_batched_tokens=64)
    stop_tok = greedy[2]
    out = eng.generate([prompt], SamplingParams(max_new_tokens=12, stop_token_ids=[stop_tok], **GREEDY))[0]
    first = greedy.index(stop_tok)
    assert out.new_token_ids == greedy[: first + 1]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop_tok)
    # The default eos id (no tokenizer: config.eos_token_id) ends with "eos" unless ignore_eos.
    eos_engine = engine(model, max_num_seqs=2, max_num_batched_tokens=64)
    eos_engine.eos_token_ids = frozenset([stop_tok])
    out = eos_engine.generate([prompt], SamplingParams(temperature=0.0, max_new_tokens=12))[0]
    assert (out.finish_reason, out.new_token_ids) == ("eos", greedy[: first + 1])
    # min_new_tokens masks stop ids for the first tokens.
    out = eng.generate([prompt], SamplingParams(max_new_tokens=12, min_new_tokens=first + 2,
                                                stop_token_ids=[stop_tok], **GREEDY))[0]
    assert stop_tok not in out.new_token_ids[: first + 2]


def test_overload_raises(model):
    eng = engine(model, max_num_seqs=2, max_num_batched_tokens=64, max_queue_size=2)
    eng.add_request("a", [5, 6], SamplingParams(max_new_tokens=2))
    eng.add_request("b", [5, 6], SamplingParams(max_new_tokens=2))
    with pytest.raises(EngineOverloadedError):
        eng.add_request("c", [5, 6], SamplingParams(max_new_tokens=2))
    eng.step()  # both admitted: the queue has room again
    eng.add_request("c", [5, 6], SamplingParams(max_new_tokens=2))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(min_p=1.1), "min_p"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(presence_penalty=3.0), "presence_penalty"),
        (dict(frequency_penalty=-2.5), "frequency_penalty"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(min_new_tokens=9, max_new_tokens=4), "min_new_tokens"),
        (dict(logprobs=21), "logprobs"),
        (dict(prompt_logprobs=-1), "prompt_logprobs"),
        (dict(stop=[""]), "stop"),
        (dict(stop_token_ids=[-3]), "stop_token_ids"),
        (dict(seed=-1), "seed"),
    ],
)
def test_sampling_params_validation_names_the_field(kwargs, field):
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams(**kwargs).validate()
    assert err.value.field == field and isinstance(err.value, ValueError)


def test_engine_rejects_requests_it_cannot_run(model):
    eng = engine(model, max_num_seqs=2, max_num_batched_tokens=64, max_model_len=64)
    cases = [
        ([], SamplingParams(max_new_tokens=4), "prompt"),
        ([1] * 64, SamplingParams(max_new_tokens=1), "prompt"),
        ([1] * 60, SamplingParams(max_new_tokens=5), "max_new_tokens"),
        ([1, 2], SamplingParams(), "max_new_tokens"),  # the default 256 does not fit a 64-token context
        ([1, 92544], SamplingParams(max_new_tokens=4), "prompt_token_ids"),
        ([1, -1], SamplingParams(max_new_tokens=4), "prompt_token_ids"),
        ([1, 2], SamplingParams(stop=["x"], max_new_tokens=4), "stop"),  # no tokenizer
        ([1, 2], SamplingParams(stop_token_ids=[10**6], max_new_tokens=4), "stop_token_ids"),
        ([1, 2], SamplingParams(top_p=0), "top_p"),
    ]
    for prompt, sp, field in cases:
        with pytest.raises(InvalidRequestError) as err:
            eng.add_request("x", prompt, sp)
        assert err.value.field == field, (prompt[:3], sp)
    eng.add_request("x", [1, 2], SamplingParams(max_new_tokens=62))
    with pytest.raises(InvalidRequestError) as err:
        eng.add_request("x", [1, 2], SamplingParams(max_new_tokens=4))
    assert err.value.field == "request_id"
    with pytest.raises(ConfigError) as err:
        engine(model, max_num_seqs=2, max_num_batched_tokens=64, num_gpu_blocks=4, max_model_len=64)
    assert err.value.field == "max_model_len"
    with pytest.raises(ConfigError):
        EngineConfig(max_num_seqs=8, max_num_batched_tokens=4).validate()


def test_dynamic_ntk_rope_past_max_position_embeddings():
    """Past max_position_embeddings dynamic NTK scales RoPE by each sequence's own length: the engine
    feeds per-token lengths ([N, 1] layout) and must match the single-sequence reference."""
    cfg = InternLM2Config.preset("tiny", max_position_embeddings=16, rope_theta=100.0,
                                 rope_scaling={"type": "dynamic", "factor": 4.0})
    dyn = random_model(cfg, seed=1)
    prompts = prompts_of([5, 14, 22], seed=16)
    sp = SamplingParams(max_new_tokens=12, **GREEDY)
    outs = engine(dyn, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64).generate(prompts, sp)
    for p, o in zip(prompts, outs):
        assert o.new_token_ids == greedy_generate(dyn, p, 12)


def test_kv_pool_sizing(model):
    from internlm2.core.engine.kv_cache import bytes_per_block

    per_block = bytes_per_block(model.config, 4, torch.float32)  # 2 layers x K,V x 2 heads x 16 x 4 tokens x 4 B
    assert per_block == 2 * 2 * 2 * 16 * 4 * 4
    assert engine(model, kv_cache_bytes=10 * per_block + 7).stats().num_total_blocks == 10
    assert engine(model, num_gpu_blocks=33).stats().num_total_blocks == 33
    # The default budget is capped at what max_num_seqs full-length sequences could ever use.
    st = engine(model, max_num_seqs=2, max_num_batched_tokens=64, max_model_len=40).stats()
    assert (st.num_total_blocks, st.max_model_len) == (2 * 10, 40)
    # max_model_len defaults to the model's context, capped by the pool.
    assert engine(model, num_gpu_blocks=5).stats().max_model_len == 20
