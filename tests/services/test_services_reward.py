"""RewardService on a real server with a tiny random InternLM2-Reward checkpoint: Score equals the model
core's RewardScorer (with and without a condition), Compare and Rank agree with it, bad input names
the field."""

from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from services_fixtures import BackgroundApp, tiny_checkpoints

from internlm2.core import InternLM2ForRewardModel
from internlm2.core.reward import RewardScorer
from internlm2.core.tokenizer import InternLM2Tokenizer
from internlm2.services.common import GrpcApp, ServerConfig
from internlm2.services.reward import RewardService
from internlm2_client import InvalidArgumentError, Preference, RewardClient

pytestmark = pytest.mark.timeout(60)

PROMPT = [{"role": "user", "content": "What is 2 + 2?"}]
CONVERSATIONS = [
    [*PROMPT, {"role": "assistant", "content": "4"}],
    [*PROMPT, {"role": "assistant", "content": "It is five, I think."}],
    [{"role": "system", "content": "Be brief."}, *PROMPT, {"role": "assistant", "content": "Four."}],
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    _, reward = tiny_checkpoints(tmp_path_factory.mktemp("tiny"))
    return reward


@pytest.fixture(scope="module")
def scorer(checkpoint):
    return RewardScorer(
        InternLM2ForRewardModel.from_pretrained(checkpoint), InternLM2Tokenizer.from_pretrained(checkpoint)
    )


@pytest.fixture(scope="module")
def client(checkpoint):
    # The server loads the checkpoint itself, as `internlm2 serve reward --model` does.
    app = GrpcApp(ServerConfig("reward", host="127.0.0.1", port=0), [RewardService(checkpoint)])
    server = BackgroundApp(app).start()
    with RewardClient(server.address, timeout=30) as client:
        yield client
    server.stop()


def f32(values):
    return np.asarray(values, dtype=np.float32)


def test_scores_equal_the_reward_scorer(client, scorer):
    served = client.score(CONVERSATIONS)
    expected = scorer.score(CONVERSATIONS)
    np.testing.assert_array_equal(f32(served), f32(expected))
    assert len(set(served)) == 3  # a random head still tells these apart


def test_condition_is_prepended_as_a_system_prompt(client, scorer):
    condition = "Score helpfulness for math questions."
    served = client.score(CONVERSATIONS[:2], condition=condition)
    np.testing.assert_array_equal(f32(served), f32(scorer.score(CONVERSATIONS[:2], condition=condition)))
    assert served != client.score(CONVERSATIONS[:2])


def test_compare_and_rank_agree_with_the_scores(client, scorer):
    responses = ["4", "It is five, I think.", "Four.", "22"]
    scores = f32(scorer.score([[*PROMPT, {"role": "assistant", "content": r}] for r in responses]))
    comparison = client.compare(PROMPT, responses[0], responses[1])
    assert comparison.preferred == (Preference.A if scores[0] > scores[1] else Preference.B)
    assert comparison.score_a == scores[0] and comparison.score_b == scores[1]
    assert comparison.margin == pytest.approx(abs(float(scores[0]) - float(scores[1])), abs=1e-6)
    tie = client.compare(PROMPT, "same", "same")
    assert tie.preferred == Preference.TIE and tie.margin == 0
    ranking = client.rank(PROMPT, responses)
    np.testing.assert_array_equal(f32(ranking.scores), scores)
    assert list(ranking.order) == sorted(range(4), key=lambda i: -scores[i])


@pytest.mark.parametrize(
    "call,field",
    [
        (lambda c: c.score([]), "conversations"),
        (
            lambda c: c.score([CONVERSATIONS[0], [{"role": "referee", "content": "x"}]]),
            "conversations[1].messages[0].role",
        ),
        (lambda c: c.score([[{"role": "user", "content": "word " * 3000}]]), "conversations[0]"),
        (lambda c: c.rank(PROMPT, []), "responses"),
        (lambda c: c.compare([{"role": "judge", "content": "x"}], "a", "b"), "prompt[0].role"),
        (lambda c: c.rank(PROMPT, ["ok", "word " * 3000]), "responses[1]"),
        # Score refuses an empty conversation; a response without a prompt is the same thing.
        (lambda c: c.compare([], "a", "b"), "prompt"),
        (lambda c: c.rank([], ["a", "b"]), "prompt"),
    ],
    ids=[
        "no conversations",
        "unknown role",
        "longer than the context",
        "nothing to rank",
        "unknown prompt role",
        "response too long",
        "compare without a prompt",
        "rank without a prompt",
    ],
)
def test_bad_input_names_the_field(client, call, field):
    with pytest.raises(InvalidArgumentError) as info:
        call(client)
    assert info.value.field == field
    assert len(client.score(CONVERSATIONS[:1])) == 1


class GatedScorer:
    """The real scorer, whose ``encode`` holds every call until ``gate`` opens: while it is closed a
    Score request is provably still being worked on."""

    def __init__(self, scorer):
        self._scorer = scorer
        self.entered = threading.Event()
        self.gate = threading.Event()

    def __getattr__(self, name):
        return getattr(self._scorer, name)

    def encode(self, messages, condition=None):
        self.entered.set()
        assert self.gate.wait(60), "the test never opened the gate"
        return self._scorer.encode(messages, condition)


@pytest.mark.timeout(180)
def test_health_answers_while_a_large_score_request_is_being_encoded(checkpoint, scorer):
    """Tokenizing runs off the event loop: health checks (and other calls' I/O) are answered while a
    large Score request is still in its encoding phase. The request is held there by a gate, so
    "still in progress" is a fact, not a race; on the old code the loop itself would be held and the
    health check would hit its deadline."""
    gated = GatedScorer(scorer)
    app = GrpcApp(ServerConfig("reward", host="127.0.0.1", port=0), [RewardService(checkpoint, scorer=gated)])
    server = BackgroundApp(app).start()
    # Over 1 MiB: the request itself is parsed in a worker thread too (services/common/decoding.py). The
    # last conversation is longer than the context, so the request ends after encoding, unscored.
    conversations = [[*PROMPT, {"role": "assistant", "content": f"answer {i} " * 150}] for i in range(1000)]
    conversations.append([{"role": "user", "content": "word " * 3000}])
    outcome: list = []

    def score():
        try:
            client.score(conversations)
        except InvalidArgumentError as exc:
            outcome.append(exc)

    try:
        with RewardClient(server.address, timeout=120) as client, grpc.insecure_channel(server.address) as channel:
            scoring = threading.Thread(target=score, daemon=True)
            scoring.start()
            assert gated.entered.wait(60), "the Score request never reached encoding"
            health = health_pb2_grpc.HealthStub(channel)
            for service in ("", "internlm2.v1.RewardService"):
                status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
                assert status == health_pb2.HealthCheckResponse.SERVING
            assert scoring.is_alive() and not outcome  # answered while the request was still being encoded
            gated.gate.set()
            scoring.join(120)
        assert len(outcome) == 1 and outcome[0].field == "conversations[1000]", outcome
    finally:
        gated.gate.set()
        server.stop()
