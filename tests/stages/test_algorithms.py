"""Unit tests of the alignment losses and metrics against hand computations (plugins/algorithms)."""

from __future__ import annotations

import math

import pytest
import torch

from internlm2.core import InternLM2Config, random_model
from internlm2.plugins.algorithms import dpo_loss, metrics, needle, ppo_loss, reward_loss, similarity
from internlm2.plugins.algorithms.logprobs import (
    IGNORE,
    right_pad,
    sequence_logprobs,
    shifted_labels,
    token_logprobs,
)

pytestmark = pytest.mark.timeout(60)


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# ------------------------------------------------------------------------------------------ reward model
def test_focal_ranking_loss_matches_the_report_formula():
    chosen = [1.0, -0.5, 0.2, 3.0]
    rejected = [0.0, 0.5, 0.2, -1.0]
    expected = []
    for c, r in zip(chosen, rejected):
        p = sigmoid(c - r)
        expected.append(-((1 - 2 * max(0.0, p - 0.5)) ** 2) * math.log(p))
    got = reward_loss.focal_ranking_loss(torch.tensor(chosen), torch.tensor(rejected), gamma=2.0)
    assert float(got) == pytest.approx(sum(expected) / len(expected), rel=1e-6)
    # A confidently ranked pair weighs far less than under the plain ranking loss; a misranked one the same.
    plain = [-math.log(sigmoid(c - r)) for c, r in zip(chosen, rejected)]
    assert expected[3] < 0.01 * plain[3]
    assert expected[1] == pytest.approx(plain[1])
    gamma0 = reward_loss.focal_ranking_loss(torch.tensor(chosen), torch.tensor(rejected), gamma=0.0)
    assert float(gamma0) == pytest.approx(sum(plain) / len(plain), rel=1e-6)


def test_log_barrier_penalty_and_total_loss():
    scores = torch.tensor([0.0, 4.0, -2.5])
    expected = [-(math.log(x + 5) + math.log(5 - x)) for x in (0.0, 4.0, -2.5)]
    assert reward_loss.log_barrier_penalty(scores).tolist() == pytest.approx(expected, rel=1e-6)
    # Out of bounds: the tangent line at ±(5 − ε) — finite, not NaN, and growing with the distance.
    far = reward_loss.log_barrier_penalty(torch.tensor([7.0, -9.0]))
    at_edge = -(math.log(1e-3) + math.log(10 - 1e-3))
    slope = 1 / 1e-3 - 1 / (10 - 1e-3)
    assert far.tolist() == pytest.approx([at_edge + slope * (7 - 4.999), at_edge + slope * (9 - 4.999)], rel=1e-4)

    chosen, rejected = torch.tensor([1.0, 0.3]), torch.tensor([-1.0, 0.8])
    out = reward_loss.reward_model_loss(chosen, rejected, gamma=2.0, penalty_weight=0.02)
    rank = float(reward_loss.focal_ranking_loss(chosen, rejected, 2.0))
    barrier = [-(math.log(x + 5) + math.log(5 - x)) for x in (1.0, 0.3, -1.0, 0.8)]
    penalty = (barrier[0] + barrier[2] + barrier[1] + barrier[3]) / 2  # per pair: chosen + rejected
    assert float(out.loss) == pytest.approx(rank + 0.02 * penalty, rel=1e-6)
    assert out.accuracy == 0.5
    assert out.chosen_mean == pytest.approx(0.65) and out.rejected_mean == pytest.approx(-0.1)


def test_reward_loss_gradient_pushes_scores_apart_and_inward():
    # A close pair: descent raises the chosen score and lowers the rejected one.
    chosen = torch.tensor([0.1], requires_grad=True)
    rejected = torch.tensor([0.0], requires_grad=True)
    reward_loss.reward_model_loss(chosen, rejected, penalty_weight=0.02).loss.backward()
    assert chosen.grad.item() < 0 < rejected.grad.item()
    # A confidently ranked pair near the bound: the ranking pull has decayed, the barrier pushes inward.
    chosen = torch.tensor([4.95], requires_grad=True)
    rejected = torch.tensor([-4.0], requires_grad=True)
    reward_loss.reward_model_loss(chosen, rejected, penalty_weight=0.02).loss.backward()
    assert chosen.grad.item() == pytest.approx(0.02 * (-1 / 9.95 + 1 / 0.05), rel=1e-3)
    assert rejected.grad.item() < 0


def test_barrier_gradient_past_the_bound_points_inward():
    """A score that escaped (−5, 5) is pulled back: nonzero gradient, inward, continuous at the edge."""
    scores = torch.tensor([7.0, -7.0, 4.999, 5.0001], requires_grad=True)
    reward_loss.log_barrier_penalty(scores).sum().backward()
    slope = 1 / 1e-3 - 1 / (10 - 1e-3)
    g = scores.grad.tolist()
    assert g[0] == pytest.approx(slope, rel=1e-4) and g[0] > 0  # descent lowers a score of 7
    assert g[1] == pytest.approx(-slope, rel=1e-4)  # and raises a score of -7
    assert g[2] == pytest.approx(slope, rel=1e-2) and g[3] == pytest.approx(slope, rel=1e-4)
    # Through the whole loss: an escaped chosen score of 7 with a confident margin still moves down.
    chosen = torch.tensor([7.0], requires_grad=True)
    reward_loss.reward_model_loss(chosen, torch.tensor([-3.0]), penalty_weight=0.02).loss.backward()
    assert chosen.grad.item() > 0


def test_truncated_responses_lose_the_penalty():
    from internlm2.plugins.algorithms.reward_shaping import penalize_truncated

    rewards = torch.tensor([1.0, 2.0, -0.5])
    truncated = torch.tensor([False, True, True])
    assert penalize_truncated(rewards, truncated, 1.5).tolist() == [1.0, 0.5, -2.0]
    assert penalize_truncated(rewards, truncated, None) is rewards
    with pytest.raises(ValueError, match="truncation_penalty"):
        penalize_truncated(rewards, truncated, -1.0)


# ------------------------------------------------------------------------------------------------- DPO
def test_dpo_loss_matches_hand_computation():
    pc, pr, rc, rr = [-10.0, -4.0], [-12.0, -3.0], [-11.0, -4.5], [-11.0, -2.0]
    beta, eps = 0.1, 0.1
    out = dpo_loss.dpo_loss(*(torch.tensor(v) for v in (pc, pr, rc, rr)), beta=beta, label_smoothing=eps)
    expected, margins = [], []
    for a, b, c, d in zip(pc, pr, rc, rr):
        h = beta * ((a - c) - (b - d))
        expected.append(-(1 - eps) * math.log(sigmoid(h)) - eps * math.log(sigmoid(-h)))
        margins.append(beta * (a - c) - beta * (b - d))
    assert float(out.loss) == pytest.approx(sum(expected) / 2, rel=1e-6)
    assert out.margin == pytest.approx(sum(margins) / 2, rel=1e-6)
    assert out.chosen_rewards.tolist() == pytest.approx([0.1, 0.05], rel=1e-5)
    assert out.rejected_rewards.tolist() == pytest.approx([-0.1, -0.1], rel=1e-5)
    assert out.accuracy == 1.0


# ------------------------------------------------------------------------------------------------- PPO
def gae_loop(rewards: list[float], values: list[float], gamma: float, lam: float):
    """The textbook recursion for one episode of len(rewards) steps."""
    n = len(rewards)
    adv = [0.0] * n
    running = 0.0
    for t in reversed(range(n)):
        next_v = values[t + 1] if t + 1 < n else 0.0
        delta = rewards[t] + gamma * next_v - values[t]
        running = delta + gamma * lam * running
        adv[t] = running
    return adv, [a + v for a, v in zip(adv, values)]


@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 0.99), (0.9, 0.95)])
def test_gae_matches_a_straightforward_loop(gamma, lam):
    gen = torch.Generator().manual_seed(0)
    lengths = [5, 2, 7, 1]
    rewards = torch.randn(4, 7, generator=gen)
    values = torch.randn(4, 7, generator=gen)
    mask = torch.zeros(4, 7, dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, :n] = True
    adv, ret = ppo_loss.gae(rewards, values, mask, gamma=gamma, lam=lam)
    for i, n in enumerate(lengths):
        exp_adv, exp_ret = gae_loop(rewards[i, :n].tolist(), values[i, :n].tolist(), gamma, lam)
        assert adv[i, :n].tolist() == pytest.approx(exp_adv, rel=1e-5, abs=1e-6)
        assert ret[i, :n].tolist() == pytest.approx(exp_ret, rel=1e-5, abs=1e-6)
        assert adv[i, n:].abs().sum() == 0 and ret[i, n:].abs().sum() == 0


def test_kl_shaped_rewards_put_the_score_on_the_last_token():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.1, -3.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-0.2, -9.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    rewards, kl = ppo_loss.kl_shaped_rewards(logp, ref, torch.tensor([2.0, -7.0]), mask, kl_coef=0.01,
                                             score_clip=5.0)
    assert kl[0].tolist() == pytest.approx([0.5, -1.0, 0.0])
    assert kl[1].tolist() == pytest.approx([0.1, 0.0, 0.0])
    assert rewards[0].tolist() == pytest.approx([-0.005, 0.01, 2.0])
    assert rewards[1].tolist() == pytest.approx([-0.001 - 5.0, 0.0, 0.0])  # score clipped to -5


def test_clipped_policy_loss_hand_cases():
    # token 0: A > 0, ratio 1.5 -> clipped at 1.2; token 1: A < 0, ratio 0.5 -> clipped at 0.8 (pessimistic
    # bound is the unclipped 0.5 * -1... min(-0.5, -0.8) = -0.8); token 2: inside the band; token 3: padding.
    old = torch.zeros(1, 4)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.1, 9.0]]))
    adv = torch.tensor([[2.0, -1.0, 1.0, 100.0]])
    mask = torch.tensor([[True, True, True, False]])
    out = ppo_loss.clipped_policy_loss(new, old, adv, mask, clip=0.2)
    per_token = [-min(1.5 * 2.0, 1.2 * 2.0), -min(0.5 * -1.0, 0.8 * -1.0), -min(1.1 * 1.0, 1.1 * 1.0)]
    assert float(out.loss) == pytest.approx(sum(per_token) / 3, rel=1e-6)
    assert out.clip_fraction == pytest.approx(2 / 3)
    # Gradient flows only through the unclipped token (and none through padding).
    new.requires_grad_(True)
    ppo_loss.clipped_policy_loss(new, old, adv, mask, clip=0.2).loss.backward()
    assert new.grad[0, 0] == 0 and new.grad[0, 1] == 0 and new.grad[0, 3] == 0
    assert new.grad[0, 2].item() == pytest.approx(-1.1 / 3, rel=1e-5)


def test_clipped_value_loss_hand_cases():
    old = torch.tensor([[1.0, 1.0, 0.0]])
    values = torch.tensor([[2.0, 1.1, 0.0]])
    returns = torch.tensor([[1.0, 3.0, 0.0]])
    mask = torch.tensor([[True, True, False]])
    out = ppo_loss.clipped_value_loss(values, old, returns, mask, clip=0.2)
    # token 0: unclipped (2-1)^2 = 1, clipped (1.2-1)^2 = 0.04 -> 1; token 1: (1.1-3)^2 = 3.61 both.
    assert float(out.loss) == pytest.approx(0.5 * (1.0 + 3.61) / 2, rel=1e-6)
    # token 0 takes the unclipped branch (clipped is smaller); token 1 moves inside the band.
    assert out.clip_fraction == 0.0
    values2 = torch.tensor([[0.5, 1.1, 0.0]])  # token 0 moved down past the band, towards a target of 1.0
    returns2 = torch.tensor([[0.4, 3.0, 0.0]])
    out2 = ppo_loss.clipped_value_loss(values2, old, returns2, mask, clip=0.2)
    # token 0: unclipped (0.5-0.4)^2 = 0.01, clipped (0.8-0.4)^2 = 0.16 -> 0.16.
    assert float(out2.loss) == pytest.approx(0.5 * (0.16 + 3.61) / 2, rel=1e-6)
    assert out2.clip_fraction == pytest.approx(0.5)
    plain = ppo_loss.clipped_value_loss(values2, old, returns2, mask, clip=None)
    assert float(plain.loss) == pytest.approx(0.5 * (0.01 + 3.61) / 2, rel=1e-6)


def test_masked_whiten():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[True, True, True, False]])
    w = ppo_loss.masked_whiten(x, mask)
    assert w[0, 3] == 0
    assert w[0, :3].tolist() == pytest.approx([-1.2247, 0.0, 1.2247], abs=1e-3)


# ------------------------------------------------------------------------------------- log-probs, metrics
@pytest.fixture(scope="module")
def small_lm():
    config = InternLM2Config.preset("tiny", vocab_size=512, max_position_embeddings=512)
    return random_model(config, seed=3)


def test_token_logprobs_match_full_logits_and_ignore_padding(small_lm):
    gen = torch.Generator().manual_seed(1)
    rows = [torch.randint(3, 512, (n,), generator=gen).tolist() for n in (9, 5)]
    ids, padding = right_pad(rows)
    targets = padding.clone()
    targets[:, :3] = False  # the first three tokens are "prompt"
    labels = shifted_labels(ids, targets)
    got = token_logprobs(small_lm, ids, labels, padding)
    for i, row in enumerate(rows):
        full = torch.log_softmax(small_lm(torch.tensor([row])).float()[0], dim=-1)  # (T, V), unpadded
        expected = torch.zeros(ids.shape[1])
        for t in range(2, len(row) - 1):
            expected[t] = full[t, row[t + 1]]
        assert torch.allclose(got[i], expected, atol=1e-4), i
    assert (got[labels == IGNORE] == 0).all()
    assert torch.allclose(sequence_logprobs(small_lm, ids, labels, padding), got.sum(1))


def test_token_logprobs_are_differentiable_per_token(small_lm):
    ids = torch.tensor([[5, 6, 7, 8]])
    labels = shifted_labels(ids, torch.tensor([[False, False, True, True]]))
    lp = token_logprobs(small_lm, ids, labels)
    (lp * torch.tensor([[0.0, 1.0, -2.0, 0.0]])).sum().backward()
    assert small_lm.output.weight.grad is not None and small_lm.output.weight.grad.abs().sum() > 0
    small_lm.zero_grad(set_to_none=True)


def test_perplexity_is_exp_of_mean_nll(small_lm):
    rows = [[1, 20, 30, 40, 50], [1, 60, 70]]
    got = metrics.perplexity(small_lm, rows, batch_size=2)
    nlls = []
    for row in rows:
        logits = small_lm(torch.tensor([row])).float()[0]
        nll = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(row[1:]), reduction="none")
        nlls += nll.tolist()
    assert got["tokens"] == 6
    assert got["perplexity"] == pytest.approx(math.exp(sum(nlls) / 6), rel=1e-4)


def test_text_metrics_on_known_cases():
    refs = ["the cat sat on the mat today", "a quick brown fox jumps over the dog"]
    assert metrics.bleu(refs, refs) == pytest.approx(100.0)
    assert metrics.bleu(["zzz yyy xxx www", "qqq ppp ooo nnn"], refs) == pytest.approx(0.0, abs=1e-6)
    partial = metrics.bleu(["the cat sat on the mat", "a quick brown fox jumps"], refs)
    assert 0.0 < partial < 100.0
    scores = metrics.rouge_scores(refs, refs)
    assert scores == pytest.approx({"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0})
    # "the cat is on the mat" vs "the cat sat on the mat": LCS 5 of 6 tokens each side -> F1 5/6.
    assert similarity.rouge_l("the cat is on the mat", "the cat sat on the mat") == pytest.approx(5 / 6)
    assert similarity.rouge_l("你好世界", "你好") == pytest.approx(2 / 3)  # per-character for CJK
    assert similarity.rouge_l_batch(["a b"], [None]) == [0.0]
    assert metrics.accuracy(["Paris.", "  42 ", "no"], ["paris", "42", "yes"]) == pytest.approx(2 / 3)
    assert metrics.answer_matches("The answer is 42!", "42", mode="contains")


def test_needle_case_layout_and_heatmap(small_lm, tmp_path):
    def encode(text: str) -> list[int]:  # a byte-level stand-in tokenizer inside the small vocabulary
        return [3 + b for b in text.encode()]

    case = needle.build_case(encode, length=400, depth=0.5, value="12345", bos_id=1)
    assert len(case.prompt_ids) == 400 and case.prompt_ids[0] == 1
    needle_ids = encode(" " + needle.NEEDLE.format(value="12345") + " ")
    ids = case.prompt_ids
    starts = [i for i in range(len(ids)) if ids[i : i + len(needle_ids)] == needle_ids]
    budget = 400 - 1 - len(needle_ids) - len(encode(needle.QUESTION))
    assert starts == [1 + round(0.5 * budget)]
    assert case.answer_ids == encode(" 12345.")
    with pytest.raises(ValueError, match="lengths"):
        needle.build_case(encode, length=20, depth=0.0, value="1", bos_id=1)

    grid = needle.evaluate_grid(small_lm, encode, lengths=[150, 300], depths=[0.0, 1.0], bos_id=1,
                                needles_per_cell=1)
    assert len(grid.retrieval) == 2 and len(grid.retrieval[0]) == 2
    assert all(lp < 0 for row in grid.logprob for lp in row)
    png = needle.plot_heatmap(grid, tmp_path / "needle.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
