"""Rectified-flow (flow matching) training objective for the Wan2.1 DiT.

x_t = (1 - sigma) * x0 + sigma * noise, the DiT sees t = sigma * 1000 and predicts the velocity
noise - x0; the loss is the MSE to it in float32 (spec: wan21-architecture.md, "Flow matching").

Exact resume and layout independence: nothing is drawn from a global RNG. Every draw for a sample
comes from its own CPU torch.Generator seeded by (seed, optimizer step, global position p), where
p = (micro_step * world_size + rank) * batch_size + index, 0 <= p < G = world_size * grad_accum *
batch_size (see `batch_positions`). So 1 rank x batch 2, 2 ranks x batch 1 and 1 rank x batch 1 x 2
micro-steps draw the same noise and timesteps for the same position, and resume needs no RNG state.
Draws are made on the CPU because CPU generators give the same numbers on every machine; CUDA
generators do not promise that across devices or torch versions.

Shapes: B samples, C latent channels, F/H/W latent frames/height/width.
"""

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from train.data.sampler import derive_seed

WEIGHTING_SCHEMES = ("logit_normal", "uniform")
# Shifted sigmas are clamped into [SIGMA_EPS, 1 - SIGMA_EPS] so t = sigma * 1000 stays strictly below
# 1000 in float32 even for a large shift (shift(1 - eps) -> 1 as shift grows and would round to 1.0),
# and never hits exactly 0. The clamp moves a draw only with probability ~1e-5 at shift 5.
SIGMA_EPS = 1e-5

Positions = Sequence[int] | torch.Tensor


def shift_sigma(sigma: torch.Tensor | float, shift: float) -> torch.Tensor | float:
    """s' = shift * s / (1 + (shift - 1) * s): shift > 1 moves sigmas towards 1 (more noise), which
    large videos need since their many tokens keep a lot of signal at a given noise level."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def batch_positions(micro_step: int, rank: int, world_size: int, batch_size: int) -> list[int]:
    """Global positions of one rank's batch at one micro-step of an optimizer step."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    if batch_size < 1 or micro_step < 0:
        raise ValueError(f"need batch_size >= 1 and micro_step >= 0, got {batch_size} and {micro_step}")
    first = (micro_step * world_size + rank) * batch_size
    return list(range(first, first + batch_size))


def timestep_bin(t: torch.Tensor, num_bins: int, num_train_timesteps: int = 1000) -> torch.Tensor:
    """Bin index [B] int64 of timesteps t in [0, num_train_timesteps) among num_bins equal bins, for
    logging the loss by timestep. Out-of-range t is clamped into the first/last bin (a logging helper
    must not stop a run)."""
    if num_bins < 1:
        raise ValueError(f"num_bins must be >= 1, got {num_bins}")
    # t * num_bins / T rather than t / T * num_bins: bin edges such as t = 100 with 10 bins stay exact.
    idx = torch.floor(t.double() * num_bins / num_train_timesteps).long()
    return idx.clamp(0, num_bins - 1)


def _ints(name: str, values: Positions) -> list[int]:
    if isinstance(values, torch.Tensor):
        if values.is_floating_point() or values.ndim != 1:
            raise ValueError(
                f"{name} must be a 1-D integer tensor, got {values.dtype} with shape {tuple(values.shape)}"
            )
        values = values.tolist()
    if len(values) == 0:
        raise ValueError(f"{name} must not be empty")
    # operator.index rejects floats: derive_seed hashes str(value), and "1.0" != "1" would change the draw.
    return [operator.index(v) for v in values]


def _generator(*parts: object) -> torch.Generator:
    # derive_seed gives [0, 2**64); manual_seed takes up to 2**64 - 1, so no reduction is needed.
    return torch.Generator().manual_seed(derive_seed(*parts))


@dataclass(frozen=True)
class FlowMatching:
    """Timestep and noise sampling, noising, target and loss. Pure: all state is in the arguments.

    weighting_scheme is the density of the unshifted sigma u: "logit_normal" = sigmoid(N(logit_mean,
    logit_std)) (SD3), "uniform" = U(0, 1). uniform_sampling=True overrides it with stratified uniform
    sampling: position p of a global batch of G draws u in [p / G, (p + 1) / G). The reference
    stratifies by rank; one stratum per global position is finer (every sample of the global batch,
    not every rank, gets its own slice of [0, 1)) and does not depend on the world size or on how the
    batch is split into micro-steps.
    """

    shift: float = 5.0
    weighting_scheme: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    uniform_sampling: bool = False
    num_train_timesteps: int = 1000

    def __post_init__(self):
        if self.weighting_scheme not in WEIGHTING_SCHEMES:
            raise ValueError(f"weighting_scheme must be one of {WEIGHTING_SCHEMES}, got {self.weighting_scheme!r}")
        if not (math.isfinite(self.shift) and self.shift > 0):
            raise ValueError(f"shift must be a finite number > 0, got {self.shift}")
        if not (math.isfinite(self.logit_std) and self.logit_std > 0):
            raise ValueError(f"logit_std must be a finite number > 0, got {self.logit_std}")
        if not math.isfinite(self.logit_mean):
            raise ValueError(f"logit_mean must be finite, got {self.logit_mean}")
        if isinstance(self.num_train_timesteps, bool) or not isinstance(self.num_train_timesteps, int):
            raise ValueError(f"num_train_timesteps must be an int, got {self.num_train_timesteps!r}")
        if self.num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be >= 1, got {self.num_train_timesteps}")

    def sample_sigmas(
        self, seed: int, step: int, positions: Positions, global_size: int, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """Shifted sigmas [B] float32 in [SIGMA_EPS, 1 - SIGMA_EPS], one per global position."""
        seed, step, global_size = operator.index(seed), operator.index(step), operator.index(global_size)
        positions = _ints("positions", positions)
        if global_size < 1 or any(not 0 <= p < global_size for p in positions):
            raise ValueError(f"positions must lie in [0, global_size={global_size}), got {positions}")
        u = torch.empty(len(positions), dtype=torch.float64)
        for i, p in enumerate(positions):
            g = _generator("flow.sigma", seed, step, p)
            if self.uniform_sampling:
                u[i] = (p + torch.rand((), generator=g, dtype=torch.float64)) / global_size
            elif self.weighting_scheme == "uniform":
                u[i] = torch.rand((), generator=g, dtype=torch.float64)
            else:
                z = torch.randn((), generator=g, dtype=torch.float64)
                u[i] = torch.sigmoid(self.logit_mean + self.logit_std * z)
        sigmas = shift_sigma(u, self.shift).clamp(SIGMA_EPS, 1 - SIGMA_EPS)  # float64 until here
        return sigmas.float().to(device)

    def sample_noise(
        self,
        seed: int,
        step: int,
        positions: Positions,
        shape: Sequence[int],
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Standard normal noise [B, *shape] float32, one generator per position, so a position's noise
        does not depend on the batch it is in. shape is one sample's latent shape, e.g. (C, F, H, W)."""
        seed, step = operator.index(seed), operator.index(step)
        shape = tuple(operator.index(s) for s in shape)
        noise = [
            torch.randn(shape, generator=_generator("flow.noise", seed, step, p), dtype=torch.float32)
            for p in _ints("positions", positions)
        ]
        return torch.stack(noise).to(device)

    def timesteps(self, sigmas: torch.Tensor) -> torch.Tensor:
        """The DiT's t [B] float32 = sigma * num_train_timesteps (continuous, not rounded to integers)."""
        return sigmas.float() * self.num_train_timesteps

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
        """x_t [B, C, F, H, W] float32 = (1 - sigma) * x0 + sigma * noise, sigma [B] broadcast per sample."""
        _check_batch(x0, noise, sigmas)
        s = sigmas.float().view(-1, *([1] * (x0.ndim - 1)))  # [B, 1, 1, 1, 1]
        return (1 - s) * x0.float() + s * noise.float()

    def target(self, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Velocity target [B, C, F, H, W] float32 = noise - x0 (d x_t / d sigma)."""
        if x0.shape != noise.shape:
            raise ValueError(f"x0 {tuple(x0.shape)} and noise {tuple(noise.shape)} must have the same shape")
        return noise.float() - x0.float()

    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean MSE scalar float32, per-sample MSE [B] float32 detached for loss-by-timestep logs).

        pred is upcast before the difference: a bf16 difference of two close velocities loses most of
        its bits. All samples of a batch have one shape, so the mean of per-sample means is the MSE.
        """
        if pred.shape != target.shape:
            raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must have the same shape")
        per_sample = (pred.float() - target.float()).square().flatten(1).mean(1)  # [B]
        return per_sample.mean(), per_sample.detach()


def _check_batch(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> None:
    if x0.shape != noise.shape:
        raise ValueError(f"x0 {tuple(x0.shape)} and noise {tuple(noise.shape)} must have the same shape")
    if sigmas.shape != x0.shape[:1]:
        raise ValueError(f"sigmas must have shape [B] = ({x0.shape[0]},), got {tuple(sigmas.shape)}")
