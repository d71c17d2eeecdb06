"""InferenceService on a real server on loopback, a tiny random checkpoint, through the SDK: every RPC,
streaming, tool-use prompts, logprobs, cancellation and deadlines freeing the engine's blocks, 64
concurrent streams, overload, bad input (each with its status and field), and the vLLM-style metrics."""

from __future__ import annotations

import concurrent.futures
import time
import urllib.request

import pytest
from services_fixtures import BackgroundApp, tiny_checkpoints, wait_for

from internlm2.core import InternLM2ForCausalLM
from internlm2.core.engine import EngineConfig
from internlm2.core.generate import greedy_generate
from internlm2.core.tokenizer import InternLM2Tokenizer
from internlm2.services.common import GrpcApp, ServerConfig
from internlm2.services.inference import InferenceService
from internlm2_client import (
    CancelledError,
    DeadlineExceededError,
    FinishReason,
    InferenceClient,
    InvalidArgumentError,
    ResourceExhaustedError,
    UnavailableError,
)

pytestmark = pytest.mark.timeout(120)

LONG = {"max_new_tokens": 1500, "ignore_eos": True, "temperature": 0.0}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    policy, _ = tiny_checkpoints(tmp_path_factory.mktemp("tiny"))
    return policy


@pytest.fixture(scope="module")
def loaded(checkpoint):
    return InternLM2ForCausalLM.from_pretrained(checkpoint), InternLM2Tokenizer.from_pretrained(checkpoint)


def _server(checkpoint, loaded, engine_config: EngineConfig, **config) -> BackgroundApp:
    model, tok = loaded
    service = InferenceService(checkpoint, engine_config=engine_config, model=model, tokenizer=tok)
    app = GrpcApp(ServerConfig("inference", host="127.0.0.1", port=0, metrics_port=0, **config), [service])
    return BackgroundApp(app).start()


@pytest.fixture(scope="module")
def server(checkpoint, loaded):
    server = _server(
        checkpoint,
        loaded,
        EngineConfig(max_num_seqs=64, max_num_batched_tokens=2048, num_gpu_blocks=1024, max_model_len=2048),
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(server):
    with InferenceClient(server.address, timeout=60) as client:
        yield client


def engine_of(server):
    return server.app.services[0].servicer.engine


def assert_engine_idle(server, timeout=10.0):
    """Nothing running or waiting and every KV block back in the free pool."""
    engine = engine_of(server)

    def idle():
        s = engine.stats()
        return s.num_running == 0 and s.num_waiting == 0 and s.num_free_blocks == s.num_total_blocks

    assert wait_for(idle, timeout), engine.stats()


# ---- every RPC ---------------------------------------------------------------------------------------
def test_generate_greedy_equals_the_model_core(client, loaded):
    model, tok = loaded
    prompt = "The quick brown fox"
    result = client.generate(prompt, max_new_tokens=12, temperature=0.0, ignore_eos=True)
    expected = greedy_generate(model, tok.encode(prompt), 12)
    assert list(result.token_ids) == expected
    assert result.text == tok.decode(expected, skip_special_tokens=True)
    assert result.finish_reason == FinishReason.LENGTH
    assert result.usage.prompt_tokens == len(tok.encode(prompt))
    assert result.usage.completion_tokens == 12 and result.usage.total_tokens == result.usage.prompt_tokens + 12
    assert result.request_id
    assert result.metrics.e2e_latency_s > 0 and result.metrics.time_to_first_token_s > 0


def test_generate_stream_deltas_then_final(client):
    stream = client.generate_stream(
        "Hello world", max_new_tokens=10, temperature=0.0, ignore_eos=True, request_id="stream-1"
    )
    deltas = list(stream)
    result = stream.result()
    assert result.request_id == "stream-1"
    assert sum(len(d.token_ids) for d in deltas) == 10 == len(result.token_ids)
    assert "".join(d.text for d in deltas) == result.text
    assert result.finish_reason == FinishReason.LENGTH
    unary = client.generate("Hello world", max_new_tokens=10, temperature=0.0, ignore_eos=True)
    assert unary.token_ids == result.token_ids


def test_token_ids_input_and_seeded_sampling_is_reproducible(client, loaded):
    _, tok = loaded
    ids = tok.encode("Numbers 1 2 3")
    a = client.generate(token_ids=ids, max_new_tokens=16, temperature=1.0, seed=7, ignore_eos=True)
    b = client.generate(token_ids=ids, max_new_tokens=16, temperature=1.0, seed=7, ignore_eos=True)
    assert a.token_ids == b.token_ids and a.usage.prompt_tokens == len(ids)


def test_chat_with_tools_renders_the_plugin_prompt(client, loaded):
    _, tok = loaded
    messages = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Weather in Paris?"}]
    tool = {
        "name": "get_weather",
        "description": "Current weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    }
    result = client.generate(messages=messages, tools=[tool], max_new_tokens=4, temperature=0.0, ignore_eos=True)
    core_tools = [
        {
            "name": "get_weather",
            "description": "Current weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        }
    ]
    expected_prompt = tok.encode_chat(messages, tools=core_tools)
    assert result.usage.prompt_tokens == len(expected_prompt)
    without_tools = client.generate(messages=messages, max_new_tokens=1, temperature=0.0)
    assert without_tools.usage.prompt_tokens == len(tok.encode_chat(messages))
    # The output's tool calls are whatever parse_tool_calls finds in the raw text.
    from internlm2.core.tokenizer import parse_tool_calls

    content, calls = parse_tool_calls(result.raw_text)
    assert result.content == content and len(result.tool_calls) == len(calls)


def test_tool_calls_in_the_output_are_parsed_into_structured_calls(loaded):
    """The response assembly on the model's literal output: a plugin call and an interpreter call."""
    from internlm2.core.engine import RequestOutput
    from internlm2.services.inference.responses import Completion
    from internlm2.v1 import common_pb2, inference_pb2

    _, tok = loaded
    text = (
        'Let me check.<|action_start|><|plugin|>\n{"name": "get_weather", "parameters": {"city": "Paris"}}'
        "<|action_end|>\n<|action_start|><|interpreter|>\nprint(1)<|action_end|>\n<|im_end|>"
    )
    ids = tok.encode(text, add_bos=False)
    completion = Completion(tok, "r1", tok.encode("hi"))
    half = len(ids) // 2
    completion.add(RequestOutput("r1", ids[:half], tok.decode(ids[:half], skip_special_tokens=True), None, False))
    completion.add(
        RequestOutput(
            "r1",
            ids[half:],
            tok.decode(ids[half:], skip_special_tokens=True),
            None,
            True,
            finish_reason="eos",
            stop_reason=ids[-1],
            prompt_tokens=2,
            completion_tokens=len(ids),
        )
    )
    final = completion.final()
    assert final.finish_reason == inference_pb2.FINISH_REASON_EOS
    assert final.content == "Let me check."
    assert final.raw_text == text
    plugin, interpreter = final.tool_calls
    assert (plugin.kind, plugin.name, plugin.id) == (common_pb2.TOOL_KIND_PLUGIN, "get_weather", "call_0")
    assert plugin.arguments_json == '{"city": "Paris"}'
    assert (interpreter.kind, interpreter.name, interpreter.id) == (
        common_pb2.TOOL_KIND_INTERPRETER,
        "interpreter",
        "call_1",
    )
    assert interpreter.arguments_json == '{"code": "print(1)"}'


def test_logprobs_and_prompt_logprobs(client, loaded):
    _, tok = loaded
    prompt_ids = tok.encode("The assistant answers")
    result = client.generate(
        token_ids=prompt_ids, max_new_tokens=5, temperature=0.0, ignore_eos=True, logprobs=3, prompt_logprobs=2
    )
    assert len(result.logprobs) == 5
    for entry, token in zip(result.logprobs, result.token_ids):
        assert entry.token_id == token and entry.logprob <= 0 and len(entry.top) == 3
        # Greedy: the chosen token is the most likely one.
        assert entry.top[0].token_id == token
    assert [e.token_id for e in result.prompt_logprobs] == prompt_ids
    assert result.prompt_logprobs[0].logprob == 0.0 and all(len(e.top) == 2 for e in result.prompt_logprobs[1:])


def test_stop_strings_and_stop_token_ids(client):
    free = client.generate("The model", max_new_tokens=20, temperature=0.0, ignore_eos=True)
    stop_id = free.token_ids[3]
    by_id = client.generate("The model", max_new_tokens=20, temperature=0.0, stop_token_ids=[stop_id])
    assert by_id.finish_reason == FinishReason.STOP and by_id.stop_reason == str(stop_id)
    assert by_id.token_ids == free.token_ids[: free.token_ids.index(stop_id) + 1]
    stop_text = free.text[len(free.text) // 2 :][:3]
    if stop_text.strip():
        by_text = client.generate("The model", max_new_tokens=20, temperature=0.0, ignore_eos=True, stop=[stop_text])
        assert by_text.finish_reason == FinishReason.STOP and stop_text not in by_text.text


def test_model_info(client, checkpoint, loaded):
    model, tok = loaded
    info = client.model_info()
    assert info.model_name == checkpoint.name and info.model_path == str(checkpoint)
    assert info.architecture == "InternLM2ForCausalLM"
    assert info.vocab_size == model.config.vocab_size == tok.vocab_size
    assert info.num_parameters == sum(p.numel() for p in model.parameters())
    assert info.max_model_len == 2048 and info.max_num_seqs == 64 and info.num_kv_blocks == 1024
    assert info.block_size == 16 and info.dtype == "float32" and info.device == "cpu"
    assert list(info.default_stop_token_ids) == tok.stop_token_ids and info.server_version


# ---- cancellation, deadlines, abort ----------------------------------------------------------------------
def test_cancel_of_a_stream_frees_the_engines_blocks(server, client):
    stream = client.generate_stream("Cancel me", **LONG)
    first = [next(stream) for _ in range(3)]
    assert all(d.token_ids for d in first)
    assert engine_of(server).stats().num_free_blocks < engine_of(server).stats().num_total_blocks
    stream.cancel()
    with pytest.raises(CancelledError):
        next(stream)
    assert_engine_idle(server)


@pytest.mark.parametrize("streaming", [False, True])
def test_short_deadline_is_deadline_exceeded_and_frees_blocks(server, client, streaming):
    start = time.monotonic()
    with pytest.raises(DeadlineExceededError):
        if streaming:
            list(client.generate_stream("Too slow", timeout=0.4, **LONG))
        else:
            client.generate("Too slow", timeout=0.4, **LONG)
    assert time.monotonic() - start < 5
    assert_engine_idle(server)


def test_abort_by_request_id_from_another_call(server, client):
    stream = client.generate_stream("Abort me", request_id="to-abort", **LONG)
    next(stream)
    assert client.abort("to-abort") is True
    result = stream.result()
    assert result.finish_reason == FinishReason.CANCELLED and result.request_id == "to-abort"
    assert client.abort("to-abort") is False
    assert_engine_idle(server)


def test_64_concurrent_streams_all_complete(server, client):
    def one(i):
        stream = client.generate_stream(
            f"Stream number {i}", max_new_tokens=24, temperature=0.0, ignore_eos=True, request_id=f"c{i}"
        )
        deltas = list(stream)
        return stream.result(), deltas

    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        results = list(pool.map(one, range(64)))
    for i, (result, deltas) in enumerate(results):
        assert result.request_id == f"c{i}" and result.finish_reason == FinishReason.LENGTH
        assert len(result.token_ids) == 24 == sum(len(d.token_ids) for d in deltas)
    # Same prompt, same greedy output, however the batch was formed.
    again = client.generate("Stream number 5", max_new_tokens=24, temperature=0.0, ignore_eos=True)
    assert again.token_ids == results[5][0].token_ids
    assert_engine_idle(server)


def test_overloaded_engine_is_resource_exhausted(checkpoint, loaded):
    server = _server(
        checkpoint,
        loaded,
        EngineConfig(
            max_num_seqs=1, max_num_batched_tokens=64, num_gpu_blocks=256, max_queue_size=1, max_model_len=2048
        ),
    )
    try:
        with InferenceClient(server.address, timeout=60) as client:
            running = client.generate_stream("first", **LONG)
            next(running)  # scheduled: it holds the only slot
            waiting = client.generate_stream("second", **LONG)
            assert wait_for(lambda: engine_of(server).stats().num_waiting == 1, 10)
            with pytest.raises(ResourceExhaustedError) as info:
                client.generate("third", max_new_tokens=4)
            assert info.value.retry_delay is not None and info.value.reason == "OVERLOADED"
            running.cancel()
            waiting.cancel()
            assert_engine_idle(server)
            assert client.generate("fourth", max_new_tokens=2).usage.completion_tokens == 2
    finally:
        server.stop()


def test_streams_past_the_grace_period_are_cancelled_on_shutdown(checkpoint, loaded):
    server = _server(checkpoint, loaded, EngineConfig(max_num_seqs=4, num_gpu_blocks=512, max_model_len=2048))
    client = InferenceClient(server.address, timeout=60, retry=None)
    stream = client.generate_stream("forever", **LONG)
    next(stream)
    engine = engine_of(server)
    start = time.monotonic()
    server.stop(drain_s=0.2, grace_s=0.5)
    with pytest.raises((CancelledError, UnavailableError)):
        stream.result()
    assert time.monotonic() - start < 10
    stats = engine.stats()
    assert stats.num_running == 0 and stats.num_free_blocks == stats.num_total_blocks
    client.close()


# ---- bad input ---------------------------------------------------------------------------------------------
BAD_REQUESTS = [
    ("empty prompt", {"prompt": ""}, "prompt"),
    ("prompt longer than the context", {"prompt": "word " * 4000}, "prompt"),
    ("token ids longer than the context", {"token_ids": [5] * 2048}, "token_ids.ids"),
    ("token id outside the vocabulary", {"token_ids": [1, 10**6]}, "token_ids.ids"),
    ("max_new_tokens 0", {"prompt": "hi", "max_new_tokens": 0}, "sampling.max_new_tokens"),
    ("max_new_tokens negative", {"prompt": "hi", "max_new_tokens": -5}, "sampling.max_new_tokens"),
    ("max_new_tokens huge", {"prompt": "hi", "max_new_tokens": 10**9}, "sampling.max_new_tokens"),
    ("temperature < 0", {"prompt": "hi", "temperature": -0.5}, "sampling.temperature"),
    ("top_p 0", {"prompt": "hi", "top_p": 0.0}, "sampling.top_p"),
    ("top_p > 1", {"prompt": "hi", "top_p": 1.5}, "sampling.top_p"),
    (
        "unknown role",
        {"messages": [{"role": "user", "content": "a"}, {"role": "wizard", "content": "b"}]},
        "chat.messages[1].role",
    ),
    (
        "bad tool name",
        {"messages": [{"role": "user", "content": "a"}], "tools": [{"name": "no spaces allowed"}]},
        "chat.tools[0].name",
    ),
    ("logprobs too many", {"prompt": "hi", "logprobs": 99}, "sampling.logprobs"),
    ("n 0", {"prompt": "hi", "n": 0}, "sampling.n"),
    ("n too many", {"prompt": "hi", "n": 1000}, "sampling.n"),
    ("bad regex", {"prompt": "hi", "structured_output": {"regex": "(ab"}}, "sampling.structured_output.regex"),
    ("bad schema", {"prompt": "hi", "structured_output": {"json_schema": '{"type": 7}'}},
     "sampling.structured_output.json_schema"),
    ("bad grammar", {"prompt": "hi", "structured_output": {"grammar": "root ::= nowhere"}},
     "sampling.structured_output.grammar"),
    ("no structured kind", {"prompt": "hi", "structured_output": {}}, "sampling.structured_output"),
    ("best_of below n", {"prompt": "hi", "n": 3, "best_of": 2}, "sampling.best_of"),
]


@pytest.mark.parametrize("case,kwargs,field", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "stream"])
def test_bad_input_is_invalid_argument_naming_the_field(server, client, case, kwargs, field, streaming):
    kwargs = dict(kwargs)
    prompt = kwargs.pop("prompt", None)
    with pytest.raises(InvalidArgumentError) as info:
        if streaming:
            list(client.generate_stream(prompt, **kwargs))
        else:
            client.generate(prompt, **kwargs)
    assert info.value.field == field, (case, info.value)
    assert_engine_idle(server)


def test_request_without_input_names_the_oneof(server):
    """The SDK refuses to build such a request, so this one goes through the generated stub."""
    import grpc

    from internlm2.v1 import inference_pb2, inference_pb2_grpc
    from internlm2_client.errors import from_rpc_error

    with grpc.insecure_channel(server.address) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Generate(inference_pb2.GenerateRequest(), timeout=10)
    error = from_rpc_error(info.value)
    assert isinstance(error, InvalidArgumentError) and error.field == "input"


def test_nothing_is_lost_after_bad_input(server, client):
    result = client.generate("still works", max_new_tokens=3, temperature=0.0, ignore_eos=True)
    assert len(result.token_ids) == 3
    assert_engine_idle(server)


def test_duplicate_live_request_id_is_rejected(server, client):
    from internlm2_client import AlreadyExistsError

    stream = client.generate_stream("dup", request_id="dup-1", **LONG)
    next(stream)
    with pytest.raises(AlreadyExistsError):
        client.generate("dup", request_id="dup-1", max_new_tokens=2)
    stream.cancel()
    assert_engine_idle(server)



def test_concurrent_calls_sharing_an_x_request_id_each_get_their_own_id(server):
    """The gateway sends one x-request-id with every prompt of a batch: each call must get a live id of its
    own (one keeps the header's, the others fresh ones), never ALREADY_EXISTS for a header it did not set."""
    import grpc

    from internlm2.v1 import inference_pb2, inference_pb2_grpc

    with grpc.insecure_channel(server.address) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        sampling = inference_pb2.SamplingParams(max_new_tokens=16, temperature=0.0, ignore_eos=True)
        calls = [stub.Generate.future(inference_pb2.GenerateRequest(prompt=f"shared header {i}", sampling=sampling),
                                      metadata=[("x-request-id", "one-header")], timeout=60) for i in range(8)]
        ids = [call.result().request_id for call in calls]
    assert len(set(ids)) == 8 and "one-header" in ids
    assert_engine_idle(server)

# ---- metrics ---------------------------------------------------------------------------------------------------
def test_vllm_style_metrics(server, client, checkpoint):
    client.generate("metrics please", max_new_tokens=4, temperature=0.0, ignore_eos=True)
    stream = client.generate_stream("Cancel me", **LONG)  # a client cancel: finished_reason="cancelled"
    next(stream)
    stream.cancel()
    assert_engine_idle(server)
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.app.metrics_port}/metrics", timeout=5).read().decode()
    label = f'model_name="{checkpoint.name}"'
    for name in ("internlm2:num_requests_running", "internlm2:num_requests_waiting", "internlm2:kv_cache_usage_perc"):
        assert f"{name}{{{label}}}" in text, name
    for name in (
        "internlm2:time_to_first_token_seconds",
        "internlm2:inter_token_latency_seconds",
        "internlm2:e2e_request_latency_seconds",
        "internlm2:request_queue_time_seconds",
    ):
        assert f"{name}_count{{{label}}}" in text, name
        assert f"{name}_bucket{{le=" in text, name
    for name in ("internlm2:prompt_tokens_total", "internlm2:generation_tokens_total"):
        value = next(line for line in text.splitlines() if line.startswith(f"{name}{{{label}}}"))
        assert float(value.split()[-1]) > 0, name
    assert f'internlm2:request_success_total{{finished_reason="length",{label}}}' in text
    assert f'internlm2:request_success_total{{finished_reason="cancelled",{label}}}' in text


# ---- n > 1 and structured output -----------------------------------------------------------------------------
def test_n_choices_share_one_prompt_and_count_it_once(server, client):
    result = client.generate("Tell me three things", n=3, seed=4, max_new_tokens=6, ignore_eos=True)
    assert [c.index for c in result.choices] == [0, 1, 2]
    assert all(len(c.token_ids) == 6 == c.completion_tokens for c in result.choices)
    assert result.token_ids == result.choices[0].token_ids and result.text == result.choices[0].text
    assert result.usage.completion_tokens == 18
    assert result.usage.total_tokens == result.usage.prompt_tokens + 18
    single = client.generate("Tell me three things", seed=4, max_new_tokens=6, ignore_eos=True)
    assert single.token_ids == result.choices[0].token_ids and len(single.choices) == 1

    with client.generate_stream("Tell me three things", n=3, seed=4, max_new_tokens=6, ignore_eos=True) as stream:
        deltas = list(stream)
        streamed = stream.result()
    assert {d.index for d in deltas} == {0, 1, 2}
    assert [c.token_ids for c in streamed.choices] == [c.token_ids for c in result.choices]
    assert [c.text for c in streamed.choices] == [c.text for c in result.choices]
    assert streamed.usage == result.usage
    assert_engine_idle(server)


def test_best_of_returns_the_most_likely_of_its_samples(server, client):
    """best_of=3, n=2: the two of the three seeded samples with the highest summed logprob, best first; the
    three samples are the n=3 choices of the same seed. Streams refuse best_of > n."""
    kwargs = dict(prompt="Pick the best", seed=8, max_new_tokens=5, ignore_eos=True, logprobs=0)
    every = client.generate(n=3, **kwargs).choices
    best = client.generate(n=2, best_of=3, **kwargs)
    ranked = sorted(every, key=lambda c: -sum(lp.logprob for lp in c.logprobs))
    assert [c.token_ids for c in best.choices] == [c.token_ids for c in ranked[:2]]
    assert [c.index for c in best.choices] == [0, 1] and best.token_ids == ranked[0].token_ids
    assert best.usage.completion_tokens == 15  # every sampled token counts
    with pytest.raises(InvalidArgumentError) as info:
        list(client.generate_stream(n=1, best_of=2, **kwargs))
    assert info.value.field == "sampling.best_of"
    assert_engine_idle(server)


def test_json_schema_output_through_the_service(server, client):
    import json

    import jsonschema

    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 99}},
        "required": ["ok", "n"],
        "additionalProperties": False,
    }
    result = client.generate("Answer in JSON", n=2, seed=1, max_new_tokens=40,
                             structured_output={"json_schema": schema})
    for choice in result.choices:
        assert choice.finish_reason == FinishReason.EOS
        jsonschema.validate(json.loads(choice.text), schema)
    regex = client.generate("A code", seed=2, max_new_tokens=20, structured_output={"regex": "[A-Z]{2}[0-9]{2}"})
    assert regex.finish_reason == FinishReason.EOS and len(regex.text) == 4 and regex.text[:2].isupper()
    assert_engine_idle(server)


def test_engine_metrics_after_requests(server, client, checkpoint):
    """vLLM's prefix-cache, preemption, prefill/decode-time, iteration-token and cache-config metrics, read
    from the live /metrics after real requests (the same prompt twice: the second hits the cache)."""
    prompt = "a prompt long enough to fill a few KV blocks " * 4
    for _ in range(2):
        client.generate(prompt, max_new_tokens=3, temperature=0.0, ignore_eos=True)
    with pytest.raises(DeadlineExceededError):
        client.generate("Too slow", timeout=0.4, **LONG)
    assert_engine_idle(server)
    url = f"http://127.0.0.1:{server.app.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    label = f'model_name="{checkpoint.name}"'

    def value(sample: str) -> float:
        return float(next(line for line in text.splitlines() if line.startswith(sample + " ")).split()[-1])

    queries = value(f"internlm2:prefix_cache_queries_total{{{label}}}")
    hits = value(f"internlm2:prefix_cache_hits_total{{{label}}}")
    assert queries > hits > 0
    assert value(f"internlm2:num_preemptions_total{{{label}}}") >= 0
    for name in ("internlm2:request_prefill_time_seconds", "internlm2:request_decode_time_seconds"):
        assert value(f"{name}_count{{{label}}}") >= 2, name
    steps = value(f'internlm2:iteration_tokens_total_bucket{{le="+Inf",{label}}}')
    assert steps >= 6 and value(f"internlm2:iteration_tokens_total_sum{{{label}}}") >= steps
    info = next(line for line in text.splitlines() if line.startswith("internlm2:cache_config_info{"))
    assert 'num_gpu_blocks="1024"' in info and 'enable_prefix_caching="True"' in info and info.endswith(" 1.0")
    assert value(f'internlm2:request_success_total{{finished_reason="deadline_exceeded",{label}}}') >= 1


def test_every_proto_sampling_field_reaches_the_engine_params():
    """The conversion tables come from the proto descriptor: each SamplingParams field set on the wire
    arrives in the engine's SamplingParams, so a new field needs no hand-kept list."""
    from internlm2.core.engine import SamplingParams, StructuredOutput
    from internlm2.services.inference.requests import sampling_from_proto
    from internlm2.v1 import inference_pb2
    from internlm2_client import _convert as cv

    values = {"temperature": 0.5, "top_p": 0.75, "top_k": 7, "min_p": 0.25, "repetition_penalty": 1.5,
              "presence_penalty": 0.5, "frequency_penalty": -0.5, "seed": 3, "max_new_tokens": 9,
              "min_new_tokens": 2, "logprobs": 4, "prompt_logprobs": 1, "skip_special_tokens": False, "n": 2,
              "best_of": 3}
    scalars = {f.name for f in inference_pb2.SamplingParams.DESCRIPTOR.fields
               if f.has_presence and f.message_type is None and not f.is_repeated}
    assert scalars - {"ignore_eos"} == set(values), "give the new field a test value here"
    pb = cv.sampling_to_pb(stop=["END"], structured_output={"regex": "[0-9]+"}, **values)
    params = sampling_from_proto(pb, SamplingParams, StructuredOutput)
    assert {name: getattr(params, name) for name in values} == values
    assert params.stop == ("END",) and params.structured_output == StructuredOutput(regex="[0-9]+")
    assert params.validate() is params
