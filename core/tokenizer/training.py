"""Train a small SentencePiece BPE tokenizer in the official InternLM2 format.

Same model settings as the released tokenizer (BPE, byte fallback, identity normalizer, no dummy
prefix, whitespace kept, digits split; unk 0 / bos 1 / eos 2, no pad piece), and the same tail: the
reward token and the six chat tokens are user-defined pieces at the end of the vocabulary, in the
official relative order (``[UNUSED_TOKEN_130]``, ``<|plugin|>`` .. ``<|im_start|>``), so
``<|im_start|>`` is always ``vocab_size - 1``. When the text is too small to learn ``vocab_size``
pieces, CONTROL pieces ``[RESERVED_k]`` (never produced by encoding) pad the gap, so the vocabulary
size is exactly what was asked for.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_pb

from .specials import BOS, CHAT_TOKENS, EOS, OFFICIAL_CHAT_TEMPLATE, REWARD_PIECE, UNK
from .tokenizer import InternLM2Tokenizer

_TAIL = (REWARD_PIECE, *CHAT_TOKENS)
# 3 meta pieces + 256 byte pieces + the tail, plus room for a few characters and merges.
MIN_VOCAB_SIZE = 300
# SentencePiece skips sentences longer than max_sentence_length bytes; chunk below it.
_MAX_SENTENCE_BYTES = 4096
_CHUNK_CHARS = 1024
# Special-token text in the corpus is cut out: those tokens are added whole, never learned as merges.
_SPECIAL_TEXT = re.compile("|".join(re.escape(t) for t in (*_TAIL, BOS, EOS, UNK)) + r"|\[UNUSED_TOKEN_\d+\]")


def train_tokenizer(
    texts_or_files: str | os.PathLike | Iterable[str | os.PathLike],
    out_dir: str | os.PathLike,
    vocab_size: int = 2000,
    *,
    character_coverage: float = 0.9999,
    num_threads: int = 2,
) -> InternLM2Tokenizer:
    """Train on ``texts_or_files`` and write a checkpoint-style tokenizer into ``out_dir``.

    ``texts_or_files``: an iterable whose ``str`` items are training text and whose ``Path``-like items
    are UTF-8 text files; a single ``str`` is one text, a single ``Path`` one file. Returns the tokenizer
    loaded back from ``out_dir`` (``tokenizer.model``, ``tokenizer_config.json`` with the chat template,
    ``added_tokens_decoder`` and ``reward_token_id``, ``special_tokens_map.json``).
    """
    if not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size: must be an int >= {MIN_VOCAB_SIZE}, got {vocab_size!r}")
    sentences = list(_sentences(texts_or_files))
    if not sentences:
        raise ValueError("texts_or_files: no training text")

    learned = vocab_size - len(_TAIL)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=buf,
        model_type="bpe",
        vocab_size=learned,
        hard_vocab_limit=False,  # small corpora learn fewer merges; padded below
        byte_fallback=True,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        required_chars="\n\t",
        character_coverage=character_coverage,
        max_sentence_length=_MAX_SENTENCE_BYTES * 2,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=num_threads,
        minloglevel=2,
    )
    model = _append_tail(buf.getvalue(), learned, vocab_size)
    tok = InternLM2Tokenizer(model, {"chat_template": OFFICIAL_CHAT_TEMPLATE}, source="<trained>")
    tok.save_pretrained(out_dir)
    return InternLM2Tokenizer.from_pretrained(out_dir)


def _append_tail(model_proto: bytes, learned: int, vocab_size: int) -> bytes:
    proto = sp_pb.ModelProto()
    proto.ParseFromString(model_proto)
    if len(proto.pieces) > learned:
        raise RuntimeError(f"sentencepiece returned {len(proto.pieces)} pieces, asked for at most {learned}")
    existing = {p.piece for p in proto.pieces}
    clash = existing.intersection(_TAIL)
    if clash:
        raise RuntimeError(f"trained vocabulary already holds the special pieces {sorted(clash)}")
    for k in range(learned - len(proto.pieces)):
        proto.pieces.add(piece=f"[RESERVED_{k}]", score=0.0, type=sp_pb.ModelProto.SentencePiece.CONTROL)
    for name in _TAIL:
        proto.pieces.add(piece=name, score=0.0, type=sp_pb.ModelProto.SentencePiece.USER_DEFINED)
    proto.trainer_spec.vocab_size = vocab_size
    assert len(proto.pieces) == vocab_size
    return proto.SerializeToString()


def _sentences(source: str | os.PathLike | Iterable[str | os.PathLike]) -> Iterator[str]:
    """Training sentences: special-token text cut out, long text split at line ends into chunks."""
    items = [source] if isinstance(source, (str, os.PathLike)) else source
    for item in items:
        if isinstance(item, os.PathLike):
            text = Path(item).read_text(encoding="utf-8")
        elif isinstance(item, str):
            text = item
        else:
            kind = type(item).__name__
            raise TypeError(f"texts_or_files: items must be str (text) or Path (file), got {kind}")
        for segment in _SPECIAL_TEXT.split(text):
            yield from _chunks(segment)


def _chunks(text: str) -> Iterator[str]:
    chunk = ""
    for line in text.splitlines(keepends=True):
        while len(line) > _CHUNK_CHARS:  # a single huge line: hard split
            if chunk:
                yield chunk
                chunk = ""
            yield line[:_CHUNK_CHARS]
            line = line[_CHUNK_CHARS:]
        if len(chunk) + len(line) > _CHUNK_CHARS:
            yield chunk
            chunk = ""
        chunk += line
    if chunk.strip():
        yield chunk
