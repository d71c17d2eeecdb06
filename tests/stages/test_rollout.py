"""PPO rollouts keep one engine across optimizer steps: its prefix cache must never serve KV computed with
the weights before an update (plugins/algorithms/rollout.py resets it before every batch)."""

from __future__ import annotations

import pytest
import torch

from internlm2.core import InternLM2Config, random_model
from internlm2.core.engine import EngineConfig, LLMEngine, SamplingParams
from internlm2.core.tokenizer import train_tokenizer
from internlm2.plugins.algorithms.rollout import RolloutEngine

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    text = ["Rollouts sample responses from the actor; the critic learns values. " * 4, "0 1 2 3 4 5 6 7 8 9"]
    return train_tokenizer(text, tmp_path_factory.mktemp("tok"), vocab_size=320)


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_new_tokens=n, ignore_eos=True)


def fresh_greedy(model, tokenizer, prompt: list[int], n: int) -> list[int]:
    engine = LLMEngine(model, tokenizer, EngineConfig(num_gpu_blocks=64, block_size=16, max_model_len=256))
    return list(engine.generate([prompt], greedy(n))[0].new_token_ids)


def test_rollouts_after_an_in_place_update_use_the_new_weights(tokenizer):
    torch.manual_seed(0)
    config = InternLM2Config.preset("tiny", vocab_size=tokenizer.vocab_size, max_position_embeddings=256)
    model = random_model(config, seed=3)
    prompt = [int(t) for t in torch.randint(3, 300, (40,))]  # 2 full blocks: cached after the first batch
    rollouts = RolloutEngine(model, tokenizer, max_model_len=256, kv_cache_bytes=4 * 2**20, max_num_seqs=4)

    before = rollouts.generate([prompt, prompt], greedy(12))
    assert before[0].response_ids == before[1].response_ids == fresh_greedy(model, tokenizer, prompt, 12)

    with torch.no_grad():  # an "optimizer step" that changes the keys and values, in place
        for layer in model.model.layers:
            layer.attention.wqkv.weight.mul_(3.0)
    expected = fresh_greedy(model, tokenizer, prompt, 12)
    assert expected != before[0].response_ids  # the update matters for this prompt

    after = rollouts.generate([prompt], greedy(12))
    assert after[0].response_ids == expected


def test_rollout_logprobs_are_those_of_the_sampling_temperature(tokenizer):
    """PPO's ratio compares log-probs of the distribution the tokens were drawn from: softmax(logits / T)."""
    from internlm2.plugins.algorithms.ppo_experience import policy_logprobs
    from internlm2.plugins.algorithms.rollout import Rollout, collate_rollouts

    config = InternLM2Config.preset("tiny", vocab_size=tokenizer.vocab_size, max_position_embeddings=256)
    model = random_model(config, seed=4)
    rollouts = [Rollout([5, 6, 7], [8, 9, 10, 11], "", "length"), Rollout([5, 6], [12, 13], "", "stop")]
    batch = collate_rollouts(rollouts, tokenizer.pad_id)
    with torch.no_grad():
        logits = model(batch.input_ids).float()
        for t in (1.0, 0.6):
            expected = torch.log_softmax(logits / t, dim=-1).gather(-1, batch.labels.clamp(min=0)[..., None])[..., 0]
            got = policy_logprobs(model, batch, t)
            torch.testing.assert_close(got[batch.action_mask], expected[batch.action_mask], rtol=1e-4, atol=1e-5)
            assert (got[~batch.action_mask] == 0).all()
        assert not torch.allclose(policy_logprobs(model, batch, 0.6), policy_logprobs(model, batch, 1.0))
