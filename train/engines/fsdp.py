"""FSDP2 (`fully_shard`): parameters, gradients and optimizer state sharded over every rank.

Each transformer block is one FSDP unit (all-gathered for its forward and backward, resharded after),
the root unit holds the embeddings and the head. With bf16 mixed precision the all-gathered copies
are bf16 while the sharded master weights, the reduce-scatter and the optimizer stay float32. fp16 is
the same with fp16 copies plus torch.amp.GradScaler (dynamic loss scaling), which works on FSDP2's
DTensor gradient shards (torch 2.13, checked with gloo): unscale_ reduces its inf/nan check over the
shards, so an inf in one rank's shard makes every rank skip and halve the scale alike.

Checkpoints are torch.distributed.checkpoint (DCP) folders under `folder/dcp`, keyed by official
parameter names, which any world size can load (DCP reshards):

    dcp/__{rank}_0.distcp   this rank's shards of the model (frozen parameters too) and optimizer state
    dcp/.metadata           DCP's index of every shard (rank 0)
    scheduler.json          the lr scheduler state (rank 0)
    grad_scaler.json        fp16 only: the loss scale (rank 0)
    fsdp.json               the saving world size and whether the optimizer had stepped (rank 0)

DCP keys: "model.{official name}" and, flattened per parameter, "optimizer.state.{name}.{exp_avg,
exp_avg_sq,step}" and "optimizer.param_groups.{name}.{lr,betas,...}" (trainable parameters only).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from torch.nn.utils import clip_grads_with_norm_, get_total_norm

from train.checkpoint_io import DCP_METADATA_FILE, fsync_tree, load_dcp, read_dcp_metadata, read_json, write_json
from train.engines.base import (
    AUTOCAST_DTYPES,
    SCHEDULER_FILE,
    EngineSetup,
    EngineTraits,
    Fragment,
    ModelStates,
    StepResult,
    TensorSource,
    advance_schedule,
    apply_offloads,
    build_grad_scaler,
    build_optimizer,
    build_schedule,
    held_bytes,
    load_grad_scaler,
    restore_schedule,
    save_grad_scaler,
    scaler_step,
)

if TYPE_CHECKING:
    from train.models import DiTRecipe

DCP_DIR = "dcp"
FSDP_STATE_FILE = "fsdp.json"
METADATA_FILE = DCP_METADATA_FILE
DCP_MODEL_PREFIX = "model."  # dcp.save({"model": get_model_state_dict(m), ...}) flattens to "model.<name>"

# Per-parameter optimizer keys ("state.{name}.exp_avg"): independent of param-group order and of how
# many ranks saved, which is what a merger or a different world size needs.
_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)
# A LoRA run saves its adapter only: the frozen base comes from the base model again at resume (as under
# DDP), and check_dcp_folder has made sure the folder holds every adapter tensor before strict=False.
_ADAPTER_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True, ignore_frozen_params=True, strict=False)


class FSDPEngine:
    """FSDP2 over all ranks (a 1-D mesh): each rank holds 1/world of every parameter (float32 master
    weights), of the gradients and of the AdamW state. Frozen parameters are sharded alongside the
    trainable ones in the same units; only trainable ones get gradients and optimizer state."""

    def __init__(self, recipe: DiTRecipe, setup: EngineSetup):
        if setup.mixed_precision not in ("bf16", "fp16", "fp32"):
            raise ValueError(
                f"[train] mixed_precision must be 'bf16', 'fp16' or 'fp32' for engine fsdp, got {setup.mixed_precision!r}"
            )
        self.setup = setup
        self.device = setup.device
        self.options = _ADAPTER_OPTIONS if recipe.lora is not None else _OPTIONS
        self.owns_process_group = ensure_process_group(self.device)
        self.world_size, self.rank = dist.get_world_size(), dist.get_rank()
        self.mesh = init_device_mesh(self.device.type, (self.world_size,), mesh_dim_names=("dp",))

        p = setup.parallel
        # FSDP2 offloads parameters, gradients and optimizer state together (one policy, no separate
        # switches): either flag moves all three to host memory; the optimizer step then runs on the CPU.
        self.offload = p.offload_param or p.offload_optimizer
        offload: OffloadPolicy = (
            CPUOffloadPolicy(pin_memory=self.device.type == "cuda") if self.offload else OffloadPolicy()
        )
        low = AUTOCAST_DTYPES.get(setup.mixed_precision)
        if low is not None:
            # cast_forward_inputs=False: FSDP would otherwise cast every floating input of every unit to
            # bf16, the timesteps (bf16 steps of 4 near 1000) and the float32 residual stream between
            # blocks included. The model autocasts itself when its gathered weights are bf16 / fp16
            # (wan/modules/precision.py), which keeps its float32 regions float32.
            mp = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32, cast_forward_inputs=False)
        else:
            mp = MixedPrecisionPolicy()
        shard = dict(
            mesh=self.mesh, reshard_after_forward=p.reshard_after_forward, mp_policy=mp, offload_policy=offload
        )

        model = recipe.build()  # meta device, trainable flags and checkpointing set
        for block in model.blocks:
            fully_shard(block, **shard)
        fully_shard(model, **shard)  # the root unit: embeddings, head, and whatever no block holds
        self.module = self.model = model
        # With offloading the sharded parameters live on the CPU (FSDP copies them to the device per use).
        self.param_device = torch.device("cpu") if self.offload else self.device
        model.to_empty(device=self.param_device)
        self._load_initial_weights(recipe)
        # The RoPE tables are non-persistent buffers outside FSDP (not parameters): computed in float32
        # on the compute device on every rank alike, never sharded or saved.
        model.rope.reset_tables(self.device)
        recipe.weights.release()

        self.named_trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        # AdamW runs where the shards are: fused on CUDA, foreach on the CPU (offloaded or CPU runs).
        self.optimizer = build_optimizer(
            list(self.named_trainable.items()), setup.optim, self.param_device, recipe.is_low_lr
        )
        self.scheduler = build_schedule(self.optimizer, setup)
        self.scaler = build_grad_scaler(setup)
        self._grad_bytes = 0

    @torch.no_grad()
    def _load_initial_weights(self, recipe: DiTRecipe) -> None:
        """Fill each sharded parameter from one full CPU tensor at a time: no rank ever holds more than
        one full tensor beyond its shards. src_data_rank=None: every rank slices its own shard from its
        own copy, no communication."""
        for name, param in self.model.named_parameters():
            full = recipe.weights.read(name)
            if full.shape != param.shape:
                raise ValueError(
                    f"DiT weight {name}: the weights have shape {list(full.shape)}, the model {list(param.shape)}"
                )
            shard = distribute_tensor(full.to(self.mesh.device_type), self.mesh, param.placements, src_data_rank=None)
            param.to_local().copy_(shard.to_local())
            del full, shard
        persistent = set(self.model.state_dict(keep_vars=True))
        for name, buffer in self.model.named_buffers():
            if name in persistent:  # persistent buffers (none in WanModel today): whole on every rank
                buffer.copy_(recipe.weights.read(name))

    # ----------------------------------------------------------------------------------------------
    # Training

    def forward(self, *args, **kwargs) -> torch.Tensor:
        # No autocast here: with bf16 gathered weights the model opens its own (see __init__); fp32 runs plain.
        return self.model(*args, **kwargs)

    @torch.no_grad()
    def inference_forward(self, *args, **kwargs) -> torch.Tensor:
        # Collective: each block's parameters are all-gathered by every rank.
        return self.model(*args, **kwargs)

    @contextlib.contextmanager
    def micro_step(self, last: bool) -> Iterator[None]:
        if not self.setup.parallel.reduce_every_micro_step:
            # Accumulate full-size unsharded gradients locally and reduce-scatter once, on the last.
            self.model.set_requires_gradient_sync(last)
        yield

    def backward(self, loss: torch.Tensor) -> None:
        loss = loss / self.setup.accumulation_steps
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self) -> StepResult:
        """Clip (max_grad_norm > 0) by the global norm over every rank's gradient shards, update unless
        it is not finite (the norm is all-reduced, so every rank decides alike), advance the schedule,
        free the gradients. fp16: the gradients are unscaled first and the GradScaler decides."""
        params = [p for p in self.named_trainable.values() if p.grad is not None]
        grads = [p.grad for p in params]
        self._grad_bytes = held_bytes(grads)
        scaler = self.scaler if grads else None  # GradScaler refuses to step an optimizer without gradients
        if scaler is not None:
            scaler.unscale_(self.optimizer)
        limit = self.setup.optim.max_grad_norm if self.setup.optim.max_grad_norm > 0 else math.inf
        if grads:
            total = get_total_norm(grads, norm_type=2.0, error_if_nonfinite=False, foreach=True)
            if isinstance(total, DTensor):  # a partial norm over the shards: all-reduce it
                if total.device.type != self.mesh.device_type:  # offloaded gradients: reduce on the device
                    total = total.to(self.device)
                total = total.full_tensor()
            if math.isfinite(limit):  # DDP's clip_grad_norm_(inf) multiplies by exactly 1.0: the same
                clip_grads_with_norm_(params, limit, total, foreach=True)
            norm = float(total)
        else:
            norm = 0.0
        lr = self.scheduler.get_last_lr()[0]
        updated = scaler_step(scaler, self.optimizer, norm)
        self.optimizer.zero_grad(set_to_none=True)
        advance_schedule(self.scheduler)
        return StepResult(norm, updated, lr)

    # ----------------------------------------------------------------------------------------------
    # Checkpoints

    def save(self, folder: Path) -> list[str]:
        """Collective: every rank writes its shards into folder/dcp; returns this rank's files."""
        folder = Path(folder)
        stepped = bool(self.optimizer.state)
        # Before the first update get_optimizer_state_dict initialises the AdamW state (a step with
        # lr 0 and zero gradients, leaving `step` at 1); fsdp.json records that, and load() drops it.
        state = {
            "model": get_model_state_dict(self.model, options=self.options),
            "optimizer": get_optimizer_state_dict(self.model, self.optimizer, options=self.options),
        }
        dcp.save(state, checkpoint_id=folder / DCP_DIR)
        if not stepped:
            self.optimizer.state.clear()
        # dcp.save ends with rank 0 writing .metadata after every rank's data file is written; DCP fsyncs
        # its files, this also makes the directory entries durable.
        fsync_tree(folder / DCP_DIR)
        files = sorted(f"{DCP_DIR}/{p.name}" for p in (folder / DCP_DIR).glob(f"__{self.rank}_*.distcp"))
        if self.rank == 0:
            write_json(folder / SCHEDULER_FILE, self.scheduler.state_dict())
            write_json(folder / FSDP_STATE_FILE, {"world_size": self.world_size, "optimizer_stepped": stepped})
            files += [f"{DCP_DIR}/{METADATA_FILE}", SCHEDULER_FILE, FSDP_STATE_FILE]
            files += save_grad_scaler(self.scaler, folder)
        return files

    def load(self, folder: Path) -> None:
        """Collective: read a checkpoint written by save() at any world size (DCP reshards). Refuses,
        before reading any tensor, a folder that lacks a file or holds other parameters or shapes."""
        folder = Path(folder)
        info = read_json(folder / FSDP_STATE_FILE)
        scheduler_state = read_json(folder / SCHEDULER_FILE)
        stepped = bool(self.optimizer.state)
        # The templates DCP loads into (this run's shards); on an optimizer that has not stepped this
        # initialises its state (see save), undone if the folder is refused.
        state = {
            "model": get_model_state_dict(self.model, options=self.options),
            "optimizer": get_optimizer_state_dict(self.model, self.optimizer, options=self.options),
        }
        try:
            metadata = check_dcp_folder(folder / DCP_DIR, state)
        except ValueError:
            if not stepped:
                self.optimizer.state.clear()
            raise
        load_dcp(state, folder / DCP_DIR, metadata)
        set_model_state_dict(self.model, state["model"], options=self.options)
        set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"], options=self.options)
        if not info.get("optimizer_stepped", True):
            self.optimizer.state.clear()  # saved before the first update: no AdamW state yet
        restore_schedule(self.optimizer, self.scheduler, scheduler_state, self.setup.optim)
        load_grad_scaler(self.scaler, folder)

    # ----------------------------------------------------------------------------------------------
    # Consolidated weights and memory

    def _full(self, tensor: torch.Tensor) -> torch.Tensor:
        """Collective for a DTensor: the whole tensor on the CPU."""
        if isinstance(tensor, DTensor):
            if tensor.device.type != self.mesh.device_type:  # offloaded shards: gather on the device
                tensor = tensor.to(self.device)
            tensor = tensor.full_tensor()
        return tensor.detach().cpu()

    @torch.no_grad()
    def full_state(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Collective: (official name, full float32 CPU tensor) for every parameter, frozen ones too,
        one at a time and in the same order on every rank."""
        for name, tensor in self.model.state_dict().items():
            yield name, self._full(tensor)

    @torch.no_grad()
    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Collective: the full float32 trainable weights on every rank (small models only)."""
        return {name: self._full(param) for name, param in self.named_trainable.items()}

    def trainable_fragments(self) -> list[Fragment]:
        """Each trainable parameter's float32 shard: rows of dim 0 (Shard(0) on a 1-D mesh)."""
        out = []
        for name, param in self.named_trainable.items():
            _, start = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
            row = math.prod(param.shape[1:])
            local = param.to_local().detach()
            out.append(Fragment(name, tuple(param.shape), start[0] * row if local.numel() else 0, local.view(-1)))
        return out

    def refresh_from_fragments(self) -> None:
        pass  # each forward all-gathers (and casts) these shards

    def model_state_bytes(self) -> dict[str, int]:
        """This rank's bytes of parameter shards, of gradient shards (as held at the last step(), before
        they were freed) and of AdamW state shards, measured from the storages actually held."""
        params = list(self.model.parameters())
        optim = [v for s in self.optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
        return {"params": held_bytes(params), "grads": self._grad_bytes, "optimizer": held_bytes(optim)}


def ensure_process_group(device: torch.device) -> bool:
    """FSDP needs a process group even on one rank: a single-process run (no torchrun) gets a private
    1-rank group. Returns whether this created it (the caller may destroy it at exit)."""
    if dist.is_initialized():
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return True


def check_dcp_folder(path: Path, expected: dict[str, Any]) -> Any:
    """Refuse (ValueError naming the file or keys) a DCP folder that lacks its index or a data file it
    lists, whose index holds anything but DCP's metadata (it is a pickle: read by a restricted
    unpickler), or whose tensors do not fit `expected` (this run's state dict: other trainable_modules
    or another model). Returns the index, for load_dcp."""
    metadata = read_dcp_metadata(path)
    files = sorted({info.relative_path for info in (metadata.storage_data or {}).values()})
    absent = [name for name in files if not (path / name).is_file()]
    if absent:
        raise ValueError(
            f"{path}: the checkpoint lacks {', '.join(str(path / m) for m in absent)} (listed in {METADATA_FILE}; "
            "a rank's shard file was not copied or was deleted)"
        )
    saved = metadata.state_dict_metadata
    missing: dict[str, list[str]] = {"weights": [], "optimizer state": []}
    shapes = []
    for key, value in flatten(expected).items():
        if key not in saved:
            part, _, rest = key.partition(".")
            if part == "model":
                missing["weights"].append(rest)
            elif rest.startswith("state."):  # state.{name}.{exp_avg,...}: report the parameter
                missing["optimizer state"].append(rest.removeprefix("state.").rpartition(".")[0])
        elif isinstance(value, torch.Tensor) and value.dim() > 0:
            entry = saved[key]
            if not isinstance(entry, TensorStorageMetadata) or tuple(entry.size) != tuple(value.shape):
                shape = list(entry.size) if isinstance(entry, TensorStorageMetadata) else "not a tensor"
                shapes.append(f"{key}: {shape} in the checkpoint, {list(value.shape)} in this run")
    problems = [f"no {what} for {_shorten(sorted(set(names)))}" for what, names in missing.items() if names]
    problems += [_shorten(shapes, 5)] if shapes else []
    if problems:
        raise ValueError(
            f"{path}: the checkpoint does not fit this run (trainable_modules or model changed?): "
            + "; ".join(problems)
        )
    return metadata


def _shorten(names: list[str], limit: int = 8) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def flatten(state: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts to DCP's dotted keys ("model.blocks.0.ffn.0.weight")."""
    out = {}
    for key, value in state.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


# ----------------------------------------------------------------------------------------------------
# Traits


def model_states(m: ModelStates) -> dict[str, float]:
    """fp32 shards of the weights (frozen ones bf16 in a LoRA run), their gradients and AdamW moments;
    offload_optimizer (CPUOffloadPolicy) moves all of them to the host, offload_param the parameter shards."""
    n = m.layout.world_size  # sharded over every rank
    out = {"params": m.param_bytes() / n, "grads": 4 * m.trainable / n, "master": 0, "optimizer": 8 * m.trainable / n}
    return apply_offloads(out, m.parallel, ("params", "grads", "master", "optimizer"))


def buffers(parallel, largest_block: int) -> dict[str, float]:
    """The current and the prefetched block gathered in bf16, and one block's fp32 gradients."""
    return {"fsdp": 2 * largest_block * 2 + largest_block * 4}


def read_checkpoint(ckpt: Path, world_size: int, tag: str | None) -> dict[str, TensorSource]:
    """A DCP folder; each "model.<name>" key is read alone (dcp.load into one empty tensor, no
    process group), which reads only that key's chunks."""
    folder = ckpt / DCP_DIR
    meta_path = folder / DCP_METADATA_FILE
    if not meta_path.is_file():
        raise ValueError(f"{meta_path}: missing (an fsdp checkpoint is a DCP save in {DCP_DIR}/)")
    metadata = read_dcp_metadata(folder)  # a pickle: read by the restricted unpickler, once
    # Every file the metadata points into must be there and long enough.
    ends: dict[str, int] = {}
    for info in metadata.storage_data.values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    for name, end in sorted(ends.items()):
        path = folder / name
        if not path.is_file():
            raise ValueError(f"{path}: missing (named by {meta_path}; the save is incomplete)")
        if path.stat().st_size < end:
            raise ValueError(f"{path}: {path.stat().st_size} bytes, {meta_path} needs {end} (truncated)")

    sources = {}
    for key, md in metadata.state_dict_metadata.items():
        if not key.startswith(DCP_MODEL_PREFIX) or not isinstance(md, TensorStorageMetadata):
            continue
        name = key[len(DCP_MODEL_PREFIX) :]
        shape, dtype = tuple(int(n) for n in md.size), md.properties.dtype

        def read(name=name, shape=shape, dtype=dtype) -> torch.Tensor:
            tensor = torch.empty(shape, dtype=dtype)
            with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
                warnings.filterwarnings("ignore", message=".*single process", category=UserWarning)
                load_dcp({"model": {name: tensor}}, folder, metadata, no_dist=True)
            return tensor

        sources[name] = TensorSource(shape, dtype, read, f"{DCP_DIR}/ {key}")
    if not sources:
        keys = list(metadata.state_dict_metadata)[:5]
        raise ValueError(f"{meta_path}: no '{DCP_MODEL_PREFIX}*' tensors (keys look like {keys})")
    return sources


TRAITS = EngineTraits(
    name="fsdp", summary="FSDP2: everything sharded", build=FSDPEngine, collective_inference=True,
    shards_parameters=True, offloads=frozenset({"optimizer", "param"}), videox_fun_flag="use_fsdp", flag_default=True,
    memory=model_states, buffers=buffers, checkpoint_reader=read_checkpoint,
    owns_checkpoint=lambda folder: (folder / DCP_DIR).is_dir(),
)  # fmt: skip
