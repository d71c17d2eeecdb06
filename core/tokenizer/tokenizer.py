"""InternLM2Tokenizer: the official InternLM2 tokenizer on SentencePiece, without transformers.

Encoding matches ``tokenization_internlm2.py`` of internlm/internlm2-chat-7b: the text is split on the
special tokens of ``added_tokens_decoder`` (``<s>``, ``</s>``, ``<unk>`` and the six chat tokens),
each special maps to its single id, and each run between them is encoded by SentencePiece on its own
(BPE, byte fallback, no dummy prefix, identity normalizer).

Decoding is lossless: runs of ordinary ids go through SentencePiece's decoder, special ids are written
as their names. (The slow HF class additionally inserts a space before each special token and applies
``clean_up_tokenization`` — " ." -> "." — which loses text; the fast HF tokenizer, LMDeploy and this
class do not.)
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_pb

from . import checkpoint_files as files
from .chat_format import render_chat
from .specials import (
    CHAT_TOKENS,
    IM_END,
    LEGACY_PIECE_NAMES,
    OFFICIAL_CHAT_TEMPLATE,
    RESERVED_PIECE_PATTERN,
    REWARD_PIECE,
)

logger = logging.getLogger(__name__)

_USER_DEFINED = sp_pb.ModelProto.SentencePiece.USER_DEFINED
_CONTROL = sp_pb.ModelProto.SentencePiece.CONTROL
_BYTE_PIECE = re.compile(r"<0x([0-9A-F]{2})>")


class InternLM2Tokenizer:
    """Text <-> ids for InternLM2, plus its chat format.

    Build with :meth:`from_pretrained` (files) or the constructor (a serialized SentencePiece model
    and, optionally, the parsed ``tokenizer_config.json`` / ``special_tokens_map.json``).
    """

    def __init__(
        self,
        model_proto: bytes,
        config: Mapping[str, Any] | None = None,
        special_tokens_map: Mapping[str, Any] | None = None,
        *,
        source: str | Path | None = None,
    ):
        self._model_proto = bytes(model_proto)
        self._config = dict(config or {})
        self._source = str(source) if source is not None else "<in-memory model>"
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(self._model_proto)
        except Exception as e:  # sentencepiece raises RuntimeError/OSError with terse messages
            raise ValueError(f"tokenizer: {self._source} is not a SentencePiece model: {e}") from e
        self._plain_sp: spm.SentencePieceProcessor | None = None  # built on first allow_special=False

        self.vocab_size: int = self._sp.get_piece_size()
        self.bos_id: int = self._sp.bos_id()
        self.eos_id: int = self._sp.eos_id()
        self.unk_id: int = self._sp.unk_id()
        if min(self.bos_id, self.eos_id, self.unk_id) < 0:
            raise ValueError(f"tokenizer: {self._source} lacks an <unk>, <s> or </s> piece")
        self._special_tokens = self._resolve_special_tokens()
        self._special_names = {i: name for name, i in self._special_tokens.items()}
        # An id with a chat name decodes by it, even where an older config also lists its
        # [UNUSED_TOKEN_n] name: stop strings and parse_tool_calls look for the chat names.
        self._special_names.update(
            {self._special_tokens[n]: n for n in CHAT_TOKENS if n in self._special_tokens}
        )
        self._special_re = re.compile(
            "(" + "|".join(re.escape(n) for n in sorted(self._special_tokens, key=len, reverse=True)) + ")"
        )
        self.pad_id: int = self._resolve_pad(special_tokens_map or {})
        self.reward_token_id: int | None = self._resolve_reward()
        template = self._config.get("chat_template") or OFFICIAL_CHAT_TEMPLATE
        self.chat_template: str = template if isinstance(template, str) else OFFICIAL_CHAT_TEMPLATE
        # Informational (reported by the tokenizer service); encode() takes add_bos explicitly.
        self.add_bos_token: bool = bool(self._config.get("add_bos_token", True))
        self.add_eos_token: bool = bool(self._config.get("add_eos_token", False))
        if template != OFFICIAL_CHAT_TEMPLATE:
            logger.warning(
                "tokenizer %s: its chat_template differs from InternLM2's; apply_chat_template renders "
                "the InternLM2 format regardless",
                self._source,
            )
        self._byte_of = self._byte_pieces()

    # ----------------------------------------------------------------------------------------------
    # construction

    @classmethod
    def from_pretrained(cls, path: str | Path) -> InternLM2Tokenizer:
        """Load a checkpoint directory (``tokenizer.model`` + optional json files) or a ``.model`` file."""
        f = files.read_tokenizer_files(path)
        return cls(f.model_proto, f.config, f.special_tokens_map, source=f.source)

    def _piece_id(self, piece: str) -> int | None:
        i = self._sp.piece_to_id(piece)
        return i if self._sp.id_to_piece(i) == piece else None

    def _resolve_special_tokens(self) -> dict[str, int]:
        """bos/eos/unk from the model; chat tokens from ``added_tokens_decoder`` when present, else from
        pieces named after them (trained layout) or their ``[UNUSED_TOKEN_n]`` pieces (official layout)."""
        specials = {
            self._sp.id_to_piece(self.unk_id): self.unk_id,
            self._sp.id_to_piece(self.bos_id): self.bos_id,
            self._sp.id_to_piece(self.eos_id): self.eos_id,
        }
        for name in CHAT_TOKENS[::-1]:
            i = self._piece_id(name)
            if i is None:
                i = self._piece_id(LEGACY_PIECE_NAMES[name])
            if i is not None:
                specials[name] = i
        added = self._config.get("added_tokens_decoder") or {}
        where = f"tokenizer_config.json of {self._source}: added_tokens_decoder"
        if not isinstance(added, Mapping):
            raise ValueError(f"{where} must be an object")
        for key, entry in added.items():
            name = files.token_content(entry)
            if name is None or not str(key).isdigit():
                raise ValueError(f"{where}[{key!r}] is malformed")
            i = int(key)
            if i >= self.vocab_size:
                raise ValueError(
                    f"{where}[{key!r}]: {name!r} lies outside the SentencePiece vocabulary of "
                    f"{self.vocab_size}; added tokens beyond the model are unsupported"
                )
            specials[name] = i
        return specials

    def _resolve_pad(self, special_tokens_map: Mapping[str, Any]) -> int:
        name = files.token_content(self._config.get("pad_token")) or files.token_content(
            special_tokens_map.get("pad_token")
        )
        if name is None:
            return self.eos_id  # the official default pad_token is "</s>"
        i = self._special_tokens.get(name, self._piece_id(name))
        if i is None:
            raise ValueError(f"tokenizer {self._source}: pad_token {name!r} is not in the vocabulary")
        return i

    def _resolve_reward(self) -> int | None:
        configured = self._config.get("reward_token_id")
        if configured is not None:
            if not isinstance(configured, int) or not 0 <= configured < self.vocab_size:
                raise ValueError(
                    f"tokenizer_config.json of {self._source}: reward_token_id {configured!r} is invalid"
                )
            return configured
        return self._piece_id(REWARD_PIECE)

    def _byte_pieces(self) -> dict[int, int]:
        return {
            i: int(_BYTE_PIECE.fullmatch(self._sp.id_to_piece(i)).group(1), 16)
            for i in range(self.vocab_size)
            if self._sp.is_byte(i)
        }

    def _plain_processor(self) -> spm.SentencePieceProcessor:
        """A copy of the model whose special and reserved user-defined pieces are CONTROL pieces, so
        SentencePiece never produces them from raw text (``[UNUSED_TOKEN_146]`` stays text)."""
        if self._plain_sp is None:
            proto = sp_pb.ModelProto()
            proto.ParseFromString(self._model_proto)
            special_ids = set(self._special_tokens.values())
            for i, piece in enumerate(proto.pieces):
                if piece.type == _USER_DEFINED and (
                    i in special_ids or RESERVED_PIECE_PATTERN.fullmatch(piece.piece)
                ):
                    piece.type = _CONTROL
            plain = spm.SentencePieceProcessor()
            plain.LoadFromSerializedProto(proto.SerializeToString())
            self._plain_sp = plain
        return self._plain_sp

    # ----------------------------------------------------------------------------------------------
    # vocabulary

    @property
    def source(self) -> str:
        """Where the model came from (a file path, or ``<in-memory model>``)."""
        return self._source

    @property
    def special_tokens(self) -> dict[str, int]:
        """Name -> id of every special token (``<s>``, ``</s>``, ``<unk>``, the chat tokens)."""
        return dict(self._special_tokens)

    @property
    def stop_token_ids(self) -> list[int]:
        """Ids that end an assistant turn: ``</s>`` and ``<|im_end|>``."""
        im_end = self._special_tokens.get(IM_END)
        return [self.eos_id] if im_end is None else [self.eos_id, im_end]

    def special_name(self, i: int) -> str | None:
        """The name of special id ``i``, or ``None`` for an ordinary id."""
        return self._special_names.get(i)

    def piece_byte(self, i: int) -> int | None:
        """The byte a byte-fallback piece (``<0xE4>``) stands for, or ``None`` for any other id."""
        return self._byte_of.get(i)

    def id_to_piece(self, i: int) -> str:
        """The piece of id ``i``; special ids give their names (``92543`` -> ``<|im_start|>``)."""
        self._check_ids([i])
        name = self._special_names.get(i)
        return name if name is not None else self._sp.id_to_piece(i)

    def piece_to_id(self, piece: str) -> int:
        """The id of a piece or special-token name; ``KeyError`` if it is neither."""
        i = self._special_tokens.get(piece)
        if i is None:
            i = self._piece_id(piece)
        if i is None:
            raise KeyError(f"{piece!r} is not a piece of tokenizer {self._source}")
        return i

    # ----------------------------------------------------------------------------------------------
    # text <-> ids

    def encode(self, text: str, add_bos: bool = True, allow_special: bool = True) -> list[int]:
        """Token ids of ``text``.

        ``allow_special=True`` (the official behaviour): special-token names in the text become their
        ids, and SentencePiece also matches its user-defined ``[UNUSED_TOKEN_n]`` pieces, so
        ``[UNUSED_TOKEN_146]`` encodes to 92543 like ``<|im_start|>``. ``allow_special=False``: the
        text is data only; neither form can produce a special or reserved id.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode: text must be str, got {type(text).__name__}")
        ids = [self.bos_id] if add_bos else []
        if not allow_special:
            ids.extend(self._plain_processor().encode(text))
            return ids
        for chunk in self._special_re.split(text):
            if not chunk:
                continue
            special = self._special_tokens.get(chunk)
            if special is not None:
                ids.append(special)
            else:
                ids.extend(self._sp.encode(chunk))
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``. Special ids are written as their names, or dropped when skipped (then the
        ids around them decode as one run). Invalid UTF-8 from byte pieces decodes to U+FFFD per byte."""
        ids = [int(i) for i in ids]
        self._check_ids(ids)
        out: list[str] = []
        run: list[int] = []
        for i in ids:
            name = self._special_names.get(i)
            if name is None:
                run.append(i)
            elif not skip_special_tokens:
                if run:
                    out.append(self._sp.decode(run))
                    run = []
                out.append(name)
        if run:
            out.append(self._sp.decode(run))
        return "".join(out)

    def _check_ids(self, ids: Sequence[int]) -> None:
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            bad = next(i for i in ids if not 0 <= i < self.vocab_size)
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.vocab_size})")

    # ----------------------------------------------------------------------------------------------
    # chat

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[Any] | None = None,
    ) -> str:
        """The prompt text (see :mod:`.chat_format`); plain messages match the official chat_template."""
        return "".join(p.text for p in render_chat(messages, add_generation_prompt, tools))

    def encode_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[Any] | None = None,
        *,
        allow_special_in_content: bool = False,
        assistant_actions: bool = False,
    ) -> list[int]:
        """Prompt ids, starting with ``<s>``.

        Identical to ``encode(apply_chat_template(...), add_bos=False)`` (which is what the official
        tokenizer gives) unless message text itself spells a special token: by default such text
        stays text, so a user cannot forge ``<|im_start|>system``. ``allow_special_in_content=True``
        gives the official, unguarded ids. ``assistant_actions=True``: only the tool-call markers of
        assistant content become tokens (the official agent format; training data and reward scoring).
        """
        parts = render_chat(messages, add_generation_prompt, tools, assistant_actions=assistant_actions)
        if allow_special_in_content:
            return self.encode("".join(p.text for p in parts), add_bos=False)
        # Runs of text between special tokens are encoded whole, as the official tokenizer does,
        # so message text and the template around it merge exactly as they would there.
        ids: list[int] = []
        text: list[str] = []

        def flush_text() -> None:
            if text:
                ids.extend(self._plain_processor().encode("".join(text)))
                text.clear()

        for part in parts:
            chunks = self._special_re.split(part.text) if part.trusted else [part.text]
            for chunk in chunks:
                special = self._special_tokens.get(chunk) if part.trusted else None
                if special is not None:
                    flush_text()
                    ids.append(special)
                elif chunk:
                    text.append(chunk)
        flush_text()
        return ids

    # ----------------------------------------------------------------------------------------------
    # files

    def save_pretrained(self, out_dir: str | Path) -> tuple[Path, ...]:
        """Write ``tokenizer.model`` (byte-identical to the loaded one), ``tokenizer_config.json`` and
        ``special_tokens_map.json`` in the official layout; unknown config keys are kept."""
        names = {
            "bos": self._sp.id_to_piece(self.bos_id),
            "eos": self._sp.id_to_piece(self.eos_id),
            "unk": self._sp.id_to_piece(self.unk_id),
            "pad": self._special_names.get(self.pad_id) or self._sp.id_to_piece(self.pad_id),
        }
        config = files.build_tokenizer_config(
            special_tokens=self._special_tokens,
            chat_template=self.chat_template,
            reward_token_id=self.reward_token_id,
            preserved=self._config,
            **names,
        )
        stmap = files.build_special_tokens_map(special_tokens=self._special_tokens, **names)
        return files.write_tokenizer_files(out_dir, self._model_proto, config, stmap)

    def __repr__(self) -> str:
        return f"InternLM2Tokenizer(source={self._source!r}, vocab_size={self.vocab_size})"
