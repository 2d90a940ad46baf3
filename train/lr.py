"""Learning-rate schedules: constant, constant_with_warmup, linear, cosine, cosine_with_restarts and
polynomial.

The multipliers are those of diffusers' get_scheduler with its defaults (and transformers' schedules):
warmup is step / max(1, warmup_steps) for step < warmup_steps, so the first optimizer step runs at lr 0
when warmup_steps > 0, as in the reference. The scheduler is stepped once per optimizer step, so `step`
below counts optimizer steps, not micro-steps.

- cosine_with_restarts: get_cosine_with_hard_restarts_schedule_with_warmup with num_cycles=1 (the
  get_scheduler default), which makes it the half-cosine of "cosine" down to 0 at total_steps.
- polynomial: get_polynomial_decay_schedule_with_warmup with lr_end=1e-7 and power=1.0 (the defaults),
  i.e. a linear decay from the base lr to the ABSOLUTE lr 1e-7. As a multiplier that end depends on the
  base lr, so `lr_multiplier` takes `base_lr` and `build_lr_scheduler` passes optimizer.defaults["lr"]
  (the AdamW's constructor lr = the configured learning_rate), exactly the lr_init diffusers reads.

One deliberate difference: past total_steps, cosine stays at 0 (diffusers' half-cosine rises again);
linear and cosine_with_restarts are 0 there and polynomial is lr_end in both.
"""

import functools
import math

import torch
from torch.optim.lr_scheduler import LambdaLR

LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
# diffusers' get_scheduler defaults, which VideoX-Fun's train.py never overrides.
RESTART_CYCLES = 1
POLY_LR_END = 1e-7
POLY_POWER = 1.0
_DECAYS = ("linear", "cosine", "cosine_with_restarts", "polynomial")


def _check(name: str, warmup_steps: int, total_steps: int, base_lr: float | None) -> None:
    if name not in LR_SCHEDULERS:
        raise ValueError(f"unknown lr_scheduler {name!r}; choose one of {', '.join(LR_SCHEDULERS)}")
    if warmup_steps < 0 or total_steps < 0:
        raise ValueError(f"warmup_steps and total_steps must be >= 0, got {warmup_steps} and {total_steps}")
    if name in _DECAYS and warmup_steps > total_steps:
        # The lr would drop from its peak straight to the end at the end of warmup: surely a config mistake.
        raise ValueError(f"{name} needs warmup_steps <= total_steps, got {warmup_steps} > {total_steps}")
    if name == "polynomial" and base_lr is None:
        raise ValueError("polynomial decays to an absolute lr, so lr_multiplier needs base_lr")
    if name == "polynomial" and not base_lr > POLY_LR_END:
        raise ValueError(f"polynomial decays to lr {POLY_LR_END:g} and needs a learning_rate above it, got {base_lr}")


def lr_multiplier(name: str, step: int, warmup_steps: int, total_steps: int, base_lr: float | None = None) -> float:
    """Factor applied to the base lr at optimizer step `step` (0 = before the first update). base_lr is
    needed by "polynomial" only (its end lr is absolute) and ignored by the others."""
    _check(name, warmup_steps, total_steps, base_lr)
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
    if name == "polynomial":
        if step > total_steps:
            return POLY_LR_END / base_lr
        # diffusers' arithmetic, term for term, so the lr is the same to the last bit or two.
        remaining = 1 - (step - warmup_steps) / decay_steps
        return ((base_lr - POLY_LR_END) * remaining**POLY_POWER + POLY_LR_END) / base_lr
    progress = (step - warmup_steps) / decay_steps
    if name == "cosine_with_restarts":
        if progress >= 1.0:
            return 0.0
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((RESTART_CYCLES * progress) % 1.0))))
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))  # cosine


def build_lr_scheduler(optimizer: torch.optim.Optimizer, name: str, warmup_steps: int, total_steps: int) -> LambdaLR:
    """A LambdaLR applying `lr_multiplier` to every param group's lr. Call `.step()` once per optimizer step.

    base_lr is optimizer.defaults["lr"], as diffusers' polynomial schedule reads it, so polynomial ends
    at 1e-7 for a group with the default lr (a group with another lr ends at the same fraction of it).

    Resume: save `scheduler.state_dict()` and, on a fresh scheduler built with the same arguments,
    `load_state_dict()` after the optimizer's. The lambda is a functools.partial: LambdaLR stores only
    its (empty) __dict__, so the schedule's arguments come from the config, never from the checkpoint.
    """
    base_lr = optimizer.defaults["lr"]
    _check(name, warmup_steps, total_steps, base_lr)
    fn = functools.partial(
        lr_multiplier, name, warmup_steps=warmup_steps, total_steps=total_steps, base_lr=float(base_lr)
    )
    return LambdaLR(optimizer, fn)
