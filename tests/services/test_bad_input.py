"""The rule "bad input always gets a clear error (the right gRPC status, a message naming the field) and
nothing is lost", end to end: one real server on loopback hosting all four services behind bearer auth
and a small receive limit, tiny random checkpoints, an embedded Redis, and the real SDK exceptions.

Each case is data: a call, the exception class it must raise and the proto path its field violation
must name. After every case the server still serves a valid request, the inference engine has nothing
running and every KV block back in the pool, and no training job was stored. Cases already covered
by ``test_services_*.py`` / ``test_engine.py`` are not repeated here.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from services_fixtures import BackgroundApp, tiny_checkpoints, wait_for

from internlm2.core.engine import EngineConfig
from internlm2.services.common import GrpcApp, ServerConfig
from internlm2.services.inference import InferenceService
from internlm2.services.local_stack import EmbeddedRedis
from internlm2.services.reward import RewardService
from internlm2.services.tokenizer import TokenizerService
from internlm2.services.training import TrainingService
from internlm2.v1 import (
    common_pb2,
    inference_pb2,
    inference_pb2_grpc,
    reward_pb2,
    reward_pb2_grpc,
    tokenizer_pb2,
    tokenizer_pb2_grpc,
    training_pb2,
    training_pb2_grpc,
)
from internlm2_client import (
    FinishReason,
    InferenceClient,
    InvalidArgumentError,
    Preference,
    ResourceExhaustedError,
    RewardClient,
    TokenizerClient,
    TrainingClient,
    UnauthenticatedError,
)
from internlm2_client.errors import InternLM2Error, from_rpc_error

pytestmark = pytest.mark.timeout(90)

TOKEN = "bad-input-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
MAX_MODEL_LEN = 1024  # the default max_new_tokens (256) fits after a chat prompt with tools
RECEIVE_LIMIT = 256 * 1024
SERVICES = (
    "internlm2.v1.TokenizerService",
    "internlm2.v1.InferenceService",
    "internlm2.v1.RewardService",
    "internlm2.v1.TrainingService",
)


# ---- one server with every service --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def platform(tmp_path_factory):
    policy, reward = tiny_checkpoints(tmp_path_factory.mktemp("tiny"))
    redis = EmbeddedRedis(tmp_path_factory.mktemp("redis"))
    inference = InferenceService(
        policy,
        engine_config=EngineConfig(
            max_num_seqs=4, max_num_batched_tokens=256, num_gpu_blocks=128, max_model_len=MAX_MODEL_LEN
        ),
    )
    services = [
        TokenizerService(policy),
        inference,
        RewardService(reward),
        TrainingService(redis.url, str(tmp_path_factory.mktemp("jobs"))),
    ]
    config = ServerConfig(
        "platform", host="127.0.0.1", port=0, auth_token=TOKEN, max_receive_message_bytes=RECEIVE_LIMIT
    )
    server = BackgroundApp(GrpcApp(config, services)).start()
    server.engine = lambda: inference.servicer.engine
    try:
        yield server
    finally:
        server.stop()
        redis.close()


@pytest.fixture(scope="module")
def clients(platform):
    opened = {
        "tokenizer": TokenizerClient(platform.address, token=TOKEN, timeout=30, retry=None),
        "inference": InferenceClient(platform.address, token=TOKEN, timeout=30, retry=None),
        "reward": RewardClient(platform.address, token=TOKEN, timeout=30, retry=None),
        "training": TrainingClient(platform.address, token=TOKEN, timeout=30, retry=None),
    }
    yield opened
    for client in opened.values():
        client.close()


@pytest.fixture(scope="module")
def stubs(platform):
    """Generated stubs for requests the SDK refuses to build (malformed JSON, raw oneofs)."""
    channel = grpc.insecure_channel(platform.address)
    yield {
        "inference": inference_pb2_grpc.InferenceServiceStub(channel),
        "tokenizer": tokenizer_pb2_grpc.TokenizerServiceStub(channel),
        "reward": reward_pb2_grpc.RewardServiceStub(channel),
        "training": training_pb2_grpc.TrainingServiceStub(channel),
        "channel": channel,
    }
    channel.close()


def raw(call, request):
    """A stub call with the bearer token; RpcErrors become the SDK's exceptions, as the clients do."""
    try:
        return call(request, timeout=30, metadata=AUTH)
    except grpc.RpcError as exc:
        raise from_rpc_error(exc) from None


@dataclass(frozen=True)
class Case:
    """``call(clients, stubs)`` must raise ``error`` whose first field violation is ``field``."""

    id: str
    call: Callable[[dict, dict], Any]
    field: str | None
    error: type[InternLM2Error] = InvalidArgumentError


def params(cases: list[Case]):
    return pytest.mark.parametrize("case", cases, ids=[c.id for c in cases])


def expect(case: Case, clients, stubs) -> InternLM2Error:
    with pytest.raises(case.error) as info:
        case.call(clients, stubs)
    if case.field is not None:
        assert info.value.field == case.field, (case.id, str(info.value))
        # The message names the field too, for people reading logs rather than details.
        assert case.field in info.value.message, info.value.message
    return info.value


def engine_idle(platform) -> bool:
    s = platform.engine().stats()
    return s.num_running == 0 and s.num_waiting == 0 and s.num_free_blocks == s.num_total_blocks


def assert_inference_still_serves(platform, clients):
    assert wait_for(lambda: engine_idle(platform), 10), platform.engine().stats()
    result = clients["inference"].generate("still fine", max_new_tokens=2, temperature=0.0, ignore_eos=True)
    assert result.finish_reason == FinishReason.LENGTH and len(result.token_ids) == 2
    assert wait_for(lambda: engine_idle(platform), 10), platform.engine().stats()


# ---- inference ----------------------------------------------------------------------------------------------
def gen(prompt: str | None = "hi", **kwargs):
    return lambda c, s: c["inference"].generate(prompt, **kwargs)


def gen_stream(prompt: str | None = "hi", **kwargs):
    return lambda c, s: list(c["inference"].generate_stream(prompt, **kwargs))


def gen_raw(**request):
    return lambda c, s: raw(s["inference"].Generate, inference_pb2.GenerateRequest(**request))


def chat(*messages, tools=()):
    return inference_pb2.ChatInput(messages=list(messages), tools=list(tools))


USER = common_pb2.ChatMessage(role="user", content="hello")

INFERENCE_CASES = [
    Case("top_k negative", gen(top_k=-1), "sampling.top_k"),
    Case("min_p negative", gen(min_p=-0.1), "sampling.min_p"),
    Case("min_p above 1", gen(min_p=1.5), "sampling.min_p"),
    Case("repetition_penalty 0", gen(repetition_penalty=0.0), "sampling.repetition_penalty"),
    Case("repetition_penalty negative", gen(repetition_penalty=-1.0), "sampling.repetition_penalty"),
    Case("presence_penalty above 2", gen(presence_penalty=2.5), "sampling.presence_penalty"),
    Case("frequency_penalty below -2", gen(frequency_penalty=-3.0), "sampling.frequency_penalty"),
    Case("temperature nan", gen(temperature=float("nan")), "sampling.temperature"),
    Case("temperature inf", gen(temperature=float("inf")), "sampling.temperature"),
    Case("top_p negative", gen(top_p=-0.5), "sampling.top_p"),
    Case("min_new_tokens above max_new_tokens", gen(max_new_tokens=4, min_new_tokens=9), "sampling.min_new_tokens"),
    Case("min_new_tokens negative", gen(min_new_tokens=-1), "sampling.min_new_tokens"),
    Case("logprobs negative", gen(logprobs=-1), "sampling.logprobs"),
    Case("prompt_logprobs too many", gen(prompt_logprobs=21), "sampling.prompt_logprobs"),
    Case("seed negative", gen(seed=-1, max_new_tokens=2), "sampling.seed"),
    Case("stop string empty", gen(stop=["ok", ""]), "sampling.stop"),
    Case("too many stop strings", gen(stop=[f"s{i}" for i in range(1000)], max_new_tokens=2), "sampling.stop"),
    Case("stop string too long", gen(stop=["x" * 5000], max_new_tokens=2), "sampling.stop"),
    Case("stop token id negative", gen(stop_token_ids=[-1]), "sampling.stop_token_ids.ids"),
    Case("stop token id outside the vocabulary", gen(stop_token_ids=[10**6]), "sampling.stop_token_ids.ids"),
    # The prompt fits, but prompt + max_new_tokens does not (the unset default 256 included).
    Case(
        "max_new_tokens past the context",
        gen(token_ids=[5] * 900, prompt=None, max_new_tokens=200),
        "sampling.max_new_tokens",
    ),
    Case("default max_new_tokens past the context", gen(token_ids=[5] * 800, prompt=None), "sampling.max_new_tokens"),
    Case("prompt exactly the context", gen(token_ids=[5] * MAX_MODEL_LEN, prompt=None), "token_ids.ids"),
    Case("negative token id", gen(token_ids=[1, -7], prompt=None), "token_ids.ids"),
    Case("empty token ids", gen(token_ids=[], prompt=None), "token_ids.ids"),
    Case("empty messages", gen(messages=[], prompt=None), "chat.messages"),
    Case("empty role", gen(messages=[{"role": "", "content": "a"}], prompt=None), "chat.messages[0].role"),
    Case(
        "chat longer than the context",
        gen(messages=[{"role": "user", "content": "word " * 3000}], prompt=None),
        "chat.messages",
    ),
    Case(
        "tool parameters not JSON",
        gen_raw(chat=chat(USER, tools=[common_pb2.Tool(name="f", parameters_json="{")])),
        "chat.tools[0].parameters_json",
    ),
    Case(
        "tool parameters not an object",
        gen_raw(chat=chat(USER, tools=[common_pb2.Tool(name="f", parameters_json="[1, 2]")])),
        "chat.tools[0].parameters_json",
    ),
    Case(
        "tool schema with a bad type",
        gen_raw(chat=chat(USER, tools=[common_pb2.Tool(name="f", parameters_json='{"type": 5}')])),
        "chat.tools[0].parameters_json",
    ),
    Case(
        "tool schema with a bad nested type",
        gen_raw(
            chat=chat(
                USER,
                tools=[
                    common_pb2.Tool(
                        name="f", parameters_json='{"type": "object", "properties": {"city": {"type": "text"}}}'
                    )
                ],
            )
        ),
        "chat.tools[0].parameters_json",
    ),
    Case(
        "tool schema with required not a list",
        gen_raw(chat=chat(USER, tools=[common_pb2.Tool(name="f", parameters_json='{"required": "city"}')])),
        "chat.tools[0].parameters_json",
    ),
    Case("tool with empty name", gen_raw(chat=chat(USER, tools=[common_pb2.Tool(name="")])), "chat.tools[0].name"),
    Case(
        "tool call arguments not JSON",
        gen_raw(
            chat=chat(
                USER,
                common_pb2.ChatMessage(
                    role="assistant", tool_calls=[common_pb2.ToolCall(name="f", arguments_json="{oops")]
                ),
            )
        ),
        "chat.messages[1].tool_calls[0].arguments_json",
    ),
    Case(
        "empty request_id for Abort", lambda c, s: raw(s["inference"].Abort, inference_pb2.AbortRequest()), "request_id"
    ),
    Case("bad sampling in a stream", gen_stream(top_k=-3), "sampling.top_k"),
    Case("stream prompt longer than the context", gen_stream("word " * 3000), "prompt"),
    Case("oversized message", gen("x" * (RECEIVE_LIMIT + 1024)), None, ResourceExhaustedError),
]


@params(INFERENCE_CASES)
def test_inference_bad_input(platform, clients, stubs, case):
    expect(case, clients, stubs)
    assert_inference_still_serves(platform, clients)


def test_prompt_and_messages_together_are_refused_by_the_sdk(platform, clients):
    # A proto oneof cannot carry both on the wire (the last one set wins), so the SDK refuses the
    # ambiguous call itself, before anything is sent.
    with pytest.raises(ValueError, match="exactly one of prompt, messages, token_ids"):
        clients["inference"].generate("hi", messages=[{"role": "user", "content": "hi"}])
    request = inference_pb2.GenerateRequest(prompt="hi")
    request.chat.messages.add(role="user", content="hi")
    assert request.WhichOneof("input") == "chat" and not request.prompt


def test_limits_and_rich_tool_schemas_are_accepted(platform, clients):
    """The edges of what is allowed still run: the checks refuse only what they must."""
    from internlm2.core.engine.params import MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS

    for edge in (
        dict(top_k=10**6),
        dict(temperature=1e-30),
        dict(min_p=1.0),
        dict(repetition_penalty=1e-30),
        dict(temperature=1e30, presence_penalty=2.0, frequency_penalty=-2.0),
        dict(seed=2**63 - 1),
    ):
        result = clients["inference"].generate("hi", max_new_tokens=2, ignore_eos=True, **edge)
        assert len(result.token_ids) == 2, edge
    stops = [f"{i:02d}" + "~" * (MAX_STOP_STRING_CHARS - 2) for i in range(MAX_STOP_STRINGS)]
    result = clients["inference"].generate("hi", stop=stops, max_new_tokens=3, ignore_eos=True, temperature=0.0)
    assert len(result.token_ids) == 3
    tool = {
        "name": "search",
        "description": "Search the web",
        "parameters": {
            "type": "object",
            "properties": {
                "query": {"type": "string", "description": "what to look for"},
                "limit": {"type": ["integer", "null"]},
                "filters": {"type": "array", "items": {"anyOf": [{"type": "string"}, {"enum": [1, 2]}]}},
                "extra": {"type": "object", "additionalProperties": True},
            },
            "required": ["query"],
        },
    }
    messages = [{"role": "user", "content": "find cats"}]
    result = clients["inference"].generate(messages=messages, tools=[tool], max_new_tokens=2, ignore_eos=True)
    assert len(result.token_ids) == 2
    prompt = clients["tokenizer"].apply_chat_template(messages, tools=[tool])
    assert "search" in prompt.text
    assert_inference_still_serves(platform, clients)


def test_a_duplicate_live_request_id_leaves_the_original_untouched(platform, clients):
    from internlm2_client import AlreadyExistsError

    stream = clients["inference"].generate_stream(
        "original", request_id="live-dup", max_new_tokens=40, temperature=0.0, ignore_eos=True
    )
    first = next(stream)
    for attempt in (
        lambda: list(clients["inference"].generate_stream("copy", request_id="live-dup", max_new_tokens=2)),
        lambda: clients["inference"].generate("copy", request_id="live-dup", max_new_tokens=2),
    ):
        with pytest.raises(AlreadyExistsError) as info:
            attempt()
        assert info.value.reason == "DUPLICATE_REQUEST_ID"
    rest = list(stream)
    result = stream.result()
    assert result.request_id == "live-dup" and result.finish_reason == FinishReason.LENGTH
    assert len(result.token_ids) == 40 == len(first.token_ids) + sum(len(d.token_ids) for d in rest)
    assert_inference_still_serves(platform, clients)


def test_abort_of_an_unknown_id_is_a_documented_false(platform, clients):
    assert clients["inference"].abort("never-started") is False
    assert_inference_still_serves(platform, clients)


def test_a_rejected_request_id_can_be_used_again(platform, clients):
    """The id of a request that was refused is not left marked live."""
    with pytest.raises(InvalidArgumentError):
        clients["inference"].generate("hi", request_id="reuse-me", top_p=0.0)
    result = clients["inference"].generate("hi", request_id="reuse-me", max_new_tokens=2, ignore_eos=True)
    assert result.request_id == "reuse-me" and len(result.token_ids) == 2
    assert clients["inference"].abort("reuse-me") is False  # finished: not live any more
    assert_inference_still_serves(platform, clients)


# ---- tokenizer ----------------------------------------------------------------------------------------------
def tok_raw(method: str, **request):
    request_cls = getattr(tokenizer_pb2, f"{method}Request")
    return lambda c, s: raw(getattr(s["tokenizer"], method), request_cls(**request))


TOKENIZER_CASES = [
    Case(
        "empty conversation to count",
        lambda c, s: c["tokenizer"].count_tokens(conversations=[[]]),
        "conversations[0].messages",
    ),
    Case("negative token id to detokenize", lambda c, s: c["tokenizer"].detokenize([[1, -1]]), "sequences[0].ids"),
    Case(
        "chat template with an empty role",
        lambda c, s: c["tokenizer"].apply_chat_template([{"role": "", "content": "a"}]),
        "messages[0].role",
    ),
    Case(
        "chat template tool parameters not JSON",
        tok_raw("ApplyChatTemplate", messages=[USER], tools=[common_pb2.Tool(name="f", parameters_json="nope")]),
        "tools[0].parameters_json",
    ),
    Case(
        "chat template bad tool name",
        lambda c, s: c["tokenizer"].apply_chat_template([{"role": "user", "content": "a"}], tools=[{"name": "a b"}]),
        "tools[0].name",
    ),
]


@params(TOKENIZER_CASES)
def test_tokenizer_bad_input(clients, stubs, case):
    expect(case, clients, stubs)
    assert clients["tokenizer"].tokenize(["still fine"])[0].token_ids


# ---- reward -------------------------------------------------------------------------------------------------
PROMPT = [{"role": "user", "content": "What is 2 + 2?"}]
ANSWERED = [*PROMPT, {"role": "assistant", "content": "4"}]

REWARD_CASES = [
    Case("empty conversation", lambda c, s: c["reward"].score([ANSWERED, []]), "conversations[1].messages"),
    Case(
        "empty role in a conversation",
        lambda c, s: c["reward"].score([[{"role": "", "content": "x"}]]),
        "conversations[0].messages[0].role",
    ),
    # The condition alone overflows the context: the fault is the condition's, not the conversation's.
    Case(
        "condition longer than the context",
        lambda c, s: c["reward"].score([ANSWERED], condition="rule " * 3000),
        "condition",
    ),
    Case(
        "compare condition longer than the context",
        lambda c, s: c["reward"].compare(PROMPT, "4", "5", condition="rule " * 3000),
        "condition",
    ),
    Case(
        "oversized message",
        lambda c, s: c["reward"].score([[{"role": "user", "content": "x" * RECEIVE_LIMIT}]]),
        None,
        ResourceExhaustedError,
    ),
    Case(
        "rank with an unknown prompt role",
        lambda c, s: c["reward"].rank([{"role": "oracle", "content": "x"}], ["a", "b"]),
        "prompt[0].role",
    ),
]


@params(REWARD_CASES)
def test_reward_bad_input(clients, stubs, case):
    expect(case, clients, stubs)
    assert len(clients["reward"].score([ANSWERED])) == 1


def test_compare_identical_responses_is_a_tie(clients):
    """Not an error: two equal candidates are equally good; the contract's answer is TIE, margin 0."""
    result = clients["reward"].compare(PROMPT, "4", "4")
    assert result.preferred == Preference.TIE and result.margin == 0.0 and result.score_a == result.score_b


def test_rank_of_one_response_is_that_response(clients):
    """RankRequest documents "at least one": ranking a single candidate is valid and trivial."""
    ranking = clients["reward"].rank(PROMPT, ["4"])
    assert list(ranking.order) == [0] and len(ranking.scores) == 1
    assert ranking.scores[0] == pytest.approx(clients["reward"].score([ANSWERED])[0], abs=1e-5)


# ---- training -----------------------------------------------------------------------------------------------
PREPARE = {"sources": ["docs.jsonl"]}
SFT = {"data": "chat.jsonl", "max_length": 64}


def submit(*stages):
    return lambda c, s: c["training"].submit_job(list(stages))


def launch(section):
    return submit({"stage": "prepare_data", "config": {**PREPARE, "launch": section}})


TRAINING_CASES = [
    Case("empty stage name", submit({"stage": "", "config": PREPARE}), "stages[0].stage"),
    Case(
        "out-of-range value",
        submit({"stage": "prepare_data", "config": {**PREPARE, "min_chars": 0}}),
        "stages[0].config.min_chars",
    ),
    Case(
        "fractional integer",
        submit({"stage": "prepare_data", "config": {**PREPARE, "shard_tokens": 2048.5}}),
        "stages[0].config.shard_tokens",
    ),
    Case(
        "wrong type in a list",
        submit({"stage": "prepare_data", "config": {"sources": [1, {"a": 2}]}}),
        "stages[0].config.sources[0]",
    ),
    # JSON has no NaN / Infinity: the Struct carries them but the config cannot hold them.
    Case(
        "NaN value",
        submit({"stage": "prepare_data", "config": {**PREPARE, "min_chars": float("nan")}}),
        "stages[0].config.min_chars",
    ),
    Case(
        "infinite value nested in a list",
        submit({"stage": "prepare_data", "config": {"sources": ["a", {"deep": [float("-inf")]}]}}),
        "stages[0].config.sources[1].deep[0]",
    ),
    Case(
        "integer too large",
        submit({"stage": "prepare_data", "config": {**PREPARE, "min_chars": 1e300}}),
        "stages[0].config.min_chars",
    ),
    Case(
        "empty required list", submit({"stage": "prepare_data", "config": {"sources": []}}), "stages[0].config.sources"
    ),
    Case(
        "out-of-range value in the second stage",
        submit({"stage": "prepare_data", "config": PREPARE}, {"stage": "sft", "config": {**SFT, "lr": -1}}),
        "stages[1].config.lr",
    ),
    Case(
        "reference to an unknown stage",
        submit({"stage": "sft", "config": {**SFT, "model": "stage:nowhere"}}),
        "stages[0].config.model",
    ),
    Case(
        "reference to a later stage",
        submit(
            {"stage": "sft", "config": {**SFT, "model": "stage:later"}},
            {"stage": "prepare_data", "name": "later", "config": PREPARE},
        ),
        "stages[0].config.model",
    ),
    Case(
        "reference to itself",
        submit({"stage": "sft", "name": "me", "config": {**SFT, "data": "stage:me"}}),
        "stages[0].config.data",
    ),
    Case(
        "duplicate stage names",
        submit(
            {"stage": "prepare_data", "name": "a", "config": PREPARE},
            {"stage": "prepare_data", "name": "a", "config": PREPARE},
        ),
        "stages[1].name",
    ),
    Case("bad stage name", submit({"stage": "prepare_data", "name": "has space", "config": PREPARE}), "stages[0].name"),
    # The runtime's own nested section, ``launch``, is validated the same way.
    Case("nested unknown key", launch({"bogus": 1}), "stages[0].config.launch.bogus"),
    Case("nested out-of-range value", launch({"nproc_per_node": 0}), "stages[0].config.launch.nproc_per_node"),
    Case("nested unknown choice", launch({"launcher": "mpi"}), "stages[0].config.launch.launcher"),
    Case("nested section not an object", launch("fast"), "stages[0].config.launch"),
    Case("nested map value of the wrong type", launch({"env": {"A": 1}}), "stages[0].config.launch.env.A"),
    Case("page size too large", lambda c, s: c["training"].list_jobs(page_size=5000), "page_size"),
    Case("malformed page token", lambda c, s: c["training"].list_jobs(page_token="not-a-token"), "page_token"),
    Case(
        "unknown job state",
        lambda c, s: raw(s["training"].ListJobs, training_pb2.ListJobsRequest(states=[999])),
        "states[0]",
    ),
    Case(
        "negative watch sequence",
        lambda c, s: list(c["training"].watch_job("0123456789abcdef", after_sequence=-1)),
        "after_sequence",
    ),
    Case("empty job id to cancel", lambda c, s: c["training"].cancel_job(""), "job_id"),
]


@params(TRAINING_CASES)
def test_training_bad_input_stores_nothing(clients, stubs, case):
    before = [j.job_id for j in clients["training"].iter_jobs(page_size=1000)]
    expect(case, clients, stubs)
    assert [j.job_id for j in clients["training"].iter_jobs(page_size=1000)] == before
    assert clients["training"].list_stages()


def test_training_reports_every_problem_at_once(clients):
    with pytest.raises(InvalidArgumentError) as info:
        clients["training"].submit_job(
            [
                {"stage": "nope"},
                {"stage": "prepare_data", "config": {"min_chars": 0, "bogus": 1}},
                {"stage": "sft", "config": {**SFT, "model": "stage:nope"}},
            ]
        )
    fields = {v.field for v in info.value.violations}
    assert {
        "stages[0].stage",
        "stages[1].config.sources",
        "stages[1].config.min_chars",
        "stages[1].config.bogus",
        "stages[2].config.model",
    } <= fields, fields


def test_a_rejected_submit_does_not_claim_its_idempotency_key(clients):
    key = "bad-input-idem"
    with pytest.raises(InvalidArgumentError):
        clients["training"].submit_job([{"stage": "prepare_data", "config": {}}], idempotency_key=key)
    # No worker runs in this module: the job stays QUEUED until it is cancelled.
    submitted = clients["training"].submit_job([{"stage": "prepare_data", "config": PREPARE}], idempotency_key=key)
    assert submitted.created and submitted.job.idempotency_key == key
    assert clients["training"].cancel_job(submitted.job.job_id).state.name == "CANCELLED"


# ---- JSON nested past the bound, on every RPC that reads JSON text -------------------------------------------
# json.loads alone recurses once per level and fails with RecursionError (which was INTERNAL); the services
# measure the depth first and refuse anything deeper than MAX_JSON_DEPTH, naming the field.
DEEP_JSON = '{"a": ' + "[" * 100_000 + "]" * 100_000 + "}"
ONE_TOO_DEEP = "[" * 65 + "]" * 65


def deep_tool(text=DEEP_JSON):
    return common_pb2.Tool(name="f", parameters_json=text)


def deep_call(text=DEEP_JSON):
    return common_pb2.ChatMessage(role="assistant", tool_calls=[common_pb2.ToolCall(name="f", arguments_json=text)])


def raw_stream(call, request):
    return raw(lambda r, **kw: list(call(r, **kw)), request)


def deep_json_cases(text: str, tag: str) -> list[Case]:
    tool, called = deep_tool(text), deep_call(text)
    conversation = common_pb2.Conversation(messages=[USER, called])
    return [
        Case(
            f"{tag} tokenizer ApplyChatTemplate tools",
            tok_raw("ApplyChatTemplate", messages=[USER], tools=[tool]),
            "tools[0].parameters_json",
        ),
        Case(
            f"{tag} tokenizer ApplyChatTemplate tool call",
            tok_raw("ApplyChatTemplate", messages=[USER, called]),
            "messages[1].tool_calls[0].arguments_json",
        ),
        Case(
            f"{tag} tokenizer CountTokens tool call",
            tok_raw("CountTokens", conversations=[conversation]),
            "conversations[0].messages[1].tool_calls[0].arguments_json",
        ),
        Case(
            f"{tag} inference Generate tools",
            gen_raw(chat=chat(USER, tools=[tool])),
            "chat.tools[0].parameters_json",
        ),
        Case(
            f"{tag} inference Generate tool call",
            gen_raw(chat=chat(USER, called)),
            "chat.messages[1].tool_calls[0].arguments_json",
        ),
        Case(
            f"{tag} inference GenerateStream tools",
            lambda c, s: raw_stream(
                s["inference"].GenerateStream, inference_pb2.GenerateStreamRequest(chat=chat(USER, tools=[tool]))
            ),
            "chat.tools[0].parameters_json",
        ),
        Case(
            f"{tag} inference GenerateStream tool call",
            lambda c, s: raw_stream(
                s["inference"].GenerateStream, inference_pb2.GenerateStreamRequest(chat=chat(USER, called))
            ),
            "chat.messages[1].tool_calls[0].arguments_json",
        ),
        Case(
            f"{tag} reward Score tool call",
            lambda c, s: raw(s["reward"].Score, reward_pb2.ScoreRequest(conversations=[conversation])),
            "conversations[0].messages[1].tool_calls[0].arguments_json",
        ),
        Case(
            f"{tag} reward Compare tool call",
            lambda c, s: raw(
                s["reward"].Compare, reward_pb2.CompareRequest(prompt=[USER, called], response_a="a", response_b="b")
            ),
            "prompt[1].tool_calls[0].arguments_json",
        ),
        Case(
            f"{tag} reward Rank tool call",
            lambda c, s: raw(s["reward"].Rank, reward_pb2.RankRequest(prompt=[USER, called], responses=["a"])),
            "prompt[1].tool_calls[0].arguments_json",
        ),
    ]


@params(deep_json_cases(DEEP_JSON, "100,000 levels") + deep_json_cases(ONE_TOO_DEEP, "65 levels"))
def test_json_nested_too_deep_is_invalid_naming_the_field(platform, clients, stubs, case):
    error = expect(case, clients, stubs)
    assert "levels" in error.message and "64" in error.message, error.message
    assert_inference_still_serves(platform, clients)


def test_json_nested_to_the_bound_is_accepted(clients):
    """64 levels (the bound) still render: the check refuses only what it must."""
    nested = "[" * 63 + "]" * 63  # the arguments object is level 1
    call = {"name": "f", "arguments_json": json.dumps({"a": json.loads(nested)})}
    rendered = clients["tokenizer"].apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "tool_calls": [call]}]
    )
    assert nested in rendered.text.replace(" ", "")


# ---- bytes protobuf cannot parse ----------------------------------------------------------------------------
MARK = "\u0001MARK"  # replaced on the wire by bytes that are not UTF-8, same length (framing stays valid)


def corrupt(message) -> bytes:
    data = message.SerializeToString()
    assert data.count(b"\x01MARK") == 1
    return data.replace(b"\x01MARK", b"\xff\xfeARK")


def send_bytes(method: str, payload: bytes, *, stream: bool = False, metadata=AUTH):
    def call(c, s):
        make = s["channel"].unary_stream if stream else s["channel"].unary_unary
        rpc = make(method, request_serializer=lambda b: b, response_deserializer=lambda b: b)
        try:
            result = rpc(payload, timeout=30, metadata=metadata)
            return list(result) if stream else result
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    return call


UNDECODABLE_CASES = [
    Case(
        "tokenizer text not UTF-8",
        send_bytes(
            "/internlm2.v1.TokenizerService/Tokenize", corrupt(tokenizer_pb2.TokenizeRequest(texts=["a", MARK]))
        ),
        "texts[1]",
    ),
    Case(
        "inference stream prompt not UTF-8",
        send_bytes(
            "/internlm2.v1.InferenceService/GenerateStream",
            corrupt(inference_pb2.GenerateStreamRequest(prompt=MARK)),
            stream=True,
        ),
        "prompt",
    ),
    Case(
        "inference stop string not UTF-8",
        send_bytes(
            "/internlm2.v1.InferenceService/Generate",
            corrupt(
                inference_pb2.GenerateRequest(prompt="hi", sampling=inference_pb2.SamplingParams(stop=["x", MARK]))
            ),
        ),
        "sampling.stop[1]",
    ),
    Case(
        "reward nested role not UTF-8",
        send_bytes(
            "/internlm2.v1.RewardService/Score",
            corrupt(
                reward_pb2.ScoreRequest(
                    conversations=[
                        common_pb2.Conversation(messages=[USER]),
                        common_pb2.Conversation(messages=[USER, common_pb2.ChatMessage(role=MARK)]),
                    ]
                )
            ),
        ),
        "conversations[1].messages[1].role",
    ),
    Case(
        "training stage name not UTF-8",
        send_bytes(
            "/internlm2.v1.TrainingService/SubmitJob",
            corrupt(training_pb2.SubmitJobRequest(stages=[training_pb2.StageSpec(stage=MARK)])),
        ),
        "stages[0].stage",
    ),
    Case("truncated string", send_bytes("/internlm2.v1.TokenizerService/Tokenize", b"\x0a\x05ab"), "texts[0]"),
    Case("a varint that never ends", send_bytes("/internlm2.v1.RewardService/Rank", b"\xff" * 12), None),
]


def _length_delimited(number: int, payload: bytes) -> bytes:
    def varint(value: int) -> bytes:
        out = bytearray()
        while True:
            out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
            value >>= 7
            if not value:
                return bytes(out)

    return varint(number << 3 | 2) + varint(len(payload)) + payload


def struct_nested(levels: int) -> bytes:
    """A google.protobuf.Struct {"a": {"a": ...}} ``levels`` deep (three messages per level), built by
    hand: protobuf itself refuses to build or copy one past its recursion limit."""
    data = b""
    for _ in range(levels):
        value = _length_delimited(5, data)  # Value.struct_value
        data = _length_delimited(1, _length_delimited(1, b"a") + _length_delimited(2, value))  # Struct.fields
    return data


def submit_with_config(config: bytes) -> bytes:
    spec_fields = training_pb2.StageSpec.DESCRIPTOR.fields_by_name
    spec = _length_delimited(spec_fields["stage"].number, b"prepare_data")
    spec += _length_delimited(spec_fields["config"].number, config)
    return _length_delimited(training_pb2.SubmitJobRequest.DESCRIPTOR.fields_by_name["stages"].number, spec)


def test_a_config_nested_past_protobufs_limit_names_the_config(clients, stubs):
    case = Case(
        "stage config nested past protobuf's limit",
        send_bytes("/internlm2.v1.TrainingService/SubmitJob", submit_with_config(struct_nested(150))),
        "stages[0].config",
    )
    error = expect(case, clients, stubs)
    assert "nested deeper than" in error.message
    # Within the limit the same shape is just a config (refused by the stage's schema, not by the parser).
    with pytest.raises(InvalidArgumentError) as shallow:
        send_bytes("/internlm2.v1.TrainingService/SubmitJob", submit_with_config(struct_nested(20)))(clients, stubs)
    assert shallow.value.field.startswith("stages[0].config"), shallow.value.field
    assert "nested deeper" not in shallow.value.message


@params(UNDECODABLE_CASES)
def test_undecodable_request_is_invalid_argument(platform, clients, stubs, case):
    error = expect(case, clients, stubs)
    if case.field is None:  # the message's own framing is broken: no field to name
        assert "not a valid internlm2.v1." in error.message and error.reason == "MALFORMED_REQUEST", error.message
    else:
        assert error.violations[0].reason == "MALFORMED_FIELD", error.violations
        assert ("UTF-8" in error.message) == ("UTF-8" in case.id), error.message
    assert "Error" not in error.message  # no exception class names
    assert_inference_still_serves(platform, clients)


def test_undecodable_request_without_a_token_is_unauthenticated(clients, stubs):
    case = Case(
        "no token",
        send_bytes("/internlm2.v1.TokenizerService/Tokenize", b"\xff" * 12, metadata=()),
        None,
        UnauthenticatedError,
    )
    expect(case, clients, stubs)


# ---- auth ---------------------------------------------------------------------------------------------------
AUTH_CALLS = {
    "tokenizer": lambda c: c.tokenize(["hi"]),
    "inference": lambda c: c.generate("hi", max_new_tokens=1),
    "inference-stream": lambda c: list(c.generate_stream("hi", max_new_tokens=1)),
    "inference-abort": lambda c: c.abort("x"),
    "reward": lambda c: c.score([ANSWERED]),
    "training": lambda c: c.list_jobs(),
    "training-watch": lambda c: list(c.watch_job("0123456789abcdef")),
    # Credentials are checked before the request is looked at: bad input without a token says nothing
    # about the input.
    "inference-bad-input": lambda c: c.generate("hi", top_p=0.0),
    "training-bad-input": lambda c: c.submit_job([{"stage": "nope"}]),
}
CLIENT_OF = {
    "tokenizer": TokenizerClient,
    "inference": InferenceClient,
    "reward": RewardClient,
    "training": TrainingClient,
}


@pytest.mark.parametrize("token", [None, "wrong-token", f"{TOKEN}x", ""], ids=["none", "wrong", "suffix", "empty"])
@pytest.mark.parametrize("call", AUTH_CALLS, ids=list(AUTH_CALLS))
def test_wrong_or_no_token_is_unauthenticated(platform, clients, call, token):
    jobs_before = [j.job_id for j in clients["training"].iter_jobs(page_size=1000)]
    client_cls = CLIENT_OF[call.split("-")[0]]
    with client_cls(platform.address, token=token, timeout=30, retry=None) as client:
        with pytest.raises(UnauthenticatedError) as info:
            AUTH_CALLS[call](client)
        assert "bearer token" in info.value.message
    assert [j.job_id for j in clients["training"].iter_jobs(page_size=1000)] == jobs_before
    assert wait_for(lambda: engine_idle(platform), 10)


@pytest.mark.parametrize("service", ["", *SERVICES])
def test_health_needs_no_token(platform, service):
    with grpc.insecure_channel(platform.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        status = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
    assert status == health_pb2.HealthCheckResponse.SERVING


def test_generated_text_nesting_without_end_is_not_a_tool_call():
    """The model's output is parsed for tool calls after every generation; text that nests deeper than
    Python's recursion limit is left as text (it was a RecursionError, so INTERNAL, in Generate)."""
    from internlm2.core.tokenizer import parse_tool_calls

    for body in ("[" * 100_000 + "]" * 100_000, '{"name": "f", "parameters": "' + "[" * 5000 + "]" * 5000 + '"}'):
        content, calls = parse_tool_calls(f"<|action_start|><|plugin|>\n{body}<|action_end|>")
        assert calls == [] and body in content
