"""The engines behind the training loop: DDP, DeepSpeed ZeRO-2 / ZeRO-3 and FSDP2, one interface.

An engine owns everything that differs between them: where the DiT is built and how its weights
arrive (whole on every rank, `deepspeed.zero.Init`, or sharded by `fully_shard`), the precision
policy, the optimizer and lr schedule, accumulation boundaries, clipping, skipping non-finite
updates alike on every rank, and saving and loading its own state into a checkpoint folder. The
loop never asks which engine it has:

    with engine.micro_step(last):      # gradients are reduced across ranks only on the last one
        pred = engine.forward(x_t, t, context, clip_fea=..., y=...)   # under the engine's precision
        engine.backward(loss)          # the micro-batch mean; the engine divides by accumulation
    result = engine.step()             # clip, update (unless non-finite), lr schedule, zero grads

Checkpoints: `save(folder)` is collective; every rank writes its own files under `folder` (each
fsynced) and returns their names relative to it; `load(folder)` reads them back, refusing (ValueError
naming the file) a state that does not fit. `full_state()` streams the full weights by official
name for consolidated saves.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn as nn

from train.checkpoint_io import read_json, write_json
from train.distributed import ParallelLayout
from train.lr import build_lr_scheduler

if TYPE_CHECKING:  # the config imports the engines' traits (train/engines/__init__.py)
    from train.config import OptimConfig, ParallelConfig, RunConfig
    from train.models import DiTRecipe

SCHEDULER_FILE = "scheduler.json"
GRAD_SCALER_FILE = "grad_scaler.json"
"""fp16 under an engine stepping with torch.amp.GradScaler: its's state (loss scale, growth tracker), rank 0."""

log = logging.getLogger(__name__)


@dataclass
class EngineSetup:
    """What every engine is built from besides the DiT recipe: the [parallel] and [optim] sections and
    the few run facts that shape the optimizer step."""

    parallel: ParallelConfig
    optim: OptimConfig
    mixed_precision: str
    """"bf16" (bf16 compute, fp32 master weights, fp32 gradient reduction), "fp16" (the same in fp16,
    with dynamic loss scaling; see check_mixed_precision for where) or "fp32"."""
    micro_batch_size: int
    accumulation_steps: int
    total_steps: int
    """Optimizer steps of the whole run (the lr schedule's length)."""
    layout: ParallelLayout
    """Where this process runs: its device, rank and data-parallel place (train/distributed.py)."""

    @property
    def device(self) -> torch.device:
        return self.layout.device


@dataclass
class StepResult:
    grad_norm: float
    """The global gradient norm before clipping (inf or nan when the update was skipped)."""
    updated: bool
    lr: float
    """The learning rate the update used."""


class Engine(Protocol):
    module: nn.Module  # the DiT itself (sharded or partitioned where the engine shards parameters)

    def forward(self, *args, **kwargs) -> torch.Tensor: ...

    def inference_forward(self, *args, **kwargs) -> torch.Tensor:
        """The DiT's prediction under no_grad in the training precision, outside the training
        bookkeeping (validation sampling, the eval loss). A collective where the traits say so
        (collective_inference): every rank calls it the same number of times (inputs may differ)."""
        ...

    def micro_step(self, last: bool) -> contextlib.AbstractContextManager: ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self) -> StepResult: ...

    def save(self, folder: Path) -> list[str]: ...

    def load(self, folder: Path) -> None: ...

    def full_state(self) -> Iterator[tuple[str, torch.Tensor]]: ...

    def model_state_bytes(self) -> dict[str, int]: ...

    def trainable_fragments(self) -> list[Fragment]:
        """This rank's piece of every trainable parameter's float32 weights, as views the optimizer updates
        in place (train/ema.py averages them): together the ranks' pieces cover each parameter once."""
        ...

    def refresh_from_fragments(self) -> None:
        """Collective: after the fragments were written in place, make the weights the forward computes
        with follow (DeepSpeed's bf16 copies); nothing where the forward reads the fragments' storage."""
        ...


@dataclass
class Fragment:
    """A contiguous piece of a trainable parameter's flattened float32 weights held by this rank."""

    name: str
    shape: tuple[int, ...]
    """The whole parameter's."""
    offset: int
    """Where `values` starts in the flattened parameter."""
    values: torch.Tensor
    """1-D float32, a view of the weights the optimizer updates (may be empty)."""


def even_fragments(named: dict[str, torch.Tensor], rank: int, world_size: int) -> list[Fragment]:
    """Fragments of parameters every rank holds whole (DDP): rank r takes the r-th of world_size even
    pieces of each flattened parameter, so an average of them is sharded like ZeRO-3's."""
    out = []
    for name, param in named.items():
        flat = local_tensor(param).detach().view(-1)
        chunk = -(-flat.numel() // world_size)
        start = min(rank * chunk, flat.numel())
        out.append(Fragment(name, tuple(param.shape), start, flat[start : start + chunk]))
    return out


@dataclass
class TensorSource:
    """One full tensor of a checkpoint, for tools/zero_to_bf16.py: shape and stored dtype known up front,
    data read on demand."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    read: Callable[[], torch.Tensor]
    where: str  # for --debug and error messages


def no_problems(cfg: RunConfig, device: torch.device, world_size: int | None) -> list[str]:
    return []


@dataclass(frozen=True)
class ModelStates:
    """What train.plan's memory formula is given: the DiT's parameter counts and the run's layout."""

    total: int
    """Parameters of the DiT (psi)."""
    trainable: int
    """Of them, the ones that train (psi_t)."""
    fp32: bool
    """mixed_precision = "fp32" (no low-precision copy of anything)."""
    layout: ParallelLayout
    """The planned run (ParallelLayout.planned): what state is sharded over."""
    parallel: ParallelConfig
    low_precision_frozen: bool = False
    """The frozen weights are held in bf16 apart from the fp32 trainable ones (a LoRA run under bf16)."""

    def param_bytes(self) -> float:
        """Bytes of every parameter held in float32, except frozen ones held in bf16 (low_precision_frozen)."""
        return 4 * self.trainable + (2 if self.low_precision_frozen else 4) * (self.total - self.trainable)


@dataclass(frozen=True)
class EngineTraits:
    """What the rest of the code may ask of an engine, declared once in the engine's own file and
    registered in train/engines/__init__.py. Nothing outside train/engines/ compares engine names."""

    name: str
    summary: str
    """One line for the config's documentation."""
    build: Callable[[DiTRecipe, EngineSetup], Engine]
    collective_inference: bool = False
    """inference_forward is a collective (the parameters are sharded): every rank calls it alike."""
    tied_to_world_size: bool = False
    """Its checkpoints resume only on the number of ranks that saved them."""
    shards_parameters: bool = False
    offloads: frozenset[str] = frozenset()
    """The [parallel] offloads it supports: "optimizer", "param"."""
    compiles: str = ""
    """Empty when [model] compile works with it, else why not (said when a config asks for both)."""
    fp16_off_cuda: str = ""
    """Empty when its fp16 path (loss scaling) runs off CUDA too, else why not (said when a config asks)."""
    low_precision_params: bool = True
    """Under bf16 / fp16 it computes with parameters held in that dtype (not autocast copies of fp32
    ones): train.plan counts no autocast weight copies."""
    videox_fun_flag: str = ""
    """The VideoX-Fun launcher flag ("use_deepspeed", "use_fsdp") that asks for this family of engines."""
    flag_default: bool = False
    """The engine that flag picks when the config names no engine of the family."""
    preflight: Callable[[RunConfig, torch.device, int | None], list[str]] = no_problems
    """Checks of a run config against this engine before any model is built (train.config check_run)."""
    memory: Callable[[ModelStates], dict[str, float]] | None = None
    """train.plan's per-GPU bytes of params, grads, master weights, AdamW state and "host" (offloaded)."""
    buffers: Callable[[ParallelConfig, int], dict[str, float]] = field(default=lambda parallel, block: {})
    """train.plan's engine buffers in bytes, given the largest block's parameter count."""
    checkpoint_reader: Callable[[Path, int, str | None], dict] | None = None
    """tools/zero_to_bf16.py: (checkpoint, world size, tag) -> the DiT's tensors by name, read lazily."""
    owns_checkpoint: Callable[[Path], bool] = field(default=lambda folder: False)
    """Whether a checkpoint folder holds this engine's files (markers older than their engine field)."""


def apply_offloads(
    out: dict[str, float], parallel: ParallelConfig, with_optimizer: tuple[str, ...]
) -> dict[str, float]:
    """`out` with what [parallel] offload_optimizer (the parts `with_optimizer`) and offload_param (the
    params) put in host memory moved to out["host"]."""
    moved = set(with_optimizer if parallel.offload_optimizer else ()) | (
        {"params"} if parallel.offload_param else set()
    )
    return {**{k: 0 if k in moved else v for k, v in out.items()}, "host": float(sum(out[k] for k in moved))}


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The part of `t` this rank holds: a DTensor's local shard, a plain tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def held_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors` (a shard's padding and a gradient bucket shared
    by several views counted once, as they are held)."""
    storages = {}
    for t in tensors:
        storage = local_tensor(t).untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def precision_context(setup: EngineSetup) -> contextlib.AbstractContextManager:
    """bf16 or fp16 autocast for fp32 master weights; nothing for fp32 training."""
    dtype = AUTOCAST_DTYPES.get(setup.mixed_precision)
    return torch.autocast(setup.device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


@functools.cache
def autocast_supports(device_type: str, dtype: torch.dtype) -> bool:
    """Whether autocast on `device_type` really computes in `dtype`: torch versions without it warn and
    turn autocast off (CPU fp16 before torch 2.4), which would silently train in fp32."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            a = torch.ones(2, 2, device=device_type)
            with torch.autocast(device_type, dtype=dtype):
                return (a @ a).dtype == dtype
        except (AssertionError, RuntimeError, ValueError):  # torch asserts on a device it was not built for
            return False


def check_mixed_precision(mixed_precision: str, traits: EngineTraits, device: torch.device) -> None:
    """Refuse (ValueError) a [train] mixed_precision that the engine cannot run on `device`, before any
    model is built. fp16 (fp16 compute on fp32 master weights, dynamic loss scaling) runs wherever autocast
    computes in fp16, except under an engine whose fp16 path is CUDA's only (DeepSpeed's loss scaler)."""
    if mixed_precision != "fp16":
        return
    where = f"[train] mixed_precision = 'fp16' with [parallel] engine = {traits.name!r} on {device}"
    if traits.fp16_off_cuda and device.type != "cuda":
        raise ValueError(f"{where}: {traits.fp16_off_cuda}")
    if not autocast_supports(device.type, torch.float16):
        raise ValueError(
            f"{where}: torch {torch.__version__} has no fp16 autocast on {device.type}; use mixed_precision = "
            "'bf16' (or 'fp32')"
        )


def build_optimizer(
    named_params: list[tuple[str, torch.nn.Parameter]],
    optim: OptimConfig,
    device: torch.device,
    is_low_lr: Callable[[str], bool] = lambda name: False,
) -> torch.optim.AdamW:
    """AdamW with the [optim] values: fused on CUDA, foreach on CPU (the same arithmetic). Two param
    groups (VideoX-Fun's): the parameters at learning_rate, then those `is_low_lr` names at half of it
    (trainable_modules_low_learning_rate); an empty group is left out. The lr schedule scales each
    group's own base lr, so the low group stays at half all along."""
    full = [p for name, p in named_params if not is_low_lr(name)]
    low = [p for name, p in named_params if is_low_lr(name)]
    lr = optim.learning_rate
    groups = [{"params": ps, "lr": group_lr} for ps, group_lr in ((full, lr), (low, lr / 2)) if ps]
    if low:
        # ZeRO-3 parameters are empty outside a gather: count their full size.
        count = [sum(getattr(p, "ds_numel", p.numel()) for p in ps) for ps in (full, low)]
        log.info(
            f"optimizer param groups: {count[0]:,} parameters at lr {lr:g}, {count[1]:,} at lr {lr / 2:g} "
            "(trainable_modules_low_learning_rate)"
        )
    fused = device.type == "cuda"
    return torch.optim.AdamW(
        groups, lr=lr, betas=(optim.adam_beta1, optim.adam_beta2),
        weight_decay=optim.adam_weight_decay, eps=optim.adam_epsilon, fused=fused or None,
        foreach=None if fused else True,
    )  # fmt: skip


def build_grad_scaler(setup: EngineSetup) -> torch.amp.GradScaler | None:
    """fp16: dynamic loss scaling (torch's defaults: scale 2**16, halved on inf/nan, doubled after 2000
    finite steps); None otherwise."""
    return torch.amp.GradScaler(setup.device.type) if setup.mixed_precision == "fp16" else None


def save_grad_scaler(scaler: torch.amp.GradScaler | None, folder: Path) -> list[str]:
    """Rank 0's part of a save: the scaler state (replicated: every rank decides skips alike)."""
    if scaler is None:
        return []
    write_json(folder / GRAD_SCALER_FILE, scaler.state_dict())
    return [GRAD_SCALER_FILE]


def load_grad_scaler(scaler: torch.amp.GradScaler | None, folder: Path) -> None:
    """Restore the loss scale saved by save_grad_scaler. A checkpoint of a bf16 or fp32 run has none: an
    fp16 run continuing it starts from a fresh scale, as a new fp16 run would."""
    path = folder / GRAD_SCALER_FILE
    if scaler is None:
        return
    if not path.is_file():
        log.warning(f"{path}: not in the checkpoint (saved without fp16): the loss scale starts afresh")
        return
    state = read_json(path)
    if not isinstance(state, dict) or "scale" not in state:
        raise ValueError(f"{path}: not a GradScaler state (no 'scale')")
    scaler.load_state_dict(state)


def build_schedule(optimizer: torch.optim.Optimizer, setup: EngineSetup) -> torch.optim.lr_scheduler.LambdaLR:
    o = setup.optim
    return build_lr_scheduler(optimizer, o.lr_scheduler, o.lr_warmup_steps, setup.total_steps)


def restore_schedule(
    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR, state: dict, optim: OptimConfig
) -> None:
    """Resume the lr schedule at the checkpoint's position with this run's [optim] values.

    Call it on a freshly built engine after the optimizer state is loaded. The checkpoint gives only
    the position (last_epoch); the base lrs (learning_rate, and half of it for a low-lr group) and the
    AdamW values come from the config: resuming with a lower learning_rate after non-finite steps is
    the advised fix, and the saved base_lrs and param groups (which the loaded optimizer state brought
    back) would silently keep the old one. Every param group gets initial_lr = its base lr and lr =
    base lr x the schedule's multiplier at that position, which is what the next update uses."""
    if not isinstance(state, dict) or not isinstance(state.get("last_epoch"), int):
        raise ValueError(f"not an lr scheduler state (no integer last_epoch): {str(state)[:200]}")
    base_lrs = list(scheduler.base_lrs)  # built from this run's config
    if len(base_lrs) != len(optimizer.param_groups):
        raise ValueError(f"the lr schedule has {len(base_lrs)} base lrs for {len(optimizer.param_groups)} groups")
    position = state["last_epoch"]
    lrs = [base * fn(position) for base, fn in zip(base_lrs, scheduler.lr_lambdas, strict=True)]
    scheduler.load_state_dict({**state, "base_lrs": base_lrs, "_last_lr": lrs})
    betas = (optim.adam_beta1, optim.adam_beta2)
    for group, base, lr in zip(optimizer.param_groups, base_lrs, lrs, strict=True):
        group.update(initial_lr=base, lr=lr, betas=betas, eps=optim.adam_epsilon, weight_decay=optim.adam_weight_decay)


def optimizer_step(
    params, optimizer: torch.optim.Optimizer, scheduler, optim: OptimConfig, scaler: torch.amp.GradScaler | None = None
) -> StepResult:
    """Clip (max_grad_norm > 0), update unless the norm is not finite, advance the schedule, zero
    the gradients. The norm is computed from the reduced gradients, so every rank decides alike.
    With a GradScaler (fp16) the gradients are unscaled before the norm and the scaler decides."""
    params = list(params)
    scaler = scaler if any(p.grad is not None for p in params) else None  # it refuses to step without any
    if scaler is not None:
        scaler.unscale_(optimizer)
    limit = optim.max_grad_norm if optim.max_grad_norm > 0 else math.inf
    norm = float(torch.nn.utils.clip_grad_norm_(params, limit))
    lr = scheduler.get_last_lr()[0]
    updated = scaler_step(scaler, optimizer, norm)
    optimizer.zero_grad(set_to_none=True)
    advance_schedule(scheduler)
    return StepResult(norm, updated, lr)


def scaler_step(scaler: torch.amp.GradScaler | None, optimizer: torch.optim.Optimizer, norm: float) -> bool:
    """Update unless the gradients are not finite; returns whether it did. Without a scaler the global
    norm decides; with one (fp16, gradients already unscaled) the scaler does: it skips the update when
    unscale_ found an inf or nan and then halves the scale, else keeps or grows it. So the scale going
    down is exactly the scaler's skip (its found-inf record is private)."""
    if scaler is None:
        if math.isfinite(norm):
            optimizer.step()
            return True
        return False
    before = scaler.get_scale()
    scaler.step(optimizer)
    scaler.update()
    return scaler.get_scale() >= before


def advance_schedule(scheduler) -> None:
    """One schedule step per optimizer step, also after a skipped update (the step count is the clock;
    torch warns when the optimizer did not step, which is intended here)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step")
        scheduler.step()


def check_named_tensors(tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], source: Path) -> None:
    """Refuse unless `tensors` holds exactly the names of `expected` with their shapes."""
    names = set(expected)
    missing, unexpected = sorted(names - set(tensors)), sorted(set(tensors) - names)
    problems = [f"missing {missing[:5]}" if missing else "", f"unexpected {unexpected[:5]}" if unexpected else ""]
    for name in sorted(names & set(tensors)):
        if tensors[name].shape != expected[name].shape:
            problems.append(f"{name}: {list(tensors[name].shape)} vs {list(expected[name].shape)}")
    problems = [p for p in problems if p]
    if problems:
        raise ValueError(
            f"{source}: the checkpoint's trainable weights do not fit this run (trainable_modules or model "
            "changed?): " + "; ".join(problems)
        )
