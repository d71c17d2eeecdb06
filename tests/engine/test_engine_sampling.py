"""Counter-based sampling noise (core/engine/sampler.py): the int64 mixer against its Python reference,
the statistical quality of the noise, sampled frequencies against the distribution (with temperature,
top-k, top-p, min-p), and seeded outputs that do not depend on the batch or on preemption."""

from __future__ import annotations

import random

import pytest
import torch

from internlm2.core import InternLM2Config, random_model
from internlm2.core.engine import EngineConfig, LLMEngine, SamplingParams
from internlm2.core.engine.request import Request
from internlm2.core.engine.sampler import (
    Sampler,
    _signed,
    counter_uniform,
    engine_noise_key,
    exponential_race,
    mix64,
    mix64_,
    noise_key,
)

pytestmark = pytest.mark.timeout(60)

# A fixed small distribution; token 7 has probability 0 (logit -inf) and must never come out.
PROBS = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.05, 0.03, 0.02, 0.0])
# Upper 0.1% points of chi-square (df = number of categories - 1). The draws are deterministic (fixed
# keys), so each check passes or fails the same way every run; a sound hash fails one with p = 0.001.
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46}
N_DRAWS = 40_000


def chi_square(tokens: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """(statistic, df) of sampled ``tokens`` against ``probs``; asserts zero-probability tokens never occur."""
    counts = torch.bincount(tokens, minlength=len(probs)).double()
    support = probs > 0
    assert counts[~support].sum() == 0, f"sampled a masked token: {counts.tolist()}"
    expected = probs[support].double() / probs[support].sum() * len(tokens)
    stat = float(((counts[support] - expected) ** 2 / expected).sum())
    return stat, int(support.sum()) - 1


def requests_for(seeds: list[int], params: dict) -> list[Request]:
    return [Request(f"r{s}", [1, 2, 3], SamplingParams(seed=s, **params), frozenset(), noise_key(s)) for s in seeds]


def sample_rows(logits_row: torch.Tensor, seeds: list[int], **params) -> torch.Tensor:
    """One Sampler call over len(seeds) requests that all see ``logits_row``."""
    reqs = requests_for(seeds, params)
    tokens, _ = Sampler(torch.device("cpu"))(logits_row.repeat(len(reqs), 1), reqs)
    return torch.tensor(tokens)


# ---- the mixer ------------------------------------------------------------------------------------
def test_int64_mixer_matches_the_uint64_reference():
    rng = random.Random(0)
    vals = [rng.getrandbits(64) for _ in range(5000)] + [0, 1, 2**63 - 1, 2**63, 2**64 - 1, 0x8000_0000_0000_0001]
    x = torch.tensor([_signed(v) for v in vals], dtype=torch.int64)
    assert mix64_(x).tolist() == [_signed(mix64(v)) for v in vals]


def test_user_seeds_and_engine_streams_get_distinct_keys():
    keys = [noise_key(s) for s in range(2000)] + [noise_key(2**63 - 1 - s) for s in range(100)]
    keys += [engine_noise_key(e, n) for e in (0, 1) for n in range(2000)]
    assert len(set(keys)) == len(keys)
    assert all(-(2**63) <= k < 2**63 for k in keys)


# ---- the noise ------------------------------------------------------------------------------------
def test_uniform_noise_moments_bits_and_neighbour_correlations():
    seeds, steps, vocab = 32, 32, 1024
    keys = torch.tensor([noise_key(s) for s in range(seeds)]).repeat_interleave(steps)
    u = counter_uniform(keys, torch.arange(steps).repeat(seeds), vocab).view(seeds, steps, vocab).double()
    n = u.numel()
    assert float(u.min()) > 0.0 and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 5 * (1 / 12 / n) ** 0.5
    assert abs(float(u.var()) - 1 / 12) < 5 * (1 / 180 / n) ** 0.5  # var of (u - 1/2)**2 is 1/180
    # Each of the 23 bits in use is a fair coin.
    j = (u * 2**23).floor().long()
    bits = torch.stack([(j >> b) & 1 for b in range(23)]).flatten(1).double().mean(1)
    assert (bits - 0.5).abs().max() < 5 * (0.25 / n) ** 0.5
    # 64-bin histogram.
    counts = torch.histc(u.float(), bins=64, min=0, max=1).double()
    assert float(((counts - n / 64) ** 2 / (n / 64)).sum()) < 120  # chi-square df 63: 0.1% point ~103.4 -> margin
    # No correlation between neighbouring vocab indices, steps, seeds, or (seed, step+1) vs (seed+1, step).
    z = u - 0.5
    pairs = {
        "vocab": (z[:, :, :-1], z[:, :, 1:]),
        "step": (z[:, :-1], z[:, 1:]),
        "seed": (z[:-1], z[1:]),
        "seed x step": (z[:-1, 1:], z[1:, :-1]),
    }
    for name, (a, b) in pairs.items():
        r = float((a * b).mean() / (z * z).mean())
        assert abs(r) < 5 / a.numel() ** 0.5, (name, r)
    # E = -log u is Exp(1): mean 1, variance 1.
    e = -u.log()
    assert abs(float(e.mean()) - 1) < 5 / n**0.5 and abs(float(e.var()) - 1) < 5 * (8 / n) ** 0.5


def test_noise_depends_only_on_key_step_and_index():
    keys = torch.tensor([noise_key(5), noise_key(6), noise_key(5)])
    u = counter_uniform(keys, torch.tensor([3, 3, 4]), 300)
    alone = counter_uniform(keys[:1], torch.tensor([3]), 300)
    assert torch.equal(u[0], alone[0])  # batch-mates change nothing
    assert not torch.equal(u[0], u[1]) and not torch.equal(u[0], u[2])  # other seed / other step
    assert torch.equal(counter_uniform(keys[:1], torch.tensor([3]), 100)[0], alone[0, :100])  # prefix of the vocab


# ---- sampled frequencies --------------------------------------------------------------------------
def test_frequencies_over_seeds_match_the_distribution():
    tokens = sample_rows(PROBS.log(), list(range(N_DRAWS)), temperature=1.0)
    stat, df = chi_square(tokens, PROBS)
    assert stat < CHI2_999[df], stat


def test_frequencies_over_steps_of_one_request_match_the_distribution():
    keys = torch.full((N_DRAWS,), noise_key(12345))
    probs = PROBS.repeat(N_DRAWS, 1)
    tokens = exponential_race(probs, counter_uniform(keys, torch.arange(N_DRAWS), len(PROBS)))
    stat, df = chi_square(tokens, PROBS)
    assert stat < CHI2_999[df], stat


def test_temperature_reshapes_the_distribution():
    tokens = sample_rows(PROBS.log(), list(range(N_DRAWS)), temperature=0.5)
    sharpened = PROBS**2 / (PROBS**2).sum()
    stat, df = chi_square(tokens, sharpened)
    assert stat < CHI2_999[df], stat


@pytest.mark.parametrize(
    "truncation, kept",
    [
        (dict(top_k=3), [0, 1, 2]),
        (dict(top_p=0.6), [0, 1]),  # 0.4 + 0.25 is the smallest head reaching 0.6
        (dict(min_p=0.2), [0, 1, 2, 3]),  # p >= 0.2 * 0.4
        (dict(top_k=4, top_p=0.85), [0, 1, 2]),  # top 4 renormalised: .444 .278 .167 .111; the top 3 hold .889
    ],
)
def test_top_k_top_p_min_p_still_apply(truncation, kept):
    tokens = sample_rows(PROBS.log(), list(range(10_000)), temperature=1.0, **truncation)
    target = torch.zeros_like(PROBS)
    target[kept] = PROBS[kept]
    stat, df = chi_square(tokens, target)
    assert stat < CHI2_999[df], stat


# ---- batch invariance and reproducibility ----------------------------------------------------------
def test_seeded_rows_sample_the_same_alone_and_in_any_batch():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 500, generator=g) * 2
    sampler = Sampler(torch.device("cpu"))
    seeds = [11, 12, 13, 14, 15, 16]
    for step in range(20):
        reqs = requests_for(seeds, dict(temperature=0.9, top_p=0.95))
        for r in reqs:
            r.token_ids.extend([5] * step)  # step = number of output tokens so far
        batch, _ = sampler(logits.clone(), reqs)
        alone = [sampler(logits[i : i + 1].clone(), [r])[0][0] for i, r in enumerate(reqs)]
        reversed_batch, _ = sampler(logits.flip(0).clone(), reqs[::-1])
        assert batch == alone == reversed_batch[::-1]


@pytest.fixture(scope="module")
def model():
    return random_model(InternLM2Config.preset("tiny"), seed=0)


def test_engine_seeded_outputs_ignore_batch_and_preemption_and_seeds_differ(model):
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 92544, (n,), generator=g).tolist() for n in (10, 12, 9, 14, 11, 13)]
    params = [SamplingParams(temperature=1.0, top_k=50, seed=100 + i, max_new_tokens=20, ignore_eos=True)
              for i in range(len(prompts))]

    def engine(**kw):
        return LLMEngine(model, None, EngineConfig(block_size=4, max_num_batched_tokens=64, **kw))

    alone = [engine(max_num_seqs=1).generate([p], sp)[0].new_token_ids for p, sp in zip(prompts, params)]
    batched = [o.new_token_ids for o in engine(max_num_seqs=6).generate(prompts, params)]
    # 12 blocks of 4 tokens: any one request fits, all six never do -> preemption and recompute.
    tight = engine(max_num_seqs=6, num_gpu_blocks=12)
    outs = tight.generate(prompts, params)
    assert tight.stats().num_preemptions > 0
    assert alone == batched == [o.new_token_ids for o in outs]
    # A different seed gives a different sequence; the same seed on another engine the same one.
    other = engine(max_num_seqs=1).generate([prompts[0]], SamplingParams(temperature=1.0, top_k=50, seed=999,
                                                                        max_new_tokens=20, ignore_eos=True))
    assert other[0].new_token_ids != alone[0]
    assert len({tuple(a) for a in alone}) == len(alone)


def test_engine_unseeded_requests_differ_and_reproduce_from_the_engine_seed(model):
    prompt = [5, 17, 300, 42, 9]
    sp = SamplingParams(temperature=1.0, max_new_tokens=12, ignore_eos=True)

    def run(seed):
        eng = LLMEngine(model, None, EngineConfig(block_size=4, max_num_seqs=3, max_num_batched_tokens=64, seed=seed))
        return [o.new_token_ids for o in eng.generate([prompt] * 3, sp)]

    a = run(0)
    assert len({tuple(x) for x in a}) == 3  # each request its own stream
    assert run(0) == a
    assert run(1) != a
