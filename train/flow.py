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

Timestep densities and loss weights are those of diffusers' SD3 helpers, which VideoX-Fun uses
(compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3); see `FlowMatching`.

Shapes: B samples, C latent channels, F/H/W latent frames/height/width.
"""

import math
import operator
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from train.data.sampler import derive_seed

# The config's choices too (train/config.py imports them). "none" is VideoX-Fun's "uniform".
WEIGHTING_SCHEMES = ("logit_normal", "uniform", "none", "mode", "sigma_sqrt", "cosmap")
# The "mode" density's map v -> u is a monotone bijection of [0, 1] only for scales in this range
# (SD3 paper, eq. 20); outside it u leaves [0, 1] and the draw is no longer a density on sigmas.
MODE_SCALE_RANGE = (-1.0, 2 / (math.pi - 2))
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


# The [train] keys a FlowMatching is built from (num_train_timesteps is the model's, not the config's).
CONFIG_KEYS = (
    "shift", "weighting_scheme", "logit_mean", "logit_std", "uniform_sampling", "mode_scale", "motion_sub_loss",
    "motion_sub_loss_ratio",
)  # fmt: skip


@dataclass(frozen=True)
class FlowMatching:
    """Timestep and noise sampling, noising, target and loss. Pure: all state is in the arguments.

    weighting_scheme sets the density of the unshifted sigma u and the loss weight, as diffusers:
    - "logit_normal": u = sigmoid(N(logit_mean, logit_std)) (SD3), weight 1;
    - "mode": v ~ U(0, 1), u = 1 - v - mode_scale * (cos(pi v / 2)^2 - 1 + v), weight 1;
    - "uniform" and "none" (the same): u ~ U(0, 1), weight 1;
    - "sigma_sqrt": u ~ U(0, 1), weight sigma^-2 (huge at low noise: 1e4 at sigma 0.01, as in diffusers);
    - "cosmap": u ~ U(0, 1), weight 2 / (pi (1 - 2 sigma + 2 sigma^2)).
    Weights use the shifted sigma the sample was noised with, as VideoX-Fun's.

    uniform_sampling=True replaces the density (not the weight) with stratified uniform sampling:
    position p of a global batch of G draws u in [p / G, (p + 1) / G). The reference stratifies by
    rank; one stratum per global position is finer (every sample of the global batch, not every rank,
    gets its own slice of [0, 1)) and does not depend on the world size or on how the batch is split
    into micro-steps.

    motion_sub_loss adds, with ratio r, the MSE of the frame-to-frame differences (see `loss`).
    """

    shift: float = 5.0
    weighting_scheme: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    uniform_sampling: bool = False
    num_train_timesteps: int = 1000
    mode_scale: float = 1.29
    motion_sub_loss: bool = False
    motion_sub_loss_ratio: float = 0.25

    @classmethod
    def from_config(cls, train) -> "FlowMatching":
        """From the [train] section (train.config.TrainConfig), which holds these values by name."""
        return cls(**{name: getattr(train, name) for name in CONFIG_KEYS})

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
        lo, hi = MODE_SCALE_RANGE
        # Checked only when used, so an unused value never stops a run.
        if self.weighting_scheme == "mode" and not lo <= self.mode_scale <= hi:
            raise ValueError(
                f"mode_scale must be in [{lo}, {hi:.4f}] for the mode density to stay in [0, 1], got {self.mode_scale}"
            )
        if not 0 <= self.motion_sub_loss_ratio <= 1:
            raise ValueError(f"motion_sub_loss_ratio must be in [0, 1], got {self.motion_sub_loss_ratio}")

    def sample_sigmas(
        self,
        seed: int,
        step: int,
        positions: Positions,
        global_size: int,
        device: torch.device | str | None = None,
        quantiles: tuple[float, float] | None = None,
    ) -> torch.Tensor:
        """Shifted sigmas [B] float32 in [SIGMA_EPS, 1 - SIGMA_EPS], one per global position.

        quantiles (q_lo, q_hi): draw from the density restricted to its quantiles [q_lo, q_hi] instead
        (a timestep range: a Wan2.2 expert's, or [experts] timestep_range; see `quantile_range`): the
        position's uniform draw v (stratified under uniform_sampling) becomes the sigma at quantile
        q_lo + v (q_hi - q_lo), so each sigma of the range keeps its relative density."""
        seed, step, global_size = operator.index(seed), operator.index(step), operator.index(global_size)
        positions = _ints("positions", positions)
        if global_size < 1 or any(not 0 <= p < global_size for p in positions):
            raise ValueError(f"positions must lie in [0, global_size={global_size}), got {positions}")
        if quantiles is not None:
            return self._sample_in_quantiles(seed, step, positions, global_size, quantiles).to(device)
        u = torch.empty(len(positions), dtype=torch.float64)
        for i, p in enumerate(positions):
            g = _generator("flow.sigma", seed, step, p)
            if self.uniform_sampling:
                u[i] = (p + torch.rand((), generator=g, dtype=torch.float64)) / global_size
            elif self.weighting_scheme == "logit_normal":
                z = torch.randn((), generator=g, dtype=torch.float64)
                u[i] = torch.sigmoid(self.logit_mean + self.logit_std * z)
            elif self.weighting_scheme == "mode":
                v = torch.rand((), generator=g, dtype=torch.float64)
                u[i] = 1 - v - self.mode_scale * (torch.cos(math.pi * v / 2) ** 2 - 1 + v)
            else:  # uniform, none, sigma_sqrt, cosmap
                u[i] = torch.rand((), generator=g, dtype=torch.float64)
        sigmas = shift_sigma(u, self.shift).clamp(SIGMA_EPS, 1 - SIGMA_EPS)  # float64 until here
        return sigmas.float().to(device)

    def _sample_in_quantiles(
        self, seed: int, step: int, positions: list[int], global_size: int, quantiles: tuple[float, float]
    ) -> torch.Tensor:
        q_lo, q_hi = quantiles
        if not 0 <= q_lo < q_hi <= 1:
            raise ValueError(f"quantiles must satisfy 0 <= q_lo < q_hi <= 1, got {quantiles}")
        out = torch.empty(len(positions), dtype=torch.float64)
        for i, p in enumerate(positions):
            v = torch.rand((), generator=_generator("flow.sigma", seed, step, p), dtype=torch.float64).item()
            if self.uniform_sampling:
                v = (p + v) / global_size
            out[i] = self._quantile(q_lo + v * (q_hi - q_lo))
        return out.float()

    def _quantile(self, q: float) -> float:
        """sigma_quantile on the closed interval [0, 1] (its ends: the clamped ends of the sigmas)."""
        return self.sigma_quantile(min(max(q, 1e-15), 1 - 1e-15))

    def sigma_cdf(self, sigma: float) -> float:
        """P(a drawn sigma < sigma), in float64: the inverse of sigma_quantile, by bisection (it is
        monotone), for a timestep range's share of the training density."""
        if sigma <= SIGMA_EPS:
            return 0.0
        if sigma >= 1 - SIGMA_EPS:
            return 1.0
        lo, hi = 0.0, 1.0
        for _ in range(64):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if self._quantile(mid) < sigma else (lo, mid)
        return (lo + hi) / 2

    def quantile_range(self, t_min: float, t_max: float) -> tuple[float, float]:
        """The quantiles (q_lo, q_hi) of the timesteps [t_min, t_max) under the training density: their
        difference is the range's probability; sample_sigmas(quantiles=...) draws within it."""
        n = self.num_train_timesteps
        return self.sigma_cdf(t_min / n), self.sigma_cdf(t_max / n)

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

    def sigma_quantile(self, q: float) -> float:
        """The q-quantile (0 < q < 1) of the shifted sigmas `sample_sigmas` draws, in float64, for
        measuring a loss at fixed points of the training timestep distribution (train/eval_loss.py).

        Closed forms, as every density here has one: the unshifted u's quantile, then the shift and the
        clamp (both monotone increasing, so they map quantiles to quantiles):
        - uniform (and uniform_sampling, whose strata make u uniform over a global batch): u_q = q;
        - logit_normal: u_q = sigmoid(logit_mean + logit_std * Phi^-1(q));
        - mode: u = f(v) with v ~ U(0, 1) and f non-increasing on [0, 1] for every allowed mode_scale
          (f' = -1 + mode_scale * (pi/2 sin(pi v) - 1) <= 0), so P(u <= f(1 - q)) = P(v >= 1 - q) = q
          and u_q = f(1 - q).
        """
        q = float(q)
        if not 0 < q < 1:
            raise ValueError(f"a quantile must lie in (0, 1), got {q}")
        if self.uniform_sampling or self.weighting_scheme not in ("logit_normal", "mode"):
            u = q
        elif self.weighting_scheme == "logit_normal":
            z = statistics.NormalDist().inv_cdf(q)
            x = self.logit_mean + self.logit_std * z
            u = 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))  # no overflow
        else:
            v = 1 - q
            u = 1 - v - self.mode_scale * (math.cos(math.pi * v / 2) ** 2 - 1 + v)
        return min(max(shift_sigma(u, self.shift), SIGMA_EPS), 1 - SIGMA_EPS)

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

    def loss_weights(self, sigmas: torch.Tensor) -> torch.Tensor:
        """Loss weight [B] float32 of each sample from its shifted sigma [B] (compute_loss_weighting_for_sd3)."""
        s = sigmas.double()  # float64 then rounded once: at least as exact as diffusers' float32
        if self.weighting_scheme == "sigma_sqrt":
            return (s**-2.0).float()
        if self.weighting_scheme == "cosmap":
            return (2 / (math.pi * (1 - 2 * s + 2 * s**2))).float()
        return torch.ones_like(s, dtype=torch.float32)

    def loss(self, pred: torch.Tensor, target: torch.Tensor, sigmas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss scalar float32 to backpropagate, per-sample MSE [B] float32 detached).

        loss = mean over samples of weight(sigma) * per-sample MSE (weight 1 except for sigma_sqrt and
        cosmap); all samples of a batch have one shape, so this is VideoX-Fun's mean of the weighted
        elementwise squared error. With motion_sub_loss and F > 1 latent frames it becomes
        (1 - r) * loss + r * MSE(pred[:, :, 1:] - pred[:, :, :-1], target[:, :, 1:] - target[:, :, :-1]),
        the motion term unweighted as in VideoX-Fun; an image batch (F = 1) keeps the plain loss.
        The per-sample MSE is the plain one (no weight, no motion term), for loss-by-timestep logs.

        pred [B, C, F, H, W] is upcast before the difference: a bf16 difference of two close velocities
        loses most of its bits. sigmas [B] are the shifted sigmas the samples were noised with.
        """
        if pred.shape != target.shape:
            raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must have the same shape")
        if sigmas.shape != pred.shape[:1]:
            raise ValueError(f"sigmas must have shape [B] = ({pred.shape[0]},), got {tuple(sigmas.shape)}")
        diff = pred.float() - target.float()
        per_sample = diff.square().flatten(1).mean(1)  # [B]
        loss = (self.loss_weights(sigmas).to(per_sample.device) * per_sample).mean()
        if self.motion_sub_loss:
            if pred.ndim != 5:
                raise ValueError(f"motion_sub_loss needs pred as [B, C, F, H, W], got shape {tuple(pred.shape)}")
            # VideoX-Fun differences dim 1 of [B, C, F, H, W] (channels, despite the name) when it has
            # more than 2 entries; motion is across latent frames, so we difference dim 2 whenever there
            # are at least two frames. diff(pred - target) = diff(pred) - diff(target), one subtraction less.
            if pred.shape[2] > 1:
                r = self.motion_sub_loss_ratio
                loss = (1 - r) * loss + r * diff.diff(dim=2).square().mean()
        return loss, per_sample.detach()


def _check_batch(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> None:
    if x0.shape != noise.shape:
        raise ValueError(f"x0 {tuple(x0.shape)} and noise {tuple(noise.shape)} must have the same shape")
    if sigmas.shape != x0.shape[:1]:
        raise ValueError(f"sigmas must have shape [B] = ({x0.shape[0]},), got {tuple(sigmas.shape)}")
