"""Wan2.2 A14B's step plan (train/experts.py): which expert a step trains, with the probability of its
timestep range, and its timesteps drawn within it; the [experts] checks; per-expert EMA bookkeeping."""

import math

import pytest
import torch

from train.config import ConfigError, check_run, load_config
from train.experts import ExpertEMA, ExpertPlan, ExpertsConfig
from train.flow import FlowMatching, shift_sigma

SHIFT = 5.0


def uniform_high_share(boundary: float, shift: float = SHIFT) -> float:
    """P(t >= boundary x 1000) for uniform u shifted: the u where shift(u) = boundary, closed form."""
    u = boundary / (shift - (shift - 1) * boundary)
    assert math.isclose(shift_sigma(u, shift), boundary)
    return 1 - u


@pytest.mark.parametrize("boundary", [0.875, 0.9])
def test_expert_probability_is_its_timestep_ranges_mass(boundary):
    flow = FlowMatching(shift=SHIFT, uniform_sampling=True)
    plan = ExpertPlan.build(ExpertsConfig(), flow, seed=3, boundary=boundary)
    assert plan.names == ["high", "low"]
    assert plan.shares["high"].probability == pytest.approx(uniform_high_share(boundary), abs=1e-9)
    steps = plan.steps_of(4000)
    assert steps["high"] + steps["low"] == 4000
    assert steps["high"] / 4000 == pytest.approx(uniform_high_share(boundary), abs=0.025)  # binomial, 3 sigma
    # The same on every rank and in every run: a function of (seed, step) only.
    again = ExpertPlan.build(ExpertsConfig(), flow, seed=3, boundary=boundary)
    assert [plan.expert_of(s) for s in range(50)] == [again.expert_of(s) for s in range(50)]
    assert plan.own_step(1) == (plan.expert_of(0), 1)


def test_timesteps_are_drawn_within_the_experts_range_with_the_density_kept():
    flow = FlowMatching(shift=SHIFT)  # logit-normal
    plan = ExpertPlan.build(ExpertsConfig(), flow, seed=0, boundary=0.875)
    positions = list(range(2000))
    high = flow.sample_sigmas(0, 5, positions, 2000, quantiles=plan.quantiles("high"))
    low = flow.sample_sigmas(0, 5, positions, 2000, quantiles=plan.quantiles("low"))
    assert high.min() >= 0.875 - 1e-6 and low.max() < 0.875 + 1e-6
    # The conditional density's median: the whole density's quantile at the range's middle mass.
    q_lo, q_hi = plan.quantiles("high")
    assert high.median().item() == pytest.approx(flow.sigma_quantile((q_lo + q_hi) / 2), abs=0.01)


def test_a_timestep_range_narrows_any_run():
    flow = FlowMatching(shift=SHIFT)
    plan = ExpertPlan.build(ExpertsConfig(timestep_range=[200.0, 600.0]), flow, seed=0, boundary=None)
    assert plan.names == ["dit"] and plan.overall_quantiles() == plan.quantiles("dit")
    sigmas = flow.sample_sigmas(0, 1, list(range(500)), 500, quantiles=plan.quantiles("dit"))
    assert sigmas.min() >= 0.2 - 1e-6 and sigmas.max() < 0.6 + 1e-6
    assert ExpertPlan.build(ExpertsConfig(), flow, seed=0, boundary=None) is None  # plain draws
    with pytest.raises(ValueError, match="leaves no timestep to the high expert"):
        ExpertPlan.build(ExpertsConfig(timestep_range=[0.0, 500.0]), flow, seed=0, boundary=0.875)


def test_experts_options_are_checked(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(["--train_data_dir=d", "--train_experts=mid", "--boundary=1.5", "--timestep_range=[900, 100]"])
    text = str(info.value)
    assert "train_experts must be one or both of high, low" in text and "boundary must be in [0, 1)" in text
    assert "timestep_range must be [t_min, t_max]" in text
    cfg = load_config([f"--train_data_dir={tmp_path}", "--preset=debug", "--learning_rate_high=1e-4"])
    assert any("need a Wan2.2 A14B model" in p for p in check_run(cfg, torch.device("cpu"), 1))
    cfg = load_config([f"--train_data_dir={tmp_path}", "--preset=debug-t2v-A14B", "--train_experts=high",
                       "--validation_prompts=a cat"])  # fmt: skip
    assert any("sampling a video needs both A14B experts" in p for p in check_run(cfg, torch.device("cpu"), 1))


class FakeEMA:
    def __init__(self):
        self.calls = []

    def after_step(self, step, updated):
        self.calls.append(step)


def test_each_expert_ema_counts_its_own_steps():
    plan = ExpertPlan.build(ExpertsConfig(), FlowMatching(shift=SHIFT), seed=1, boundary=0.875)
    emas = {"high": FakeEMA(), "low": FakeEMA()}
    ema = ExpertEMA(emas, plan)
    for step in range(1, 31):
        ema.after_step(step, True)
    experts = [plan.expert_of(s) for s in range(30)]
    for name in ("high", "low"):
        assert emas[name].calls == list(range(1, experts.count(name) + 1))
