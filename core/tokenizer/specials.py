"""The fixed vocabulary facts of InternLM2: special-token names, official ids, chat template.

In the released ``tokenizer.model`` the six chat tokens are user-defined pieces named
``[UNUSED_TOKEN_141]`` .. ``[UNUSED_TOKEN_146]``; their chat names (``<|im_start|>`` ...) come
from ``tokenizer_config.json``'s ``added_tokens_decoder``. Tokenizers trained by
:func:`~internlm2.core.tokenizer.training.train_tokenizer` name the pieces by their chat names
directly, so both layouts resolve through :data:`LEGACY_PIECE_NAMES`.
"""

from __future__ import annotations

import re

BOS, EOS, UNK = "<s>", "</s>", "<unk>"

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ACTION_START = "<|action_start|>"
ACTION_END = "<|action_end|>"
INTERPRETER = "<|interpreter|>"
PLUGIN = "<|plugin|>"

# Ordered as in the official vocabulary's tail (ids 92538 .. 92543).
CHAT_TOKENS: tuple[str, ...] = (PLUGIN, INTERPRETER, ACTION_END, ACTION_START, IM_END, IM_START)

OFFICIAL_VOCAB_SIZE = 92544
OFFICIAL_CHAT_IDS: dict[str, int] = {name: 92538 + i for i, name in enumerate(CHAT_TOKENS)}

# Chat name -> the piece that carries it in the official .model file.
LEGACY_PIECE_NAMES: dict[str, str] = {name: f"[UNUSED_TOKEN_{141 + i}]" for i, name in enumerate(CHAT_TOKENS)}

# InternLM2-Reward scores the hidden state of this token (config ``reward_token_id``).
REWARD_PIECE = "[UNUSED_TOKEN_130]"
OFFICIAL_REWARD_TOKEN_ID = 92527

# Reserved user-defined pieces of the official vocabulary; sentencepiece matches them in raw text.
RESERVED_PIECE_PATTERN = re.compile(r"\[UNUSED_TOKEN_\d+\]")

# tokenizer_config.json's chat_template of internlm/internlm2-chat-7b, character for character.
OFFICIAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
