"""An exponential moving average of the trainable weights, sharded like the engine's weights.

Each rank averages only its own fragment of each trainable parameter's float32 weights (the engine's
`trainable_fragments`: ZeRO-3's and FSDP's shards, ZeRO-2's piece of the fp32 partitions, and for DDP an
even 1/N piece of its whole weights), so no rank holds a full copy under any engine. After optimizer
step s (an update that was applied; a skipped one changes nothing):

    s <= start_step                              ema = w          (it follows the weights)
    (s - start_step) % update_every == 0         ema = d_n ema + (1 - d_n) w,   n = averages so far
    d_n = decay; with warmup (diffusers' EMAModel, VideoX-Fun's --use_ema): 0 for n = 0, else
          min(decay, (1 + n) / (10 + n))

in float32 on the fragments. Checkpoints: `ema/rank_{r}.safetensors` per rank (its fragments by parameter
name, with their offsets in the metadata); any rank count and engine reads them back (the pieces a rank
needs are cut from every file that overlaps them), and tools/zero_to_bf16.py --ema assembles the whole
weights. Validation and the eval loss run on the average when [ema] validate_with_ema: `swapped()` puts
it into the engine's weights and back, bit for bit.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from train.checkpoint_io import write_safetensors
from train.engines.base import Engine, TensorSource

EMA_DIR = "ema"
EMA_DEVICES = ("gpu", "cpu")


@dataclass
class EMAConfig:
    enabled: bool = False
    """Keep an exponential moving average of the trainable weights, sharded like the weights under every
    engine, saved with each checkpoint (VideoX-Fun's --use_ema sets it, with warmup)."""
    decay: float = 0.9999
    """The average's decay per update."""
    warmup: bool = False
    """Ramp the decay up as diffusers' EMAModel does (VideoX-Fun's --use_ema): min(decay, (1 + n) / (10 + n))
    at the n-th average, the first a copy."""
    start_step: int = 0
    """Until this optimizer step the average equals the weights; averaging starts after it."""
    update_every: int = 1
    """Average every N optimizer steps (counted from start_step)."""
    device: str = "gpu"
    """Where the average lives: "gpu" beside the weights (the training device), "cpu" in host memory."""
    validate_with_ema: bool = True
    """Validation videos and the eval loss use the average instead of the training weights."""

    def problems(self) -> list[str]:
        out = (
            []
            if self.device in EMA_DEVICES
            else [f"device must be one of {', '.join(EMA_DEVICES)}, got {self.device!r}"]
        )
        if not 0 <= self.decay < 1:
            out.append(f"decay must be in [0, 1), got {self.decay}")
        if self.start_step < 0:
            out.append(f"start_step must be >= 0, got {self.start_step}")
        if self.update_every < 1:
            out.append(f"update_every must be >= 1, got {self.update_every}")
        return out


class EMA:
    """The average of this rank's fragments (see the module docstring); a checkpoint part."""

    def __init__(self, cfg: EMAConfig, engine: Engine, rank: int, world_size: int):
        self.cfg, self.engine, self.rank, self.world_size = cfg, engine, rank, world_size
        self.fragments = engine.trainable_fragments()
        self.device = torch.device("cpu") if cfg.device == "cpu" else None
        self.shadow = [
            f.values.detach().to(self.device or f.values.device, torch.float32, copy=True) for f in self.fragments
        ]
        self.averages = 0  # n: averages taken so far (the warmup's clock)

    def decay(self) -> float:
        n, c = self.averages, self.cfg
        if not c.warmup:
            return c.decay
        return 0.0 if n == 0 else min(c.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def after_step(self, step: int, updated: bool) -> None:
        """Fold the weights after optimizer step `step` in (see the module docstring)."""
        if not updated:
            return
        current = [f.values.to(s.device, torch.float32) for f, s in zip(self.fragments, self.shadow, strict=True)]
        if step <= self.cfg.start_step:
            torch._foreach_copy_(self.shadow, current)
        elif (step - self.cfg.start_step) % self.cfg.update_every == 0:
            torch._foreach_lerp_(self.shadow, current, 1.0 - self.decay())
            self.averages += 1

    def nbytes(self) -> int:
        """Bytes of the average this rank holds."""
        return sum(s.numel() * s.element_size() for s in self.shadow)

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """Collective: the engine computes with the average inside, with its own weights again after
        (restored exactly: the fragments are copied back)."""
        kept = [f.values.detach().clone() for f in self.fragments]
        with torch.no_grad():
            torch._foreach_copy_([f.values for f in self.fragments], [s.to(f.values.device) for f, s in
                                                                       zip(self.fragments, self.shadow, strict=True)])  # fmt: skip
        self.engine.refresh_from_fragments()
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_([f.values for f in self.fragments], kept)
            self.engine.refresh_from_fragments()

    # --- checkpoint part ------------------------------------------------------------------------------

    def save(self, folder: Path) -> list[str]:
        name = f"{EMA_DIR}/rank_{self.rank}.safetensors"
        index = {f.name: {"shape": list(f.shape), "offset": f.offset} for f in self.fragments}
        meta = {"index": json.dumps(index), "averages": str(self.averages), "world_size": str(self.world_size)}
        tensors = {f.name: s.contiguous() for f, s in zip(self.fragments, self.shadow, strict=True)}
        write_safetensors(folder / name, tensors, meta)
        return [name]

    @torch.no_grad()
    def load(self, folder: Path) -> None:
        """This rank's fragments cut from every rank file of the checkpoint (any saving rank count or engine)."""
        self.fragments = self.engine.trainable_fragments()  # the engine's load may have placed its weights anew
        files = saved_files(folder)
        if not files:
            raise ValueError(
                f"{folder / EMA_DIR}: no EMA in this checkpoint (saved without [ema] enabled); resume with "
                "enabled = false, or start a new run from its weights (tools/zero_to_bf16.py) with the EMA on"
            )
        averages = set()
        for path in files:
            with safe_open(path, "pt") as f:
                meta = f.metadata()
                index = json.loads(meta["index"])
                averages.add(int(meta["averages"]))
                for fragment, shadow in zip(self.fragments, self.shadow, strict=True):
                    piece = index.get(fragment.name)
                    if piece is None:
                        raise ValueError(f"{path}: holds no average of {fragment.name} (other trainable weights?)")
                    if tuple(piece["shape"]) != fragment.shape:
                        raise ValueError(
                            f"{path}: {fragment.name} has shape {piece['shape']}, this run {list(fragment.shape)}"
                        )
                    start = max(piece["offset"], fragment.offset)
                    saved = f.get_slice(fragment.name)
                    end = min(piece["offset"] + saved.get_shape()[0], fragment.offset + fragment.values.numel())
                    if start < end:
                        shadow[start - fragment.offset : end - fragment.offset].copy_(
                            saved[start - piece["offset"] : end - piece["offset"]]
                        )
        if len(averages) != 1:
            raise ValueError(
                f"{folder / EMA_DIR}: its rank files disagree on the number of averages ({sorted(averages)})"
            )
        self.averages = averages.pop()


def saved_files(folder: Path) -> list[Path]:
    return sorted((folder / EMA_DIR).glob("rank_*.safetensors"))


def ema_sources(folder: Path) -> dict[str, TensorSource]:
    """The whole averaged weights of a checkpoint, by parameter name, each assembled from the rank files
    when read (tools/zero_to_bf16.py --ema)."""
    files = saved_files(folder)
    if not files:
        raise ValueError(f"{folder / EMA_DIR}: no EMA in this checkpoint (the run had no [ema] enabled = true)")
    pieces: dict[str, list[tuple[Path, int]]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for path in files:
        with safe_open(path, "pt") as f:
            for name, info in json.loads(f.metadata()["index"]).items():
                pieces.setdefault(name, []).append((path, info["offset"]))
                shapes[name] = tuple(info["shape"])

    def reader(name: str):
        def read() -> torch.Tensor:
            flat = torch.empty(math.prod(shapes[name]), dtype=torch.float32)
            covered = 0
            for path, offset in pieces[name]:
                with safe_open(path, "pt") as f:
                    piece = f.get_tensor(name)
                flat[offset : offset + piece.numel()] = piece
                covered += piece.numel()
            if covered != flat.numel():
                raise ValueError(f"{folder / EMA_DIR}: the pieces of {name} cover {covered} of {flat.numel()} elements")
            return flat.view(shapes[name])

        return read

    return {name: TensorSource(shapes[name], torch.float32, reader(name), f"{EMA_DIR}/ (average)") for name in pieces}
