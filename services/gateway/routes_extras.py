"""vLLM's extra endpoints: POST /tokenize, /detokenize, and reward scoring as /score and /pooling.

Reward scoring comes in both of vLLM's shapes, because each fits one of the reward service's RPCs:

- ``POST /score`` (and ``/v1/score``), vLLM's Score API: ``text_1`` is the query, ``text_2`` one or
  more candidate answers; each pair is scored as the conversation ``[user: text_1, assistant:
  text_2[i]]`` (RewardService.Rank), which is what a reward model judges: how good an answer is to a
  prompt. Answer ``{"data": [{"index", "object": "score", "score"}], "ranking": [best first]}``.
- ``POST /pooling`` (and ``/v1/pooling``), vLLM's pooling API for reward models: a whole conversation
  (``messages``), or several (``input``), each reduced to its one reward value (RewardService.Score).
  Answer ``{"data": [{"index", "object": "pooling", "data": [score]}]}``.

Both accept InternLM2's ``condition`` (the conditional reward model's system prompt).
"""

from __future__ import annotations

from fastapi import APIRouter, Request

from internlm2.v1 import common_pb2, reward_pb2, tokenizer_pb2

from .errors import ApiError, ProtoPaths
from .schemas import DetokenizeRequest, PoolingRequest, ScoreRequest, TokenizeRequest
from .translate import messages_to_proto, token_text, tools_to_proto

router = APIRouter()


def _context(request: Request):
    return request.app.state.gateway, request.state.request_id


async def _max_model_len(gateway, request_id) -> int | None:
    if "inference" not in gateway.backends.addresses:
        return None
    try:
        return (await gateway.backends.model_info(request_id)).max_model_len
    except ApiError:  # the tokenizer answers even while the inference model still loads
        return None


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request):
    gateway, request_id = _context(request)
    if (body.prompt is None) == (body.messages is None):
        raise ApiError.bad_param("prompt", "give exactly one of prompt and messages")
    if body.model is not None:
        await gateway.resolve_model(body.model, request_id)
    if body.messages is not None:
        proto = tokenizer_pb2.ApplyChatTemplateRequest(
            messages=messages_to_proto(body.messages),
            tools=tools_to_proto(body.tools or []),
            add_generation_prompt=body.add_generation_prompt,
        )
        paths = ProtoPaths({"messages": "messages", "tools": "tools"}, default="messages")
        result = await gateway.backends.call("tokenizer", "ApplyChatTemplate", proto, request_id, param_of=paths)
        ids = list(result.token_ids)
        pieces = None
        if body.return_token_strs:
            pieces = await _pieces(gateway, ids, request_id)
    else:
        if body.tools:
            raise ApiError.bad_param("tools", "only with messages")
        proto = tokenizer_pb2.TokenizeRequest(texts=[body.prompt], add_bos=body.add_special_tokens,
                                              return_pieces=body.return_token_strs)
        paths = ProtoPaths({"texts": "prompt"}, default="prompt")
        result = (await gateway.backends.call("tokenizer", "Tokenize", proto, request_id, param_of=paths)).results[0]
        ids = list(result.token_ids)
        pieces = [token_text(p)[0] for p in result.pieces] if body.return_token_strs else None
    out = {"count": len(ids), "max_model_len": await _max_model_len(gateway, request_id), "tokens": ids}
    if pieces is not None:
        out["token_strs"] = pieces
    return out


async def _pieces(gateway, ids: list[int], request_id) -> list[str]:
    """Each id's text, decoded one by one with special tokens kept."""
    proto = tokenizer_pb2.DetokenizeRequest(sequences=[common_pb2.TokenIds(ids=[i]) for i in ids],
                                            skip_special_tokens=False)
    return list((await gateway.backends.call("tokenizer", "Detokenize", proto, request_id)).texts)


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request):
    gateway, request_id = _context(request)
    if body.model is not None:
        await gateway.resolve_model(body.model, request_id)
    proto = tokenizer_pb2.DetokenizeRequest(sequences=[common_pb2.TokenIds(ids=body.tokens)])
    if body.skip_special_tokens is not None:
        proto.skip_special_tokens = body.skip_special_tokens
    paths = ProtoPaths({"sequences[0].ids": "tokens", "sequences": "tokens"}, default="tokens")
    result = await gateway.backends.call("tokenizer", "Detokenize", proto, request_id, param_of=paths)
    return {"prompt": result.texts[0]}


@router.post("/score")
@router.post("/v1/score")
async def score(body: ScoreRequest, request: Request):
    gateway, request_id = _context(request)
    gateway.check_reward_model(body.model)
    answers = [body.text_2] if isinstance(body.text_2, str) else body.text_2
    proto = reward_pb2.RankRequest(prompt=[common_pb2.ChatMessage(role="user", content=body.text_1)],
                                   responses=answers)
    if body.condition is not None:
        proto.condition = body.condition
    paths = ProtoPaths({"prompt": "text_1", "responses": "text_2", "condition": "condition"}, default="text_2")
    result = await gateway.backends.call("reward", "Rank", proto, request_id, param_of=paths)
    data = [{"index": i, "object": "score", "score": s} for i, s in enumerate(result.scores)]
    return {"id": f"score-{request_id}", "object": "list", "model": gateway.config.reward_model_name, "data": data,
            "ranking": list(result.order), "usage": {}}


@router.post("/pooling")
@router.post("/v1/pooling")
async def pooling(body: PoolingRequest, request: Request):
    gateway, request_id = _context(request)
    gateway.check_reward_model(body.model)
    if (body.messages is None) == (body.input is None):
        raise ApiError.bad_param("messages", "give exactly one of messages (one conversation) and input (a list)")
    conversations = [body.messages] if body.messages is not None else body.input
    prefix = "messages" if body.messages is not None else "input"
    proto = reward_pb2.ScoreRequest(
        conversations=[common_pb2.Conversation(messages=messages_to_proto(c)) for c in conversations]
    )
    if body.condition is not None:
        proto.condition = body.condition

    def param_of(path: str) -> str:
        # conversations[i].messages[j].x -> messages[j].x (one conversation) or input[i][j].x
        if not path.startswith("conversations"):
            return "condition" if path.startswith("condition") else prefix
        head, _, rest = path.partition(".messages")
        index = head[len("conversations"):]
        return f"messages{rest}" if prefix == "messages" else f"input{index}{rest}"

    result = await gateway.backends.call("reward", "Score", proto, request_id, param_of=param_of)
    data = [{"index": i, "object": "pooling", "data": [s]} for i, s in enumerate(result.scores)]
    tokens = sum(result.token_counts)
    return {"id": f"pool-{request_id}", "object": "list", "model": gateway.config.reward_model_name, "data": data,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
