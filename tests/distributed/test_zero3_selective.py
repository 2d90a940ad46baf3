"""ZeRO-3 with selective checkpointing: the checkpoint runs inside each block's call and the block is a
DeepSpeed leaf module, so ZeRO-3's parameter fetches (whose number changes once it prefetches, after a
first traced forward such as the eval loss's no_grad baseline) never run inside the region the policy
replays (wan/modules/checkpointing.py, train/engines/deepspeed.py)."""

import json
from pathlib import Path

import pytest
from deepspeed.utils import z3_leaf_module
from train_runs import data, losses, torchrun

from train.engines.deepspeed import apply_selective_leaf_blocks
from train.eval_loss import EVAL_LOSS_FILE
from wan import WanModel, dit_preset

__all__ = ["data"]  # a fixture

STEPS = 2


def test_selectively_checkpointed_blocks_are_the_leaf_modules():
    model = WanModel(**dict(dit_preset("debug"), num_layers=3))
    model.set_gradient_checkpointing("selective", every=2)
    assert apply_selective_leaf_blocks(model) == [0, 2]
    assert [z3_leaf_module(block) for block in model.blocks] == [True, False, True]
    other = WanModel(**dict(dit_preset("debug"), num_layers=3))
    other.set_gradient_checkpointing("full")  # full checkpointing replays nothing: hooks may run inside
    assert apply_selective_leaf_blocks(other) == []


def evaluations(out: Path) -> dict[int, float]:
    lines = [json.loads(line) for line in (out / EVAL_LOSS_FILE).read_text().splitlines()]
    return {line["step"]: line["loss"] for line in lines}


@pytest.mark.slow
@pytest.mark.heavy  # CI's heavy tier, for time
def test_zero3_selective_trains_after_the_eval_baseline_as_without_checkpointing(data, tmp_path):
    """2 gloo ranks through train.main: the eval loss's no_grad baseline at step 0, then training steps
    with selective checkpointing (which crashed at the first backward: "... encountered during backward
    but not found in storage"). Every block's parameters are partitioned (persistence threshold 0). The
    losses equal those of the same run without checkpointing (which fetches per submodule)."""
    args = [
        "--engine=zero3", "--stage3_param_persistence_threshold=0", f"--max_train_steps={STEPS}",
        f"--eval_steps={STEPS}", "--eval_holdout=3", "--lr_warmup_steps=0", "--checkpointing_steps=100",
    ]  # fmt: skip
    selective = torchrun(data, tmp_path / "selective", *args, "--gradient_checkpointing=selective", nproc=2)
    assert "not found in storage" not in selective.stderr
    torchrun(data, tmp_path / "none", *args, "--gradient_checkpointing=none", nproc=2)
    got, want = evaluations(tmp_path / "selective"), evaluations(tmp_path / "none")
    assert sorted(got) == [0, STEPS]
    assert got[STEPS] != got[0]  # it trained
    for step in got:
        assert got[step] == pytest.approx(want[step], rel=1e-6), step
    got, want = losses(tmp_path / "selective"), losses(tmp_path / "none")
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in got:
        assert got[step] == pytest.approx(want[step], rel=1e-6), step
