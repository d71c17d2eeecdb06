"""get_score-style reward scoring on the official tokenizer: the exact ids, batching, conditions."""

from __future__ import annotations

import pytest
import torch

from internlm2.core import InternLM2Config, InternLM2Tokenizer, RewardScorer, random_model

pytestmark = pytest.mark.timeout(60)

# SOURCES.md: system + user with a generation prompt; the reward input has no generation prompt
# (the last 4 ids, "<|im_start|>assistant\n") and ends with the reward token 92527.
CHAT_IDS = [1, 92543, 9081, 364, 2770, 657, 4576, 11146, 281, 92542, 364, 92543, 1008, 364, 9843, 328, 262,
            77230, 346, 92542, 364, 92543, 525, 11353, 364]


@pytest.fixture(scope="module")
def scorer(official_tokenizer_path):
    config = InternLM2Config.preset("tiny", architectures=["InternLM2ForRewardModel"], reward_token_id=92527)
    return RewardScorer(random_model(config, seed=11, reward=True), InternLM2Tokenizer.from_pretrained(
        official_tokenizer_path))


def test_reward_input_is_the_chat_template_plus_reward_token(scorer):
    conversation = [{"role": "system", "content": "You are InternLM."}, {"role": "user", "content": "Hello, 你好!"}]
    assert scorer.encode(conversation) == [*CHAT_IDS[:-4], 92527]
    # a condition (COOL RLHF) is a system prompt in front
    conditioned = scorer.encode(conversation[1:], condition="You are InternLM.")
    assert conditioned == scorer.encode(conversation)


def test_batched_scores_equal_one_at_a_time(scorer):
    conversations = [
        [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
        [{"role": "user", "content": "Write a haiku about rain."},
         {"role": "assistant", "content": "Soft rain on the roof / 屋根の雨 / a long quiet night"}],
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello 👋"}],
    ]
    batched = scorer.score(conversations)
    single = [scorer.score([c])[0] for c in conversations]
    torch.testing.assert_close(torch.tensor(batched), torch.tensor(single), atol=1e-5, rtol=0)
    # and each equals v_head at the reward token of a plain forward
    for conv, value in zip(conversations, batched):
        ids = torch.tensor([scorer.encode(conv)])
        with torch.no_grad():
            expected = scorer.model.v_head(scorer.model.model(ids))[0, -1, 0].item()
        assert value == pytest.approx(expected, abs=1e-5)
    assert len(set(round(v, 6) for v in batched)) == 3
