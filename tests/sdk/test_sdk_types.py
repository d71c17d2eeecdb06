"""The SDK without a server: it imports without torch, and dataclasses <-> protobuf conversions."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys

import pytest

from internlm2.v1 import common_pb2, inference_pb2, training_pb2
from internlm2_client import _convert as cv
from internlm2_client import _foreign
from internlm2_client import types as t
from internlm2_client.cli._common import to_jsonable

pytestmark = pytest.mark.timeout(30)


def test_sdk_and_cli_import_without_torch():
    code = (
        "import sys, internlm2_client, internlm2_client.aio, internlm2_client.cli; "
        "internlm2_client.cli.build_parser(); "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy', 'internlm2.core') "
        "or m.startswith(('internlm2.core', 'internlm2.services'))); print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stdout + out.stderr


def test_sampling_unset_stays_unset_and_zero_is_sent():
    pb = cv.sampling_to_pb(t.SamplingParams(temperature=0.0, top_k=0), max_new_tokens=5, seed=None)
    assert pb.HasField("temperature") and pb.temperature == 0.0 and pb.HasField("top_k")
    assert pb.max_new_tokens == 5 and not pb.HasField("seed") and not pb.HasField("top_p")
    assert not pb.HasField("stop_token_ids")  # None = the tokenizer's defaults
    none = cv.sampling_to_pb(stop_token_ids=[], stop="END")
    assert none.HasField("stop_token_ids") and list(none.stop_token_ids.ids) == [] and list(none.stop) == ["END"]
    with pytest.raises(TypeError, match="tempreature"):
        cv.sampling_to_pb(tempreature=1.0)


def test_generate_request_needs_exactly_one_input():
    with pytest.raises(ValueError):
        cv.generate_request(inference_pb2.GenerateRequest)
    with pytest.raises(ValueError):
        cv.generate_request(inference_pb2.GenerateRequest, prompt="a", token_ids=[1])
    with pytest.raises(ValueError, match="tools"):
        cv.generate_request(inference_pb2.GenerateRequest, prompt="a", tools=[{"name": "x"}])
    req = cv.generate_request(
        inference_pb2.GenerateStreamRequest,
        messages=[
            t.ChatMessage("assistant", "", tool_calls=(t.ToolCall("f", '{"a": 1}', id="call_0"),)),
            {"role": "environment", "name": "plugin", "content": "42"},
        ],
        tools=[t.Tool("f", "does f", {"type": "object", "properties": {"a": {"type": "integer"}}})],
        add_generation_prompt=False,
    )
    assert req.WhichOneof("input") == "chat" and req.chat.HasField("add_generation_prompt")
    call = req.chat.messages[0].tool_calls[0]
    assert call.kind == common_pb2.TOOL_KIND_PLUGIN and call.arguments_json == '{"a": 1}'
    assert req.chat.messages[1].name == "plugin"
    assert json.loads(req.chat.tools[0].parameters_json)["properties"]["a"]["type"] == "integer"
    empty = cv.generate_request(inference_pb2.GenerateRequest, token_ids=[])
    assert empty.WhichOneof("input") == "token_ids"  # an empty id list is still the chosen input


def test_stream_folding_equals_the_unary_result_shape():
    deltas = [t.GenerateDelta("Hel", (1, 2)), t.GenerateDelta("lo", (3,), prompt_logprobs=())]
    final = inference_pb2.GenerateFinal(
        finish_reason=inference_pb2.FINISH_REASON_LENGTH,
        usage=common_pb2.Usage(prompt_tokens=2, completion_tokens=3, total_tokens=5),
        content="Hello",
        raw_text="Hello",
    )
    res = cv.result_from_stream("r", deltas, final)
    assert res.text == "Hello" and res.token_ids == (1, 2, 3) and res.finish_reason is t.FinishReason.LENGTH
    assert res.usage == t.Usage(2, 3, 5, 0) and res.as_message() == t.ChatMessage("assistant", "Hello")


def test_unknown_enum_numbers_from_a_newer_server_become_unspecified():
    assert cv.finish_reason_from_pb(99) is t.FinishReason.UNSPECIFIED
    assert cv.job_state_from_pb(training_pb2.JOB_STATE_CANCELLING) is t.JobState.CANCELLING
    assert cv.job_state_to_pb("failed") == training_pb2.JOB_STATE_FAILED
    for member in t.JobState:  # every SDK enum value has a proto twin and back
        assert cv.job_state_from_pb(cv.job_state_to_pb(member)) is member


def test_job_and_events_convert():
    pb = training_pb2.Job(job_id="j", state=training_pb2.JOB_STATE_RUNNING, progress=0.25, labels={"a": "b"})
    pb.create_time.FromSeconds(0)
    st = pb.stages.add(name="sft", stage="sft", state=training_pb2.JOB_STATE_RUNNING, metrics={"loss": 2.0})
    st.config.update({"lr": 0.1, "nested": {"k": [1, "x"]}})
    job = cv.job_from_pb(pb)
    assert job.state is t.JobState.RUNNING and not job.is_terminal and job.labels == {"a": "b"}
    assert job.create_time == dt.datetime(1970, 1, 1, tzinfo=dt.UTC) and job.start_time is None
    assert job.stages[0].config == {"lr": 0.1, "nested": {"k": [1.0, "x"]}} and job.stages[0].metrics == {"loss": 2.0}

    ev = training_pb2.WatchJobResponse(
        job_id="j", sequence=3, stage="sft", log=training_pb2.LogMessage(level="WARNING", message="hot")
    )
    e = cv.job_event_from_pb(ev)
    assert e.kind is t.JobEventKind.LOG and e.level == "WARNING" and e.time is None and not e.is_terminal
    unknown = cv.job_event_from_pb(training_pb2.WatchJobResponse(job_id="j", sequence=4))
    assert unknown.kind is t.JobEventKind.UNKNOWN
    done = cv.job_event_from_pb(
        training_pb2.WatchJobResponse(
            job_id="j",
            sequence=5,
            state_changed=training_pb2.StateChanged(state=training_pb2.JOB_STATE_FAILED),
        )
    )
    assert done.is_terminal and done.state is t.JobState.FAILED

    spec = cv.submit_job_request(["eval", {"stage": "sft", "config": {"lr": 1}, "name": "s1"}], "key", "n", None)
    assert [s.stage for s in spec.stages] == ["eval", "sft"] and spec.stages[1].name == "s1"
    assert spec.stages[1].config["lr"] == 1


def test_coercions_and_tool_call_arguments():
    assert t.ChatMessage.coerce({"role": "user", "content": "x"}) == t.ChatMessage("user", "x")
    assert t.Tool.coerce({"type": "function", "function": {"name": "f", "description": "d"}}) == t.Tool("f", "d")
    assert t.ToolCall("f", '{"a": [1]}').arguments == {"a": [1]}
    assert t.ToolCall("f", "not json").arguments is None and t.ToolCall("f", "[1]").arguments is None
    assert cv.tool_to_pb(t.Tool("f")).parameters_json == ""


def test_to_jsonable_handles_nested_dataclasses_enums_and_times():
    job = t.Job(
        "j",
        t.JobState.SUCCEEDED,
        create_time=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
        artifacts=(t.Artifact("final", t.ArtifactKind.CHECKPOINT, "/x"),),
    )
    data = json.loads(json.dumps(to_jsonable(job)))
    assert data["state"] == "succeeded" and data["create_time"] == "2026-01-01T00:00:00+00:00"
    assert data["artifacts"][0]["kind"] == "checkpoint"


def test_status_details_parse_and_tolerate_garbage():
    from google.protobuf import any_pb2
    from google.rpc import error_details_pb2, status_pb2

    br = error_details_pb2.BadRequest(field_violations=[{"field": "messages[1].role", "description": "bad"}])
    packed = any_pb2.Any()
    packed.Pack(br)
    other = any_pb2.Any(type_url="type.googleapis.com/some.Unknown", value=b"\x01")
    blob = status_pb2.Status(code=3, message="m", details=[packed, other]).SerializeToString()
    status, details = _foreign.parse_status_details([("x", "y"), ("grpc-status-details-bin", blob)])
    assert status.code == 3 and len(details) == 1 and details[0].field_violations[0].field == "messages[1].role"
    assert _foreign.parse_status_details([("grpc-status-details-bin", b"\xff\xff")]) == (None, [])
    assert _foreign.parse_status_details(None) == (None, [])
