"""RewardServicer: conversations in, ``RewardScorer`` scores out (HF ``get_score`` semantics).

Nothing heavy runs on the event loop, which must stay free for health checks and cancellation:
turning the request into messages (JSON of tool calls included) and tokenizing run in a worker
thread (``asyncio.to_thread``), and the model runs on one dedicated thread, where concurrent calls
queue instead of racing on the model. Each call's batch is scored in one go by the scorer
(length-sorted, padded batches).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from internlm2.v1 import reward_pb2, reward_pb2_grpc

from ..common.app import Service
from ..common.chat import core_value_error, messages_from_proto
from ..common.errors import ServiceError

SERVICE_NAME = reward_pb2.DESCRIPTOR.services_by_name["RewardService"].full_name


@dataclass(frozen=True)
class Candidate:
    """One conversation to score. ``path`` names it in the request; core errors about its messages
    ("messages[1].role") are re-rooted under ``prefix`` or, for prompt + response pairs, onto
    ``prompt[j]`` / the response field."""

    path: str
    messages: list[dict]
    prefix: str | None = None
    prompt_len: int = 0

    def locate(self, core_field: str) -> str:
        if self.prefix is not None:
            return f"{self.prefix}.{core_field}"
        match = re.match(r"messages\[(\d+)\](.*)", core_field)
        if match and int(match.group(1)) < self.prompt_len:
            return f"prompt[{match.group(1)}]{match.group(2)}"
        return self.path


def _with_response(prompt: list[dict], path: str, text: str) -> Candidate:
    return Candidate(path, [*prompt, {"role": "assistant", "content": text}], prompt_len=len(prompt))


class RewardServicer(reward_pb2_grpc.RewardServiceServicer):
    """``scorer`` is set once loaded; until then ReadinessInterceptor keeps calls away."""

    def __init__(self, scorer=None, max_len: int | None = None):
        self.scorer = scorer
        self.max_len = max_len
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward-model")

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _encode(self, conversations: list[Candidate], condition: str | None) -> list[list[int]]:
        """Conversations -> sequences ending in the reward token, checked against the context length."""
        sequences = []
        for candidate in conversations:
            try:
                ids = self.scorer.encode(candidate.messages, condition)
            except ValueError as exc:
                error = core_value_error(exc, default_field=candidate.path)
                violation = error.violations[0]
                raise ServiceError.invalid_argument(candidate.locate(violation.field), violation.description) from None
            if self.max_len is not None and len(ids) > self.max_len:
                self._check_condition_fits(condition)
                raise ServiceError.invalid_argument(
                    candidate.path,
                    f"{len(ids)} tokens (reward token included) exceed the model's context of {self.max_len}",
                )
            sequences.append(ids)
        return sequences

    def _check_condition_fits(self, condition: str | None) -> None:
        """On an overflow: blame ``condition`` when it alone (as the system message, plus the reward
        token) already fills the context, since no conversation could fit after it."""
        if not condition:
            return
        length = len(self.scorer.encode([], condition))
        if length >= self.max_len:
            raise ServiceError.invalid_argument(
                "condition",
                f"{length} tokens (reward token included) leave no room in the model's context of {self.max_len}",
            )

    async def _score(self, candidates: Callable[[], list[Candidate]], condition: str | None):
        """Builds the request's candidates and tokenizes them in a worker thread, then scores them on
        the model's thread; the event loop only waits."""
        sequences = await asyncio.to_thread(lambda: self._encode(candidates(), condition))
        loop = asyncio.get_running_loop()
        scores = await loop.run_in_executor(self._executor, self.scorer.score_ids, sequences)
        return scores, [len(s) for s in sequences]

    async def Score(self, request, context):
        if not request.conversations:
            raise ServiceError.invalid_argument("conversations", "at least one conversation is required")

        def candidates():
            return [
                Candidate(
                    f"conversations[{i}]",
                    messages_from_proto(c.messages, f"conversations[{i}].messages"),
                    prefix=f"conversations[{i}]",
                )
                for i, c in enumerate(request.conversations)
            ]

        condition = request.condition if request.HasField("condition") else None
        scores, counts = await self._score(candidates, condition)
        return reward_pb2.ScoreResponse(scores=scores, token_counts=counts)

    async def Compare(self, request, context):
        def candidates():
            # A response is judged as the answer to a prompt: an empty prompt is refused as in Score.
            prompt = messages_from_proto(request.prompt, "prompt")
            return [
                _with_response(prompt, "response_a", request.response_a),
                _with_response(prompt, "response_b", request.response_b),
            ]

        condition = request.condition if request.HasField("condition") else None
        (a, b), _ = await self._score(candidates, condition)
        if a > b:
            preferred = reward_pb2.PREFERENCE_A
        elif b > a:
            preferred = reward_pb2.PREFERENCE_B
        else:
            preferred = reward_pb2.PREFERENCE_TIE
        return reward_pb2.CompareResponse(preferred=preferred, margin=abs(a - b), score_a=a, score_b=b)

    async def Rank(self, request, context):
        if not request.responses:
            raise ServiceError.invalid_argument("responses", "at least one response is required")

        def candidates():
            prompt = messages_from_proto(request.prompt, "prompt")
            return [_with_response(prompt, f"responses[{i}]", text) for i, text in enumerate(request.responses)]

        condition = request.condition if request.HasField("condition") else None
        scores, _ = await self._score(candidates, condition)
        order = sorted(range(len(scores)), key=lambda i: -scores[i])  # stable: ties keep input order
        return reward_pb2.RankResponse(order=order, scores=scores)


class RewardService(Service):
    """Loads an InternLM2-Reward checkpoint (weights + tokenizer files) from ``model_path``."""

    service_name = SERVICE_NAME

    def __init__(self, model_path: str | Path, device: str = "cpu", dtype: str | None = None, scorer=None):
        self.model_path = str(model_path)
        self.device = device
        self.dtype = dtype
        self.servicer = RewardServicer()
        self._preloaded = scorer

    def add_to_server(self, server) -> None:
        reward_pb2_grpc.add_RewardServiceServicer_to_server(self.servicer, server)

    def _load_scorer(self):
        from internlm2.core import InternLM2ForRewardModel
        from internlm2.core.reward import RewardScorer
        from internlm2.core.tokenizer import InternLM2Tokenizer

        model = InternLM2ForRewardModel.from_pretrained(self.model_path, dtype=self.dtype, device=self.device)
        return RewardScorer(model, InternLM2Tokenizer.from_pretrained(self.model_path))

    async def load(self) -> None:
        scorer = self._preloaded or await asyncio.to_thread(self._load_scorer)
        self.servicer.max_len = scorer.model.config.max_position_embeddings
        self.servicer.scorer = scorer

    async def close(self) -> None:
        self.servicer.close()
