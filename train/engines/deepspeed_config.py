"""The DeepSpeed config our [parallel] / [optim] / [train] values stand for, and a user's
deepspeed_config JSON merged over it (VideoX-Fun ships such files): values our loop depends on are
refused, every other change is reported in one line. No DeepSpeed import: train.plan and the config
checks use it without DeepSpeed installed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from train.engines.base import EngineSetup
from wan.modules.state_dict_io import read_json_object

STAGES = {"zero2": 2, "zero3": 3}
"""Our engine names for the ZeRO stages (VideoX-Fun's --zero_stage maps onto them)."""
_UNSET = object()

# Keys our loop and model construction depend on: a deepspeed_config JSON may not change them (they
# come from [train] and [parallel] engine, which the data loader and zero.Init also follow).
_FIXED_KEYS = {
    ("train_micro_batch_size_per_gpu",): "[train] train_batch_size (per rank)",
    ("gradient_accumulation_steps",): "[train] gradient_accumulation_steps",
    ("train_batch_size",): "[train] train_batch_size and gradient_accumulation_steps",
    ("zero_optimization", "stage"): "[parallel] engine (zero2 or zero3)",
    ("bf16", "enabled"): "[train] mixed_precision",
    ("fp16", "enabled"): "[train] mixed_precision",
}
# The optimizer and lr schedule are ours (built from [optim]); DeepSpeed's would be a second one.
_REFUSED_KEYS = {"optimizer": "[optim]", "scheduler": "[optim] lr_scheduler"}
# DeepSpeed's universal-checkpoint load unpickles its files blindly (weights_only off), past the
# guarded reader our resume installs (load_weights_only): a planted file would run code on resume.
_UNSAFE_KEYS = {
    ("checkpoint", "load_universal"): "resume from our own checkpoints, or merge with tools/zero_to_bf16.py",
}


def generated_config(setup: EngineSetup, world_size: int) -> dict:
    """The DeepSpeed config our [parallel] / [optim] / [train] values stand for (nothing read from disk).
    Whether the engine runs that precision on the device is the engine's check (deepspeed_config)."""
    p, o = setup.parallel, setup.optim
    if p.engine not in STAGES:
        raise ValueError(f"[parallel] engine {p.engine!r} is not a DeepSpeed engine (zero2 or zero3)")
    if setup.mixed_precision not in ("bf16", "fp16", "fp32"):
        raise ValueError(
            f"mixed_precision must be 'bf16', 'fp16' or 'fp32' for DeepSpeed, got {setup.mixed_precision!r}"
        )
    stage = STAGES[p.engine]
    bf16, fp16 = setup.mixed_precision == "bf16", setup.mixed_precision == "fp16"
    zero: dict[str, Any] = {
        "stage": stage,
        "reduce_bucket_size": p.reduce_bucket_size,
        "overlap_comm": p.overlap_comm,
        "contiguous_gradients": True,
    }
    if stage == 2:
        zero["allgather_bucket_size"] = p.allgather_bucket_size
    else:
        zero["stage3_prefetch_bucket_size"] = p.stage3_prefetch_bucket_size
        zero["stage3_param_persistence_threshold"] = p.stage3_param_persistence_threshold
        zero["stage3_max_live_parameters"] = p.stage3_max_live_parameters
        # True (DeepSpeed's default) makes zero.Init replace torch.nn.functional.linear process-wide,
        # for good, by its own autograd function: every later F.linear (encoders, the other engines)
        # would run DeepSpeed's code. Plain F.linear works under ZeRO-3 (parameters are gathered by the
        # module hooks before use).
        zero["memory_efficient_linear"] = False
    if p.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if stage == 3 and p.offload_param:
        zero["offload_param"] = {"device": "cpu"}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": setup.micro_batch_size,
        "gradient_accumulation_steps": setup.accumulation_steps,
        "train_batch_size": setup.micro_batch_size * setup.accumulation_steps * world_size,
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": False},
        "gradient_clipping": o.max_grad_norm,
        "zero_optimization": zero,
        # With offload_optimizer DeepSpeed insists on its DeepSpeedCPUAdam (a C++ op compiled at first
        # use, ~30 s on CPU, needing a compiler on every node). We keep our torch AdamW (foreach, on the
        # host where the offloaded partitions live): slower per step than CPUAdam, but the same
        # arithmetic as the other engines and nothing to compile.
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**62,  # we log ourselves
        "wall_clock_breakdown": False,
    }
    if fp16:
        # Dynamic loss scaling with GradScaler's rule (loss_scale 0 = dynamic; hysteresis 1: halve on the
        # first overflow; DeepSpeed's default would wait for a second one).
        config["fp16"] = {
            "enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 2000,
            "hysteresis": 1, "consecutive_hysteresis": False, "min_loss_scale": 1,
        }  # fmt: skip
    if bf16 or fp16:
        # Gradients are reduced across ranks in fp32 (as the other engines do) rather than in bf16 / fp16.
        config["communication_data_type"] = "fp32"
    return config


def read_override(path: str) -> dict:
    """The JSON object of a deepspeed_config file; ValueError naming the file when it is unusable."""
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"deepspeed_config {path}: no such file")
    try:
        return read_json_object(file)
    except ValueError as err:
        raise ValueError(f"deepspeed_config {err}") from None


def _nested(config: dict, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(config, dict):
            return None
        config = config.get(key)
    return config


def merge_override(ours: dict, theirs: dict, source: str, prefix: tuple[str, ...] = ()) -> list[str]:
    """Deep-merge `theirs` over `ours` in place; returns one line per value that changed,
    `deepspeed_config FILE: key.path: ours -> theirs`. Keys our loop depends on are refused."""
    lines = []
    for path, advice in _UNSAFE_KEYS.items():
        value = _nested(theirs, path) if not prefix else None
        if value:
            raise ValueError(
                f"deepspeed_config {source}: {'.'.join(path)} = {value!r} is refused: it reads checkpoints with "
                f"a blanket unpickle; {advice} instead"
            )
    for key, value in theirs.items():
        path = (*prefix, key)
        dotted = ".".join(path)
        if value == "auto":  # accelerate's placeholder (VideoX-Fun's JSON files): the run's own value
            continue
        if not prefix and key in _REFUSED_KEYS:
            raise ValueError(
                f"deepspeed_config {source}: {dotted!r} is not supported; set {_REFUSED_KEYS[key]} instead"
            )
        current = ours.get(key, _UNSET)
        if isinstance(value, dict) and isinstance(current, dict):
            lines += merge_override(current, value, source, path)
            continue
        if path in _FIXED_KEYS and value != current:
            raise ValueError(
                f"deepspeed_config {source}: {dotted} = {value!r} conflicts with the run's {current!r}; "
                f"set {_FIXED_KEYS[path]} instead"
            )
        if current is _UNSET or value != current:
            was = "(unset)" if current is _UNSET else json.dumps(current)
            lines.append(f"deepspeed_config {source}: {dotted}: {was} -> {json.dumps(value)}")
        ours[key] = value
    return lines
