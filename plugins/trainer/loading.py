"""Building trained models without a full host copy per rank.

Every rank used to read the checkpoint into a full fp32 model on the host and hand it to DeepSpeed
(a 7B: ~31 GB per rank, ~250 GB per 8-GPU node). Here the model is built where it will live, in the
dtype it trains in, and the safetensors tensors are copied in one at a time:

- ZeRO-0/1/2: on the meta device, converted to the training dtype there, materialised once on the
  rank's device (``cuda:LOCAL_RANK``, or the CPU) and filled tensor by tensor — one copy, on the GPU
  when there is one, bf16 when training is bf16;
- ZeRO-3: under ``deepspeed.zero.Init`` (each module's parameters are partitioned as soon as it is
  built), then each rank copies only its own flat slice of every checkpoint tensor into its partition
  (``core.checkpoint.load_weights_into``): no rank ever holds more than its partition plus the one
  tensor being read (safetensors are memory-mapped).

Public for the stages with several models (PPO): :func:`load_causal_lm`, :func:`load_reward_model`,
:func:`build_model`, :func:`is_partitioned`, :func:`zero_parameter`.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from internlm2.core import InternLM2Config, InternLM2ForCausalLM, InternLM2ForRewardModel
from internlm2.core.checkpoint import load_weights_into

from .config import TrainingConfig, training_dtype


def training_device() -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` when CUDA is there, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


@contextlib.contextmanager
def _skip_init():
    """Parameters built to be overwritten by a checkpoint skip their random init (at 1.8B+ the init of
    a CPU-built model costs more than reading the weights)."""
    names = ("normal_", "uniform_", "kaiming_uniform_", "zeros_", "ones_")
    saved = {n: getattr(nn.init, n) for n in names}
    try:
        for n in names:
            setattr(nn.init, n, lambda tensor, *a, **k: tensor)
        yield
    finally:
        for n, fn in saved.items():
            setattr(nn.init, n, fn)


def zero3_init(cfg: TrainingConfig):
    """``deepspeed.zero.Init`` for ``cfg`` (parameters partitioned as modules are built), or a no-op below
    ZeRO-3. Initialises torch.distributed first."""
    if cfg.zero_stage != 3:
        return contextlib.nullcontext()
    from .deepspeed_loop import _deepspeed, deepspeed_config, init_distributed

    deepspeed = _deepspeed()
    init_distributed()
    # The dtype comes from the config's bf16 section (training_dtype's rule): DeepSpeed 0.19 ignores an
    # explicit dtype= on accelerators without fp16 (the CPU) and builds bf16.
    return deepspeed.zero.Init(config_dict_or_path=deepspeed_config(cfg),
                               remote_device="cpu" if cfg.offload_params else None)


def build_model(cls: type[nn.Module], config: InternLM2Config, cfg: TrainingConfig) -> nn.Module:
    """An uninitialised ``cls(config)`` placed as ``cfg`` trains it: partitioned under ZeRO-3, else on
    this rank's device in the training dtype. Fill it with :func:`core.checkpoint.load_weights_into`."""
    dtype = training_dtype(cfg)
    if cfg.zero_stage == 3:
        with _skip_init(), zero3_init(cfg):
            return cls(config)
    with torch.device("meta"):
        model = cls(config).to(dtype)
    return model.to_empty(device=training_device())


def is_partitioned(param: torch.Tensor) -> bool:
    """True for a ZeRO-3 parameter whose data is not held here (only its partition ``ds_tensor`` is)."""
    return hasattr(param, "ds_tensor") and param.numel() == 0


def zero_parameter(param: torch.Tensor) -> None:
    """Set a parameter to zero, partitioned or not (a new reward head)."""
    with torch.no_grad():
        (param.ds_tensor if hasattr(param, "ds_tensor") else param).data.zero_()


def load_causal_lm(path: str | Path, cfg: TrainingConfig | None = None,
                   **config_overrides: Any) -> InternLM2ForCausalLM:
    """A causal LM in train mode, ready for DeepSpeed.

    With ``cfg``: placed as ``cfg`` trains it (see the module docstring; no full host copy). Without:
    fp32 on the CPU (DeepSpeed moves and casts it) — for callers that hold the model whole anyway.
    ``config_overrides`` (e.g. ``rope_theta``) replace fields of the checkpoint's config.
    """
    config = InternLM2Config.from_pretrained(path)
    if config_overrides:
        config = config.replace(**config_overrides)
    if cfg is None:
        model = InternLM2ForCausalLM.from_pretrained(path, dtype=torch.float32, device="cpu", config=config)
        return model.train()
    model = build_model(InternLM2ForCausalLM, config, cfg)
    load_weights_into(model, path)
    return model.train()


def load_reward_model(path: str | Path, reward_token_id: int | None, cfg: TrainingConfig) -> InternLM2ForRewardModel:
    """A reward model in train mode, placed as ``cfg`` trains it: a reward checkpoint as it is (the
    token may be overridden), or a causal LM's trunk under a new zero ``v_head`` (its ``output.weight``
    is never read)."""
    from ..algorithms.models import reward_config

    config = InternLM2Config.from_pretrained(path)
    from_lm = not config.is_reward_model
    token = reward_token_id if reward_token_id is not None else config.reward_token_id
    if token is None:
        raise ValueError("reward_token_id: neither the config nor the tokenizer names a reward token")
    model = build_model(InternLM2ForRewardModel, reward_config(config, token), cfg)
    if from_lm:
        load_weights_into(model, path, rename=lambda n: None if n == "output.weight" else n,
                          allow_missing=("v_head.weight",))
        zero_parameter(model.v_head.weight)
    else:
        load_weights_into(model, path)
    return model.train()
