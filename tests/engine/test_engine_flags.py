"""Every EngineConfig field is a `internlm2 serve inference` flag (vLLM's names), parsed by the real CLI
into the EngineConfig the server builds; the flag table stays importable without torch; chunked prefill
off runs each prompt in one step."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from internlm2.core.engine import EngineConfig
from internlm2.services.inference.server import engine_config_from_args
from internlm2_client.cli import build_parser
from internlm2_client.cli._engine_flags import ENGINE_FLAGS

pytestmark = pytest.mark.timeout(120)


def parse(*flags: str):
    return build_parser().parse_args(["serve", "inference", "--model", "m", *flags])


def test_every_engine_config_field_has_exactly_one_flag():
    fields = [f.name for f in dataclasses.fields(EngineConfig)]
    rows = [row.field for row in ENGINE_FLAGS]
    assert sorted(rows) == sorted(fields), set(fields) ^ set(rows)
    flags = [name for row in ENGINE_FLAGS for name in (row.flag, *row.aliases)]
    assert len(flags) == len(set(flags))


def test_no_flag_keeps_every_default():
    assert engine_config_from_args(parse()) == EngineConfig()


def test_every_flag_reaches_its_field():
    args = parse(
        "--max-num-seqs", "8", "--max-num-batched-tokens", "512", "--block-size", "32",
        "--num-gpu-blocks-override", "100", "--gpu-memory-utilization", "0.5", "--kv-cache-memory-bytes", "4096",
        "--no-enable-prefix-caching", "--no-enable-chunked-prefill", "--max-queue-size", "7",
        "--max-model-len", "256", "--enforce-eager", "--cuda-graph-sizes", "1", "2", "8", "--seed", "9",
    )
    config = engine_config_from_args(args)
    expected = EngineConfig(
        max_num_seqs=8, max_num_batched_tokens=512, block_size=32, num_gpu_blocks=100,
        kv_cache_memory_fraction=0.5, kv_cache_bytes=4096, enable_prefix_caching=False,
        enable_chunked_prefill=False, max_queue_size=7, max_model_len=256, enforce_eager=True,
        cuda_graph_batch_sizes=(1, 2, 8), seed=9,
    )
    assert config == expected
    # Every field differs from its default, so no row is silently ignored.
    default = EngineConfig()
    assert all(getattr(config, f.name) != getattr(default, f.name) for f in dataclasses.fields(EngineConfig))


def test_the_former_prefix_caching_spelling_still_works():
    assert engine_config_from_args(parse("--no-prefix-caching")).enable_prefix_caching is False


def test_a_bad_value_is_a_config_error_naming_the_field():
    from internlm2.core.config import ConfigError

    with pytest.raises(ConfigError, match="kv_cache_memory_fraction"):
        engine_config_from_args(parse("--gpu-memory-utilization", "1.5"))
    with pytest.raises(SystemExit):  # argparse: not an integer
        parse("--max-num-seqs", "many")


def test_the_flag_table_and_the_cli_import_without_torch():
    code = ("import sys; import internlm2_client.cli._engine_flags, internlm2_client.cli; "
            "internlm2_client.cli.build_parser(); assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_without_chunked_prefill_a_prompt_runs_in_one_step_and_the_context_is_capped():
    from internlm2.core import InternLM2Config, random_model
    from internlm2.core.engine import InvalidRequestError, LLMEngine, SamplingParams

    model = random_model(InternLM2Config.preset("tiny"), seed=0)
    config = dict(max_num_seqs=4, max_num_batched_tokens=64, block_size=4, num_gpu_blocks=256)
    chunked = LLMEngine(model, None, EngineConfig(**config))
    whole = LLMEngine(model, None, EngineConfig(**config, enable_chunked_prefill=False))
    assert whole.max_model_len == 64 < chunked.max_model_len
    params = SamplingParams(temperature=0.0, max_new_tokens=4, ignore_eos=True)
    short, longer = list(range(5, 45)), list(range(5, 55))  # 40 then 50 tokens: not both in one 64 budget
    for engine in (chunked, whole):
        engine.add_request("a", short, params)
        engine.add_request("b", longer, params)
    first = chunked.scheduler.schedule()
    assert first.num_new_tokens == [40, 24]  # b's prompt is split
    first = whole.scheduler.schedule()
    assert first.num_new_tokens == [40]  # b waits for a step with room for all 50
    with pytest.raises(InvalidRequestError):
        whole.add_request("c", list(range(5, 70)), params)
