"""How big the demo's model is and how long each stage trains.

``smoke`` is what the end-to-end test runs (a few minutes on 2 cores); ``small`` is the README's demo
(about ten minutes on 2 cores). Both are CPU-sized: the point is the whole chain, measured.
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
    reward_steps: int
    ppo_steps: int
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
                      vocab_size=320, num_train=400, num_heldout=16, pretrain_steps=150, sft_steps=400,
                      reward_steps=150, ppo_steps=6, seq_len=128, batch_size=8),
    "small": DemoSize(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=352,
                      vocab_size=384, num_train=1500, num_heldout=32, pretrain_steps=200, sft_steps=400,
                      reward_steps=150, ppo_steps=12, seq_len=128, batch_size=16),
}
