"""The SDK over real gRPC on loopback: every client method, streams, cancel, deadlines,
retries of UNAVAILABLE, the status-code -> exception mapping, bearer token and mTLS."""

from __future__ import annotations

import asyncio
import inspect
import socket
import threading
import time
from pathlib import Path

import grpc
import pytest
from certificates import make_certificates
from sdk_fakes import FakePlatform

import internlm2_client as ic
from internlm2.v1 import inference_pb2, reward_pb2, tokenizer_pb2, training_pb2
from internlm2_client import _base, aio
from internlm2_client import errors as E

pytestmark = pytest.mark.timeout(60)

NO_RETRY = {"retry": None}


@pytest.fixture(scope="module")
def platform():
    p = FakePlatform().start()
    yield p
    p.stop()


@pytest.fixture
def inference(platform):
    platform.inference.requests.clear()
    platform.inference.calls.clear()
    platform.inference.cancelled.clear()
    with ic.InferenceClient(platform.address, timeout=10) as client:
        yield client


# ------------------------------------------------------------------ unary calls and results


def test_generate_sends_inputs_and_sampling_and_returns_typed_result(platform, inference):
    result = inference.generate("hello", max_new_tokens=7, temperature=0.0, stop=["\n"], request_id="r-1")
    assert isinstance(result, ic.GenerateResult)
    assert result.text == "echo: hello" and result.request_id == "r-1"
    assert result.finish_reason is ic.FinishReason.EOS and result.finish_reason == "eos"
    assert result.usage.total_tokens == result.usage.prompt_tokens + result.usage.completion_tokens
    assert result.metrics.time_to_first_token_s == pytest.approx(0.01)
    sent = platform.inference.requests[-1]
    assert sent.prompt == "hello" and sent.sampling.max_new_tokens == 7
    assert sent.sampling.HasField("temperature") and sent.sampling.temperature == 0.0  # 0 is sent, not dropped
    assert not sent.sampling.HasField("top_p") and list(sent.sampling.stop) == ["\n"]


def test_generate_chat_with_tools_returns_parsed_tool_calls(platform, inference):
    tools = [{"type": "function", "function": {"name": "search", "parameters": {"type": "object"}}}]
    result = inference.generate(messages=[{"role": "user", "content": "tool"}], tools=tools)
    (call,) = result.tool_calls
    assert call.kind is ic.ToolKind.PLUGIN and call.name == "search" and call.arguments == {"q": "x"}
    sent = platform.inference.requests[-1]
    assert sent.WhichOneof("input") == "chat" and sent.chat.tools[0].name == "search"
    assert result.as_message().tool_calls == result.tool_calls


def test_token_ids_input(platform, inference):
    assert inference.generate(token_ids=[1, 2, 3]).text == "echo: 1 2 3"
    assert list(platform.inference.requests[-1].token_ids.ids) == [1, 2, 3]


def test_tokenizer_client(platform):
    with ic.TokenizerClient(platform.address) as tok:
        (one,) = tok.tokenize("ab", return_pieces=True)
        assert one.token_ids == (1, 97, 98) and one.pieces == ("a", "b")
        assert tok.tokenize(["a", "b"], add_bos=False)[1].token_ids == (98,)
        assert tok.detokenize([[1, 104, 105]]) == ["hi"]
        assert tok.detokenize([[1, 104]], skip_special_tokens=False) == ["<s>h"]
        rendered = tok.apply_chat_template([ic.ChatMessage("user", "hi")])
        assert rendered.text.endswith("<|im_start|>assistant\n") and len(rendered.token_ids) == len(rendered.text)
        counts = tok.count_tokens(["abc"], conversations=[[{"role": "user", "content": "xy"}]])
        assert counts == ic.TokenCounts((4,), (2,), 6)
        info = tok.info()
        assert info.vocab_size == 92544 and info.special_tokens["<|im_end|>"] == 92542
        assert tok.health() == "SERVING"


def test_reward_client(platform):
    with ic.RewardClient(platform.address) as rm:
        conv = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "abcd"}]
        assert rm.score([conv]) == [4.0]
        assert rm.score([conv], condition="be safe") == [104.0]
        assert platform.reward.requests[-1].condition == "be safe"
        cmp = rm.compare([{"role": "user", "content": "q"}], "long answer", "short")
        assert cmp.preferred is ic.Preference.A and cmp.margin == pytest.approx(6.0)
        ranking = rm.rank([{"role": "user", "content": "q"}], ["a", "abc", "ab"])
        assert ranking.order == (1, 2, 0) and ranking.scores == (1.0, 3.0, 2.0)


def test_training_client_submit_get_list_watch_cancel(platform):
    with ic.TrainingClient(platform.address) as tr:
        stages = tr.list_stages()
        assert stages[0].name == "sft" and stages[0].config_schema["properties"]["lr"]["type"] == "number"
        sub = tr.submit_job(
            [ic.StageSpec("sft", {"lr": 1e-5, "steps": 10}), "eval"],
            idempotency_key="k1",
            name="run",
            labels={"team": "a"},
        )
        assert sub.created and sub.job.state is ic.JobState.QUEUED
        assert sub.job.stages[0].config == {"lr": 1e-5, "steps": 10.0}
        assert sub.job.create_time is not None and sub.job.create_time.tzinfo is not None
        again = tr.submit_job(["sft"], idempotency_key="k1")
        assert not again.created and again.job.job_id == sub.job.job_id
        with pytest.raises(E.InvalidArgumentError) as bad:
            tr.submit_job(["sft", "nope"])
        assert bad.value.field == "stages[1].stage"
        with pytest.raises(E.NotFoundError):
            tr.get_job("job-missing")

        events = list(tr.watch_job(sub.job.job_id))
        assert [e.sequence for e in events] == list(range(1, 8))
        kinds = [e.kind.value for e in events]
        assert kinds == ["state", "progress", "metrics", "progress", "artifact", "log", "state"]
        assert events[2].metrics == {"loss": 1.25} and events[1].fraction == 0.5 and events[1].total_steps == 10
        assert events[4].artifact.kind is ic.ArtifactKind.CHECKPOINT and events[4].artifact.uri == "/ckpt/final"
        assert events[-1].is_terminal and not events[0].is_terminal
        resumed = list(tr.watch_job(sub.job.job_id, after_sequence=5))
        assert [e.sequence for e in resumed] == [6, 7]

        job = tr.get_job(sub.job.job_id)
        assert job.is_terminal and job.artifacts[0].uri == "/ckpt/final"
        with pytest.raises(E.FailedPreconditionError):
            tr.cancel_job(job.job_id)
        for i in range(3):
            tr.submit_job(["eval"], name=f"n{i}")
        assert len(tr.list_jobs(page_size=2).jobs) == 2
        assert [j.name for j in tr.iter_jobs(page_size=2)][:3] == ["n2", "n1", "n0"]
        queued = tr.list_jobs(states=["queued"]).jobs
        assert queued and all(j.state is ic.JobState.QUEUED for j in queued)
        assert tr.cancel_job("job-3", reason="test").state is ic.JobState.CANCELLED


# ------------------------------------------------------------------ streams, cancel, deadline


def test_generate_stream_yields_deltas_then_folded_result(platform, inference):
    with inference.generate_stream("a b c", logprobs=0, request_id="s-1") as stream:
        deltas = list(stream)
        result = stream.result()
    assert [d.text for d in deltas] == ["echo:", " a", " b", " c"]
    assert result.text == "echo: a b c" and result.finish_reason is ic.FinishReason.STOP
    assert result.stop_reason == "</s>" and result.request_id == "s-1"
    assert result.token_ids == tuple(i for d in deltas for i in d.token_ids)
    assert len(result.logprobs) == 4 and result.logprobs[0].logprob == -0.5


def test_cancelling_a_stream_cancels_the_server_call(platform, inference):
    stream = inference.generate_stream("slow")
    first = next(stream)
    assert first.text == "."
    stream.cancel()
    with pytest.raises(E.CancelledError):
        for _ in stream:
            pass
    assert platform.inference.cancelled.wait(5), "server handler never saw the cancellation"


def test_abort_by_request_id_ends_the_stream(platform, inference):
    stream = inference.generate_stream("slow", request_id="to-abort")
    next(stream)
    assert inference.abort("to-abort") is True
    assert stream.result().finish_reason is ic.FinishReason.CANCELLED
    assert inference.abort("never-existed") is False


def test_deadline_raises_deadline_exceeded_and_the_server_stops(platform, inference):
    t0 = time.monotonic()
    with pytest.raises(E.DeadlineExceededError) as err:
        inference.generate("sleep", timeout=0.3)
    assert time.monotonic() - t0 < 5
    assert isinstance(err.value, TimeoutError)
    assert platform.inference.cancelled.wait(5)


# ------------------------------------------------------------------ errors


MAPPED = {
    "CANCELLED": E.CancelledError,
    "UNKNOWN": E.UnknownError,
    "INVALID_ARGUMENT": E.InvalidArgumentError,
    "DEADLINE_EXCEEDED": E.DeadlineExceededError,
    "NOT_FOUND": E.NotFoundError,
    "ALREADY_EXISTS": E.AlreadyExistsError,
    "PERMISSION_DENIED": E.PermissionDeniedError,
    "RESOURCE_EXHAUSTED": E.ResourceExhaustedError,
    "FAILED_PRECONDITION": E.FailedPreconditionError,
    "ABORTED": E.AbortedError,
    "OUT_OF_RANGE": E.OutOfRangeError,
    "UNIMPLEMENTED": E.UnimplementedError,
    "INTERNAL": E.InternalError,
    "UNAVAILABLE": E.UnavailableError,
    "DATA_LOSS": E.DataLossError,
    "UNAUTHENTICATED": E.UnauthenticatedError,
}


def test_every_status_code_maps_to_its_exception_with_details(platform):
    assert set(MAPPED) == {c.name for c in grpc.StatusCode} - {"OK"}
    with ic.InferenceClient(platform.address, **NO_RETRY) as client:
        for code, cls in MAPPED.items():
            with pytest.raises(cls) as info:
                client.generate(f"status:{code}", request_id=f"rid-{code}")
            err = info.value
            assert type(err) is cls and isinstance(err, E.InternLM2Error)
            assert err.code == grpc.StatusCode[code] and err.message == f"scripted status:{code}"
            assert err.reason == code and err.request_id == f"rid-{code}"
            assert isinstance(err.__cause__, grpc.RpcError)
    with ic.InferenceClient(platform.address, **NO_RETRY) as client:
        with pytest.raises(E.InvalidArgumentError) as bad:
            client.generate("status:INVALID_ARGUMENT")
        assert bad.value.field == "sampling.top_p" and "sampling.top_p" in str(bad.value)
        assert isinstance(bad.value, ValueError)
        with pytest.raises(E.ResourceExhaustedError) as busy:
            client.generate("status:RESOURCE_EXHAUSTED")
        assert busy.value.retry_delay == pytest.approx(1.5)


def test_errors_in_streams_and_in_the_aio_client_map_the_same_way(platform):
    with ic.InferenceClient(platform.address, **NO_RETRY) as client, pytest.raises(E.ResourceExhaustedError):
        list(client.generate_stream("status:RESOURCE_EXHAUSTED"))

    async def main():
        async with aio.InferenceClient(platform.address, **NO_RETRY) as client:
            with pytest.raises(E.InvalidArgumentError) as bad:
                await client.generate("status:INVALID_ARGUMENT")
            assert bad.value.field == "sampling.top_p"
            with pytest.raises(E.NotFoundError):
                async for _ in client.generate_stream("status:NOT_FOUND"):
                    pass

    asyncio.run(main())


# ------------------------------------------------------------------ retries


def test_unavailable_is_retried_by_the_service_config(platform):
    platform.inference.calls.clear()
    platform.inference.unavailable_before_success = 2
    retry = ic.RetryPolicy(max_attempts=5, initial_backoff_s=0.01, max_backoff_s=0.05)
    with ic.InferenceClient(platform.address, retry=retry) as client:
        assert client.model_info().model_name == "fake-internlm2"
    assert platform.inference.calls["GetModelInfo"] == 3  # failed, failed, succeeded

    platform.inference.calls.clear()
    platform.inference.unavailable_before_success = 2
    with ic.InferenceClient(platform.address, retry=None) as client, pytest.raises(E.UnavailableError):
        client.model_info()
    assert platform.inference.calls["GetModelInfo"] == 1
    platform.inference.unavailable_before_success = 0


def test_retry_policy_json_is_a_grpc_service_config():
    import json

    cfg = json.loads(ic.RetryPolicy(max_attempts=3, initial_backoff_s=0.5).service_config())
    (method,) = cfg["methodConfig"]
    assert {"service": "internlm2.v1.InferenceService"} in method["name"] and len(method["name"]) == 4
    assert method["retryPolicy"] == {
        "maxAttempts": 3,
        "initialBackoff": "0.5s",
        "maxBackoff": "5.0s",
        "backoffMultiplier": 2.0,
        "retryableStatusCodes": ["UNAVAILABLE"],
    }


# ------------------------------------------------------------------ aio twins


def test_aio_clients_mirror_the_sync_api(platform):
    async def main():
        async with (
            aio.InferenceClient(platform.address) as inf,
            aio.TokenizerClient(platform.address) as tok,
            aio.RewardClient(platform.address) as rm,
            aio.TrainingClient(platform.address) as tr,
        ):
            assert (await inf.generate("x")).text == "echo: x"
            async with inf.generate_stream("y z") as stream:
                texts = [d.text async for d in stream]
            assert texts == ["echo:", " y", " z"] and (await stream.result()).text == "echo: y z"
            slow = inf.generate_stream("slow")
            await slow.__anext__()
            slow.cancel()
            with pytest.raises(E.CancelledError):
                await slow.__anext__()
            assert (await tok.tokenize("a"))[0].token_ids == (1, 97)
            assert await rm.score([[{"role": "user", "content": "abc"}]]) == [3.0]
            job = (await tr.submit_job(["sft"])).job
            events = [e async for e in tr.watch_job(job.job_id)]
            assert events[-1].state is ic.JobState.SUCCEEDED
            assert (await inf.model_info()).vocab_size == 92544
            assert await inf.health() == "SERVING"
            with pytest.raises(E.DeadlineExceededError):
                await inf.generate("sleep", timeout=0.2)

    asyncio.run(main())


# ------------------------------------------------------------------ one definition, two transports

SERVICE_CLIENTS = [
    (tokenizer_pb2, "TokenizerService", ic.TokenizerClient, aio.TokenizerClient),
    (inference_pb2, "InferenceService", ic.InferenceClient, aio.InferenceClient),
    (reward_pb2, "RewardService", ic.RewardClient, aio.RewardClient),
    (training_pb2, "TrainingService", ic.TrainingClient, aio.TrainingClient),
]


@pytest.mark.parametrize("module, service, sync_cls, aio_cls", SERVICE_CLIENTS, ids=[s[1] for s in SERVICE_CLIENTS])
def test_every_rpc_has_one_declaration_and_both_clients_have_it(module, service, sync_cls, aio_cls):
    """The sync and asyncio clients are generated from the same declarations: every RPC of the
    service has exactly one, and both clients expose it with the same signature and docstring."""
    declared = _base.declarations(sync_cls.__mro__[1])
    assert declared == _base.declarations(aio_cls.__mro__[1])
    rpcs = [d.method for d in declared.values() if isinstance(d, _base.Rpc)]
    assert sorted(rpcs) == sorted(m.name for m in module.DESCRIPTOR.services_by_name[service].methods)
    assert len(set(rpcs)) == len(rpcs)
    for name, declaration in declared.items():
        sync_method, aio_method = getattr(sync_cls, name), getattr(aio_cls, name)
        sync_sig, aio_sig = inspect.signature(sync_method), inspect.signature(aio_method)
        assert "timeout" in sync_sig.parameters, name
        if isinstance(declaration, _base.Pager):
            assert inspect.isgeneratorfunction(sync_method) and inspect.isasyncgenfunction(aio_method)
            assert sync_sig.parameters == aio_sig.parameters
        else:
            assert sync_sig == aio_sig, name
            assert inspect.iscoroutinefunction(aio_method) == (declaration.stream is None), name
            assert not inspect.iscoroutinefunction(sync_method)
        assert sync_method.__doc__ and sync_method.__doc__ == aio_method.__doc__, name
    assert sync_cls.__doc__.startswith(f"Client of internlm2.v1.{service}")
    assert aio_cls.__doc__.startswith(f"asyncio client of internlm2.v1.{service}")


def test_aio_iter_jobs_pages_like_the_sync_one(platform):
    with ic.TrainingClient(platform.address) as tr:
        for i in range(3):
            tr.submit_job(["eval"], name=f"page-{i}")
        expected = [j.job_id for j in tr.iter_jobs(page_size=2)]

    async def main():
        async with aio.TrainingClient(platform.address) as tr:
            return [j.job_id async for j in tr.iter_jobs(page_size=2)]

    assert asyncio.run(main()) == expected and len(expected) >= 3


# ------------------------------------------------------------------ wait_until_ready: health SERVING, not a connection


def test_wait_until_ready_waits_for_serving_and_times_out_naming_the_service(platform):
    name = "internlm2.v1.InferenceService"
    platform.set_health(name, False)
    platform.health.watched.discard(name)
    try:
        with ic.InferenceClient(platform.address) as client:
            # Connected, but not SERVING: the wait times out, saying what it waited for and what it saw.
            with pytest.raises(E.DeadlineExceededError) as late:
                client.wait_until_ready(timeout=2)
            assert name in str(late.value) and platform.address in str(late.value)
            assert "NOT_SERVING" in str(late.value) and isinstance(late.value, TimeoutError)

            done, failure = threading.Event(), []

            def waiter():
                try:
                    client.wait_until_ready(timeout=60)
                except Exception as exc:
                    failure.append(exc)
                done.set()

            platform.health.watched.discard(name)
            threading.Thread(target=waiter, daemon=True).start()
            deadline = time.monotonic() + 30
            while name not in platform.health.watched and time.monotonic() < deadline:
                time.sleep(0.01)
            assert name in platform.health.watched, "the waiter never watched the service's health"
            assert not done.is_set(), "wait_until_ready returned while the service was NOT_SERVING"
            platform.set_health(name, True)
            assert done.wait(30) and not failure, failure
    finally:
        platform.set_health(name, True)


def test_wait_until_ready_on_a_closed_port_times_out():
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{sock.getsockname()[1]}"
    with ic.RewardClient(address) as client, pytest.raises(E.DeadlineExceededError) as late:
        client.wait_until_ready(timeout=1)
    assert "internlm2.v1.RewardService" in str(late.value) and "no answer" in str(late.value)


def test_aio_wait_until_ready_returns_once_serving(platform):
    name = "internlm2.v1.TokenizerService"
    platform.set_health(name, False)

    async def main():
        async with aio.TokenizerClient(platform.address) as client:
            with pytest.raises(E.DeadlineExceededError, match="NOT_SERVING"):
                await client.wait_until_ready(timeout=2)
            waiting = asyncio.ensure_future(client.wait_until_ready(timeout=60))
            await asyncio.sleep(0)
            assert not waiting.done()
            await asyncio.to_thread(platform.set_health, name, True)
            await asyncio.wait_for(waiting, 30)

    try:
        asyncio.run(main())
    finally:
        platform.set_health(name, True)


# ------------------------------------------------------------------ auth and TLS


def test_bearer_token_is_sent_and_a_missing_one_is_unauthenticated():
    p = FakePlatform(token="s3cret").start()
    try:
        with ic.InferenceClient(p.address, token="s3cret") as client:
            assert client.model_info().server_version == "Bearer s3cret"
        with (
            ic.InferenceClient(p.address, token="wrong", **NO_RETRY) as client,
            pytest.raises(E.UnauthenticatedError),
        ):
            client.model_info()
        with ic.InferenceClient(p.address, **NO_RETRY) as client:
            with pytest.raises(E.UnauthenticatedError):
                client.model_info()
            assert client.health() == "SERVING"  # health is exempt from auth
    finally:
        p.stop()


def test_mutual_tls(tmp_path):
    certs = make_certificates(tmp_path)
    read = lambda key: Path(certs[key]).read_bytes()
    creds = grpc.ssl_server_credentials(
        [(read("server_key"), read("server_cert"))], root_certificates=read("ca"), require_client_auth=True
    )
    p = FakePlatform(server_credentials=creds).start()
    try:
        tls = dict(root_certificates=Path(certs["ca"]), server_name="localhost", **NO_RETRY)
        with ic.InferenceClient(
            p.address,
            client_certificate=Path(certs["client_cert"]),
            client_key=certs["client_key"],
            **tls,
        ) as client:
            assert client.model_info().model_name == "fake-internlm2"
        with (
            ic.InferenceClient(p.address, timeout=3, **tls) as client,
            pytest.raises(E.UnavailableError),
        ):  # no client certificate
            client.model_info()
        with (
            ic.InferenceClient(p.address, timeout=3, **NO_RETRY) as client,
            pytest.raises(E.UnavailableError),
        ):  # plaintext to a TLS port
            client.model_info()
    finally:
        p.stop()
