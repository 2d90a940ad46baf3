"""The precision policy shared by every model: low-precision weights run under autocast."""

import contextlib

import torch


def autocast_for_weights(device_type: str, param_dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Autocast to the weights' dtype when they are not float32 and no autocast is on.

    bf16 weights arrive under FSDP2 / DeepSpeed mixed precision or from a bf16 release file; the
    reference runs such models under autocast, which is what keeps each model's explicit float32
    regions (norms, residual stream, modulation) meaningful. fp32 weights, or an autocast the caller
    already opened, are left alone."""
    if param_dtype != torch.float32 and not torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, dtype=param_dtype)
    return contextlib.nullcontext()
