"""The engine flags of `internlm2 serve inference`: one row per EngineConfig field, under vLLM's name.

Plain data, no torch: the CLI ships in the torch-free SDK, while EngineConfig lives in the platform
(`internlm2.core.engine.params`). The platform's server builds its EngineConfig from the parsed flags by
this same table (`engine_overrides`), and tests/engine/test_engine_flags.py fails when an EngineConfig field
has no row here, so a new engine setting cannot be left unreachable. Every flag defaults to None:
unset means EngineConfig's own default. Helm (`inference.engine`, camelCase key -> `--kebab-case`) and
compose (`INTERNLM2_ENGINE_ARGS`) pass these flags through as they are.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass


@dataclass(frozen=True)
class EngineFlag:
    """``field`` of EngineConfig <- ``flag``; ``kind`` int | float | bool (``--x`` / ``--no-x``) | ints
    (one or more integers); ``aliases`` are older spellings still accepted."""

    field: str
    flag: str
    kind: str
    help: str
    metavar: str | None = None
    aliases: tuple[str, ...] = ()


ENGINE_FLAGS: tuple[EngineFlag, ...] = (
    EngineFlag("max_num_seqs", "--max-num-seqs", "int", "most sequences in one batch", "N"),
    EngineFlag("max_num_batched_tokens", "--max-num-batched-tokens", "int",
               "token budget of one engine step (prefill chunks + decodes); >= --max-num-seqs", "N"),
    EngineFlag("block_size", "--block-size", "int", "tokens per KV-cache block", "N"),
    EngineFlag("num_gpu_blocks", "--num-gpu-blocks-override", "int",
               "exact number of KV-cache blocks (overrides the memory-based sizing)", "N"),
    EngineFlag("kv_cache_memory_fraction", "--gpu-memory-utilization", "float",
               "fraction of the device memory left after the weights and a profiled step that the KV cache "
               "takes, in (0, 1]", "F"),
    EngineFlag("kv_cache_bytes", "--kv-cache-memory-bytes", "int",
               "KV-cache size in bytes (overrides --gpu-memory-utilization)", "BYTES"),
    EngineFlag("enable_prefix_caching", "--enable-prefix-caching", "bool",
               "share the KV of common prompt prefixes between requests (n > 1 siblings share the prompt "
               "through it)", aliases=("--prefix-caching",)),
    EngineFlag("enable_chunked_prefill", "--enable-chunked-prefill", "bool",
               "split long prompts over steps so decodes never stall; off: a prompt is prefilled in one step "
               "and the context is capped at --max-num-batched-tokens"),
    EngineFlag("max_queue_size", "--max-queue-size", "int",
               "sequences waiting beyond this are refused with RESOURCE_EXHAUSTED", "N"),
    EngineFlag("max_model_len", "--max-model-len", "int",
               "longest prompt + completion (default: the model's, capped at what the KV cache holds)", "N"),
    EngineFlag("enforce_eager", "--enforce-eager", "bool", "never capture CUDA graphs"),
    EngineFlag("cuda_graph_batch_sizes", "--cuda-graph-sizes", "ints",
               "decode batch sizes to capture CUDA graphs for (default 1 2 4 8 16 ... max-num-seqs)", "N"),
    EngineFlag("seed", "--seed", "int", "sampling seed of requests that bring none (with their arrival order)",
               "N"),
)


def add_engine_options(parser: argparse.ArgumentParser) -> None:
    """The table's flags on ``parser``; each stores into its EngineConfig field's name."""
    group = parser.add_argument_group("engine (vLLM flag names; unset = the engine's defaults)")
    for row in ENGINE_FLAGS:
        names = (row.flag, *row.aliases)
        if row.kind == "bool":
            group.add_argument(*names, dest=row.field, action=argparse.BooleanOptionalAction, default=None,
                               help=row.help)
        elif row.kind == "ints":
            group.add_argument(*names, dest=row.field, type=int, nargs="+", default=None, metavar=row.metavar,
                               help=row.help)
        else:
            group.add_argument(*names, dest=row.field, type=int if row.kind == "int" else float, default=None,
                               metavar=row.metavar, help=row.help)


def engine_overrides(args: argparse.Namespace) -> dict:
    """EngineConfig keyword arguments for the flags that were given (lists as tuples)."""
    out = {}
    for row in ENGINE_FLAGS:
        value = getattr(args, row.field, None)
        if value is not None:
            out[row.field] = tuple(value) if row.kind == "ints" else value
    return out
