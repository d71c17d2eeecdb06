"""OpenAI tool calling through the gateway: the tiny InternLM2 overfitted to one tool-use conversation
(``test_services_tool_calls``' fixture, checked there with the core's greedy decoding) served by the real
inference and tokenizer services; the official ``openai`` client offers the tool, gets a real
``tool_calls`` answer (unary and streamed), sends the tool's result back as a ``tool`` message, and gets
the model's final answer: the agent loop an OpenAI user writes, end to end."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import openai
import pytest
from gateway_fixtures import CHROMIUM, CHROMIUM_ARGS, BackgroundGateway, gateway_config
from services_fixtures import BackgroundApp
from test_services_tool_calls import ANSWER, QUESTION, RESULT, TOOL, trained  # noqa: F401 - trained is a fixture

from internlm2.core.engine import EngineConfig
from internlm2.services.common import GrpcApp, ServerConfig
from internlm2.services.inference import InferenceService
from internlm2.services.tokenizer import TokenizerService

# Overfitting the tiny model takes ~2 s idle and minutes on a loaded 2-core machine (the first test pays it).
pytestmark = pytest.mark.timeout(480)

OPENAI_TOOL = {"type": "function", "function": TOOL}


@pytest.fixture(scope="module")
def gateway(trained):  # noqa: F811 - the imported fixture
    engine = EngineConfig(max_num_seqs=4, max_num_batched_tokens=512, num_gpu_blocks=64, max_model_len=512)
    services = [TokenizerService(trained["path"]), InferenceService(trained["path"], engine_config=engine,
                                                                    model_name="tool-model")]
    backend = BackgroundApp(GrpcApp(ServerConfig("models", host="127.0.0.1", port=0), services)).start()
    gateway = BackgroundGateway(gateway_config({"inference": backend.address, "tokenizer": backend.address})).start()
    yield gateway
    gateway.stop()
    backend.stop()


@pytest.fixture(scope="module")
def client(gateway):
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0, timeout=120) as client:
        yield client


def _ask(client, messages, **kwargs):
    kwargs = {"max_tokens": 64, **kwargs}
    return client.chat.completions.create(model="tool-model", messages=messages, tools=[OPENAI_TOOL], temperature=0,
                                          **kwargs)


def test_the_model_calls_the_tool(client):
    result = _ask(client, QUESTION)
    choice = result.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "I will check."
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    assert json.loads(call.function.arguments) == {"city": "Paris"}


def test_the_streamed_call_arrives_whole_and_no_call_json_leaks_into_content(client):
    chunks = list(_ask(client, QUESTION, stream=True))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == "I will check."
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or ())]
    assert len(calls) == 1 and calls[0].index == 0 and calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments) == {"city": "Paris"}
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
def test_the_tool_result_gets_the_final_answer(client, stream):
    """The assistant message goes back as the client got it (tool_calls included) and the result as a `tool`
    message; the gateway renders them as InternLM2's assistant action + environment turn."""
    call_message = _ask(client, QUESTION).choices[0].message
    history = [
        *QUESTION,
        call_message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call_message.tool_calls[0].id, "content": RESULT["content"]},
    ]
    if stream:
        chunks = list(_ask(client, history, stream=True))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    else:
        answer = _ask(client, history).choices[0]
        text, reasons = answer.message.content, [answer.finish_reason]
        assert answer.message.tool_calls is None
    assert text == ANSWER and reasons == ["stop"]


def test_tool_choice_none_offers_no_tools(client, gateway):
    """With tool_choice "none" the prompt carries no tool list (fewer tokens than with the tool offered)."""
    offered = _ask(client, QUESTION, max_tokens=1)
    hidden = client.chat.completions.create(model="tool-model", messages=QUESTION, tools=[OPENAI_TOOL],
                                            tool_choice="none", temperature=0, max_tokens=1)
    assert hidden.usage.prompt_tokens < offered.usage.prompt_tokens


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed (scripts/install.sh)")
def test_the_playground_shows_the_tool_call(gateway, tmp_path):
    """The playground's default tool is this model's tool and its default system prompt this conversation's:
    offered the tool at temperature 0, the page shows the model's call as a tool-call block."""
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1360, "height": 860})
            page.goto(gateway.url + "/")
            page.wait_for_selector("#model option[value='tool-model']", state="attached")
            page.check("#use-tools")
            page.fill("#temperature", "0")
            page.fill("#max_tokens", "64")
            page.fill("#prompt", QUESTION[1]["content"])
            page.click("#send")
            page.wait_for_selector(".msg.assistant.done", timeout=120_000)
            assert page.text_content(".msg.assistant .content") == "I will check."
            call = page.text_content(".msg.assistant .tool-call")
            assert "get_weather(" in call and json.loads(call[call.index("(") + 1 : -1]) == {"city": "Paris"}
            assert "finish: tool_calls" in page.text_content(".msg.assistant .meta")
            page.screenshot(path=str(tmp_path / "playground-tools.png"))
            target = os.environ.get("INTERNLM2_SCREENSHOT_DIR")
            if target:
                shutil.copyfile(tmp_path / "playground-tools.png", Path(target) / "playground-tools.png")
        finally:
            browser.close()
