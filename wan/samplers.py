"""Flow-matching samplers for Wan2.1: the release's UniPC and a plain Euler, both over the release's
sigma grid.

The DiT predicts the velocity v = noise - x0 at x_t = (1 - sigma) * x0 + sigma * noise, so the
clean-sample prediction is x0 = x_t - sigma * v and the ODE is dx/dsigma = v.

Grid (the official `FlowUniPCMultistepScheduler`): s = linspace(1 - 1/T, 0, N + 1)[:-1] (T = 1000
training timesteps, so s starts at 0.999), shifted s' = shift * s / (1 + (shift - 1) * s), then a
final 0: N + 1 sigmas. The DiT sees the timesteps int64(s' * T), truncated, as the references pass
them. Note: diffusers' UniPCMultistepScheduler(use_flow_sigmas=True).set_timesteps(N) builds a
different grid (linspace(1, 1/T), first sigma 1 - 1e-6); given the release's unshifted s through
set_timesteps(sigmas=...) it builds this one exactly (tests/reference/test_samplers.py).

UniPC is diffusers' UniPCMultistepScheduler as WanPipeline and the release configure it:
flow_prediction, predict x0, order 2, "bh2", lower_order_final, the corrector on every step after
the first, final sigma 0. Its scalar coefficients are computed in float32 on the CPU in the
reference's order of operations, so that the two agree to float32 rounding.
"""

import numpy as np
import torch

SAMPLERS = ("unipc", "euler")  # the choices of every `sampler` option


def _check(num_steps: int, shift: float, num_train_timesteps: int) -> None:
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"the number of sampling steps must be an integer >= 1, got {num_steps!r}")
    if not 0 < shift < float("inf"):  # also refuses NaN
        raise ValueError(
            f"the sigma shift must be finite and > 0 (1 = no shift; the release uses 3 to 5), got {shift!r}"
        )
    if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, int) or num_train_timesteps < 2:
        raise ValueError(f"num_train_timesteps must be an integer >= 2, got {num_train_timesteps!r}")


def _shifted_grid(num_steps: int, shift: float, num_train_timesteps: int) -> np.ndarray:
    """The N shifted sigmas before the final 0, float64, computed as the release computes them."""
    _check(num_steps, shift, num_train_timesteps)
    # The release keeps its training sigmas in float32 and starts from sigmas[0].item(), i.e. the
    # float32 value of 0.999 (0.99900001287...), not 0.999 itself.
    sigma_max = float(np.float32(1.0 - 1.0 / num_train_timesteps))
    s = np.linspace(sigma_max, 0.0, num_steps + 1)[:-1]
    return shift * s / (1 + (shift - 1) * s)


def sampling_sigmas(num_steps: int, shift: float, num_train_timesteps: int = 1000) -> torch.Tensor:
    """The release's sigma grid [num_steps + 1], float32, decreasing from ~1 to a final 0."""
    grid = _shifted_grid(num_steps, shift, num_train_timesteps)
    return torch.from_numpy(np.append(grid, 0.0).astype(np.float32))


def sampling_timesteps(num_steps: int, shift: float, num_train_timesteps: int = 1000) -> torch.Tensor:
    """The timesteps the DiT receives [num_steps], int64: sigma * T truncated (from the float64 sigmas,
    as the release and diffusers cast them)."""
    grid = _shifted_grid(num_steps, shift, num_train_timesteps)
    return torch.from_numpy((grid * num_train_timesteps).astype(np.int64))


class FlowSampler:
    """One sampling trajectory: `.timesteps` [N] int64 (what the DiT sees), `.sigmas` [N + 1] float32
    (CPU), and step(velocity, x) -> the sample at the next sigma, advancing an internal index.

    Arithmetic is float32 on x's device; the result has x's dtype (keep x float32, as the references
    do). A sampler is single-use: build a new one (build_sampler) for the next trajectory.
    """

    name = ""

    def __init__(self, num_steps: int, shift: float, num_train_timesteps: int = 1000):
        self.num_steps = num_steps
        self.shift = shift
        self.sigmas = sampling_sigmas(num_steps, shift, num_train_timesteps)
        self.timesteps = sampling_timesteps(num_steps, shift, num_train_timesteps)
        self.step_index = 0

    def step(self, velocity: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.step_index >= self.num_steps:
            raise RuntimeError(f"{type(self).__name__}: all {self.num_steps} steps are done; build a new sampler")
        if velocity.shape != x.shape:
            raise ValueError(f"velocity {list(velocity.shape)} and sample {list(x.shape)} differ in shape")
        out = self._step(velocity.to(x.device, torch.float32), x.float())
        self.step_index += 1
        return out.to(x.dtype)

    def _step(self, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class EulerSampler(FlowSampler):
    """x_next = x + (sigma_next - sigma) * v: diffusers' FlowMatchEulerDiscreteScheduler on this grid.
    The DiT sees the same int64 timesteps as under UniPC (diffusers' Euler passes float sigma * 1000)."""

    name = "euler"

    def _step(self, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        i = self.step_index
        dt = (self.sigmas[i + 1] - self.sigmas[i]).item()  # a float32 difference, as the reference's
        return x + dt * v


def _lam(sigma: torch.Tensor) -> torch.Tensor:
    """log-SNR of a flow sigma: log(1 - sigma) - log(sigma), float32 (+inf at sigma 0)."""
    return torch.log(1 - sigma) - torch.log(sigma)


class UniPCSampler(FlowSampler):
    """UniPC (predictor-corrector, order 2, B(h) = expm1(h) 'bh2') on x0 predictions.

    Each step first corrects the incoming sample with the new x0 prediction (UniC; not on the first
    step), then predicts the next one (UniP): order 1 on the first step (no history) and on the last
    (lower_order_final: the step to sigma 0), order 2 between.
    """

    name = "unipc"
    order = 2

    def __init__(self, num_steps: int, shift: float, num_train_timesteps: int = 1000):
        super().__init__(num_steps, shift, num_train_timesteps)
        self._x0: list[torch.Tensor] = []  # the last `order` x0 predictions, oldest first
        self._last_sample: torch.Tensor | None = None  # the sample the last predictor started from
        self._last_order = 0

    def _step(self, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        i = self.step_index
        x0 = x - self.sigmas[i].item() * v
        if i > 0:
            x = self._correct(x0, x, self._last_order)
        self._x0 = (self._x0 + [x0])[-self.order :]
        order = min(self.order, self.num_steps - i, len(self._x0))
        self._last_order = order
        self._last_sample = x
        return self._predict(x, order)

    def _predict(self, x: torch.Tensor, order: int) -> torch.Tensor:
        """UniP from sigmas[i] to sigmas[i + 1] with the x0 predictions at sigmas[i], sigmas[i - 1]."""
        i = self.step_index
        s = self.sigmas
        m0 = self._x0[-1]
        h = _lam(s[i + 1]) - _lam(s[i])
        hh = -h
        h_phi_1 = torch.expm1(hh)
        b_h = torch.expm1(hh)  # bh2
        alpha_t = 1 - s[i + 1]
        # At sigma 0, h = inf and this is exactly x0 (order 1 there: lower_order_final).
        x_next = (s[i + 1] / s[i]).item() * x - (alpha_t * h_phi_1).item() * m0
        if order == 2:
            rk = ((_lam(s[i - 1]) - _lam(s[i])) / h).item()
            d1 = (self._x0[-2] - m0) / rk
            x_next = x_next - (alpha_t * b_h).item() * (0.5 * d1)  # rhos_p = [0.5] at order 2
        return x_next

    def _correct(self, x0: torch.Tensor, x: torch.Tensor, order: int) -> torch.Tensor:
        """UniC of the sample x at sigmas[i], reached from the last sample at sigmas[i - 1], with the new
        x0 prediction at sigmas[i] and the previous ones."""
        i = self.step_index
        s = self.sigmas
        m0 = self._x0[-1]
        h = _lam(s[i]) - _lam(s[i - 1])
        hh = -h
        h_phi_1 = torch.expm1(hh)
        b_h = torch.expm1(hh)
        alpha_t = 1 - s[i]
        rks = [torch.ones(())]
        d1 = None
        if order == 2:
            rk = (_lam(s[i - 2]) - _lam(s[i - 1])) / h
            rks.insert(0, rk)
            d1 = (self._x0[-2] - m0) / rk.item()
        if order == 1:
            rhos_c = [0.5]
        else:
            # The reference's linear system for the corrector weights, solved in float32 as it does.
            rks_t = torch.stack(rks)
            h_phi_k = h_phi_1 / hh - 1
            factorial = 1
            rows, b = [], []
            for k in range(1, order + 1):
                rows.append(torch.pow(rks_t, k - 1))
                b.append(h_phi_k * factorial / b_h)
                factorial *= k + 1
                h_phi_k = h_phi_k / hh - 1 / factorial
            rhos_c = torch.linalg.solve(torch.stack(rows), torch.stack(b)).tolist()
        x_t = (s[i] / s[i - 1]).item() * self._last_sample - (alpha_t * h_phi_1).item() * m0
        correction = rhos_c[-1] * (x0 - m0)
        if d1 is not None:
            correction = rhos_c[0] * d1 + correction
        return x_t - (alpha_t * b_h).item() * correction


_CLASSES = {"unipc": UniPCSampler, "euler": EulerSampler}
assert tuple(_CLASSES) == SAMPLERS


def build_sampler(name: str, num_steps: int, shift: float, num_train_timesteps: int = 1000) -> FlowSampler:
    """A fresh sampler for one trajectory of num_steps steps over the release's grid with this shift."""
    if name not in _CLASSES:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    return _CLASSES[name](num_steps, shift, num_train_timesteps)
