"""Tool use end to end: a tiny InternLM2 overfitted on CPU to one tool-use conversation, served by the real
InferenceService on loopback and called through the real SDK.

A random model never emits a tool call, so the test teaches one to: given the chat prompt with a
``get_weather`` tool it answers ``I will check.<|action_start|><|plugin|>\\n{json}<|action_end|>\\n<|im_end|>``,
and given the same history plus the assistant's call and an ``environment`` result it answers in plain
text. The fixture checks the overfit with the model core's greedy decoding before serving, so a failure
further down is the service's or the SDK's: how they render tools and tool calls into the prompt, and how
they parse the model's raw output back into structured calls, unary and streamed.
"""

from __future__ import annotations

import json

import pytest
import torch
from services_fixtures import BackgroundApp

from internlm2.core import InternLM2Config, InternLM2ForCausalLM, greedy_generate, random_model
from internlm2.core.engine import EngineConfig
from internlm2.core.tokenizer import train_tokenizer
from internlm2.services.common import GrpcApp, ServerConfig
from internlm2.services.inference import InferenceService
from internlm2_client import FinishReason, InferenceClient, ToolKind

pytestmark = pytest.mark.timeout(240)  # training the tiny model takes 2 s idle, ~40 s on a loaded machine

TOOL = {
    "name": "get_weather",
    "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
QUESTION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the weather in Paris?"},
]
CALL_JSON = '{"name": "get_weather", "parameters": {"city": "Paris"}}'
# The assistant turn as InternLM2 writes it (InternLM chat_format.md); generation ends at <|im_end|>.
CALL_TURN = f"I will check.<|action_start|><|plugin|>\n{CALL_JSON}<|action_end|>\n<|im_end|>"
RESULT = {"role": "environment", "name": "plugin", "content": '{"temperature": 22, "condition": "sunny"}'}
ANSWER = "It is sunny and 22 degrees in Paris."
# The same assistant call in the core's message form, to render the follow-up prompt the model learns.
CORE_CALL = {"role": "assistant", "content": "I will check.", "tool_calls": [{"name": "get_weather",
                                                                           "arguments": {"city": "Paris"}}]}

TRAIN_STEPS = 150
MAX_LOSS = 0.05


def _corpus() -> str:
    """Text for the tokenizer: everything the prompts and answers spell, special tokens aside."""
    return "\n".join(
        [
            json.dumps([TOOL], indent=4),
            *(m["content"] for m in QUESTION),
            CALL_TURN,
            RESULT["content"],
            ANSWER,
            "system name= user assistant environment",
        ]
    )


def _overfit(model, examples: list[tuple[list[int], list[int]]]) -> float:
    """Full-batch AdamW on the completion tokens only (prompt positions are ignored); returns the last loss."""
    length = max(len(p) + len(c) for p, c in examples)
    input_ids = torch.zeros(len(examples), length, dtype=torch.long)
    labels = torch.full((len(examples), length), -100, dtype=torch.long)
    for row, (prompt, completion) in enumerate(examples):
        seq = prompt + completion
        input_ids[row, : len(seq)] = torch.tensor(seq)
        # labels[t] is the target of position t: the completion starts at the last prompt position.
        labels[row, len(prompt) - 1 : len(seq) - 1] = torch.tensor(completion)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    for _ in range(TRAIN_STEPS):
        loss = model.loss(input_ids, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return loss.item()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A checkpoint directory holding the overfitted model and its tokenizer, plus the two prompts'
    ids as the core renders them."""
    directory = tmp_path_factory.mktemp("tool-model")
    tok = train_tokenizer([_corpus()], directory, vocab_size=384, num_threads=1)
    first_prompt = tok.encode_chat(QUESTION, tools=[TOOL])
    second_prompt = tok.encode_chat([*QUESTION, CORE_CALL, RESULT], tools=[TOOL])
    examples = [
        (first_prompt, tok.encode(CALL_TURN, add_bos=False)),
        (second_prompt, tok.encode(ANSWER + "<|im_end|>", add_bos=False)),
    ]
    config = InternLM2Config.preset("tiny", vocab_size=tok.vocab_size, max_position_embeddings=512)
    torch.manual_seed(0)
    model = random_model(config, seed=0)
    loss = _overfit(model, examples)
    assert loss < MAX_LOSS, f"the tiny model did not overfit: loss {loss:.4f} after {TRAIN_STEPS} steps"
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    # The checkpoint as saved must already do it with plain greedy decoding.
    reloaded = InternLM2ForCausalLM.from_pretrained(directory)
    for prompt, completion in examples:
        assert greedy_generate(reloaded, prompt, len(completion))[: len(completion)] == completion
    return {"path": directory, "tok": tok, "first_prompt": first_prompt, "second_prompt": second_prompt}


@pytest.fixture(scope="module")
def server(trained):
    # The service loads the checkpoint from disk, as `internlm2 serve inference --model PATH` does.
    engine = EngineConfig(max_num_seqs=4, max_num_batched_tokens=512, num_gpu_blocks=64, max_model_len=512)
    service = InferenceService(trained["path"], engine_config=engine)
    app = GrpcApp(ServerConfig("inference", host="127.0.0.1", port=0, metrics_port=0), [service])
    server = BackgroundApp(app).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(server):
    with InferenceClient(server.address, timeout=60) as client:
        yield client


def _ask(client, messages, stream: bool = False, **kwargs):
    """Greedy generation of the next assistant turn with the tool offered; prompt_logprobs=0 returns the
    prompt's ids, so the test sees exactly what the server rendered."""
    call = client.generate_stream if stream else client.generate
    result = call(messages=messages, tools=[TOOL], temperature=0, max_new_tokens=64, prompt_logprobs=0, **kwargs)
    if stream:
        deltas = list(result)
        return result.result(), deltas
    return result


@pytest.fixture(scope="module")
def tool_call_result(client):
    return _ask(client, QUESTION)


def _prompt_ids(result) -> list[int]:
    return [entry.token_id for entry in result.prompt_logprobs]


def _im_end(tok) -> int:
    return tok.special_tokens["<|im_end|>"]


def test_the_server_renders_tools_as_the_core_does(tool_call_result, trained):
    """The plugin system message the model sees over gRPC is token for token the core's."""
    assert _prompt_ids(tool_call_result) == trained["first_prompt"]
    assert tool_call_result.usage.prompt_tokens == len(trained["first_prompt"])


def test_generate_returns_a_structured_tool_call(tool_call_result, trained):
    tok = trained["tok"]
    result = tool_call_result
    assert len(result.tool_calls) == 1
    (call,) = result.tool_calls
    assert call.name == "get_weather" and call.kind == ToolKind.PLUGIN and call.id == "call_0"
    assert call.arguments == {"city": "Paris"} and call.raw == CALL_JSON
    assert result.content == "I will check."
    assert result.raw_text == CALL_TURN
    assert "<|action_start|><|plugin|>" in result.raw_text and "<|action_end|>" in result.raw_text
    # `text` is the same tokens with the special ones skipped.
    assert result.text == tok.decode(result.token_ids, skip_special_tokens=True)
    assert list(result.token_ids) == tok.encode(CALL_TURN, add_bos=False)
    # Generation ended on the end-of-turn token, not on the length limit (stop_reason is for STOP only).
    assert result.finish_reason == FinishReason.EOS and result.stop_reason == ""
    assert result.token_ids[-1] == _im_end(tok)
    assert result.usage.completion_tokens == len(result.token_ids)


def test_streamed_deltas_assemble_to_the_same_result(client, tool_call_result):
    result, deltas = _ask(client, QUESTION, stream=True)
    assert len(deltas) > 1
    assert [i for d in deltas for i in d.token_ids] == list(result.token_ids) == list(tool_call_result.token_ids)
    assert "".join(d.text for d in deltas) == result.text == tool_call_result.text
    assert result.tool_calls == tool_call_result.tool_calls
    assert (result.content, result.raw_text) == (tool_call_result.content, tool_call_result.raw_text)
    assert (result.finish_reason, result.stop_reason) == (tool_call_result.finish_reason, tool_call_result.stop_reason)


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
def test_the_environment_result_gets_a_final_answer(client, tool_call_result, trained, stream):
    """The assistant's call goes back as a structured message (as_message) with the tool's result in the
    environment role; the server renders it as the core does and the model answers in plain text."""
    history = [*QUESTION, tool_call_result.as_message(), RESULT]
    answer = _ask(client, history, stream=stream)
    if stream:
        answer, deltas = answer
        assert "".join(d.text for d in deltas) == answer.text
    assert _prompt_ids(answer) == trained["second_prompt"]
    assert answer.content == ANSWER and answer.text == ANSWER
    assert answer.tool_calls == ()
    assert answer.raw_text == ANSWER + "<|im_end|>"
    assert answer.finish_reason == FinishReason.EOS and answer.token_ids[-1] == _im_end(trained["tok"])
