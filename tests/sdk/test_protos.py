"""The gRPC contract (protos/internlm2/v1): generated code up to date, every element documented,
buf lint clean, and the shape the services and the engine rely on."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[2]
GENERATED = REPO / "sdk" / "python" / "internlm2" / "v1"


def test_generated_code_is_up_to_date(tmp_path):
    """Regenerates into a temp dir; the committed files must be byte-identical
    (run `python -m internlm2_client._codegen` after editing a .proto)."""
    from internlm2_client import _codegen

    fresh = _codegen.generate(tmp_path)
    committed = _codegen.generated_files()
    assert [p.name for p in fresh] == [p.name for p in committed], "generated file set differs"
    stale = [p.name for p in fresh if p.read_bytes() != (GENERATED / p.name).read_bytes()]
    if stale:
        from importlib.metadata import version as installed

        version = installed("grpcio-tools")
        pytest.fail(
            f"stale generated files {stale}: rerun `python -m internlm2_client._codegen` "
            f"(with the pinned grpcio-tools; this one is {version})"
        )
    assert len(fresh) == 3 * len(_codegen.proto_files()) == 15


# FileDescriptorProto / DescriptorProto field numbers used in SourceCodeInfo paths.
_MESSAGE, _ENUM, _SERVICE = 4, 5, 6
_FIELD, _NESTED, _NESTED_ENUM, _ONEOF = 2, 3, 4, 8
_ENUM_VALUE, _METHOD = 2, 2


def _undocumented(file_proto) -> list[str]:
    documented = {tuple(loc.path) for loc in file_proto.source_code_info.location if loc.leading_comments.strip()}
    missing: list[str] = []

    def enum(e, path, prefix):
        if path not in documented:
            missing.append(f"{prefix}{e.name}")
        for i, v in enumerate(e.value):
            if (*path, _ENUM_VALUE, i) not in documented:
                missing.append(f"{prefix}{e.name}.{v.name}")

    def message(m, path, prefix):
        if path not in documented:
            missing.append(f"{prefix}{m.name}")
        for i, f in enumerate(m.field):
            if (*path, _FIELD, i) not in documented:
                missing.append(f"{prefix}{m.name}.{f.name}")
        for i, o in enumerate(m.oneof_decl):
            # proto3 `optional` makes synthetic oneofs ("_temperature"); those carry no comment.
            synthetic = any(f.proto3_optional and f.oneof_index == i for f in m.field)
            if not synthetic and (*path, _ONEOF, i) not in documented:
                missing.append(f"{prefix}{m.name} oneof {o.name}")
        for i, n in enumerate(m.nested_type):
            if not n.options.map_entry:
                message(n, (*path, _NESTED, i), f"{prefix}{m.name}.")
        for i, e in enumerate(m.enum_type):
            enum(e, (*path, _NESTED_ENUM, i), f"{prefix}{m.name}.")

    for i, m in enumerate(file_proto.message_type):
        message(m, (_MESSAGE, i), "")
    for i, e in enumerate(file_proto.enum_type):
        enum(e, (_ENUM, i), "")
    for i, s in enumerate(file_proto.service):
        if (_SERVICE, i) not in documented:
            missing.append(s.name)
        for j, rpc in enumerate(s.method):
            if (_SERVICE, i, _METHOD, j) not in documented:
                missing.append(f"{s.name}.{rpc.name}")
    return missing


def test_every_element_has_a_doc_comment(tmp_path):
    from google.protobuf import descriptor_pb2

    from internlm2_client import _codegen

    fds = descriptor_pb2.FileDescriptorSet.FromString(
        _codegen.descriptor_set_with_source_info(tmp_path / "set.pb").read_bytes()
    )
    ours = [f for f in fds.file if f.package == "internlm2.v1"]
    assert len(ours) == 5
    missing = {f.name: _undocumented(f) for f in ours}
    assert not any(missing.values()), f"undocumented proto elements: {missing}"


def test_the_walk_finds_a_missing_comment():
    """The check above must be able to fail: an undocumented field is reported."""
    from google.protobuf import descriptor_pb2

    fp = descriptor_pb2.FileDescriptorProto(name="x.proto")
    m = fp.message_type.add(name="M")
    m.field.add(name="f", number=1)
    loc = fp.source_code_info.location.add(path=[_MESSAGE, 0])
    loc.leading_comments = " A message.\n"
    assert _undocumented(fp) == ["M.f"]


def _buf() -> str | None:
    local = REPO / "node_modules" / ".bin" / "buf"
    return str(local) if local.exists() else shutil.which("buf")


@pytest.mark.skipif(_buf() is None, reason="buf is not installed (npm install @bufbuild/buf; .ci/run does it)")
def test_buf_lint_is_clean_and_catches_violations(tmp_path):
    buf = _buf()
    env = {**os.environ, "BUF_CACHE_DIR": str(tmp_path / "cache")}
    ok = subprocess.run([buf, "lint"], cwd=REPO, capture_output=True, text=True, env=env, timeout=60)
    assert ok.returncode == 0, ok.stdout + ok.stderr

    # Same config on a module with one bad RPC: buf must report it (the lint is live).
    module = tmp_path / "mod"
    shutil.copytree(REPO / "protos", module / "protos")
    shutil.copy(REPO / "buf.yaml", module / "buf.yaml")
    bad = module / "protos" / "internlm2" / "v1" / "bad.proto"
    bad.write_text(
        'syntax = "proto3";\npackage internlm2.v1;\n// Bad.\nservice BadService {\n'
        "  // Bad.\n  rpc Go(GetJobRequestX) returns (GetJobRequestX);\n}\n"
        "// X.\nmessage GetJobRequestX {\n  string undocumented = 1;\n}\n"
    )
    fail = subprocess.run([buf, "lint"], cwd=module, capture_output=True, text=True, env=env, timeout=60)
    assert fail.returncode != 0
    assert "COMMENT_FIELD" in fail.stdout or "undocumented" in fail.stdout, fail.stdout
    assert "RPC_REQUEST_STANDARD_NAME" in fail.stdout or "GoRequest" in fail.stdout, fail.stdout


def test_services_and_rpcs_are_the_shared_contract():
    from internlm2.v1 import inference_pb2, reward_pb2, tokenizer_pb2, training_pb2

    services = {
        s.full_name: [m.name for m in s.methods]
        for mod in (tokenizer_pb2, inference_pb2, reward_pb2, training_pb2)
        for s in mod.DESCRIPTOR.services_by_name.values()
    }
    assert services == {
        "internlm2.v1.TokenizerService": [
            "Tokenize",
            "Detokenize",
            "ApplyChatTemplate",
            "CountTokens",
            "GetTokenizerInfo",
        ],
        "internlm2.v1.InferenceService": ["Generate", "GenerateStream", "Abort", "GetModelInfo"],
        "internlm2.v1.RewardService": ["Score", "Compare", "Rank"],
        "internlm2.v1.TrainingService": [
            "ListStages",
            "SubmitJob",
            "GetJob",
            "ListJobs",
            "CancelJob",
            "WatchJob",
            "RetryJob",
            "PlanJob",
        ],
    }
    stream = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].methods_by_name["GenerateStream"]
    assert stream.server_streaming and not stream.client_streaming
    watch = training_pb2.DESCRIPTOR.services_by_name["TrainingService"].methods_by_name["WatchJob"]
    assert watch.server_streaming


# The engine's SamplingParams (docs/HELPERS.md); every field must be expressible over the wire.
ENGINE_SAMPLING_FIELDS = {
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "max_new_tokens",
    "min_new_tokens",
    "stop",
    "stop_token_ids",
    "ignore_eos",
    "logprobs",
    "prompt_logprobs",
    "skip_special_tokens",
    "n",
    "structured_output",
    "best_of",
}


def test_sampling_params_mirror_the_engine_and_unset_differs_from_zero():
    from internlm2.v1 import inference_pb2

    desc = inference_pb2.SamplingParams.DESCRIPTOR
    assert set(desc.fields_by_name) == ENGINE_SAMPLING_FIELDS
    scalars = [f for f in desc.fields if not f.is_repeated and f.message_type is None]
    assert all(f.has_presence for f in scalars), [f.name for f in scalars if not f.has_presence]
    p = inference_pb2.SamplingParams(temperature=0.0)
    assert p.HasField("temperature") and not p.HasField("top_p")
    # stop_token_ids: unset (tokenizer defaults) vs set-but-empty (no stop ids) survive the wire.
    empty = inference_pb2.SamplingParams()
    empty.stop_token_ids.SetInParent()
    assert inference_pb2.SamplingParams.FromString(empty.SerializeToString()).HasField("stop_token_ids")
    assert not inference_pb2.SamplingParams.FromString(b"").HasField("stop_token_ids")


def test_engine_sampling_params_match_when_the_platform_is_installed():
    try:
        from internlm2.core.engine import SamplingParams
    except ImportError as e:
        pytest.skip(f"engine not importable here ({e}); the literal list above is the contract")
    import dataclasses

    assert {f.name for f in dataclasses.fields(SamplingParams)} == ENGINE_SAMPLING_FIELDS


def test_stream_response_is_a_delta_or_final_oneof():
    from internlm2.v1 import inference_pb2, training_pb2

    oneof = inference_pb2.GenerateStreamResponse.DESCRIPTOR.oneofs_by_name["event"]
    assert [f.name for f in oneof.fields] == ["delta", "final"]
    watch = training_pb2.WatchJobResponse.DESCRIPTOR.oneofs_by_name["event"]
    assert [f.name for f in watch.fields] == ["state_changed", "progress", "metrics", "artifact", "log"]
    # Generate and GenerateStream take the same request fields with the same numbers.
    a, b = inference_pb2.GenerateRequest.DESCRIPTOR, inference_pb2.GenerateStreamRequest.DESCRIPTOR
    assert [(f.name, f.number, f.type) for f in a.fields] == [(f.name, f.number, f.type) for f in b.fields]
