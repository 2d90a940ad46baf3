"""FlowMatching: closed forms, the shift, stratified and logit-normal sampling, determinism and layout
independence of the per-position draws, diffusers parity of the densities and loss weights, the
weighted loss and the motion sub-loss."""

import math

import pytest
import torch
import torch.nn.functional as F

from train.flow import SIGMA_EPS, WEIGHTING_SCHEMES, FlowMatching, batch_positions, shift_sigma, timestep_bin

SHAPE = (4, 3, 5, 6)  # one sample's latent: C, F, H, W


def test_add_noise_endpoints_and_formula():
    fm = FlowMatching()
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, *SHAPE, generator=g), torch.randn(3, *SHAPE, generator=g)
    assert torch.equal(fm.add_noise(x0, noise, torch.zeros(3)), x0)
    assert torch.equal(fm.add_noise(x0, noise, torch.ones(3)), noise)
    sigmas = torch.tensor([0.1, 0.5, 0.9])
    expected = torch.stack([(1 - s) * a + s * b for s, a, b in zip(sigmas.tolist(), x0, noise, strict=True)])
    x_t = fm.add_noise(x0.bfloat16(), noise, sigmas)
    assert x_t.dtype == torch.float32
    torch.testing.assert_close(fm.add_noise(x0, noise, sigmas), expected)
    with pytest.raises(ValueError, match="sigmas"):
        fm.add_noise(x0, noise, sigmas[:2])


def test_target():
    fm = FlowMatching()
    x0, noise = torch.randn(2, *SHAPE), torch.randn(2, *SHAPE)
    target = fm.target(x0.bfloat16(), noise)
    assert target.dtype == torch.float32
    assert torch.equal(fm.target(x0, noise), noise - x0)


def test_loss_matches_mse_in_float64_and_is_float32():
    fm = FlowMatching()
    pred, target = torch.randn(3, *SHAPE), torch.randn(3, *SHAPE)
    sigmas = torch.tensor([0.2, 0.5, 0.9])
    loss, per_sample = fm.loss(pred, target, sigmas)
    assert loss.dtype == per_sample.dtype == torch.float32 and loss.ndim == 0 and per_sample.shape == (3,)
    assert abs(loss.item() - F.mse_loss(pred.double(), target.double()).item()) < 1e-6
    per64 = ((pred.double() - target.double()) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(per_sample.double(), per64, atol=1e-6, rtol=0)

    pred_bf16 = pred.bfloat16().requires_grad_()
    loss, per_sample = fm.loss(pred_bf16, target, sigmas)
    assert loss.dtype == torch.float32 and not per_sample.requires_grad
    # the upcast happens before the difference: equal to the fp64 MSE of the bf16 values
    assert abs(loss.item() - F.mse_loss(pred_bf16.double(), target.double()).item()) < 1e-6
    loss.backward()
    assert pred_bf16.grad.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="same shape"):
        fm.loss(pred[:2], target, sigmas)
    with pytest.raises(ValueError, match="sigmas"):
        fm.loss(pred, target, sigmas[:2])


def test_shift_function():
    s = torch.linspace(0, 1, 101, dtype=torch.float64)
    torch.testing.assert_close(shift_sigma(s, 1.0), s)
    assert shift_sigma(0.5, 5.0) == pytest.approx(5 / 6)
    assert shift_sigma(0.0, 5.0) == 0.0 and shift_sigma(1.0, 5.0) == 1.0
    assert (shift_sigma(s, 5.0).diff() > 0).all()
    assert (shift_sigma(s[1:-1], 5.0) > s[1:-1]).all()  # shift > 1 moves towards more noise


def test_uniform_sampling_one_stratum_per_position():
    fm = FlowMatching(shift=1.0, uniform_sampling=True)
    g = 8
    for step in range(5):
        u = fm.sample_sigmas(seed=3, step=step, positions=list(range(g)), global_size=g).double()
        p = torch.arange(g, dtype=torch.float64)
        assert ((u >= p / g) & (u < (p + 1) / g)).all(), u
    # uniform_sampling overrides the logit-normal default: still one draw per stratum
    u = FlowMatching(shift=1.0, weighting_scheme="logit_normal", uniform_sampling=True).sample_sigmas(
        0, 0, torch.arange(g), g
    )
    assert ((u * g).floor() == torch.arange(g)).all()


def test_sampling_is_deterministic_and_depends_on_seed_and_step():
    fm = FlowMatching()
    pos = [0, 1, 2, 3]
    a = fm.sample_sigmas(7, 10, pos, 4)
    assert a.dtype == torch.float32 and a.shape == (4,)
    assert torch.equal(a, fm.sample_sigmas(7, 10, torch.tensor(pos), 4))
    assert torch.equal(fm.sample_noise(7, 10, pos, SHAPE), fm.sample_noise(7, 10, pos, SHAPE))
    assert not torch.equal(a, fm.sample_sigmas(7, 11, pos, 4))
    assert not torch.equal(a, fm.sample_sigmas(8, 10, pos, 4))
    n = fm.sample_noise(7, 10, pos, SHAPE)
    assert n.dtype == torch.float32 and n.shape == (4, *SHAPE)
    assert not torch.equal(n, fm.sample_noise(7, 11, pos, SHAPE))
    assert not torch.equal(n, fm.sample_noise(8, 10, pos, SHAPE))
    assert len({tuple(x.flatten()[:4].tolist()) for x in n}) == 4  # positions get different noise
    assert len(set(a.tolist())) == 4


def test_global_rng_is_untouched():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    FlowMatching().sample_sigmas(0, 0, [0, 1], 2)
    FlowMatching().sample_noise(0, 0, [0, 1], SHAPE)
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize(
    ("uniform_sampling", "scheme"), [(False, "logit_normal"), (True, "logit_normal"), (False, "mode")]
)
def test_layout_independence(uniform_sampling, scheme):
    """1 rank x batch 4, 2 ranks x batch 2, 4 ranks x batch 1, and 1 rank x batch 2 x 2 micro-steps
    draw the same sigmas and noise for the same global positions."""
    fm = FlowMatching(uniform_sampling=uniform_sampling, weighting_scheme=scheme)
    seed, step, g = 5, 42, 4
    whole_s = fm.sample_sigmas(seed, step, [0, 1, 2, 3], g)
    whole_n = fm.sample_noise(seed, step, [0, 1, 2, 3], SHAPE)
    layouts = [(1, 1, 4), (1, 2, 2), (1, 4, 1), (2, 1, 2), (2, 2, 1)]  # (micro_steps, world_size, batch_size)
    for micro_steps, world_size, batch_size in layouts:
        parts = [batch_positions(m, r, world_size, batch_size) for m in range(micro_steps) for r in range(world_size)]
        assert sum(parts, []) == [0, 1, 2, 3]
        assert torch.equal(torch.cat([fm.sample_sigmas(seed, step, p, g) for p in parts]), whole_s)
        assert torch.equal(torch.cat([fm.sample_noise(seed, step, p, SHAPE) for p in parts]), whole_n)


def test_batch_positions():
    assert batch_positions(0, 0, 1, 2) == [0, 1]
    assert batch_positions(1, 1, 2, 3) == [9, 10, 11]  # (1 * 2 + 1) * 3
    with pytest.raises(ValueError):
        batch_positions(0, 2, 2, 1)


def test_logit_normal_moments():
    mean, std = 0.5, 1.2
    fm = FlowMatching(shift=1.0, logit_mean=mean, logit_std=std)
    n = 10_000
    u = fm.sample_sigmas(seed=0, step=0, positions=range(n), global_size=n).double()
    z = torch.logit(u)
    # standard errors: std / sqrt(n) = 0.012 for the mean, ~std / sqrt(2n) = 0.0085 for the std
    assert abs(z.mean().item() - mean) < 0.05
    assert abs(z.std().item() - std) < 0.04


def test_uniform_scheme_moments():
    n = 10_000
    u = FlowMatching(shift=1.0, weighting_scheme="uniform").sample_sigmas(1, 0, range(n), n).double()
    assert abs(u.mean().item() - 0.5) < 0.01  # standard error 0.0029
    assert abs(u.std().item() - (1 / 12) ** 0.5) < 0.01


@pytest.mark.parametrize("shift", [1.0, 5.0, 1000.0])
@pytest.mark.parametrize("scheme", WEIGHTING_SCHEMES)
def test_timesteps_in_range(shift, scheme):
    fm = FlowMatching(shift=shift, weighting_scheme=scheme, logit_std=3.0)
    sigmas = fm.sample_sigmas(0, 0, range(2000), 2000)
    t = fm.timesteps(sigmas)
    assert t.dtype == torch.float32
    assert (t >= 0).all() and (t < 1000).all()
    assert (sigmas >= SIGMA_EPS).all() and (sigmas <= 1 - SIGMA_EPS).all()
    # the clamp keeps t < 1000 even when the draw sits at the very top
    assert fm.timesteps(torch.tensor([1 - SIGMA_EPS])).item() < 1000
    torch.testing.assert_close(fm.timesteps(torch.tensor([0.0, 0.25, 0.5])), torch.tensor([0.0, 250.0, 500.0]))


def test_timestep_bin_edges():
    t = torch.tensor([0.0, 99.999, 100.0, 199.9, 500.0, 900.0, 999.999])
    assert timestep_bin(t, 10).tolist() == [0, 0, 1, 1, 5, 9, 9]
    assert timestep_bin(t, 1).tolist() == [0] * 7
    assert timestep_bin(torch.tensor([1000.0, -1.0]), 4).tolist() == [3, 0]  # clamped, not an error
    assert timestep_bin(torch.tensor([250.0, 249.99]), 4).tolist() == [1, 0]
    with pytest.raises(ValueError):
        timestep_bin(t, 0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"weighting_scheme": "lognorm"},
        {"weighting_scheme": "mode", "mode_scale": 2.0},  # above 2 / (pi - 2): u would leave [0, 1]
        {"weighting_scheme": "mode", "mode_scale": -1.5},
        {"motion_sub_loss_ratio": 1.5},
        {"motion_sub_loss_ratio": -0.1},
        {"shift": 0.0},
        {"shift": -1.0},
        {"logit_std": 0.0},
        {"num_train_timesteps": 0},
    ],
)
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        FlowMatching(**kwargs)


def test_bad_sampling_arguments():
    fm = FlowMatching()
    with pytest.raises(ValueError, match="global_size"):
        fm.sample_sigmas(0, 0, [0, 4], 4)
    with pytest.raises(ValueError, match="empty"):
        fm.sample_noise(0, 0, [], SHAPE)
    with pytest.raises(TypeError):
        fm.sample_sigmas(0, 0, [0.0], 4)  # a float position would hash differently from the int


def test_config_refuses_what_flow_matching_refuses():
    from train.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="mode_scale must be in"):
        load_config(["--train_data_dir=d", "--weighting_scheme=mode", "--mode_scale=2"])
    with pytest.raises(ValueError, match="mode_scale"):
        FlowMatching(weighting_scheme="mode", mode_scale=2.0)
    FlowMatching(weighting_scheme="logit_normal", mode_scale=2.0)  # mode_scale is checked only when used
    load_config(["--train_data_dir=d", "--mode_scale=2"])


def ks_statistic(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: sup over x of |ECDF_a(x) - ECDF_b(x)|."""
    a, b = a.double().sort().values, b.double().sort().values
    grid = torch.cat([a, b])
    cdf_a = torch.searchsorted(a, grid, right=True) / len(a)
    cdf_b = torch.searchsorted(b, grid, right=True) / len(b)
    return (cdf_a - cdf_b).abs().max().item()


KS_N = 20_000
# Two samples of n from one distribution exceed c * sqrt(2 / n) with probability alpha, where
# c = sqrt(-ln(alpha / 2) / 2); alpha = 1e-4 gives c = 2.23 and a bound of 0.022 at n = 20,000. The
# draws are seeded, so the test is deterministic; the bound says a correct density passes for all but
# ~1 seed pair in 10,000. The distances between different densities here are 0.13-0.20 (checked below),
# six times the bound, so a wrong density or a parameter that is not passed through fails.
KS_BOUND = math.sqrt(-math.log(1e-4 / 2) / 2) * math.sqrt(2 / KS_N)


@pytest.mark.parametrize("scheme", WEIGHTING_SCHEMES)
def test_density_matches_diffusers(scheme):
    """u (shift 1, so sigma = u up to the 1e-5 clamp) follows compute_density_for_timestep_sampling."""
    density = pytest.importorskip("diffusers.training_utils").compute_density_for_timestep_sampling
    kw = {"logit_mean": 0.3, "logit_std": 1.2, "mode_scale": 1.29}  # not the defaults: pass-through is tested
    ours = FlowMatching(shift=1.0, weighting_scheme=scheme, **kw).sample_sigmas(0, 0, range(KS_N), KS_N)
    ref = density(scheme, KS_N, generator=torch.Generator().manual_seed(1), **kw)
    assert ks_statistic(ours, ref) < KS_BOUND
    others = {"logit_normal", "mode", "uniform"} - {"uniform" if scheme in ("none", "sigma_sqrt", "cosmap") else scheme}
    for other in others:  # the test has power: every other density is far outside the bound
        other_ref = density(other, KS_N, generator=torch.Generator().manual_seed(2), **kw)
        assert ks_statistic(ours, other_ref) > 5 * KS_BOUND, other


def test_mode_density_is_in_unit_interval_at_range_ends():
    for scale in (-1.0, 2 / (math.pi - 2)):
        u = FlowMatching(shift=1.0, weighting_scheme="mode", mode_scale=scale).sample_sigmas(0, 0, range(2000), 2000)
        assert (u >= SIGMA_EPS).all() and (u <= 1 - SIGMA_EPS).all()


@pytest.mark.parametrize("scheme", WEIGHTING_SCHEMES)
def test_weights_match_diffusers(scheme):
    weighting = pytest.importorskip("diffusers.training_utils").compute_loss_weighting_for_sd3
    fm = FlowMatching(weighting_scheme=scheme)
    sigmas = torch.cat([fm.sample_sigmas(3, 7, range(500), 500), torch.tensor([SIGMA_EPS, 0.5, 1 - SIGMA_EPS])])
    ours = fm.loss_weights(sigmas)
    assert ours.dtype == torch.float32 and ours.shape == sigmas.shape
    torch.testing.assert_close(ours, weighting(scheme, sigmas).float())  # float32 tolerances (rtol 1.3e-6)


@pytest.mark.parametrize("uniform_sampling", [False, True])
@pytest.mark.parametrize("scheme", ["logit_normal", "sigma_sqrt", "cosmap"])
def test_weighted_loss_by_hand(scheme, uniform_sampling):
    """loss = mean_i w(sigma_i) * MSE_i (= VideoX-Fun's mean of the weighted elementwise error); the
    per-sample values stay the plain MSE; stratified sampling keeps the scheme's weight."""
    fm = FlowMatching(weighting_scheme=scheme, uniform_sampling=uniform_sampling)
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(4, *SHAPE, generator=g), torch.randn(4, *SHAPE, generator=g)
    sigmas = fm.sample_sigmas(0, 3, range(4), 4)
    loss, per_sample = fm.loss(pred, target, sigmas)

    s = sigmas.double()
    w = torch.ones(4, dtype=torch.float64)
    if scheme == "sigma_sqrt":
        w = 1 / s**2
    if scheme == "cosmap":
        w = 2 / (math.pi * ((1 - s) ** 2 + s**2))  # diffusers' denominator, written another way
    mse = [((p.double() - t.double()) ** 2).mean() for p, t in zip(pred, target, strict=True)]
    expected = sum(wi * m for wi, m in zip(w.tolist(), mse, strict=True)) / 4
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    elementwise = F.mse_loss(pred.double(), target.double(), reduction="none") * w.view(-1, 1, 1, 1, 1)
    assert loss.item() == pytest.approx(elementwise.mean().item(), rel=1e-6)
    torch.testing.assert_close(per_sample.double(), torch.stack(mse), atol=1e-6, rtol=0)


def test_weighted_loss_gradient_is_weighted():
    fm = FlowMatching(weighting_scheme="sigma_sqrt")
    pred = torch.zeros(2, 1, 1, 1, 1, requires_grad=True)
    target = torch.ones(2, 1, 1, 1, 1)
    loss, _ = fm.loss(pred, target, torch.tensor([0.5, 0.25]))
    loss.backward()
    # d/dp of 0.5 * sum_i w_i (p_i - 1)^2 at p = 0 is -w_i, with w = [4, 16]
    torch.testing.assert_close(pred.grad.flatten(), torch.tensor([-4.0, -16.0]))


@pytest.mark.parametrize("scheme", ["logit_normal", "cosmap"])
def test_motion_sub_loss_video_by_hand(scheme):
    r = 0.3
    fm = FlowMatching(weighting_scheme=scheme, motion_sub_loss=True, motion_sub_loss_ratio=r)
    plain = FlowMatching(weighting_scheme=scheme)
    g = torch.Generator().manual_seed(1)
    pred, target = torch.randn(2, 4, 5, 3, 3, generator=g), torch.randn(2, 4, 5, 3, 3, generator=g)
    sigmas = torch.tensor([0.3, 0.8])
    loss, per_sample = fm.loss(pred, target, sigmas)
    base, plain_per_sample = plain.loss(pred, target, sigmas)
    p, t = pred.double(), target.double()
    motion = F.mse_loss(p[:, :, 1:] - p[:, :, :-1], t[:, :, 1:] - t[:, :, :-1])  # frames = dim 2, unweighted
    assert loss.item() == pytest.approx((1 - r) * base.item() + r * motion.item(), rel=1e-6)
    assert torch.equal(per_sample, plain_per_sample)  # logs keep the plain MSE


def test_motion_sub_loss_differences_frames_not_channels():
    """An error constant across frames but varying across channels has no motion: the loss is (1 - r)
    times the plain one. VideoX-Fun's channel difference would see a motion error here."""
    r = 0.25
    fm = FlowMatching(motion_sub_loss=True, motion_sub_loss_ratio=r)
    target = torch.zeros(1, 4, 3, 2, 2)
    pred = torch.arange(4.0).view(1, 4, 1, 1, 1).expand(1, 4, 3, 2, 2)
    loss, per_sample = fm.loss(pred, target, torch.tensor([0.5]))
    assert loss.item() == pytest.approx((1 - r) * per_sample.item())
    assert per_sample.item() == pytest.approx((0 + 1 + 4 + 9) / 4)


def test_motion_sub_loss_image_batch_is_plain():
    fm = FlowMatching(weighting_scheme="cosmap", motion_sub_loss=True, motion_sub_loss_ratio=0.5)
    pred, target = torch.randn(3, 4, 1, 4, 4), torch.randn(3, 4, 1, 4, 4)  # images: one latent frame
    sigmas = torch.tensor([0.1, 0.5, 0.9])
    assert torch.equal(
        fm.loss(pred, target, sigmas)[0], FlowMatching(weighting_scheme="cosmap").loss(pred, target, sigmas)[0]
    )
    with pytest.raises(ValueError, match="B, C, F, H, W"):
        fm.loss(pred[:, :, 0], target[:, :, 0], sigmas)
