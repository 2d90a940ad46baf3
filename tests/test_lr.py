"""Learning-rate schedules: closed forms, driving AdamW, resume from state_dict, diffusers parity."""

import io
import math

import pytest
import torch

from train.lr import LR_SCHEDULERS, build_lr_scheduler, lr_multiplier

W, T = 10, 50  # warmup and total steps


def make_optimizer(lr: float = 1e-3) -> torch.optim.AdamW:
    return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))], lr=lr)


def test_closed_forms():
    def m(name, step):
        return lr_multiplier(name, step, W, T)

    for step in (0, 5, 10, 30, 50, 60):
        assert m("constant", step) == 1.0
    assert [m("constant_with_warmup", s) for s in (0, 5, 10, 30, 50)] == [0.0, 0.5, 1.0, 1.0, 1.0]
    assert [m("linear", s) for s in (0, 5, 10, 30, 50, 60)] == pytest.approx([0.0, 0.5, 1.0, 0.5, 0.0, 0.0])
    assert [m("cosine", s) for s in (0, 5, 10, 30, 50)] == pytest.approx([0.0, 0.5, 1.0, 0.5, 0.0], abs=1e-12)
    assert m("cosine", 20) == pytest.approx(0.5 * (1 + math.cos(math.pi * 10 / 40)))
    assert m("cosine", 60) == 0.0  # stays at 0 past the end (diffusers' would rise again)
    # no warmup: the first step is at full lr
    assert lr_multiplier("linear", 0, 0, T) == 1.0 and lr_multiplier("cosine", 0, 0, T) == 1.0


def test_bad_arguments():
    with pytest.raises(ValueError, match="constant, constant_with_warmup, linear, cosine"):
        lr_multiplier("polynomial", 0, W, T)
    with pytest.raises(ValueError, match="choose one of"):
        build_lr_scheduler(make_optimizer(), "cosine_with_restarts", W, T)
    with pytest.raises(ValueError):
        build_lr_scheduler(make_optimizer(), "linear", 60, T)
    with pytest.raises(ValueError):
        lr_multiplier("constant", -1, W, T)


@pytest.mark.parametrize("name", LR_SCHEDULERS)
def test_drives_adamw(name):
    base = 2e-4
    opt = make_optimizer(base)
    sched = build_lr_scheduler(opt, name, W, T)
    for step in range(T + 1):
        assert opt.param_groups[0]["lr"] == pytest.approx(base * lr_multiplier(name, step, W, T), abs=1e-15)
        opt.param_groups[0]["params"][0].grad = torch.ones(3)
        opt.step()
        sched.step()


@pytest.mark.parametrize("name", LR_SCHEDULERS)
def test_resume_from_state_dict(name):
    def run(opt, sched, n):
        lrs = []
        for _ in range(n):
            opt.param_groups[0]["params"][0].grad = torch.ones(3)
            opt.step()
            sched.step()
            lrs.append(opt.param_groups[0]["lr"])
        return lrs

    opt = make_optimizer()
    sched = build_lr_scheduler(opt, name, W, T)
    full = run(opt, sched, T)

    opt = make_optimizer()
    sched = build_lr_scheduler(opt, name, W, T)
    first = run(opt, sched, 17)  # stop mid-decay, after warmup
    buf = io.BytesIO()
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)  # the scheduler state holds plain data only

    opt2 = make_optimizer()
    sched2 = build_lr_scheduler(opt2, name, W, T)
    opt2.load_state_dict(ckpt["optimizer"])
    sched2.load_state_dict(ckpt["scheduler"])
    assert opt2.param_groups[0]["lr"] == first[-1] and sched2.get_last_lr() == [first[-1]]
    assert first + run(opt2, sched2, T - 17) == full  # exact, not approximate


@pytest.mark.parametrize("name", LR_SCHEDULERS)
def test_matches_diffusers(name):
    get_scheduler = pytest.importorskip("diffusers.optimization").get_scheduler
    ours_opt, ref_opt = make_optimizer(), make_optimizer()
    ours = build_lr_scheduler(ours_opt, name, W, T)
    ref = get_scheduler(name, ref_opt, num_warmup_steps=W, num_training_steps=T)
    for _ in range(T + 1):  # steps 0..50 inclusive
        assert ours_opt.param_groups[0]["lr"] == pytest.approx(ref_opt.param_groups[0]["lr"], rel=1e-12, abs=1e-18)
        for opt, sched in ((ours_opt, ours), (ref_opt, ref)):
            opt.step()  # no grads: a no-op, but the order torch expects
            sched.step()
