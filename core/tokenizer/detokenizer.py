"""Streaming detokenization: ids arrive a few at a time, text leaves as soon as it is final.

Byte-fallback pieces (``<0xE4>`` ``<0xBD>`` ``<0xA0>`` = "你") can arrive in different steps, so
the last ids of the stream may be the start of a character not yet complete. Those (at most three
byte pieces) are held back; everything before them is decoded and emitted. That is exact because
SentencePiece decodes byte runs character by character and turns every invalid byte into its own
U+FFFD: a boundary just before a UTF-8 lead byte, or after a complete character, never changes how
either side decodes. So the deltas concatenate to ``tok.decode(all_ids)`` and each step decodes only
its new ids plus the held ones (vLLM's prefix-offset window, cut at UTF-8 boundaries instead of on
"text ends with U+FFFD", which would also stall on a genuine U+FFFD).
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable

from .tokenizer import InternLM2Tokenizer


class IncrementalDetokenizer:
    """One per output stream. ``push(new_ids)`` returns the new text; ``flush()`` the held rest."""

    def __init__(self, tokenizer: InternLM2Tokenizer, skip_special_tokens: bool = True):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._held: list[int] = []  # ids of the current run whose text is not emitted yet

    def push(self, new_ids: int | Iterable[int]) -> str:
        """Take the next generated id(s); return the text they complete (possibly ``""``)."""
        # One id may come as an int, a numpy integer or a 0-d tensor.
        single = isinstance(new_ids, numbers.Integral) or getattr(new_ids, "ndim", None) == 0
        ids = [int(new_ids)] if single else [int(i) for i in new_ids]
        vocab = self._tok.vocab_size
        for i in ids:
            if not 0 <= i < vocab:
                raise ValueError(f"token id {i} is outside the vocabulary [0, {vocab})")
        out: list[str] = []
        for i in ids:
            name = self._tok.special_name(i)
            if name is None:
                self._held.append(i)
            elif not self._skip:  # a special token ends the run: its held bytes are final
                out.append(self.flush())
                out.append(name)
        cut = _incomplete_tail_start(self._held, self._tok.piece_byte)
        if cut:
            out.append(self._tok.decode(self._held[:cut]))
            del self._held[:cut]
        return "".join(out)

    def flush(self) -> str:
        """End of stream: decode whatever is held (an unfinished character becomes U+FFFD)."""
        text = self._tok.decode(self._held) if self._held else ""
        self._held.clear()
        return text


def _utf8_length(lead: int) -> int:
    """Bytes a character starting with ``lead`` spans; 1 when it cannot start a multi-byte one.

    Lenient on purpose (C0/C1 and F5-F7 count as leads): holding a doomed byte a step longer is
    harmless, emitting a prefix SentencePiece would still combine is not.
    """
    if 0xC0 <= lead <= 0xDF:
        return 2
    if 0xE0 <= lead <= 0xEF:
        return 3
    if 0xF0 <= lead <= 0xF7:
        return 4
    return 1


def _incomplete_tail_start(ids: list[int], byte_of) -> int:
    """Index where a trailing, still-completable UTF-8 byte sequence starts (``len(ids)`` if none)."""
    n = len(ids)
    continuations = 0
    for j in range(n - 1, max(n - 4, -1), -1):
        b = byte_of(ids[j])
        if b is None:  # an ordinary piece: complete text, and no byte run continues across it
            return n
        if 0x80 <= b <= 0xBF:
            continuations += 1
            continue
        return j if continuations + 1 < _utf8_length(b) else n
    return n
