"""Wan2.2 A14B's experts under one engine interface: one engine per expert, the step's expert chosen.

Each trained expert has an engine of its own, of the run's kind (ddp, zero2, zero3, fsdp): its DiT
(sharded as that engine shards), its optimizer, learning rate and lr schedule (counting its own steps).
So a step trains one expert exactly as a run of that expert alone would, and the idle expert's weights,
gradients and AdamW state do not move. The loop selects the step's expert with `use` (train/experts.py
draws it, the same on every rank) and then talks to this object as to any engine.

Inference (validation sampling, the eval loss) routes each sample to the expert of its timestep
(t >= boundary x 1000: the high-noise one). Under a sharded engine a forward is a collective: every rank
must call the same experts in the same order, which holds because every rank's call carries the same
timesteps (one sampling step for all ranks; the eval loss's fixed quantiles).

Checkpoints: each expert's engine saves into `<checkpoint>/<expert>/` (high, low); the readers
(tools/zero_to_bf16.py, train/resume.py) find the experts there.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch

from train.engines.base import Engine, Fragment, StepResult


class ExpertEngines:
    """The Engine protocol over {expert: engine}; `use(expert)` picks the one the next step trains."""

    def __init__(self, engines: dict[str, Engine], boundary: float):
        self.engines, self.boundary = engines, boundary
        self.active = next(iter(engines))

    # --- training: the active expert's engine ---------------------------------------------------------

    def use(self, expert: str) -> None:
        if expert not in self.engines:
            raise ValueError(f"expert {expert!r} is not trained in this run ({', '.join(self.engines)})")
        self.active = expert

    @property
    def engine(self) -> Engine:
        return self.engines[self.active]

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.engine.forward(*args, **kwargs)

    def micro_step(self, last: bool) -> contextlib.AbstractContextManager:
        return self.engine.micro_step(last)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> StepResult:
        return self.engine.step()

    # --- inference: by timestep -------------------------------------------------------------------------

    def expert_of_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """[B] bool: whether each sample is the high-noise expert's (t [B], or per token [B, S]: its largest)."""
        per_sample = t.reshape(t.shape[0], -1).amax(dim=1) if t.ndim > 1 else t.reshape(-1)
        return per_sample >= self.boundary * 1000

    def inference_forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, **kwargs) -> torch.Tensor:
        high = self.expert_of_timesteps(t.expand(x.shape[0]) if t.numel() == 1 else t)
        parts = [(e, mask) for e, mask in (("high", high), ("low", ~high)) if bool(mask.any())]
        missing = [e for e, _ in parts if e not in self.engines]
        if missing:
            raise ValueError(
                f"timesteps of the {missing[0]}-noise expert, which this run does not train (train_experts = "
                f"{list(self.engines)}): sample with both experts (tools/sample.py)"
            )
        if len(parts) == 1:
            return self.engines[parts[0][0]].inference_forward(x, t, context, **kwargs)
        out = None
        for expert, mask in parts:
            pick = {k: (v[mask] if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
            pred = self.engines[expert].inference_forward(
                x[mask], t[mask] if t.numel() > 1 else t, context[mask], **pick
            )
            if out is None:
                out = pred.new_empty((x.shape[0], *pred.shape[1:]))
            out[mask] = pred
        return out

    # --- checkpoints and the rest: every expert ----------------------------------------------------------

    def save(self, folder: Path) -> list[str]:
        names = []
        for expert, engine in self.engines.items():
            (folder / expert).mkdir(parents=True, exist_ok=True)
            names += [f"{expert}/{name}" for name in engine.save(folder / expert)]
        return names

    def load(self, folder: Path) -> None:
        for expert, engine in self.engines.items():
            sub = folder / expert
            if not sub.is_dir():
                raise ValueError(f"{sub}: missing: the checkpoint holds no {expert}-noise expert (train_experts?)")
            engine.load(sub)

    def full_state(self) -> Iterator[tuple[str, torch.Tensor]]:
        raise NotImplementedError("ExpertEngines: stream each expert's engine (full_state of .engines[e])")

    def model_state_bytes(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for engine in self.engines.values():
            for key, value in engine.model_state_bytes().items():
                out[key] = out.get(key, 0) + value
        return out

    def trainable_fragments(self) -> list[Fragment]:
        raise NotImplementedError("ExpertEngines: each expert has its own EMA (train/experts.py ExpertEMA)")

    def refresh_from_fragments(self) -> None:
        for engine in self.engines.values():
            engine.refresh_from_fragments()
