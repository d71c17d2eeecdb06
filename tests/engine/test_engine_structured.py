"""Structured output (xgrammar bitmasks) and n > 1 sibling sequences in the engine, on a tiny random model
with the official tokenizer: a random model's output is only valid JSON / a regex match because the
grammar forces it."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from internlm2.core import InternLM2Config, random_model
from internlm2.core.engine import EngineConfig, InvalidRequestError, LLMEngine, SamplingParams, StructuredOutput

pytestmark = pytest.mark.timeout(240)

SCHEMA = {
    "type": "object",
    "properties": {
        "a": {"type": "integer", "minimum": 0, "maximum": 999},
        "b": {"enum": ["x", "y"]},
        "c": {"type": "boolean"},
    },
    "required": ["a", "b", "c"],
    "additionalProperties": False,
}
REGEX = r"[0-9]{3}-[a-z]{2,4}"
GRAMMAR = 'root ::= ("yes" | "no") " " [0-9]'


@pytest.fixture(scope="module")
def engine(tok):
    model = random_model(InternLM2Config.preset("tiny"), seed=0)
    return LLMEngine(model, tok, EngineConfig(block_size=4, max_num_seqs=8, num_gpu_blocks=256))


@pytest.fixture(scope="module")
def prompt(tok):
    return tok.encode("Hello world, please answer")


def constrained(seed: int, max_new_tokens: int = 64, **spec) -> SamplingParams:
    return SamplingParams(seed=seed, max_new_tokens=max_new_tokens, structured_output=StructuredOutput(**spec))


def test_json_schema_output_parses_and_validates(engine, prompt):
    outs = engine.generate([prompt] * 4, [constrained(s, json_schema=json.dumps(SCHEMA)) for s in range(4)])
    for out in outs:
        assert out.finish_reason == "eos", out
        jsonschema.validate(json.loads(out.new_text), SCHEMA)


def test_json_object_output_is_an_object(engine, prompt):
    out = engine.generate([prompt], constrained(3, max_new_tokens=200, json_object=True))[0]
    if out.finish_reason == "eos":  # an unbounded object may run out of tokens; a finished one must parse
        assert isinstance(json.loads(out.new_text), dict)
    else:
        assert out.new_text.startswith("{")


def test_regex_and_grammar_outputs_fullmatch(engine, prompt):
    outs = engine.generate([prompt] * 4, [constrained(s, regex=REGEX) for s in range(4)])
    assert all(o.finish_reason == "eos" and re.fullmatch(REGEX, o.new_text) for o in outs), outs
    outs = engine.generate([prompt] * 3, [constrained(s, grammar=GRAMMAR) for s in range(3)])
    assert all(re.fullmatch(r"(yes|no) [0-9]", o.new_text) for o in outs), outs


def test_constrained_and_unconstrained_rows_share_a_batch(engine, prompt, tok):
    """The unconstrained rows are token-exact with running alone: the bitmask touches only its rows."""
    free = [SamplingParams(seed=10 + i, max_new_tokens=12, ignore_eos=True) for i in range(2)]
    alone = engine.generate([prompt] * 2, free)
    mixed = engine.generate([prompt] * 4, [free[0], constrained(1, regex=REGEX), free[1],
                                           constrained(2, json_schema=json.dumps(SCHEMA))])
    assert mixed[0].new_token_ids == alone[0].new_token_ids
    assert mixed[2].new_token_ids == alone[1].new_token_ids
    assert re.fullmatch(REGEX, mixed[1].new_text)
    jsonschema.validate(json.loads(mixed[3].new_text), SCHEMA)
    # The unconstrained output is not itself forced into any of these shapes.
    assert not re.fullmatch(REGEX, tok.decode(alone[0].new_token_ids))


def test_seeded_constrained_output_is_reproducible(engine, prompt):
    spec = json.dumps(SCHEMA)
    first = engine.generate([prompt], constrained(7, json_schema=spec))[0]
    again = engine.generate([prompt, prompt], [constrained(8, regex=REGEX), constrained(7, json_schema=spec)])[1]
    assert first.new_token_ids == again.new_token_ids


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"json_schema": '{"type": 5}'}, "structured_output.json_schema"),
        ({"json_schema": "not json"}, "structured_output.json_schema"),
        ({"json_schema": "[1, 2]"}, "structured_output.json_schema"),
        ({"regex": "(ab"}, "structured_output.regex"),
        ({"grammar": "root ::= undefined_rule"}, "structured_output.grammar"),
        ({"grammar": "  "}, "structured_output.grammar"),
        ({"json_object": False}, "structured_output"),
        ({}, "structured_output"),
        ({"regex": "a", "grammar": 'root ::= "a"'}, "structured_output"),
    ],
)
def test_bad_specs_name_their_field(engine, prompt, spec, field):
    with pytest.raises(InvalidRequestError) as info:
        engine.add_request("bad", prompt, SamplingParams(structured_output=StructuredOutput(**spec)))
    assert info.value.field == field
    assert not engine.has_unfinished()



def test_a_deeply_nested_schema_is_refused_by_its_depth_before_parsing(engine, prompt):
    # The same depth rule the services apply to tool JSON (core/json_limits.py): refused as too deep,
    # never parsed into a RecursionError.
    spec = StructuredOutput(json_schema="[" * 30_000 + "]" * 30_000)
    with pytest.raises(InvalidRequestError) as info:
        engine.add_request("deep", prompt, SamplingParams(structured_output=spec))
    assert info.value.field == "structured_output.json_schema"
    assert "levels deep" in str(info.value) and "recursion" not in str(info.value).lower()

def test_a_constrained_request_must_be_able_to_end(engine, prompt):
    so = StructuredOutput(regex=REGEX)
    with pytest.raises(InvalidRequestError) as info:
        engine.add_request("x", prompt, SamplingParams(structured_output=so, ignore_eos=True))
    assert info.value.field == "structured_output"
    with pytest.raises(InvalidRequestError) as info:
        engine.add_request("x", prompt, SamplingParams(structured_output=so, min_new_tokens=2))
    assert info.value.field == "min_new_tokens"
    # Its own stop ids end it instead of the tokenizer's.
    out = engine.generate([prompt], SamplingParams(seed=1, structured_output=so, ignore_eos=True,
                                                   stop_token_ids=[2]))[0]
    assert out.finish_reason == "stop" and out.stop_reason == 2 and re.fullmatch(REGEX, out.new_text)


def test_the_device_and_host_bitmask_expansions_agree():
    """apply_bitmask's GPU path (shifts on the device) and CPU path (numpy unpackbits + bias) mask the same
    tokens; both run here on CPU tensors."""
    from internlm2.core.engine.structured import apply_bitmask, forbidden_tokens

    vocab = 1000
    words = torch.randint(-(2**31), 2**31 - 1, (3, (vocab + 31) // 32), dtype=torch.int32,
                          generator=torch.Generator().manual_seed(0))
    logits = torch.zeros(5, vocab)
    apply_bitmask(logits, [0, 2, 4], words)
    expected = forbidden_tokens(words, vocab)
    assert torch.equal(torch.isinf(logits[[0, 2, 4]]), expected)
    assert not torch.isinf(logits[[1, 3]]).any()
    assert 0.4 < expected.float().mean() < 0.6  # random words: about half the tokens each way
    for v in (0, 31, 32, 999):  # bit v % 32 of word v // 32
        assert bool(expected[0, v]) == (not (int(words[0, v // 32]) >> (v % 32)) & 1)


# ---- n > 1 -------------------------------------------------------------------------------------------


def test_n_siblings_share_the_prompt_blocks(tok):
    """Sibling sequences start from the leader's cached prompt blocks (ref counted), so n = 4 over a long
    prompt holds far fewer blocks than 4 separate requests without the cache."""
    model = random_model(InternLM2Config.preset("tiny"), seed=0)
    prompt = tok.encode("the quick brown fox jumps over the lazy dog " * 12)
    assert len(prompt) > 100

    def peak_blocks(prefix_caching: bool, n: int, copies: int) -> tuple[int, list]:
        eng = LLMEngine(model, tok, EngineConfig(block_size=4, max_num_seqs=8, num_gpu_blocks=1024,
                                                 enable_prefix_caching=prefix_caching))
        for i in range(copies):
            eng.add_request(f"r{i}", prompt, SamplingParams(n=n, seed=5, max_new_tokens=8, ignore_eos=True))
        peak, outs = 0, []
        while eng.has_unfinished():
            outs += eng.step()
            peak = max(peak, eng.block_manager.num_total_blocks - eng.block_manager.num_free_blocks)
        return peak, outs

    single, _ = peak_blocks(True, 1, 1)
    shared, outs = peak_blocks(True, 4, 1)
    separate, _ = peak_blocks(False, 1, 4)
    assert shared < 1.5 * single < separate, (single, shared, separate)
    finals = [o for o in outs if o.finished]
    assert sorted(o.index for o in finals) == [0, 1, 2, 3]
    assert all(o.prompt_tokens == len(prompt) and o.completion_tokens == 8 for o in finals)


def test_sibling_seeds_are_reproducible_and_sibling_zero_is_the_n1_completion(engine, prompt):
    params = SamplingParams(n=3, seed=11, max_new_tokens=10, ignore_eos=True)
    first = engine.generate([prompt], params)
    again = engine.generate([prompt], params)
    assert [o.index for o in first] == [0, 1, 2]
    assert [o.new_token_ids for o in first] == [o.new_token_ids for o in again]
    single = engine.generate([prompt], SamplingParams(seed=11, max_new_tokens=10, ignore_eos=True))[0]
    assert first[0].new_token_ids == single.new_token_ids
    assert len({tuple(o.new_token_ids) for o in first}) == 3  # distinct streams (temperature 1 over 92k ids)


def test_best_of_siblings_carry_their_cumulative_logprob(engine, prompt):
    params = SamplingParams(n=1, best_of=3, seed=11, max_new_tokens=6, ignore_eos=True)
    outs = engine.generate([prompt], params)
    with_logprobs = engine.generate([prompt], SamplingParams(n=3, seed=11, max_new_tokens=6, ignore_eos=True,
                                                             logprobs=0))
    assert [o.new_token_ids for o in outs] == [o.new_token_ids for o in with_logprobs]
    for out, ref in zip(outs, with_logprobs):
        assert out.cumulative_logprob == pytest.approx(sum(lp.logprob for lp in ref.logprobs), abs=1e-4)
    assert engine.generate([prompt], SamplingParams(n=2, max_new_tokens=2))[0].cumulative_logprob is None
    with pytest.raises(InvalidRequestError) as info:
        engine.add_request("b", prompt, SamplingParams(n=3, best_of=2))
    assert info.value.field == "best_of"


def test_abort_ends_every_sibling(engine, prompt):
    engine.add_request("group", prompt, SamplingParams(n=3, max_new_tokens=50, ignore_eos=True))
    engine.step()
    assert engine.abort("group")
    finals = [o for o in engine.step() if o.finished]
    assert sorted(o.index for o in finals) == [0, 1, 2]
    assert all(o.finish_reason == "cancelled" for o in finals)
    assert not engine.has_unfinished() and not engine.abort("group")


def test_n_out_of_range_names_n(engine, prompt):
    for n in (0, 65, 2.0):
        with pytest.raises(InvalidRequestError) as info:
            engine.add_request("n", prompt, SamplingParams(n=n))
        assert info.value.field == "n"
