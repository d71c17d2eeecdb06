"""The paged KV pool's tensors and how many blocks fit in the memory budget.

Layout per layer: ``k[layer]``, ``v[layer]`` of shape [num_blocks + 1, block_size, Hkv, D]; token slot
``s`` is ``block s // block_size``, row ``s % block_size``. The extra last block is scratch: padded
rows of a CUDA-graph batch write there and nothing ever reads it as real context.
"""

from __future__ import annotations

import logging

import torch

from ..config import ConfigError, InternLM2Config
from .params import EngineConfig

logger = logging.getLogger(__name__)

CPU_KV_CACHE_BYTES = 512 * 2**20  # default budget off-GPU: plenty for tests and the local stack


def bytes_per_block(model_config: InternLM2Config, block_size: int, dtype: torch.dtype) -> int:
    per_token = 2 * model_config.num_hidden_layers * model_config.num_key_value_heads * model_config.head_dim
    return per_token * block_size * torch.empty((), dtype=dtype).element_size()


def plan_num_blocks(config: EngineConfig, model_config: InternLM2Config, dtype: torch.dtype,
                    device: torch.device, max_model_len: int, reserved_bytes: int = 0) -> int:
    """Blocks in the pool. ``reserved_bytes``: device memory the steps themselves need (profiled peak
    activations), taken off the free memory before the fraction is applied."""
    per_block = bytes_per_block(model_config, config.block_size, dtype)
    if config.num_gpu_blocks is not None:
        return config.num_gpu_blocks
    if config.kv_cache_bytes is not None:
        budget, source = config.kv_cache_bytes, "kv_cache_bytes"
    elif device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = int(config.kv_cache_memory_fraction * max(0, free - reserved_bytes))
        source = "kv_cache_memory_fraction"
    else:
        budget, source = CPU_KV_CACHE_BYTES, "default CPU budget"
    num = budget // per_block
    # More blocks than max_num_seqs full-length sequences can use would only hold stale prefixes.
    cap = config.max_num_seqs * -(-max_model_len // config.block_size)
    num = min(num, cap)
    if num < 1:
        raise ConfigError(source, f"{budget} bytes hold no KV block ({per_block} bytes each)")
    logger.info("KV cache: %d blocks of %d tokens (%.1f MiB) from %s", num, config.block_size,
                num * per_block / 2**20, source)
    return num


class PagedKVCache:
    def __init__(self, model_config: InternLM2Config, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device):
        shape = (model_config.num_hidden_layers, num_blocks + 1, block_size,
                 model_config.num_key_value_heads, model_config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.scratch_block = num_blocks

    @property
    def scratch_slot(self) -> int:
        return self.scratch_block * self.block_size
