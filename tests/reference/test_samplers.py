"""Our flow-matching samplers (wan/samplers.py) against diffusers' schedulers (test-only references)
and against closed-form solutions.

Grid: the release's (official FlowUniPCMultistepScheduler, transcribed below). diffusers' UniPC
builds the same grid from set_timesteps(sigmas=<the release's unshifted sigmas>), which it shifts by
flow_shift; FlowMatchEulerDiscreteScheduler(shift=1) is given our shifted sigmas directly
(set_timesteps(sigmas=...)), as shift 1 leaves them unchanged.

Tolerance: trajectories within 1e-6 relative at every step. Measured: bit-identical on CPU (0.0),
every step count and shift here, both samplers.
"""

import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

from wan.samplers import SAMPLERS, EulerSampler, UniPCSampler, build_sampler, sampling_sigmas, sampling_timesteps

STEPS = [1, 2, 3, 5, 20, 50]
SHIFTS = [1.0, 3.0, 5.0]
RTOL = 1e-6


def release_grid(num_steps: int, shift: float, t: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """The official FlowUniPCMultistepScheduler(shift=1).set_timesteps(N, shift=shift), transcribed:
    its training sigmas in float32, then linspace(sigma_max, sigma_min, N + 1)[:-1] in float64."""
    alphas = np.linspace(1, 1 / t, t)[::-1].copy()
    train_sigmas = torch.from_numpy(1.0 - alphas).to(torch.float32)
    sigma_max, sigma_min = train_sigmas[0].item(), train_sigmas[-1].item()
    sigmas = np.linspace(sigma_max, sigma_min, num_steps + 1).copy()[:-1]
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    timesteps = sigmas * t
    sigmas = np.concatenate([sigmas, [0]]).astype(np.float32)
    return torch.from_numpy(sigmas), torch.from_numpy(timesteps).to(torch.int64)


def diffusers_unipc(num_steps: int, shift: float) -> UniPCMultistepScheduler:
    """As WanPipeline is configured, on the release's grid (unshifted sigmas in, flow_shift applied)."""
    sched = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift)
    sched.set_timesteps(sigmas=np.linspace(float(np.float32(0.999)), 0.0, num_steps + 1)[:-1])
    return sched


def diffusers_euler(num_steps: int, shift: float) -> FlowMatchEulerDiscreteScheduler:
    sched = FlowMatchEulerDiscreteScheduler(shift=1.0)
    sched.set_timesteps(sigmas=sampling_sigmas(num_steps, shift)[:-1].tolist())
    return sched


def field(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """A toy velocity field, nonlinear in x and dependent on sigma."""
    return torch.tanh(x) * (1 + sigma) + 0.3 * torch.sin(2 * x + 5 * sigma) - 0.5 * x * sigma**2


@pytest.mark.parametrize("shift", SHIFTS)
@pytest.mark.parametrize("num_steps", STEPS)
def test_grid_is_the_release_grid(num_steps, shift):
    sigmas, timesteps = sampling_sigmas(num_steps, shift), sampling_timesteps(num_steps, shift)
    assert sigmas.shape == (num_steps + 1,) and sigmas.dtype == torch.float32 and sigmas[-1] == 0
    assert timesteps.shape == (num_steps,) and timesteps.dtype == torch.int64
    assert bool((sigmas[1:] < sigmas[:-1]).all())
    official_sigmas, official_timesteps = release_grid(num_steps, shift)
    assert torch.equal(sigmas, official_sigmas) and torch.equal(timesteps, official_timesteps)
    ref = diffusers_unipc(num_steps, shift)
    assert torch.equal(sigmas, ref.sigmas) and torch.equal(timesteps, ref.timesteps)
    for name in SAMPLERS:  # the DiT sees the same timesteps whichever the sampler
        sampler = build_sampler(name, num_steps, shift)
        assert torch.equal(sampler.sigmas, sigmas) and torch.equal(sampler.timesteps, timesteps)


def test_grid_values():
    # shift 5, 50 steps: the first sigma is shift(0.999), the last before 0 is shift(0.999 / 50).
    sigmas = sampling_sigmas(50, 5.0).double()
    assert sigmas[0].item() == pytest.approx(5 * 0.999 / (1 + 4 * 0.999), rel=1e-7)
    assert sigmas[-2].item() == pytest.approx(5 * 0.01998 / (1 + 4 * 0.01998), rel=1e-6)
    assert sampling_timesteps(50, 5.0)[:3].tolist() == [999, 995, 991]
    assert torch.equal(sampling_sigmas(4, 1.0), torch.tensor([0.999, 0.74925, 0.4995, 0.24975, 0.0]))


def test_diffusers_default_grid_is_not_the_release_grid():
    """Recorded, not wished for: diffusers' set_timesteps(N) starts from linspace(1, 1/T, N + 1)
    (then 1 - 1e-6 for the first), not the release's linspace(0.999, 0, N + 1)."""
    sched = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0)
    sched.set_timesteps(50)
    ours = sampling_sigmas(50, 5.0)
    assert sched.sigmas[0].item() == pytest.approx(1 - 1e-6, abs=1e-7) and ours[0].item() < 0.99981
    assert (sched.sigmas - ours).abs().max() > 1e-3


@pytest.mark.parametrize("shift", SHIFTS)
@pytest.mark.parametrize("num_steps", STEPS)
@pytest.mark.parametrize("name", SAMPLERS)
def test_trajectory_matches_diffusers(name, num_steps, shift):
    ref = diffusers_unipc(num_steps, shift) if name == "unipc" else diffusers_euler(num_steps, shift)
    ours = build_sampler(name, num_steps, shift)
    x_ref = x = torch.randn(2, 4, 3, 5, 6, generator=torch.Generator().manual_seed(num_steps))
    for i, t in enumerate(ref.timesteps):
        sigma = ours.sigmas[i].item()
        x_ref = ref.step(field(x_ref, sigma), t, x_ref, return_dict=False)[0]
        x = ours.step(field(x, sigma), x)
        err = ((x.double() - x_ref.double()).norm() / x_ref.double().norm()).item()
        assert err <= RTOL, f"step {i}: relative error {err:.2e}"
    assert ours.step_index == num_steps


@pytest.mark.parametrize("shift", SHIFTS)
@pytest.mark.parametrize("name", SAMPLERS)
def test_single_point_data_is_reached_exactly(name, shift):
    """Data = one point x0*: the exact velocity is v = (x - x0*) / sigma and every x0 prediction is
    x0*; both samplers land on it (up to float32 rounding) in any number of steps."""
    target = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    for num_steps in (1, 2, 5, 50):
        sampler = build_sampler(name, num_steps, shift)
        x = torch.randn(3, 8, generator=torch.Generator().manual_seed(2))
        for i in range(num_steps):
            x = sampler.step((x - target) / sampler.sigmas[i].item(), x)
        torch.testing.assert_close(x, target, rtol=1e-5, atol=1e-5)


def gaussian_data_error(name: str, num_steps: int, shift: float = 1.0) -> float:
    """Data ~ N(mu, c^2): the exact flow from noise n is x(s) = (1 - s) mu + std(s) n with
    std(s) = sqrt((1 - s)^2 c^2 + s^2), ending at mu + c n; its velocity field is known in closed
    form. Relative error of the sampled endpoint."""
    mu, c = 0.5, 0.8

    def std(s):
        return math.sqrt((1 - s) ** 2 * c * c + s * s)

    def velocity(x, s):
        return -mu + (s - (1 - s) * c * c) / std(s) ** 2 * (x - (1 - s) * mu)

    n = torch.randn(4096, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sampler = build_sampler(name, num_steps, shift)
    s0 = sampler.sigmas[0].item()
    x = ((1 - s0) * mu + std(s0) * n).float()  # on the exact trajectory at the first sigma
    for i in range(num_steps):
        x = sampler.step(velocity(x.double(), sampler.sigmas[i].item()).float(), x)
    target = mu + c * n
    return ((x.double() - target).norm() / target.norm()).item()


def test_gaussian_data_convergence():
    # Measured: Euler 0.0533 (20 steps), 0.0271 (40), 0.0136 (80); UniPC 0.00095 (40), 0.00021 (80).
    euler = [gaussian_data_error("euler", n) for n in (20, 40, 80)]
    assert 1.8 < euler[0] / euler[1] < 2.2 and 1.8 < euler[1] / euler[2] < 2.2  # first order
    unipc = [gaussian_data_error("unipc", n) for n in (40, 80)]
    assert unipc[0] < euler[1] / 10 and unipc[1] < euler[2] / 10
    assert unipc[1] < 5e-4


def test_dtype_and_device_follow_the_sample():
    sampler = UniPCSampler(5, 3.0)
    x = torch.randn(2, 3, dtype=torch.bfloat16)
    out = sampler.step(torch.randn(2, 3), x)
    assert out.dtype == torch.bfloat16 and sampler.step_index == 1
    assert EulerSampler(2, 1.0).step(torch.zeros(4), torch.ones(4, dtype=torch.float64)).dtype == torch.float64


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="unknown sampler 'ddim'; choose one of unipc, euler"):
        build_sampler("ddim", 10, 5.0)
    for steps in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="number of sampling steps"):
            build_sampler("unipc", steps, 5.0)
    for shift in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="shift must be finite and > 0"):
            sampling_sigmas(10, shift)
    sampler = build_sampler("euler", 1, 1.0)
    with pytest.raises(ValueError, match="differ in shape"):
        sampler.step(torch.zeros(2), torch.zeros(3))
    sampler.step(torch.zeros(2), torch.zeros(2))
    with pytest.raises(RuntimeError, match="all 1 steps are done"):
        sampler.step(torch.zeros(2), torch.zeros(2))
