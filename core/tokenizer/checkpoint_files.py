"""Tokenizer files of a checkpoint directory, read and written in the official Hugging Face layout.

A checkpoint holds ``tokenizer.model`` (the SentencePiece proto, required) and optionally
``tokenizer_config.json`` and ``special_tokens_map.json``. This module only moves bytes and JSON;
what the fields mean is decided in :mod:`.tokenizer`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .specials import ACTION_END, ACTION_START, IM_END, IM_START, INTERPRETER, PLUGIN

TOKENIZER_MODEL = "tokenizer.model"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"

# The order internlm2-chat-7b lists them in ``additional_special_tokens``.
ADDITIONAL_SPECIAL_ORDER = (IM_START, IM_END, ACTION_START, ACTION_END, INTERPRETER, PLUGIN)


@dataclass(frozen=True)
class TokenizerFiles:
    """The raw contents of a tokenizer's files; ``config``/``special_tokens_map`` are ``{}`` if absent."""

    model_proto: bytes
    source: Path
    config: dict[str, Any] = field(default_factory=dict)
    special_tokens_map: dict[str, Any] = field(default_factory=dict)


def read_tokenizer_files(path: str | Path) -> TokenizerFiles:
    """Read a checkpoint directory or a bare ``tokenizer.model`` file.

    A bare model file is read alone: json files beside it are not guessed at.
    Raises ``FileNotFoundError`` naming the path when the model file is missing.
    """
    path = Path(path)
    if path.is_dir():
        model_path = path / TOKENIZER_MODEL
        if not model_path.is_file():
            raise FileNotFoundError(f"tokenizer: no {TOKENIZER_MODEL} in checkpoint directory {path}")
        return TokenizerFiles(
            model_proto=model_path.read_bytes(),
            source=model_path,
            config=_read_json(path / TOKENIZER_CONFIG),
            special_tokens_map=_read_json(path / SPECIAL_TOKENS_MAP),
        )
    if path.is_file():
        return TokenizerFiles(model_proto=path.read_bytes(), source=path)
    raise FileNotFoundError(f"tokenizer: path does not exist: {path}")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"tokenizer: {path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"tokenizer: {path} must hold a JSON object")
    return data


def token_content(value: Any) -> str | None:
    """A token field as HF writes it: a plain string or an AddedToken dict with ``content``."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _added_token(content: str) -> dict[str, Any]:
    return {
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
    }


def build_tokenizer_config(
    *,
    special_tokens: dict[str, int],
    bos: str,
    eos: str,
    unk: str,
    pad: str,
    chat_template: str,
    reward_token_id: int | None,
    preserved: dict[str, Any],
) -> dict[str, Any]:
    """``tokenizer_config.json`` in the official layout; keys of ``preserved`` we do not own are kept."""
    added = {
        str(i): {**_added_token(name), "special": True}
        for name, i in sorted(special_tokens.items(), key=lambda kv: kv[1])
    }
    ours: dict[str, Any] = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": [t for t in ADDITIONAL_SPECIAL_ORDER if t in special_tokens],
        "bos_token": bos,
        "chat_template": chat_template,
        "clean_up_tokenization_spaces": False,
        "decode_with_prefix_space": False,
        "eos_token": eos,
        "pad_token": pad,
        "sp_model_kwargs": None,
        "tokenizer_class": "InternLM2Tokenizer",
        "unk_token": unk,
    }
    if reward_token_id is not None:
        ours["reward_token_id"] = reward_token_id
    merged = {**preserved, **ours}
    return dict(sorted(merged.items()))


def build_special_tokens_map(
    *, special_tokens: dict[str, int], bos: str, eos: str, unk: str, pad: str
) -> dict[str, Any]:
    return {
        "additional_special_tokens": [t for t in ADDITIONAL_SPECIAL_ORDER if t in special_tokens],
        "bos_token": _added_token(bos),
        "eos_token": _added_token(eos),
        "pad_token": _added_token(pad),
        "unk_token": _added_token(unk),
    }


def write_tokenizer_files(
    out_dir: str | Path, model_proto: bytes, config: dict[str, Any], special_tokens_map: dict[str, Any]
) -> tuple[Path, Path, Path]:
    """Write the three files into ``out_dir`` (created if needed); returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_path = out / TOKENIZER_MODEL
    config_path = out / TOKENIZER_CONFIG
    map_path = out / SPECIAL_TOKENS_MAP
    model_path.write_bytes(model_proto)
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    map_path.write_text(json.dumps(special_tokens_map, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return model_path, config_path, map_path
