"""Wan2.2 A14B: its two expert DiTs trained in one run, and timestep ranges.

An A14B release is two 14B DiTs: the high-noise expert denoises the timesteps t >= boundary x 1000
(the release's boundary: 0.875 t2v, 0.9 i2v), the low-noise expert the rest. A run trains both (or one:
[experts] train_experts), each rank holding its shards of every trained expert, each expert with its own
engine: its weights, optimizer, learning rate and lr schedule (train/engines/experts.py).

Every optimizer step trains one expert, the same on every rank (so a sharded engine's collectives line
up): step s's expert is drawn from (seed, s) with the probability of its timestep range under the
training density ([train] shift and weighting_scheme), and the step's timesteps are drawn within that
range (FlowMatching.sample_sigmas with the range's quantiles). The timesteps of the whole run therefore
follow the training density as a single model's would, and an expert's steps see what a run training it
alone on its range would see. Its lr schedule counts its own steps, known up front (the draws depend on
(seed, step) only).

`timestep_range` narrows the timesteps of any run (an A14B expert's range, or a single DiT's): the draws
keep the density's shape inside it.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from train.data.sampler import derive_seed
from train.flow import FlowMatching
from wan.configs import EXPERTS

NUM_TRAIN_TIMESTEPS = 1000


@dataclass
class ExpertsConfig:
    train_experts: list[str] = field(default_factory=lambda: list(EXPERTS))
    """Which Wan2.2 A14B experts train: "high" (the high-noise expert, t >= boundary x 1000) and "low". With
    both, each step trains one, drawn with the probability of its timestep range; with one, only it is
    built. Ignored (must stay default) for a model without experts."""
    boundary: float = 0.0
    """The fraction of the 1000 timesteps where the experts meet: the high-noise expert's timesteps are
    t >= boundary x 1000. 0: the release's (0.875 t2v, 0.9 i2v; a diffusers folder's boundary_ratio)."""
    learning_rate_high: float = 0.0
    """The high-noise expert's learning rate; 0: [optim] learning_rate."""
    learning_rate_low: float = 0.0
    """The low-noise expert's learning rate; 0: [optim] learning_rate."""
    timestep_range: list[float] = field(default_factory=list)
    """[t_min, t_max]: train on the timesteps t_min <= t < t_max only (0..1000), drawn with the training
    density's shape inside the range; empty: all. Any model (with experts: each expert's range is cut to it)."""

    def problems(self) -> list[str]:
        out = []
        unknown = [e for e in self.train_experts if e not in EXPERTS]
        if unknown or not self.train_experts or len(set(self.train_experts)) != len(self.train_experts):
            out.append(
                f"train_experts must be one or both of {', '.join(EXPERTS)} (once each), got {self.train_experts}"
            )
        if not 0 <= self.boundary < 1:
            out.append(f"boundary must be in [0, 1) (0: the release's), got {self.boundary}")
        for name in ("learning_rate_high", "learning_rate_low"):
            if not getattr(self, name) >= 0:
                out.append(f"{name} must be >= 0 (0: [optim] learning_rate), got {getattr(self, name)}")
        r = self.timestep_range
        if r and not (len(r) == 2 and 0 <= r[0] < r[1] <= NUM_TRAIN_TIMESTEPS):
            out.append(f"timestep_range must be [t_min, t_max] with 0 <= t_min < t_max <= 1000, got {r}")
        return out

    def learning_rate(self, expert: str, default: float) -> float:
        return getattr(self, f"learning_rate_{expert}") or default

    @property
    def is_default(self) -> bool:
        """Nothing set that only a model with experts can use (timestep_range is any model's)."""
        return dataclasses.replace(self, timestep_range=[]) == ExpertsConfig()


@dataclass(frozen=True)
class TimestepShare:
    """A range of timesteps [t_min, t_max), its quantiles under the training density and its share of
    the run's steps."""

    t_min: float
    t_max: float
    quantiles: tuple[float, float]
    probability: float


class ExpertPlan:
    """Which expert each optimizer step trains and the timesteps it draws (see the module docstring).
    A run without experts but with a timestep_range has one entry, named "dit"."""

    def __init__(self, shares: dict[str, TimestepShare], seed: int, boundary: float | None = None):
        self.shares, self.seed, self.boundary = shares, seed, boundary
        self.names = list(shares)
        self._trace: list[tuple[str, int]] = []  # own_step of steps 1, 2, ... as far as asked
        self._tally = dict.fromkeys(self.names, 0)

    @classmethod
    def build(cls, cfg: ExpertsConfig, flow: FlowMatching, seed: int, boundary: float | None) -> ExpertPlan | None:
        """boundary: the A14B model's (None: a model without experts). None when nothing restricts the
        timesteps (a single DiT without timestep_range: the draws are the plain ones)."""
        t_lo, t_hi = cfg.timestep_range or (0.0, float(NUM_TRAIN_TIMESTEPS))
        if boundary is None:
            if not cfg.timestep_range:
                return None
            ranges = {"dit": (t_lo, t_hi)}
        else:
            edge = boundary * NUM_TRAIN_TIMESTEPS
            full = {"high": (edge, float(NUM_TRAIN_TIMESTEPS)), "low": (0.0, edge)}
            ranges = {e: (max(full[e][0], t_lo), min(full[e][1], t_hi)) for e in EXPERTS if e in cfg.train_experts}
        empty = [e for e, (a, b) in ranges.items() if a >= b]
        if empty:
            raise ValueError(
                f"[experts] timestep_range {cfg.timestep_range} leaves no timestep to the {' and '.join(empty)} "
                f"expert (the experts meet at t = {boundary * NUM_TRAIN_TIMESTEPS:g}): widen it or drop that expert "
                "from train_experts"
            )
        quantiles = {e: flow.quantile_range(a, b) for e, (a, b) in ranges.items()}
        mass = {e: q[1] - q[0] for e, q in quantiles.items()}
        total = sum(mass.values())
        if not total > 0:
            raise ValueError(
                f"[experts] timestep_range {cfg.timestep_range} has no probability under the training density"
            )
        shares = {e: TimestepShare(*ranges[e], quantiles[e], mass[e] / total) for e in ranges}
        return cls(shares, seed, boundary)

    def expert_of(self, step: int) -> str:
        """The expert optimizer step `step` (0-based: the steps done before it) trains, the same on every rank."""
        if len(self.names) == 1:
            return self.names[0]
        g = torch.Generator().manual_seed(derive_seed("experts.step", self.seed, step))
        u = torch.rand((), generator=g, dtype=torch.float64).item()
        cumulative = 0.0
        for name in self.names[:-1]:
            cumulative += self.shares[name].probability
            if u < cumulative:
                return name
        return self.names[-1]

    def own_step(self, step: int) -> tuple[str, int]:
        """Optimizer step `step` (1-based): (its expert, the steps that expert has trained, this one included)."""
        while len(self._trace) < step:
            expert = self.expert_of(len(self._trace))
            self._tally[expert] += 1
            self._trace.append((expert, self._tally[expert]))
        return self._trace[step - 1]

    def overall_quantiles(self) -> tuple[float, float] | None:
        """The quantiles of all the run's timesteps (its experts' ranges meet), None for the whole density."""
        lo = min(s.quantiles[0] for s in self.shares.values())
        hi = max(s.quantiles[1] for s in self.shares.values())
        return None if (lo, hi) == (0.0, 1.0) else (lo, hi)

    def quantiles(self, expert: str) -> tuple[float, float]:
        return self.shares[expert].quantiles

    def steps_of(self, total_steps: int) -> dict[str, int]:
        """Optimizer steps each expert trains over a run of total_steps (its lr schedule's length)."""
        counts = dict.fromkeys(self.names, 0)
        for expert, _ in (self.own_step(s) for s in range(1, total_steps + 1)):
            counts[expert] += 1
        return counts

    def describe_one(self, name: str) -> str:
        s = self.shares[name]
        return f"t in [{s.t_min:g}, {s.t_max:g}), probability {s.probability:.3f}"


class PerExpert:
    """A checkpoint part made of one part per expert (train/checkpoint.py FileState), each saved into
    `<checkpoint>/<expert>/` (into the checkpoint folder itself with in_place: parts that name their own
    sub-folders, as the consolidated export's high_noise_model/ and low_noise_model/)."""

    def __init__(self, parts: dict, in_place: bool = False):
        self.parts, self.in_place = parts, in_place

    def save(self, folder: Path) -> list[str]:
        names = []
        for expert, part in self.parts.items():
            sub = folder if self.in_place else folder / expert
            sub.mkdir(parents=True, exist_ok=True)
            prefix = "" if self.in_place else f"{expert}/"
            names += [prefix + name for name in part.save(sub)]
        return names

    def load(self, folder: Path) -> None:
        for expert, part in self.parts.items():
            part.load(folder if self.in_place else folder / expert)


class ExpertEMA(PerExpert):
    """[ema] for an A14B run: an EMA per trained expert (train/ema.py), each folding in its expert's
    weights after that expert's own steps, counted by the expert (start_step, update_every and the warmup
    count them): each average is what a run of that expert alone would keep."""

    def __init__(self, emas: dict, plan: ExpertPlan):
        super().__init__(emas)
        self.plan = plan

    def after_step(self, step: int, updated: bool) -> None:
        """Optimizer step `step` (1-based) trained its plan's expert: fold that expert's weights in."""
        expert, own = self.plan.own_step(step)
        self.parts[expert].after_step(own, updated)

    def nbytes(self) -> int:
        return sum(ema.nbytes() for ema in self.parts.values())

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for ema in self.parts.values():
                stack.enter_context(ema.swapped())
            yield
