"""How big the demo's model is and how long each stage trains.

``smoke`` is what the end-to-end test runs (about two minutes on 2 cores); ``small`` is the README's demo
(about six). Both are CPU-sized: the point is the whole chain, measured.

SFT trains until the policy sorts competently in both of the demonstrators' styles (task.py); thousands of
training questions keep it from memorising a smaller set (with 400, 1,600 SFT steps drove the loss to 0.000
and sorted 66 % of held-out questions either way; with 3,000, all of them). PPO gets enough iterations,
each of ``ppo_prompts`` prompts, for its reward curve to show a trend rather than one small batch's noise.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DemoSize:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    num_train: int
    num_heldout: int
    pretrain_steps: int
    sft_steps: int
    ppo_steps: int
    ppo_prompts: int  # prompts (rollouts) per PPO iteration
    seq_len: int
    batch_size: int

    def model_overrides(self) -> dict:
        return {
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": 512,
            "rope_theta": 10000.0,
        }


SIZES = {
    "smoke": DemoSize(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=176,
                      vocab_size=320, num_train=3000, num_heldout=64, pretrain_steps=150, sft_steps=1600,
                      ppo_steps=40, ppo_prompts=16, seq_len=128, batch_size=8),
    "small": DemoSize(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=352,
                      vocab_size=384, num_train=4000, num_heldout=128, pretrain_steps=200, sft_steps=1200,
                      ppo_steps=60, ppo_prompts=16, seq_len=128, batch_size=16),
}
