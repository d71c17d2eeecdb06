"""`internlm2 generate` / `chat` sampling flags for n and structured output reach the request proto."""

from __future__ import annotations

import json

import pytest

from internlm2_client import _convert as cv
from internlm2_client.cli import build_parser
from internlm2_client.cli._inference import sampling_from_args


def sampling_pb(*flags: str):
    return cv.sampling_to_pb(sampling_from_args(build_parser().parse_args(["generate", "hi", *flags])))


def test_n_and_each_structured_output_kind(tmp_path):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    pb = sampling_pb("-n", "3", "--best-of", "5", "--json-schema", json.dumps(schema))
    assert pb.n == 3 and pb.best_of == 5 and json.loads(pb.structured_output.json_schema) == schema
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(schema))
    assert json.loads(sampling_pb("--json-schema", f"@{path}").structured_output.json_schema) == schema
    assert sampling_pb("--regex", "[0-9]+").structured_output.regex == "[0-9]+"
    grammar = tmp_path / "g.ebnf"
    grammar.write_text('root ::= "yes" | "no"')
    assert sampling_pb("--grammar", f"@{grammar}").structured_output.grammar == 'root ::= "yes" | "no"'
    assert sampling_pb("--json-object").structured_output.json_object is True
    plain = sampling_pb()
    assert not plain.HasField("n") and not plain.HasField("structured_output")


def test_structured_output_kinds_are_mutually_exclusive():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "hi", "--regex", "a", "--json-object"])
