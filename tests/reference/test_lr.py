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
    # one cycle of hard restarts is the half-cosine, and 0 (not rising) past the end
    for step in (0, 5, 10, 20, 30, 49, 50):
        assert m("cosine_with_restarts", step) == pytest.approx(m("cosine", step), abs=1e-15)
    assert m("cosine_with_restarts", 60) == 0.0
    # polynomial (power 1) decays linearly from the base lr to the absolute lr 1e-7
    base = 1e-4
    end = 1e-7 / base
    poly = [lr_multiplier("polynomial", s, W, T, base_lr=base) for s in (0, 5, 10, 30, 50, 60)]
    assert poly == pytest.approx([0.0, 0.5, 1.0, 0.5 + 0.5 * end, end, end], rel=1e-12)
    assert lr_multiplier("polynomial", 60, W, T, base_lr=1e-6) == pytest.approx(0.1)  # end depends on base
    # no warmup: the first step is at full lr
    for name in ("linear", "cosine", "cosine_with_restarts"):
        assert lr_multiplier(name, 0, 0, T) == 1.0
    assert lr_multiplier("polynomial", 0, 0, T, base_lr=base) == 1.0


def test_bad_arguments():
    with pytest.raises(ValueError, match="cosine, cosine_with_restarts, polynomial"):
        lr_multiplier("step", 0, W, T)
    with pytest.raises(ValueError, match="choose one of"):
        build_lr_scheduler(make_optimizer(), "cosine_restarts", W, T)
    for name in ("linear", "cosine", "cosine_with_restarts", "polynomial"):
        with pytest.raises(ValueError, match="warmup_steps <= total_steps"):
            build_lr_scheduler(make_optimizer(), name, 60, T)
    with pytest.raises(ValueError, match="base_lr"):
        lr_multiplier("polynomial", 0, W, T)
    with pytest.raises(ValueError, match="above it"):  # diffusers refuses lr <= lr_end too
        build_lr_scheduler(make_optimizer(1e-7), "polynomial", W, T)
    with pytest.raises(ValueError):
        lr_multiplier("constant", -1, W, T)


@pytest.mark.parametrize("name", LR_SCHEDULERS)
def test_drives_adamw(name):
    base = 2e-4
    opt = make_optimizer(base)
    sched = build_lr_scheduler(opt, name, W, T)
    for step in range(T + 1):
        expected = base * lr_multiplier(name, step, W, T, base_lr=base)
        assert opt.param_groups[0]["lr"] == pytest.approx(expected, abs=1e-15)
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


@pytest.mark.parametrize("warmup", [W, 0])
@pytest.mark.parametrize("base", [1e-3, 2e-5])  # polynomial's multiplier depends on the base lr
@pytest.mark.parametrize("name", LR_SCHEDULERS)
def test_matches_diffusers(name, base, warmup):
    """The lr of every step, with get_scheduler's defaults (num_cycles=1, lr_end=1e-7, power=1.0), as
    VideoX-Fun calls it. Past the end only our cosine differs (documented), so the others run 10 more."""
    get_scheduler = pytest.importorskip("diffusers.optimization").get_scheduler
    ours_opt, ref_opt = make_optimizer(base), make_optimizer(base)
    ours = build_lr_scheduler(ours_opt, name, warmup, T)
    ref = get_scheduler(name, ref_opt, num_warmup_steps=warmup, num_training_steps=T)
    for _ in range(T + 1 if name == "cosine" else T + 11):  # steps 0..50 (or 60) inclusive
        assert ours_opt.param_groups[0]["lr"] == pytest.approx(ref_opt.param_groups[0]["lr"], rel=1e-12, abs=1e-18)
        for opt, sched in ((ours_opt, ours), (ref_opt, ref)):
            opt.step()  # no grads: a no-op, but the order torch expects
            sched.step()
