"""TokenizerService serving the official InternLM2 tokenizer (../shared reference data): every RPC, and
its answers equal the facts in SOURCES.md; bad input with its status and field."""

from __future__ import annotations

import pytest
from services_fixtures import BackgroundApp

from internlm2.services.common import GrpcApp, ServerConfig
from internlm2.services.tokenizer import TokenizerService
from internlm2_client import InvalidArgumentError, TokenizerClient

pytestmark = pytest.mark.timeout(60)

# Facts from ../shared/reference-data/internlm2/SOURCES.md ("Facts checked with sentencepiece 0.2.3").
HELLO = "Hello world! 你好，世界"
HELLO_IDS = [9843, 2028, 346, 262, 77230, 60353, 68339]
CHAT = [{"role": "system", "content": "You are InternLM."}, {"role": "user", "content": "Hello, 你好!"}]
CHAT_TEXT = (
    "<s><|im_start|>system\nYou are InternLM.<|im_end|>\n<|im_start|>user\nHello, 你好!<|im_end|>\n"
    "<|im_start|>assistant\n"
)
CHAT_IDS = [
    1,
    92543,
    9081,
    364,
    2770,
    657,
    4576,
    11146,
    281,
    92542,
    364,
    92543,
    1008,
    364,
    9843,
    328,
    262,
    77230,
    346,
    92542,
    364,
    92543,
    525,
    11353,
    364,
]
CHAT_TOKENS = {
    "<|im_start|>": 92543,
    "<|im_end|>": 92542,
    "<|action_start|>": 92541,
    "<|action_end|>": 92540,
    "<|interpreter|>": 92539,
    "<|plugin|>": 92538,
}


@pytest.fixture(scope="module")
def client(official_tokenizer_path):
    app = GrpcApp(ServerConfig("tokenizer", host="127.0.0.1", port=0), [TokenizerService(official_tokenizer_path)])
    server = BackgroundApp(app).start()
    with TokenizerClient(server.address, timeout=30) as client:
        yield client
    server.stop()


def test_tokenize_matches_the_reference_ids(client):
    without_bos, with_bos = client.tokenize([HELLO], add_bos=False)[0], client.tokenize([HELLO])[0]
    assert list(without_bos.token_ids) == HELLO_IDS
    assert list(with_bos.token_ids) == [1, *HELLO_IDS]


def test_tokenize_returns_pieces_and_special_tokens_are_single_ids(client):
    result = client.tokenize(["<|im_start|>user\nhi<|im_end|>"], add_bos=False, return_pieces=True)[0]
    assert result.token_ids[0] == 92543 and result.token_ids[-1] == 92542
    assert result.pieces[0] == "<|im_start|>" and len(result.pieces) == len(result.token_ids)


def test_batched_tokenize_and_detokenize_round_trip(client):
    texts = [HELLO, "second text", "三"]
    encoded = client.tokenize(texts, add_bos=False)
    assert list(encoded[0].token_ids) == HELLO_IDS
    assert client.detokenize([e.token_ids for e in encoded]) == texts


def test_detokenize_skips_or_keeps_special_tokens(client):
    assert client.detokenize([CHAT_IDS], skip_special_tokens=False) == [CHAT_TEXT]
    kept_out = client.detokenize([CHAT_IDS])[0]
    assert "<|im_start|>" not in kept_out and "You are InternLM." in kept_out


def test_apply_chat_template_matches_the_reference(client):
    result = client.apply_chat_template(CHAT)
    assert result.text == CHAT_TEXT
    assert list(result.token_ids) == CHAT_IDS
    no_prompt = client.apply_chat_template(CHAT, add_generation_prompt=False)
    assert list(no_prompt.token_ids) == CHAT_IDS[:-4] and not no_prompt.text.endswith("assistant\n")


def test_apply_chat_template_with_tools(client):
    result = client.apply_chat_template(
        CHAT, tools=[{"name": "get_weather", "description": "weather", "parameters": {"type": "object"}}]
    )
    assert "<|im_start|>system name=<|plugin|>\n" in result.text and '"get_weather"' in result.text
    assert 92538 in result.token_ids  # <|plugin|> as one id


def test_count_tokens(client):
    counts = client.count_tokens(texts=[HELLO, "a"], conversations=[CHAT], add_bos=False)
    assert list(counts.text_counts) == [7, 1]
    assert list(counts.conversation_counts) == [len(CHAT_IDS)]
    assert counts.total == 7 + 1 + len(CHAT_IDS)


def test_tokenizer_info_matches_the_reference(client, official_tokenizer_path):
    info = client.info()
    assert info.vocab_size == 92544
    assert (info.unk_token_id, info.bos_token_id, info.eos_token_id, info.pad_token_id) == (0, 1, 2, 2)
    specials = dict(info.special_tokens)
    assert {k: specials[k] for k in CHAT_TOKENS} == CHAT_TOKENS
    assert (specials["<unk>"], specials["<s>"], specials["</s>"]) == (0, 1, 2)
    assert list(info.default_stop_token_ids) == [2, 92542]
    assert "<|im_start|>" in info.chat_template and info.add_bos_token and not info.add_eos_token
    assert info.source == str(official_tokenizer_path)


@pytest.mark.parametrize(
    "call,field",
    [
        (lambda c: c.tokenize([]), "texts"),
        (lambda c: c.detokenize([]), "sequences"),
        (lambda c: c.detokenize([[1, 2], [5, 99999999]]), "sequences[1].ids"),
        (lambda c: c.apply_chat_template([]), "messages"),
        (
            lambda c: c.apply_chat_template([{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]),
            "messages[1].role",
        ),
        (lambda c: c.count_tokens(), "texts"),
        (
            lambda c: c.count_tokens(conversations=[[{"role": "alien", "content": "x"}]]),
            "conversations[0].messages[0].role",
        ),
    ],
    ids=[
        "no texts",
        "no sequences",
        "id outside vocab",
        "no messages",
        "unknown role",
        "nothing to count",
        "unknown role in conversation",
    ],
)
def test_bad_input_names_the_field(client, call, field):
    with pytest.raises(InvalidArgumentError) as info:
        call(client)
    assert info.value.field == field
    assert client.tokenize(["still fine"])[0].token_ids
