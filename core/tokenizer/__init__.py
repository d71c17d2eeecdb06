"""InternLM2 tokenizer: SentencePiece BPE with the InternLM2 special tokens and chat format.

- ``specials``          token names, official ids, the official chat template
- ``tokenizer``         InternLM2Tokenizer: encode/decode, special tokens, chat template -> ids, files
- ``chat_format``       messages (+ tools, tool calls, environment turns) -> template parts
- ``tool_calls``        ToolCall, rendering a call, parse_tool_calls for generated text
- ``detokenizer``       IncrementalDetokenizer for streaming output
- ``training``          train_tokenizer: a small tokenizer in the official format
- ``checkpoint_files``  tokenizer.model / tokenizer_config.json / special_tokens_map.json I/O
"""

from .detokenizer import IncrementalDetokenizer
from .tokenizer import InternLM2Tokenizer
from .tool_calls import ToolCall, parse_tool_calls
from .training import train_tokenizer

__all__ = ["IncrementalDetokenizer", "InternLM2Tokenizer", "ToolCall", "parse_tool_calls", "train_tokenizer"]
