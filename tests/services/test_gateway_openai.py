"""The gateway through the official ``openai`` client: the real tokenizer, inference and reward services on
loopback (tiny random checkpoints), the real gateway (uvicorn) in front, and the client's sync, async and
streaming calls, n siblings, logprobs, text completions and the vLLM-shaped extras."""

from __future__ import annotations

import asyncio
import json
import socket

import httpx
import jsonschema
import openai
import pytest
from gateway_fixtures import BackgroundGateway, gateway_config, start_model_services
from services_fixtures import wait_for

pytestmark = pytest.mark.timeout(240)

MODEL = "tiny-chat"
HELLO = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Say hello to the world."}]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    server = start_model_services(tmp_path_factory.mktemp("models"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def gateway(models):
    backends = {"inference": models.address, "tokenizer": models.address, "reward": models.address}
    server = BackgroundGateway(gateway_config(backends)).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(gateway):
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0, timeout=120) as client:
        yield client


def test_models_lists_the_served_chat_and_reward_models(client):
    models = {m.id: m for m in client.models.list()}
    assert set(models) == {MODEL, "internlm2-reward"}
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("gpt-4o")
    assert info.value.body["code"] == "model_not_found"


def test_chat_completion_greedy_is_reproducible_and_counts_tokens(client, gateway):
    first = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=12, temperature=0)
    again = client.chat.completions.create(model=MODEL, messages=HELLO, max_completion_tokens=12, temperature=0)
    choice = first.choices[0]
    assert first.object == "chat.completion" and first.model == MODEL and len(first.choices) == 1
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.message.content == again.choices[0].message.content
    # A random model rarely stops by itself within 12 tokens; either way the reason is a real one.
    assert choice.finish_reason in ("length", "stop")
    if choice.finish_reason == "length":
        assert first.usage.completion_tokens == 12
    # The prompt as the tokenizer service renders it (vLLM's /tokenize with messages) is what was counted.
    rendered = httpx.post(gateway.url + "/tokenize", json={"messages": HELLO}).json()
    assert first.usage.prompt_tokens == rendered["count"]
    assert first.usage.total_tokens == first.usage.prompt_tokens + first.usage.completion_tokens


def test_streaming_assembles_to_the_unary_answer_with_usage(client):
    unary = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=16, temperature=0)
    stream = client.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=16, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content_chunks) > 1, "the answer arrived in one piece: not streamed"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content for c in content_chunks) == unary.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [unary.choices[0].finish_reason]
    # include_usage: every chunk has usage null, then one last chunk with no choices and the totals.
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == unary.usage.completion_tokens
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")


def test_async_client_concurrent_requests(gateway):
    async def main():
        async with openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0) as client:
            calls = [
                client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=10, temperature=0)
                for _ in range(4)
            ]
            results = await asyncio.gather(*calls)
            stream = await client.chat.completions.create(
                model=MODEL, messages=HELLO, max_tokens=10, temperature=0, stream=True
            )
            streamed = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
            return results, streamed

    results, streamed = asyncio.run(main())
    texts = {r.choices[0].message.content for r in results}
    assert len(texts) == 1, "greedy answers to one prompt differ under concurrency"
    assert streamed == texts.pop()


def test_logprobs_and_top_logprobs(client):
    result = client.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3
    )
    entries = result.choices[0].logprobs.content
    assert len(entries) == result.usage.completion_tokens
    for entry in entries:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        # Greedy: the chosen token is the most likely one.
        assert entry.top_logprobs[0].token == entry.token
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)
    without = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=6, temperature=0)
    assert without.choices[0].logprobs is None


def test_n_three_siblings_unary_and_streamed(client):
    kwargs = dict(model=MODEL, messages=HELLO, max_tokens=8, temperature=1.0, seed=7)
    result = client.chat.completions.create(n=3, **kwargs)
    assert [c.index for c in result.choices] == [0, 1, 2]
    texts = [c.message.content for c in result.choices]
    assert len(set(texts)) > 1, "three sampled siblings came out identical"
    single = client.chat.completions.create(n=1, **kwargs)
    # Sibling 0 is the n = 1 completion with the same seed; the prompt is counted once.
    assert texts[0] == single.choices[0].message.content
    assert result.usage.prompt_tokens == single.usage.prompt_tokens
    assert 3 <= result.usage.completion_tokens <= 3 * 8
    stream = client.chat.completions.create(n=3, stream=True, **kwargs)
    parts: dict[int, str] = {0: "", 1: "", 2: ""}
    finished = set()
    for chunk in stream:
        for choice in chunk.choices:
            parts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finished.add(choice.index)
    assert finished == {0, 1, 2}
    assert [parts[i] for i in range(3)] == texts


def test_text_completions_prompt_list_and_logprobs(client):
    result = client.completions.create(model=MODEL, prompt=["The quick brown", "Numbers 0 1"], max_tokens=5,
                                       temperature=0, logprobs=2)
    assert result.object == "text_completion" and [c.index for c in result.choices] == [0, 1]
    for choice in result.choices:
        assert len(choice.logprobs.tokens) == len(choice.logprobs.token_logprobs) == 5
        assert all(len(top) <= 2 for top in choice.logprobs.top_logprobs)
    single = client.completions.create(model=MODEL, prompt="Numbers 0 1", max_tokens=5, temperature=0)
    assert single.choices[0].text == result.choices[1].text
    streamed = client.completions.create(model=MODEL, prompt="Numbers 0 1", max_tokens=5, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == single.choices[0].text


def test_stop_strings_end_the_answer(client):
    free = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=16, temperature=0)
    text = free.choices[0].message.content
    stop = text[len(text) // 2 :][:2]
    if not stop.strip():
        pytest.skip(f"the greedy answer {text!r} has no usable stop string in its second half")
    stopped = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=16, temperature=0, stop=[stop])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].message.content == text[: text.index(stop)]


def test_response_format_json_schema_output_validates(client):
    schema = {
        "type": "object",
        "properties": {"color": {"enum": ["red", "green", "blue"]}, "size": {"type": "integer"}},
        "required": ["color", "size"],
        "additionalProperties": False,
    }
    try:
        result = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Pick a color and a size as JSON."}],
            max_tokens=96,
            temperature=0.7,
            seed=3,
            response_format={"type": "json_schema", "json_schema": {"name": "pick", "schema": schema}},
        )
    except openai.BadRequestError as exc:
        # The proto declares structured output before the engine implements it (it lands in steps).
        if "not supported by this engine" in str(exc):
            pytest.skip(f"the engine does not implement structured output yet: {exc}")
        raise
    assert result.choices[0].message.content is not None
    choice = result.choices[0]
    assert choice.finish_reason == "stop", f"the constrained answer did not complete: {choice.message.content!r}"
    jsonschema.validate(json.loads(choice.message.content), schema)


def test_tokenize_detokenize_round_trip(gateway):
    tokens = httpx.post(gateway.url + "/tokenize", json={"prompt": "hello world", "return_token_strs": True}).json()
    assert tokens["count"] == len(tokens["tokens"]) == len(tokens["token_strs"])
    assert tokens["max_model_len"] == 512 and tokens["token_strs"][0] == "<s>"
    text = httpx.post(gateway.url + "/detokenize", json={"tokens": tokens["tokens"]}).json()
    assert text == {"prompt": "hello world"}
    bare = httpx.post(gateway.url + "/tokenize", json={"prompt": "hello world", "add_special_tokens": False}).json()
    assert bare["tokens"] == tokens["tokens"][1:]


def test_score_ranks_answers_and_pooling_scores_conversations(gateway):
    answers = ["Paris is the capital.", "I like turtles.", "Berlin."]
    scored = httpx.post(gateway.url + "/score", json={"text_1": "Capital of France?", "text_2": answers}).json()
    scores = [d["score"] for d in scored["data"]]
    assert [d["index"] for d in scored["data"]] == [0, 1, 2]
    assert scored["ranking"] == sorted(range(3), key=lambda i: -scores[i])
    # The same conversation through /pooling gets the same reward.
    conversation = [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": answers[1]}]
    pooled = httpx.post(gateway.url + "/v1/pooling", json={"messages": conversation}).json()
    assert pooled["data"][0]["data"][0] == pytest.approx(scores[1], abs=1e-5)
    many = httpx.post(gateway.url + "/pooling", json={"input": [conversation, conversation]}).json()
    assert [d["index"] for d in many["data"]] == [0, 1]


def test_a_client_that_goes_away_frees_its_engine_work(gateway, models):
    """Closing the HTTP stream mid-answer cancels the gRPC call, which aborts the request in the engine and
    returns its KV blocks."""
    engine = models.app.services[1].servicer.engine  # tokenizer, inference, reward share one server

    def idle() -> bool:
        s = engine.stats()
        return s.num_running == 0 and s.num_waiting == 0 and s.num_free_blocks == s.num_total_blocks

    assert wait_for(idle, 30), engine.stats()
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 400, "ignore_eos": True, "temperature": 0, "stream": True}
    with httpx.stream("POST", gateway.url + "/v1/chat/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        assert engine.stats().num_running == 1
    assert wait_for(idle, 30), engine.stats()


def test_a_client_that_gives_up_on_a_unary_answer_frees_its_engine_work(gateway, models):
    """A non-streamed request whose client hangs up mid-generation is aborted in the engine (fewer tokens
    generated than asked for, every block back) instead of generating an answer nobody reads."""
    engine = models.app.services[1].servicer.engine

    def idle() -> bool:
        s = engine.stats()
        return s.num_running == 0 and s.num_waiting == 0 and s.num_free_blocks == s.num_total_blocks

    assert wait_for(idle, 30), engine.stats()
    generated_before = engine.stats().num_generated_tokens
    body = json.dumps({"model": MODEL, "messages": HELLO, "max_tokens": 400, "ignore_eos": True, "temperature": 0})
    host, port = gateway.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
        assert wait_for(lambda: engine.stats().num_running == 1, 30)
    assert wait_for(idle, 30), engine.stats()
    assert engine.stats().num_generated_tokens - generated_before < 400


def test_response_format_json_object_constrains_the_output(client):
    """A random model inside an open JSON object may write one string until max_tokens (nothing bounds it, unlike
    a schema's enum): what is checked is that the output is a JSON object, or a prefix of one, where the same
    request without the constraint is not."""
    kwargs = dict(model=MODEL, messages=HELLO, max_tokens=48, temperature=0.7, seed=11)
    free = client.chat.completions.create(**kwargs).choices[0].message.content
    assert not free.lstrip().startswith("{")
    choice = client.chat.completions.create(response_format={"type": "json_object"}, **kwargs).choices[0]
    content = choice.message.content
    assert content.lstrip().startswith("{"), content
    if choice.finish_reason == "stop":
        assert isinstance(json.loads(content), dict)
    else:
        assert choice.finish_reason == "length"
        with pytest.raises(json.JSONDecodeError) as info:  # cut short: it fails only where the text ends
            json.loads(content)
        assert info.value.pos >= len(content.rstrip()) - 1 or "Unterminated string" in info.value.msg
