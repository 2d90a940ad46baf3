"""The data-parallel engine behind the training loop: DDP now; ZeRO-2, ZeRO-3 and FSDP2 go behind the
same few methods next.

What the loop needs from an engine, and nothing more:
- `model(...)`: the forward of the wrapped model;
- `sync(enabled)`: a context for one micro-step; gradients are reduced across ranks only when enabled
  (the last micro-step of an optimizer step), so accumulation costs one all-reduce per step;
- `backward(loss)`, then `step(max_grad_norm)`: clip, and update unless the gradients are not
  finite (then the update is skipped on every rank alike: the reduced gradients are identical);
- `trainable_state()` / `load_trainable_state()`: the trainable weights by their official names;
- `optimizer_state()` / `load_optimizer_state()`: the optimizer state keyed by the same names, so a
  checkpoint does not depend on the engine's parameter order.
"""

import contextlib
import inspect
import math
from collections.abc import Iterator

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from train.checkpoint import load_named_optimizer_state, optimizer_state_to_named


class DDPEngine:
    """Every rank holds the whole model in float32 and the AdamW state of its trainable parameters;
    gradients are averaged across ranks in backward (DDP's bucketed all-reduce)."""

    def __init__(
        self,
        model: nn.Module,
        device: torch.device,
        *,
        learning_rate: float,
        betas: tuple[float, float],
        weight_decay: float,
        eps: float,
    ):
        self.module = model
        self.device = device
        self.named_trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.names_by_param = {p: n for n, p in self.named_trainable.items()}
        self.distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if self.distributed:
            # Frozen parameters (requires_grad=False before wrapping) get no gradient buckets. Buffers
            # (the RoPE tables) are computed alike on every rank: no broadcast before each forward.
            # Gradients as views of the all-reduce buckets: one copy of the gradients, not two.
            ids = [device.index] if device.type == "cuda" else None
            new_torch = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
            no_buffer_sync = {"forward_sync_buffers": False} if new_torch else {"broadcast_buffers": False}
            self.model = DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True, **no_buffer_sync)
        else:
            self.model = model
        # Fused AdamW where the device has it; foreach on CPU. Same arithmetic as the reference AdamW.
        fused = device.type == "cuda"
        self.optimizer = torch.optim.AdamW(
            list(self.named_trainable.values()), lr=learning_rate, betas=betas, weight_decay=weight_decay, eps=eps,
            fused=fused or None, foreach=None if fused else True,
        )  # fmt: skip

    @contextlib.contextmanager
    def sync(self, enabled: bool) -> Iterator[None]:
        if self.distributed and not enabled:
            with self.model.no_sync():
                yield
        else:
            yield

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, max_grad_norm: float) -> tuple[float, bool]:
        """Clip (max_grad_norm > 0) and update; returns (total gradient norm, whether it updated)."""
        params = list(self.named_trainable.values())
        limit = max_grad_norm if max_grad_norm > 0 else math.inf
        norm = float(torch.nn.utils.clip_grad_norm_(params, limit))
        updated = math.isfinite(norm)
        if updated:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm, updated

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu() for n, p in self.named_trainable.items()}

    @torch.no_grad()
    def load_trainable_state(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        names = set(self.named_trainable)
        missing, unexpected = sorted(names - set(tensors)), sorted(set(tensors) - names)
        problems = [f"missing {missing[:5]}" if missing else "", f"unexpected {unexpected[:5]}" if unexpected else ""]
        for name in sorted(names & set(tensors)):
            if tensors[name].shape != self.named_trainable[name].shape:
                problems.append(f"{name}: {list(tensors[name].shape)} vs {list(self.named_trainable[name].shape)}")
        problems = [p for p in problems if p]
        if problems:
            raise ValueError(
                f"{source}: the checkpoint's trainable weights do not fit this run (trainable_modules or model "
                "changed?): " + "; ".join(problems)
            )
        for name, param in self.named_trainable.items():
            param.copy_(tensors[name])

    def optimizer_state(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        return optimizer_state_to_named(self.optimizer, self.names_by_param)

    def load_optimizer_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
        load_named_optimizer_state(self.optimizer, self.names_by_param, tensors, meta)


def build_engine(name: str, model: nn.Module, device: torch.device, **optim) -> DDPEngine:
    if name != "ddp":
        raise ValueError(f"engine {name!r} is not implemented yet (only 'ddp')")
    return DDPEngine(model, device, **optim)
