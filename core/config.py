"""InternLM2 model configuration: reads an official ``config.json`` unchanged.

Field names and defaults follow the official ``configuration_internlm2.py`` so a
checkpoint's config round-trips exactly. Validation happens once, here, and every
error names the field that is wrong.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Tokens fixed by the released tokenizer (see SOURCES.md of the reference data).
REWARD_TOKEN_ID = 92527


class ConfigError(ValueError):
    """A config value is invalid; ``field`` names it."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


@dataclass
class InternLM2Config:
    vocab_size: int = 92544
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = 0
    bos_token_id: int = 1
    eos_token_id: int = 2
    tie_word_embeddings: bool = False
    bias: bool = True
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    attn_implementation: str = "eager"
    torch_dtype: str | None = None
    reward_token_id: int | None = None
    architectures: list[str] | None = None
    # Keys we do not interpret (auto_map, transformers_version, ...) are kept so
    # save_pretrained writes back what it read.
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        self.validate()

    # ---- derived shapes -------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_kv_groups(self) -> int:
        """Query heads per KV head (G); wqkv rows come in blocks of G + 2 heads."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def is_reward_model(self) -> bool:
        return bool(self.architectures) and any("Reward" in a for a in self.architectures)

    # ---- validation -----------------------------------------------------------------
    def validate(self) -> None:
        positive = (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "max_position_embeddings",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(name, f"must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                "hidden_size",
                f"{self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}",
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                "num_key_value_heads",
                f"{self.num_key_value_heads} does not divide num_attention_heads={self.num_attention_heads}",
            )
        if self.head_dim % 2:
            raise ConfigError("hidden_size", f"head_dim {self.head_dim} must be even for rotary embeddings")
        if not (isinstance(self.rms_norm_eps, (int, float)) and self.rms_norm_eps > 0):
            raise ConfigError("rms_norm_eps", f"must be > 0, got {self.rms_norm_eps!r}")
        if not (isinstance(self.rope_theta, (int, float)) and self.rope_theta > 0):
            raise ConfigError("rope_theta", f"must be > 0, got {self.rope_theta!r}")
        if self.hidden_act != "silu":
            raise ConfigError("hidden_act", f"only 'silu' is used by InternLM2, got {self.hidden_act!r}")
        if self.rope_scaling is not None:
            if not isinstance(self.rope_scaling, dict):
                raise ConfigError("rope_scaling", "must be null or an object {type, factor}")
            kind = self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))
            if kind not in ("linear", "dynamic"):
                raise ConfigError("rope_scaling.type", f"must be 'linear' or 'dynamic', got {kind!r}")
            factor = self.rope_scaling.get("factor")
            if not isinstance(factor, (int, float)) or isinstance(factor, bool) or factor <= 1.0:
                raise ConfigError("rope_scaling.factor", f"must be a number > 1, got {factor!r}")
        if self.reward_token_id is not None and not 0 <= self.reward_token_id < self.vocab_size:
            raise ConfigError("reward_token_id", f"{self.reward_token_id} is outside the vocabulary")
        if self.torch_dtype not in (None, "float32", "float16", "bfloat16"):
            raise ConfigError("torch_dtype", f"unsupported dtype {self.torch_dtype!r}")

    # ---- (de)serialisation ----------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InternLM2Config:
        if not isinstance(data, dict):
            raise ConfigError("config", "must be a JSON object")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in data.items() if k in known}
        extra = {k: v for k, v in data.items() if k not in known}
        if "model_type" in extra and extra["model_type"] != "internlm2":
            raise ConfigError("model_type", f"expected 'internlm2', got {extra['model_type']!r}")
        return cls(**kwargs, extra=extra)

    @classmethod
    def from_json(cls, path: str | Path) -> InternLM2Config:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError("config.json", f"not found at {path}") from None
        except json.JSONDecodeError as exc:
            raise ConfigError("config.json", f"invalid JSON in {path}: {exc}") from None
        return cls.from_dict(data)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> InternLM2Config:
        path = Path(path)
        return cls.from_json(path / "config.json" if path.is_dir() else path)

    def to_dict(self) -> dict[str, Any]:
        out = {"model_type": "internlm2"}
        out.update(self.extra)
        for f in dataclasses.fields(self):
            if f.name != "extra":
                out[f.name] = getattr(self, f.name)
        if out.get("reward_token_id") is None:
            out.pop("reward_token_id")
        return out

    def save(self, directory: str | Path) -> None:
        Path(directory, "config.json").write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    def replace(self, **changes: Any) -> InternLM2Config:
        return dataclasses.replace(self, **changes)

    # ---- presets --------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> InternLM2Config:
        """Shapes of the released models ("1_8b", "7b", "20b"; "-reward" variants) or "tiny" for tests."""
        try:
            base = dict(PRESETS[name])
        except KeyError:
            raise ConfigError("preset", f"unknown preset {name!r}; known: {sorted(PRESETS)}") from None
        base.update(overrides)
        return cls.from_dict(base)


_COMMON = {
    "vocab_size": 92544,
    "max_position_embeddings": 32768,
    "rope_theta": 1000000,
    "rms_norm_eps": 1e-5,
    "bias": False,
    "tie_word_embeddings": False,
    "pad_token_id": 2,
    "torch_dtype": "bfloat16",
    "architectures": ["InternLM2ForCausalLM"],
}
_REWARD = {"architectures": ["InternLM2ForRewardModel"], "reward_token_id": REWARD_TOKEN_ID}

# Shapes of the released internlm2(-chat|-reward)-{1_8b,7b,20b} checkpoints.
PRESETS: dict[str, dict[str, Any]] = {
    "1_8b": {**_COMMON, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24,
             "num_attention_heads": 16, "num_key_value_heads": 8},
    "7b": {**_COMMON, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
           "num_attention_heads": 32, "num_key_value_heads": 8},
    "20b": {**_COMMON, "hidden_size": 6144, "intermediate_size": 16384, "num_hidden_layers": 48,
            "num_attention_heads": 48, "num_key_value_heads": 8},
    # A few-MB model with the real vocabulary and GQA, for tests and the local stack.
    "tiny": {**_COMMON, "hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 2048,
             "torch_dtype": "float32"},
}
for _name in ("1_8b", "7b", "20b"):
    PRESETS[f"{_name}-reward"] = {**PRESETS[_name], **_REWARD}
