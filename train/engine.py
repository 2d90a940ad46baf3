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

import contextlib
import functools
import inspect
import logging
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from train.config import ENGINES, OptimConfig, ParallelConfig
from train.lr import build_lr_scheduler
from train.models import DiTRecipe
from wan import WanModel

DDP_MODEL_FILE = "model.safetensors"
DDP_OPTIMIZER_FILE = "optimizer.safetensors"
SCHEDULER_FILE = "scheduler.json"
GRAD_SCALER_FILE = "grad_scaler.json"
"""fp16 under ddp and fsdp: torch.amp.GradScaler's state (loss scale, growth tracker), rank 0."""

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
    device: torch.device


@dataclass
class StepResult:
    grad_norm: float
    """The global gradient norm before clipping (inf or nan when the update was skipped)."""
    updated: bool
    lr: float
    """The learning rate the update used."""


class Engine(Protocol):
    module: nn.Module  # the DiT itself (sharded or partitioned under zero3 and fsdp)

    def forward(self, *args, **kwargs) -> torch.Tensor: ...

    def inference_forward(self, *args, **kwargs) -> torch.Tensor:
        """The DiT's prediction under no_grad in the training precision, outside the training
        bookkeeping (validation sampling, the eval loss). Collective under zero3 and fsdp: every rank
        calls it the same number of times (inputs may differ)."""
        ...

    def micro_step(self, last: bool) -> contextlib.AbstractContextManager: ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self) -> StepResult: ...

    def save(self, folder: Path) -> list[str]: ...

    def load(self, folder: Path) -> None: ...

    def full_state(self) -> Iterator[tuple[str, torch.Tensor]]: ...

    def model_state_bytes(self) -> dict[str, int]: ...


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


def check_mixed_precision(mixed_precision: str, engine: str, device: torch.device) -> None:
    """Refuse (ValueError) a [train] mixed_precision that `engine` cannot run on `device`, before any model
    is built. fp16 (fp16 compute on fp32 master weights, dynamic loss scaling) runs under ddp and fsdp
    (torch.amp.GradScaler) wherever autocast computes in fp16, and under zero2 / zero3 (DeepSpeed's own
    fp16 loss scaler) on CUDA only."""
    if mixed_precision != "fp16":
        return
    where = f"[train] mixed_precision = 'fp16' with [parallel] engine = {engine!r} on {device}"
    if engine in ("zero2", "zero3") and device.type != "cuda":
        raise ValueError(
            f"{where}: DeepSpeed's CPU accelerator has no fp16 training (it reports fp16 unsupported on CPUs "
            "without oneDNN fp16 kernels, and its fp16 optimizer with loss scaling is a GPU path); use "
            "mixed_precision = 'bf16' (or 'fp32'), or engine 'ddp' / 'fsdp', which run fp16 on the CPU"
        )
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
    from train.checkpoint import write_json

    if scaler is None:
        return []
    write_json(folder / GRAD_SCALER_FILE, scaler.state_dict())
    return [GRAD_SCALER_FILE]


def load_grad_scaler(scaler: torch.amp.GradScaler | None, folder: Path) -> None:
    """Restore the loss scale saved by save_grad_scaler. A checkpoint of a bf16 or fp32 run has none: an
    fp16 run continuing it starts from a fresh scale, as a new fp16 run would."""
    from train.checkpoint import read_json

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


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class DDPEngine:
    """Every rank holds the whole model in float32 and the AdamW state of its trainable parameters;
    gradients are averaged across ranks in backward (DDP's bucketed all-reduce). Checkpoints:
    rank 0 writes the trainable weights and the optimizer state keyed by parameter name (safetensors),
    which any world size can read back."""

    def __init__(self, recipe: DiTRecipe, setup: EngineSetup):
        self.setup = setup
        self.module = recipe.materialize(setup.device)
        self.named_trainable = {n: p for n, p in self.module.named_parameters() if p.requires_grad}
        self.names_by_param = {p: n for n, p in self.named_trainable.items()}
        if distributed():
            # Frozen parameters (requires_grad=False before wrapping) get no gradient buckets. Buffers
            # (the RoPE tables) are computed alike on every rank: no broadcast before each forward.
            # Gradients as views of the all-reduce buckets: one copy of the gradients, not two.
            ids = [setup.device.index] if setup.device.type == "cuda" else None
            new_torch = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
            no_buffer_sync = {"forward_sync_buffers": False} if new_torch else {"broadcast_buffers": False}
            self.model = DistributedDataParallel(
                self.module, device_ids=ids, gradient_as_bucket_view=True, **no_buffer_sync
            )
        else:
            self.model = self.module
        self.optimizer = build_optimizer(
            list(self.named_trainable.items()), setup.optim, setup.device, recipe.is_low_lr
        )
        self.scheduler = build_schedule(self.optimizer, setup)
        self.precision = precision_context(setup)
        self.scaler = build_grad_scaler(setup)
        self._grad_bytes = 0

    def forward(self, *args, **kwargs) -> torch.Tensor:
        with self.precision:
            return self.model(*args, **kwargs)

    @torch.no_grad()
    def inference_forward(self, *args, **kwargs) -> torch.Tensor:
        # The bare module, not the DDP wrapper: no collective, so ranks may sample different counts.
        with self.precision:
            return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def micro_step(self, last: bool) -> Iterator[None]:
        if distributed() and not last:
            with self.model.no_sync():
                yield
        else:
            yield

    def backward(self, loss: torch.Tensor) -> None:
        loss = loss / self.setup.accumulation_steps
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self) -> StepResult:
        self._grad_bytes = held_bytes([p.grad for p in self.named_trainable.values() if p.grad is not None])
        return optimizer_step(
            self.named_trainable.values(), self.optimizer, self.scheduler, self.setup.optim, self.scaler
        )

    def model_state_bytes(self) -> dict[str, int]:
        """This rank's bytes of parameters, gradients (as held at the last step) and AdamW state."""
        optim = [v for s in self.optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
        params = list(self.module.parameters())
        return {"params": held_bytes(params), "grads": self._grad_bytes, "optimizer": held_bytes(optim)}

    def save(self, folder: Path) -> list[str]:
        from train.checkpoint import optimizer_state_to_named, write_json, write_safetensors

        if dist.is_initialized() and dist.get_rank() != 0:
            return []  # replicated state: rank 0 writes it once
        tensors, meta = optimizer_state_to_named(self.optimizer, self.names_by_param)
        weights = {n: p.detach() for n, p in self.named_trainable.items()}
        write_safetensors(folder / DDP_MODEL_FILE, weights, {"format": "pt"})
        write_safetensors(folder / DDP_OPTIMIZER_FILE, tensors, meta)
        write_json(folder / SCHEDULER_FILE, self.scheduler.state_dict())
        return [DDP_MODEL_FILE, DDP_OPTIMIZER_FILE, SCHEDULER_FILE, *save_grad_scaler(self.scaler, folder)]

    @torch.no_grad()
    def load(self, folder: Path) -> None:
        from train.checkpoint import load_named_optimizer_state, read_json, read_safetensors

        tensors = read_safetensors(folder / DDP_MODEL_FILE)[0]
        check_named_tensors(tensors, self.named_trainable, folder / DDP_MODEL_FILE)
        for name, param in self.named_trainable.items():
            param.copy_(tensors[name])
        optim_tensors, meta = read_safetensors(folder / DDP_OPTIMIZER_FILE)
        load_named_optimizer_state(
            self.optimizer, self.names_by_param, optim_tensors, meta, folder / DDP_OPTIMIZER_FILE
        )
        restore_schedule(self.optimizer, self.scheduler, read_json(folder / SCHEDULER_FILE), self.setup.optim)
        load_grad_scaler(self.scaler, folder)

    def full_state(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in self.module.state_dict().items():
            yield name, tensor.detach()


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


class ConsolidatedWeights:
    """A checkpoint part: the whole DiT in bf16, official layout, in `consolidated/` (VideoX-Fun's
    zero3_save_16bit_model): config.json + diffusion_pytorch_model*.safetensors, loadable with
    WanModel.from_pretrained or as [model] transformer_path. Collective: the engine streams the full
    weights one tensor at a time (gathered from the shards under zero3 and fsdp) and rank 0 writes
    them as they come, so no rank holds the whole model."""

    FOLDER = "consolidated"

    def __init__(self, engine: Engine, dit_config: dict, max_shard_size: str = "10GB"):
        self.engine, self.dit_config, self.max_shard_size = engine, dit_config, max_shard_size

    def save(self, folder: Path) -> list[str]:
        from train.checkpoint import fsync_tree, write_json
        from wan.modules.dit_weights import CONFIG_NAME, WEIGHTS_NAME
        from wan.modules.safetensors_io import (
            ShardItem,
            index_name,
            parse_size,
            plan_shards,
            write_safetensors_streaming,
        )

        with torch.device("meta"):
            shapes = {name: tuple(t.shape) for name, t in WanModel(**self.dit_config).state_dict().items()}
        stream = self.engine.full_state()
        if dist.is_initialized() and dist.get_rank() != 0:
            for _ in stream:  # collective: gather alongside rank 0, write nothing
                pass
            return []
        out = folder / self.FOLDER
        out.mkdir(parents=True, exist_ok=True)
        items = [ShardItem(name, name, shape, torch.bfloat16) for name, shape in shapes.items()]
        shards = plan_shards(items, parse_size(self.max_shard_size), WEIGHTS_NAME)

        def produce(item: ShardItem) -> torch.Tensor:
            name, tensor = next(stream)
            assert name == item.name, (name, item.name)  # full_state follows state_dict order
            return tensor

        for file, shard in shards:
            write_safetensors_streaming(out / file, shard, produce)
        assert next(stream, None) is None, "full_state yielded more tensors than the DiT has"
        files = [file for file, _ in shards]
        if len(shards) > 1:
            index = {
                "metadata": {"total_size": sum(i.nbytes for i in items)},
                "weight_map": {i.key: file for file, shard in shards for i in shard},
            }
            write_json(out / index_name(WEIGHTS_NAME), index)
            files.append(index_name(WEIGHTS_NAME))
        write_json(out / CONFIG_NAME, {"_class_name": "WanModel", **self.dit_config})
        fsync_tree(out)
        return [f"{self.FOLDER}/{name}" for name in [*files, CONFIG_NAME]]

    def load(self, folder: Path) -> None:
        pass  # an export: training resumes from the engine's own state


def build_engine(recipe: DiTRecipe, setup: EngineSetup) -> Engine:
    """The engine [parallel] engine names, building the DiT from `recipe`."""
    name = setup.parallel.engine
    assert name in ENGINES, name  # the config refuses other names
    if name == "ddp":
        return DDPEngine(recipe, setup)
    if name in ("zero2", "zero3"):
        from train.engine_deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(recipe, setup)
    from train.engine_fsdp import FSDPEngine

    return FSDPEngine(recipe, setup)
