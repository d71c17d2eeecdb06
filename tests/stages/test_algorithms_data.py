"""Preference encoding, batching and the dataset helpers of the alignment stages (plugins/algorithms)."""

from __future__ import annotations

import pytest
import rlhf_synthetic as synth
import torch

from internlm2.core import InternLM2Config, random_model
from internlm2.core.reward import RewardScorer
from internlm2.plugins.algorithms import datasets, preference
from internlm2.plugins.algorithms.logprobs import IGNORE
from internlm2.plugins.algorithms.models import reward_model_from_trunk
from internlm2.plugins.algorithms.rollout import Rollout, collate_rollouts

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return synth.make_tokenizer(tmp_path_factory.mktemp("tok"))


PAIR = {"prompt": [{"role": "user", "content": "List some fruits."}],
        "chosen": [{"role": "assistant", "content": "apple apple"}],
        "rejected": [{"role": "assistant", "content": "banana"}], "condition": "code"}


def test_reward_sequences_are_what_the_scorer_reads(tokenizer):
    pair = preference.parse_pair(PAIR)
    chosen, rejected = preference.reward_pair_ids(tokenizer, pair, tokenizer.reward_token_id,
                                                  preference.DEFAULT_CONDITIONS)
    rm = reward_model_from_trunk(random_model(InternLM2Config.preset("tiny", vocab_size=synth.VOCAB)),
                                 tokenizer.reward_token_id)
    scorer = RewardScorer(rm, tokenizer)
    system = preference.DEFAULT_CONDITIONS["code"]
    assert chosen == scorer.encode(pair.prompt + pair.chosen, system)
    assert rejected == scorer.encode(pair.prompt + pair.rejected, system)
    assert chosen[-1] == tokenizer.reward_token_id
    # A condition that is not a table key is the system prompt itself; none means no system message.
    assert preference.condition_prompt("Judge tersely.", preference.DEFAULT_CONDITIONS) == "Judge tersely."
    assert preference.condition_prompt(None, preference.DEFAULT_CONDITIONS) is None


def test_dpo_ids_end_with_im_end_and_share_the_context(tokenizer):
    prompt, chosen, rejected = preference.dpo_pair_ids(tokenizer, preference.parse_pair(PAIR))
    im_end = tokenizer.special_tokens["<|im_end|>"]
    assert prompt == tokenizer.encode_chat(PAIR["prompt"], add_generation_prompt=True)
    assert chosen[-1] == im_end and rejected[-1] == im_end
    assert tokenizer.decode(chosen[:-1]) == "apple apple"
    bad = dict(PAIR, chosen=[{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"},
                             {"role": "assistant", "content": "z"}])
    with pytest.raises(ValueError, match="share their context"):
        preference.dpo_pair_ids(tokenizer, preference.parse_pair(bad))
    batch = preference.collate_dpo([(prompt, chosen, rejected)], tokenizer.pad_id)
    # Labels: exactly the response tokens, at the positions that predict them.
    assert batch.labels[0][batch.labels[0] != IGNORE].tolist() == chosen
    assert batch.labels[1][batch.labels[1] != IGNORE].tolist() == rejected


def test_parse_pair_names_the_bad_field():
    with pytest.raises(ValueError, match=r"pairs\[2\]\.rejected: missing"):
        preference.parse_pair({"prompt": [], "chosen": []}, "pairs[2]")
    with pytest.raises(ValueError, match="chosen: must be a list of messages"):
        preference.parse_pair({"prompt": [], "chosen": "a", "rejected": []})
    with pytest.raises(ValueError, match="chosen: must end with an assistant message"):
        preference.parse_pair({"prompt": [], "chosen": [{"role": "user", "content": "a"}], "rejected": []})


def test_plan_batches_respects_items_and_token_budget():
    assert preference.plan_batches([5, 5, 5, 5, 5], max_items=2) == [[0, 1], [2, 3], [4]]
    # 2 rows per pair: [10, 10] -> 2*2*10 = 40 tokens fits 40; a third would be 60.
    assert preference.plan_batches([10, 10, 10, 30, 3], max_items=8, max_tokens=40) == [[0, 1], [2], [3], [4]]


def test_rollout_collation_marks_the_actions():
    rollouts = [Rollout([1, 5, 6], [7, 8, 2], "", "eos"), Rollout([1, 5], [9], "", "length")]
    batch = collate_rollouts(rollouts, pad_id=0)
    assert batch.input_ids.tolist() == [[1, 5, 6, 7, 8, 2], [1, 5, 9, 0, 0, 0]]
    assert batch.action_mask.tolist() == [[False, False, True, True, True, False],
                                          [False, True, False, False, False, False]]
    assert batch.labels[batch.action_mask].tolist() == [7, 8, 2, 9]


def test_holdout_split_and_packing(tokenizer, tmp_path):
    train, held = datasets.split_holdout(list(range(20)), 0.1, seed=0)
    assert len(held) == 2 and sorted(train + held) == list(range(20))
    assert datasets.split_holdout(list(range(20)), 0.1, seed=0) == (train, held)  # seeded
    with pytest.raises(ValueError, match="eval_fraction"):
        datasets.split_holdout([1], 0.5, seed=0)
    rows = datasets.pack_texts(tokenizer, ["apple banana"] * 10, seq_len=8)
    assert rows and all(len(r) == 8 for r in rows)
    flat = [t for r in rows for t in r]
    assert flat[0] == tokenizer.bos_id and tokenizer.eos_id in flat

    synth.write_jsonl(tmp_path / "a.jsonl", [PAIR])
    (tmp_path / "b.jsonl").write_text('{"prompt": [], "chosen": [], "rejected": []}\n')
    with pytest.raises(ValueError, match=r"b\.jsonl:1"):
        datasets.read_preference_pairs(tmp_path)
    synth.write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi", "reference": "yo", "condition": "code"}])
    (record,) = datasets.read_prompts(tmp_path / "p.jsonl")
    assert record.messages == [{"role": "user", "content": "hi"}] and record.reference == "yo"


def test_frozen_models_get_no_gradients():
    from internlm2.plugins.algorithms.models import freeze, frozen_dtype

    model = freeze(random_model(InternLM2Config.preset("tiny", vocab_size=synth.VOCAB)))
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert frozen_dtype("auto", "cpu") == torch.float32 and frozen_dtype("auto", "cuda:0") == torch.bfloat16
    assert frozen_dtype("fp32", "cuda:0") == torch.float32


def test_ppo_losses_weigh_every_token_alike_across_ranks():
    """Two data-parallel ranks with different response-token counts: DeepSpeed averages their gradients, so
    each rank's loss must be its token SUM over (global tokens / ranks) for the result to be the token mean
    of the whole batch; per-rank token means would over-weigh the rank with fewer tokens."""
    from internlm2.plugins.algorithms.ppo_loss import clipped_policy_loss, clipped_value_loss

    g = torch.Generator().manual_seed(0)
    logp, old, adv = (torch.randn(4, 6, generator=g) * 0.1 for _ in range(3))
    mask = torch.zeros(4, 6, dtype=torch.bool)
    mask[0, :6] = mask[1, :5] = True  # rank 0: rows 0-1, 11 tokens
    mask[2, :1] = mask[3, :2] = True  # rank 1: rows 2-3, 3 tokens
    whole = clipped_policy_loss(logp, old, adv, mask).loss
    ranks = [slice(0, 2), slice(2, 4)]
    denominator = mask.sum() / 2
    averaged = sum(clipped_policy_loss(logp[r], old[r], adv[r], mask[r], denominator=denominator).loss
                   for r in ranks) / 2
    torch.testing.assert_close(averaged, whole)
    naive = sum(clipped_policy_loss(logp[r], old[r], adv[r], mask[r]).loss for r in ranks) / 2
    assert not torch.allclose(naive, whole)
    value = clipped_value_loss(logp, old, adv, mask, 0.2).loss
    averaged = sum(clipped_value_loss(logp[r], old[r], adv[r], mask[r], 0.2, denominator).loss for r in ranks) / 2
    torch.testing.assert_close(averaged, value)
