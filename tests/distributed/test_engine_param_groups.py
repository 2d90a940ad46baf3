"""trainable_modules_low_learning_rate (VideoX-Fun's option): parameters matching only that list train,
at half the learning rate, in a second AdamW param group, on every engine.

The 2-rank run (tests/distributed/param_groups_worker.py, ~1 min) takes one AdamW step per engine; the reference
is independent of build_optimizer: a plain torch AdamW with two hand-made groups (lr, lr/2) stepped on
the gradients of the same model and global batch in this process."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from fsdp_engine_worker import batch
from param_groups_worker import ENGINES, LOW_LR, LR, TRAINABLE, recipe
from ranks import gloo_worker_results

from train.checkpoint_io import read_safetensors
from train.config import OptimConfig
from train.engines.base import build_optimizer
from train.models import apply_trainable_modules
from wan import WanModel, dit_preset

WORKER = Path(__file__).with_name("param_groups_worker.py")


def names_by_group() -> tuple[list[str], list[str]]:
    """The two groups, written out from VideoX-Fun's rule rather than computed by train.models."""
    with torch.device("meta"):
        names = [n for n, _ in WanModel(**dit_preset("debug")).named_parameters()]
    full = [n for n in names if n.startswith("blocks.0.") or n.startswith("head.")]
    low = [n for n in names if n.startswith("blocks.1.")]
    return full, low


def test_apply_trainable_modules_trains_both_lists():
    with torch.device("meta"):
        model = WanModel(**dit_preset("debug"))
    trainable, total = apply_trainable_modules(model, TRAINABLE, LOW_LR)
    full, low = names_by_group()
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == sorted(full + low)
    assert trainable == sum(p.numel() for n, p in model.named_parameters() if n in full + low) < total
    with pytest.raises(ValueError, match=r"trainable_modules \['nope'\] and trainable_modules_low_learning_rate"):
        apply_trainable_modules(model, ["nope"], ["nothing"])


def test_build_optimizer_groups():
    """[lr] for the first list (also for a parameter both lists match), [lr/2] for the rest; an empty
    group is left out; the parameter counts are logged."""
    model = recipe().build()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optim = OptimConfig(learning_rate=LR)
    opt = build_optimizer(named, optim, torch.device("cpu"), recipe().is_low_lr)
    by_id = {id(p): n for n, p in named}
    got = [(g["lr"], sorted(by_id[id(p)] for p in g["params"])) for g in opt.param_groups]
    full, low = names_by_group()
    assert got == [(LR, sorted(full)), (LR / 2, sorted(low))]
    assert "head.head.weight" in full and recipe().is_low_lr("blocks.1.ffn.0.weight")
    assert not recipe().is_low_lr("head.head.weight")
    only = build_optimizer(named, optim, torch.device("cpu"))  # no low list: one group
    assert [g["lr"] for g in only.param_groups] == [LR]
    low_only = build_optimizer(named, optim, torch.device("cpu"), lambda name: True)
    assert [g["lr"] for g in low_only.param_groups] == [LR / 2]


def reference_step() -> dict[str, torch.Tensor]:
    """One AdamW step as the 2-rank engines take it: the mean of the two ranks' losses (each rank one
    sample), plain torch AdamW (foreach, the engines' arithmetic on CPU) with groups [lr], [lr/2]."""
    model = recipe().materialize(torch.device("cpu"))
    params = dict(model.named_parameters())
    full, low = names_by_group()
    o = OptimConfig()
    opt = torch.optim.AdamW(
        [{"params": [params[n] for n in full], "lr": LR}, {"params": [params[n] for n in low], "lr": LR / 2}],
        betas=(o.adam_beta1, o.adam_beta2), weight_decay=o.adam_weight_decay, eps=o.adam_epsilon, foreach=True,
    )  # fmt: skip
    total = 0
    for rank in (0, 1):
        x, t, context, target = batch(0, rank, 1)
        total = total + F.mse_loss(model(x, t, context), target)
    (total / 2).backward()
    opt.step()
    return {n: p.detach().clone() for n, p in params.items() if n in full + low}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("param_groups")
    return {"out": out, "ranks": gloo_worker_results(WORKER, out)}


def weights(run: dict, engine: str, key: str) -> dict[str, torch.Tensor]:
    return read_safetensors(run["out"] / f"{engine}_{key}.safetensors")[0]


@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINES)
def test_low_group_moves_at_half_the_lr(run, engine):
    """After one AdamW step from the same start, every trainable weight equals the two-group reference:
    blocks.1.* moved as AdamW at lr/2 moves it, blocks.0.* and head.* (head.head matches both lists) at lr.
    Gradients differ from the reference by summation order only (1e-7 relative), which moves a first
    AdamW update (lr * g / (|g| + eps)) by far less than 1e-3 of lr; lr against lr/2 is a difference of
    ~lr/2 in every element whose gradient is not ~0."""
    expected = reference_step()
    start = recipe().weights
    got = weights(run, engine, "step1")
    full, low = names_by_group()
    assert sorted(got) == sorted(full + low)
    for name in full + low:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=LR * 1e-3, msg=f"{engine} {name}")
    # The step sizes themselves: at most lr (full) and lr/2 (low), up to weight decay's tiny pull.
    for names, lr in ((full, LR), (low, LR / 2)):
        moved = max(float((got[n] - start.read(n)).abs().max()) for n in names)
        assert lr * 0.99 < moved < lr * 1.01, (engine, lr, moved)
    for rank in (0, 1):
        record = run["ranks"][rank][engine]
        assert record["step1"]["lr"] == LR and record["step1"]["updated"]
        before, after = record["groups_before"], record["groups_after"]
        if engine in ("ddp", "fsdp"):  # DeepSpeed's module parameters are not the ones it steps
            assert [g["names"] for g in before] == [sorted(full), sorted(low)]
        assert [g["lr"] for g in before] == [LR, LR / 2]
        assert [g["lr"] for g in after] == pytest.approx([LR * 0.9, LR / 2 * 0.9], rel=1e-12)  # linear, 10 steps


@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINES)
def test_resume_restores_both_groups(run, engine):
    """A fresh engine loading the step-1 checkpoint has both groups at their step-1 lr, and its second
    step equals the uninterrupted run's (bit for bit: the same arithmetic on the same state)."""
    for rank in (0, 1):
        record = run["ranks"][rank][engine]
        assert [g["lr"] for g in record["groups_loaded"]] == [g["lr"] for g in record["groups_after"]]
        assert record["resumed"] == record["step2"]
    straight, resumed = weights(run, engine, "step2"), weights(run, engine, "resumed")
    assert all(torch.equal(straight[n], resumed[n]) for n in straight), engine
    assert math.isfinite(run["ranks"][0][engine]["step2"]["grad_norm"])
