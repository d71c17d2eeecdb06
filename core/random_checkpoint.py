"""Tiny random checkpoints in the official layout, for tests, benchmarks and the local stack.

No hub: weights are drawn from the official init (optionally perturbed norms so tests notice a
missing or misplaced norm) and written with ``save_pretrained``; tokenizer files are copied from a
tokenizer directory or ``tokenizer.model`` when given.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from .config import REWARD_TOKEN_ID, InternLM2Config
from .model import InternLM2ForCausalLM, InternLM2ForRewardModel

TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")


def random_model(config: InternLM2Config, seed: int = 0, reward: bool = False, perturb_norms: bool = True):
    torch.manual_seed(seed)
    cls = InternLM2ForRewardModel if reward else InternLM2ForCausalLM
    model = cls(config)
    generator = torch.Generator().manual_seed(seed)
    model.init_weights(generator)
    if perturb_norms:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.add_(0.1 * torch.randn(p.shape, generator=generator))
    return model.eval()


def copy_tokenizer(source: str | Path, directory: str | Path) -> None:
    source = Path(source)
    directory = Path(directory)
    if source.is_file():
        shutil.copyfile(source, directory / "tokenizer.model")
        return
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copyfile(source / name, directory / name)
    if not (directory / "tokenizer.model").exists():
        raise FileNotFoundError(f"tokenizer: no tokenizer.model in {source}")


def make_random_checkpoint(
    directory: str | Path,
    preset: str = "tiny",
    reward: bool = False,
    seed: int = 0,
    tokenizer: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
    **overrides,
) -> Path:
    """Write a random InternLM2 (or InternLM2-Reward) checkpoint; returns its directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if reward:
        overrides = {"architectures": ["InternLM2ForRewardModel"], "reward_token_id": REWARD_TOKEN_ID,
                     **overrides}
    config = InternLM2Config.preset(preset, **overrides)
    model = random_model(config, seed=seed, reward=reward).to(dtype)
    model.save_pretrained(directory)
    if tokenizer is not None:
        copy_tokenizer(tokenizer, directory)
    return directory
