"""TokenizerServicer: protobuf in, ``InternLM2Tokenizer`` calls, protobuf out.

Encoding, and turning request messages into the core's dicts (tool JSON included), run in a worker
thread (sentencepiece releases the GIL) so a large batch never stalls the event loop that also
answers health checks.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from internlm2.v1 import tokenizer_pb2, tokenizer_pb2_grpc

from ..common.app import Service
from ..common.chat import core_value_error, messages_from_proto, tools_from_proto
from ..common.errors import ServiceError

SERVICE_NAME = tokenizer_pb2.DESCRIPTOR.services_by_name["TokenizerService"].full_name


def _flag(request, name: str, default: bool) -> bool:
    return getattr(request, name) if request.HasField(name) else default


class TokenizerServicer(tokenizer_pb2_grpc.TokenizerServiceServicer):
    """``tok`` is set once loaded; until then ReadinessInterceptor keeps calls away."""

    def __init__(self, tokenizer=None, source: str = ""):
        self.tok = tokenizer
        self.source = source

    async def Tokenize(self, request, context):
        if not request.texts:
            raise ServiceError.invalid_argument("texts", "at least one text is required")
        add_bos = _flag(request, "add_bos", True)

        def run():
            results = []
            for text in request.texts:
                ids = self.tok.encode(text, add_bos=add_bos)
                pieces = [self.tok.id_to_piece(i) for i in ids] if request.return_pieces else []
                results.append(tokenizer_pb2.TokenizedText(token_ids=ids, pieces=pieces))
            return results

        return tokenizer_pb2.TokenizeResponse(results=await asyncio.to_thread(run))

    async def Detokenize(self, request, context):
        if not request.sequences:
            raise ServiceError.invalid_argument("sequences", "at least one sequence is required")
        skip = _flag(request, "skip_special_tokens", True)
        vocab = self.tok.vocab_size
        for i, seq in enumerate(request.sequences):
            bad = next((t for t in seq.ids if not 0 <= t < vocab), None)
            if bad is not None:
                raise ServiceError.invalid_argument(
                    f"sequences[{i}].ids", f"token id {bad} is outside the vocabulary [0, {vocab})"
                )

        def run():
            return [self.tok.decode(seq.ids, skip_special_tokens=skip) for seq in request.sequences]

        return tokenizer_pb2.DetokenizeResponse(texts=await asyncio.to_thread(run))

    async def ApplyChatTemplate(self, request, context):
        add_generation_prompt = _flag(request, "add_generation_prompt", True)

        def run():
            messages = messages_from_proto(request.messages)
            tools = tools_from_proto(request.tools) or None
            text = self.tok.apply_chat_template(messages, add_generation_prompt, tools)
            return text, self.tok.encode_chat(messages, add_generation_prompt, tools)

        try:
            text, ids = await asyncio.to_thread(run)
        except ValueError as exc:
            raise core_value_error(exc) from None
        return tokenizer_pb2.ApplyChatTemplateResponse(text=text, token_ids=ids)

    async def CountTokens(self, request, context):
        if not request.texts and not request.conversations:
            raise ServiceError.invalid_argument("texts", "give at least one text or conversation")
        add_bos = _flag(request, "add_bos", True)
        add_generation_prompt = _flag(request, "add_generation_prompt", True)

        def run():
            conversations = [
                messages_from_proto(c.messages, f"conversations[{i}].messages")
                for i, c in enumerate(request.conversations)
            ]
            texts = [len(self.tok.encode(t, add_bos=add_bos)) for t in request.texts]
            convs = []
            for i, messages in enumerate(conversations):
                try:
                    convs.append(len(self.tok.encode_chat(messages, add_generation_prompt)))
                except ValueError as exc:
                    raise core_value_error(exc, f"conversations[{i}]") from None
            return texts, convs

        texts, convs = await asyncio.to_thread(run)
        return tokenizer_pb2.CountTokensResponse(
            text_counts=texts, conversation_counts=convs, total=sum(texts) + sum(convs)
        )

    async def GetTokenizerInfo(self, request, context):
        tok = self.tok
        specials = sorted(tok.special_tokens.items(), key=lambda item: item[1])
        return tokenizer_pb2.GetTokenizerInfoResponse(
            vocab_size=tok.vocab_size,
            bos_token_id=tok.bos_id,
            eos_token_id=tok.eos_id,
            pad_token_id=tok.pad_id,
            unk_token_id=tok.unk_id,
            special_tokens=[tokenizer_pb2.SpecialToken(content=name, id=i) for name, i in specials],
            default_stop_token_ids=tok.stop_token_ids,
            chat_template=tok.chat_template,
            # InternLM2Tokenizer.encode adds BOS by default and never EOS.
            add_bos_token=True,
            add_eos_token=False,
            source=self.source,
        )


class TokenizerService(Service):
    """Loads the tokenizer of ``model_path`` (a checkpoint folder or a tokenizer.model file)."""

    service_name = SERVICE_NAME

    def __init__(self, model_path: str | Path, tokenizer=None):
        self.model_path = str(model_path)
        self.servicer = TokenizerServicer(source=self.model_path)
        self._preloaded = tokenizer

    def add_to_server(self, server) -> None:
        tokenizer_pb2_grpc.add_TokenizerServiceServicer_to_server(self.servicer, server)

    async def load(self) -> None:
        tokenizer = self._preloaded
        if tokenizer is None:
            from internlm2.core.tokenizer import InternLM2Tokenizer

            tokenizer = await asyncio.to_thread(InternLM2Tokenizer.from_pretrained, self.model_path)
        self.servicer.tok = tokenizer
