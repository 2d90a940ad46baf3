"""Learning-rate schedules: constant, constant_with_warmup, linear and cosine.

The multipliers are those of diffusers' get_scheduler (and transformers' schedules): warmup is
step / max(1, warmup_steps) for step < warmup_steps, so the first optimizer step runs at lr 0 when
warmup_steps > 0, as in the reference. The scheduler is stepped once per optimizer step, so `step`
below counts optimizer steps, not micro-steps.

One deliberate difference: past total_steps, cosine stays at 0 (diffusers' half-cosine rises again);
linear is 0 there in both.
"""

import functools
import math

import torch
from torch.optim.lr_scheduler import LambdaLR

LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")


def _check(name: str, warmup_steps: int, total_steps: int) -> None:
    if name not in LR_SCHEDULERS:
        raise ValueError(f"unknown lr_scheduler {name!r}; choose one of {', '.join(LR_SCHEDULERS)}")
    if warmup_steps < 0 or total_steps < 0:
        raise ValueError(f"warmup_steps and total_steps must be >= 0, got {warmup_steps} and {total_steps}")
    if name in ("linear", "cosine") and warmup_steps > total_steps:
        # The lr would drop from its peak straight to 0 at the end of warmup: surely a config mistake.
        raise ValueError(f"{name} needs warmup_steps <= total_steps, got {warmup_steps} > {total_steps}")


def lr_multiplier(name: str, step: int, warmup_steps: int, total_steps: int) -> float:
    """Factor applied to the base lr at optimizer step `step` (0 = before the first update)."""
    _check(name, warmup_steps, total_steps)
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if name == "constant":
        return 1.0
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    if name == "constant_with_warmup":
        return 1.0
    decay_steps = max(1, total_steps - warmup_steps)
    if name == "linear":
        return max(0.0, (total_steps - step) / decay_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)  # cosine
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_lr_scheduler(optimizer: torch.optim.Optimizer, name: str, warmup_steps: int, total_steps: int) -> LambdaLR:
    """A LambdaLR applying `lr_multiplier` to every param group's lr. Call `.step()` once per optimizer step.

    Resume: save `scheduler.state_dict()` and, on a fresh scheduler built with the same arguments,
    `load_state_dict()` after the optimizer's. The lambda is a functools.partial: LambdaLR stores only
    its (empty) __dict__, so the schedule's arguments come from the config, never from the checkpoint.
    """
    _check(name, warmup_steps, total_steps)
    fn = functools.partial(lr_multiplier, name, warmup_steps=warmup_steps, total_steps=total_steps)
    return LambdaLR(optimizer, fn)
