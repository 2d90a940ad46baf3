"""DDP: the whole model in float32 on every rank, gradients averaged in backward.

Its checkpoint is rank 0's: the trainable weights (model.safetensors) and the AdamW state keyed by
parameter name (optimizer.safetensors), which any world size reads back.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from train.checkpoint_io import read_json, read_safetensors, write_json, write_safetensors
from train.engines.base import (
    SCHEDULER_FILE,
    EngineSetup,
    EngineTraits,
    Fragment,
    ModelStates,
    StepResult,
    TensorSource,
    build_grad_scaler,
    build_optimizer,
    build_schedule,
    check_named_tensors,
    even_fragments,
    held_bytes,
    load_grad_scaler,
    optimizer_step,
    precision_context,
    restore_schedule,
    save_grad_scaler,
)
from train.engines.named_optimizer import load_named_optimizer_state, optimizer_state_to_named
from wan.modules.safetensors_io import DTYPES, read_header, read_tensor

if TYPE_CHECKING:
    from train.models import DiTRecipe

DDP_MODEL_FILE = "model.safetensors"
DDP_OPTIMIZER_FILE = "optimizer.safetensors"


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
        if setup.layout.distributed:
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
        if self.setup.layout.distributed and not last:
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
        if self.setup.layout.rank != 0:
            return []  # replicated state: rank 0 writes it once
        tensors, meta = optimizer_state_to_named(self.optimizer, self.names_by_param)
        weights = {n: p.detach() for n, p in self.named_trainable.items()}
        write_safetensors(folder / DDP_MODEL_FILE, weights, {"format": "pt"})
        write_safetensors(folder / DDP_OPTIMIZER_FILE, tensors, meta)
        write_json(folder / SCHEDULER_FILE, self.scheduler.state_dict())
        return [DDP_MODEL_FILE, DDP_OPTIMIZER_FILE, SCHEDULER_FILE, *save_grad_scaler(self.scaler, folder)]

    @torch.no_grad()
    def load(self, folder: Path) -> None:
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

    def trainable_fragments(self) -> list[Fragment]:
        return even_fragments(self.named_trainable, self.setup.layout.rank, self.setup.layout.world_size)

    @torch.no_grad()
    def refresh_from_fragments(self) -> None:
        """Every rank holds the whole weights but wrote only its even piece: gather the others' pieces."""
        layout = self.setup.layout
        if not layout.distributed:
            return
        for fragment in self.trainable_fragments():
            flat = self.named_trainable[fragment.name].detach().view(-1)
            chunk = -(-flat.numel() // layout.world_size)
            pieces = [torch.zeros(chunk, dtype=flat.dtype, device=flat.device) for _ in range(layout.world_size)]
            mine = torch.zeros(chunk, dtype=flat.dtype, device=flat.device)
            mine[: fragment.values.numel()] = fragment.values
            dist.all_gather(pieces, mine)
            flat.copy_(torch.cat(pieces)[: flat.numel()])


def model_states(m: ModelStates) -> dict[str, float]:
    """fp32 weights (frozen ones bf16 in a LoRA run), gradients of the trainable ones and their AdamW moments,
    whole on every GPU."""
    return {"params": m.param_bytes(), "grads": 4 * m.trainable, "master": 0, "optimizer": 8 * m.trainable, "host": 0.0}


def read_checkpoint(ckpt: Path, world_size: int, tag: str | None) -> dict[str, TensorSource]:
    """model.safetensors holds the trainable weights by official name."""
    path = ckpt / DDP_MODEL_FILE
    if not path.is_file():
        raise ValueError(f"{path}: missing (a ddp checkpoint keeps its trainable weights there)")
    header, data_start = read_header(path)

    def reader(info: dict) -> Callable[[], torch.Tensor]:
        def read() -> torch.Tensor:
            with open(path, "rb") as f:
                return read_tensor(f, info, data_start)

        return read

    return {
        key: TensorSource(tuple(info["shape"]), DTYPES[info["dtype"]], reader(info), DDP_MODEL_FILE)
        for key, info in header.items()
    }


TRAITS = EngineTraits(
    name="ddp",
    summary="whole model on every rank",
    build=DDPEngine,
    low_precision_params=False,  # fp32 weights under autocast: autocast makes the low-precision copies
    memory=model_states,
    checkpoint_reader=read_checkpoint,
    owns_checkpoint=lambda folder: (folder / DDP_MODEL_FILE).is_file(),
)
