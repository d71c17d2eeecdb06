"""A tiny synthetic world for the alignment-stage tests: a small tokenizer, fruit-list answers, and a
preference for "apple".

Everything a CPU test needs to show that a stage improves what it optimises within a few dozen steps:
- a 512-piece tokenizer in the official format (``train_tokenizer``), so the model's vocabulary — and
  every logits matmul — is 180x smaller than the released one;
- prompts asking for fruit, answers that are lists of fruit words;
- preference pairs whose chosen answer names "apple" more often than the rejected one;
- ``quick_sft`` / ``quick_reward_model``: plain-PyTorch warm starts (an actor that answers with fruit
  lists, a reward model that counts apples) for the stages that start from them.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from internlm2.core import InternLM2Config, random_model
from internlm2.core.tokenizer import InternLM2Tokenizer, train_tokenizer
from internlm2.plugins.algorithms import preference, reward_loss
from internlm2.plugins.algorithms.logprobs import right_pad, sequence_logprobs, shifted_labels

FRUITS = ("apple", "banana", "cherry", "grape", "lemon", "mango")
PROMPTS = ("List some fruits.", "Name a few fruits.", "Which fruits do you like?", "Tell me fruits.",
           "Give me fruit names.", "What fruits are there?")
VOCAB = 512


def corpus(rng: random.Random) -> list[str]:
    lines = [f"{p} " + " ".join(rng.choice(FRUITS) for _ in range(8)) for p in PROMPTS for _ in range(20)]
    lines += ["The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.",
              "What is the special magic number mentioned in the text above? The special magic number is 12345.",
              "system user assistant You are a reward model judging helpfulness: prefer answers that follow"]
    lines += [" ".join(str(rng.randrange(10**5)) for _ in range(10)) for _ in range(20)]
    return lines


def make_tokenizer(out_dir: Path) -> InternLM2Tokenizer:
    return train_tokenizer(corpus(random.Random(0)), out_dir, vocab_size=VOCAB)


def tiny_config(**overrides) -> InternLM2Config:
    base = {"vocab_size": VOCAB, "max_position_embeddings": 512, "rope_theta": 10000.0, "pad_token_id": 2}
    return InternLM2Config.preset("tiny", **{**base, **overrides})


def save_model(model, tokenizer_dir: Path, out_dir: Path) -> Path:
    model.save_pretrained(out_dir)
    InternLM2Tokenizer.from_pretrained(tokenizer_dir).save_pretrained(out_dir)
    return out_dir


def fruit_answer(rng: random.Random, apples: int, length: int) -> str:
    words = ["apple"] * apples + [rng.choice(FRUITS[1:]) for _ in range(length - apples)]
    rng.shuffle(words)
    return " ".join(words)


def preference_pairs(n: int, seed: int, condition: str | None = "helpful") -> list[dict]:
    """Pairs over the same prompt; the chosen answer has 2-3 more apples than the rejected one."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        length = rng.randint(4, 6)
        low = rng.randint(0, length - 3)
        high = min(length, low + rng.randint(2, 3))
        pairs.append({
            "prompt": [{"role": "user", "content": rng.choice(PROMPTS)}],
            "chosen": [{"role": "assistant", "content": fruit_answer(rng, high, length)}],
            "rejected": [{"role": "assistant", "content": fruit_answer(rng, low, length)}],
            "condition": condition,
        })
    return pairs


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def quick_sft(tokenizer: InternLM2Tokenizer, steps: int = 40, seed: int = 0) -> torch.nn.Module:
    """A tiny actor that answers fruit prompts with 3-6 fruit words (few apples) and then <|im_end|>."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    model = random_model(tiny_config(), seed=seed).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    prompts = {p: tokenizer.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS}
    for _ in range(steps):
        rows, targets = [], []
        for _ in range(16):
            prompt = prompts[rng.choice(PROMPTS)]
            length = rng.randint(3, 6)
            answer = preference.response_ids(
                tokenizer, [{"role": "assistant", "content": fruit_answer(rng, rng.randint(0, 1), length)}])
            rows.append(prompt + answer)
            targets.append([0] * len(prompt) + [1] * len(answer))
        ids, mask = right_pad(rows, tokenizer.pad_id)
        labels = shifted_labels(ids, right_pad(targets)[0].bool())
        loss = -sequence_logprobs(model, ids, labels, mask).sum() / (labels != -100).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def quick_reward_model(tokenizer: InternLM2Tokenizer, trunk: torch.nn.Module, steps: int = 40,
                       seed: int = 1) -> torch.nn.Module:
    """A reward model (trunk of ``trunk`` + v_head) trained on apple-preference pairs."""
    from internlm2.core import InternLM2ForRewardModel

    torch.manual_seed(seed)
    config = trunk.config.replace(architectures=["InternLM2ForRewardModel"],
                                  reward_token_id=tokenizer.reward_token_id)
    rm = InternLM2ForRewardModel(config)
    rm.model.load_state_dict(trunk.model.state_dict())
    torch.nn.init.zeros_(rm.v_head.weight)
    rm.train()
    opt = torch.optim.AdamW(rm.parameters(), lr=2e-3)
    pairs = [preference.parse_pair(p) for p in preference_pairs(steps * 8, seed)]
    for step in range(steps):
        batch = [preference.reward_pair_ids(tokenizer, p, tokenizer.reward_token_id, preference.DEFAULT_CONDITIONS)
                 for p in pairs[step * 8 : (step + 1) * 8]]
        b = preference.collate_reward(batch, tokenizer.pad_id)
        scores = rm.score(b.input_ids, b.padding_mask)
        out = reward_loss.reward_model_loss(scores[: b.num_pairs], scores[b.num_pairs :])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    return rm.eval()
