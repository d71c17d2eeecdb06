"""Token ids and loss labels of training records, with the core tokenizer's chat format.

A chat becomes ``<s>`` + one segment per message, each ``<|im_start|>role\\ncontent<|im_end|>\\n``
exactly as ``InternLM2Tokenizer.encode_chat`` renders it. An assistant message is encoded as the
prompt ``<|im_start|>assistant\\n`` (as the model sees it at inference, after
``add_generation_prompt``) followed by the content tokens and ``<|im_end|>`` — those are the targets
(unless the turn has ``"loss": false``); the trailing newline is context.

Official agent format: an assistant's tool call — written in its content
(``<|action_start|><|plugin|>\n{json}<|action_end|>\n``) or given as ``tool_calls`` — is encoded with
the official special tokens, so the model learns to emit the markers the serving parser and
``get_score`` read. User, system and environment content stay guarded: a special-token name typed
there is plain text.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from internlm2.core.tokenizer.chat_format import ACTION_MARKERS
from internlm2.core.tokenizer.tool_calls import ACTION_FOOTER, action_header, coerce_tool_call

IGNORE = -100


def tokenize_text(tok: Any, text: str) -> list[int]:
    """``<s> text </s>``; special-token names in the text stay text."""
    return [*tok.encode(text, add_bos=True, allow_special=False), tok.eos_id]


def _assistant_parts(tok: Any) -> tuple[list[int], list[int], int]:
    header = tok.encode_chat([], add_generation_prompt=True)[1:]  # <|im_start|> "assistant\n"
    newline = tok.encode("\n", add_bos=False, allow_special=False)
    return header, newline, tok.special_tokens["<|im_end|>"]


def assistant_content_ids(tok: Any, content: str, tool_calls: Sequence[Any] = ()) -> list[int]:
    """An assistant turn's body as the policy emits it: text runs encoded on their own, the tool-call
    markers (in the content or from ``tool_calls``) as their special tokens; no ``<|im_end|>``."""
    text = content + "".join(action_header(call.kind) + call.body() + ACTION_FOOTER
                             for call in (coerce_tool_call(c, "tool_calls") for c in tool_calls))
    ids: list[int] = []
    for i, chunk in enumerate(ACTION_MARKERS.split(text)):
        if i % 2:
            ids.append(tok.special_tokens[chunk])
        elif chunk:
            ids += tok.encode(chunk, add_bos=False, allow_special=False)
    return ids


def tokenize_chat(tok: Any, messages: Sequence[Mapping[str, Any]]) -> tuple[list[int], list[int]]:
    """``(ids, targets)`` of one conversation; ``targets[t]`` is ids[t] where the loss applies, else
    -100 (unshifted: :func:`shift_labels` aligns them to the model's outputs)."""
    header, newline, im_end = _assistant_parts(tok)
    ids = [tok.bos_id]
    targets = [IGNORE]
    for m in messages:
        if m["role"] == "assistant" and not m.get("name"):
            body = [*assistant_content_ids(tok, m.get("content") or "", m.get("tool_calls") or ()), im_end]
            learn = m.get("loss", True)
            ids += header + body + newline
            targets += [IGNORE] * len(header) + (body if learn else [IGNORE] * len(body)) + [IGNORE] * len(newline)
        else:
            seg = tok.encode_chat([dict(m)], add_generation_prompt=False, assistant_actions=True)[1:]
            learn = m["role"] == "assistant" and m.get("loss", True)
            ids += seg
            if learn:  # a named assistant turn: everything after the role header is target
                n = len(header)
                targets += [IGNORE] * n + seg[n:-len(newline)] + [IGNORE] * len(newline)
            else:
                targets += [IGNORE] * len(seg)
    return ids, targets


def prompt_ids(tok: Any, messages: Sequence[Mapping[str, Any]]) -> list[int]:
    """The inference prompt for ``messages`` (what generation continues from)."""
    return tok.encode_chat(list(messages), add_generation_prompt=True, assistant_actions=True)


def shift_labels(targets: Sequence[int]) -> list[int]:
    """Labels aligned with the outputs: ``labels[t] = targets[t + 1]`` (the last is -100)."""
    return [*targets[1:], IGNORE]
