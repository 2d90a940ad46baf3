"""Non-finite steps and the resume that follows them (issue 11): a streak of skipped updates writes no
checkpoint, so checkpoints_total_limit never prunes the last good one; a save due at a skipped step is
made after the next finite one; a resume applies this run's learning_rate (and AdamW values) at the
checkpoint's schedule position, on every engine, says so once, and starts the non-finite count at 0."""

import math
import shutil
from pathlib import Path

import pytest
import torch
from param_groups_worker import ENGINES, LR, recipe
from ranks import gloo_worker_results
from resume_lr_worker import NEW_LR, NEW_WEIGHT_DECAY
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from train_runs import base_args, data

from train.checkpoint_io import read_json, read_safetensors
from train.checkpoint_verify import find_latest
from train.config import load_config
from train.lr import lr_multiplier
from train.main import Trainer

__all__ = ["data"]  # a fixture

WORKER = Path(__file__).with_name("resume_lr_worker.py")


def in_process(data: Path, out: Path, *overrides: str) -> Trainer:
    return Trainer(load_config([*base_args(data, out), *overrides]))


def nan_at(trainer: Trainer, steps: set[int]) -> None:
    """Make the DiT's prediction NaN during the given (1-based) optimizer steps: a non-finite loss and
    gradient, so the engine skips those updates."""

    def hook(module, args, output):
        return output * math.nan if trainer.state.step + 1 in steps else None

    trainer.engine.module.register_forward_hook(hook)


def checkpoints(out: Path) -> list[str]:
    return sorted((p.name for p in out.glob("checkpoint-*")), key=lambda name: int(name.split("-")[1]))


def scalars(out: Path, tag: str) -> dict[int, float]:
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    return {e.step: e.value for e in events.Scalars(tag)}


@pytest.mark.parametrize("engine", ["ddp", "zero2", "zero3", "fsdp"])
def test_a_nan_streak_never_prunes_the_last_good_checkpoint(data, tmp_path, capsys, engine):
    """Steps 4 on are NaN with a checkpoint every step and a limit of 1: steps 4 and 5 save nothing (the
    run stops at 6, the third in a row), so checkpoint-3 stays, and it holds the weights the run ended
    with (skipped updates change nothing), all finite. Every engine, one process."""
    out = tmp_path / "out"
    args = ["--max_train_steps=10", "--checkpointing_steps=1", "--checkpoints_total_limit=1", "--max_nonfinite_steps=3",
            f"--engine={engine}", "--save_consolidated_weights"]  # fmt: skip
    trainer = in_process(data, out, *args)
    nan_at(trainer, set(range(4, 11)))
    with pytest.raises(RuntimeError, match="3 steps in a row had a non-finite loss"):
        trainer.train()
    assert trainer.state.step == 6
    assert checkpoints(out) == ["checkpoint-3"] and find_latest(out).name == "checkpoint-3"
    saved = dict(trainer.engine.full_state())  # the weights now: every engine gathers them the same way
    consolidated = load_file(out / "checkpoint-3" / "consolidated" / "diffusion_pytorch_model.safetensors")
    assert all(torch.isfinite(t).all() for t in consolidated.values())
    for name, tensor in consolidated.items():  # the checkpoint's bf16 export equals the live weights
        assert torch.equal(tensor, saved[name].to(tensor.dtype)), name
    printed = capsys.readouterr().out
    for step in (4, 5):
        assert printed.count(f"step {step}: checkpoint not saved (update skipped)") == 1, printed[-3000:]


def test_a_save_due_at_a_skipped_step_is_made_at_the_next_finite_one(data, tmp_path, capsys):
    """Checkpoints every 2 steps, NaN at steps 2 and 5 of 5: the save of step 2 is made at step 3, step 4
    saves as scheduled, and the run ends without a checkpoint of its skipped last step."""
    out = tmp_path / "out"
    trainer = in_process(data, out, "--max_train_steps=5", "--checkpointing_steps=2", "--checkpoints_total_limit=0")
    nan_at(trainer, {2, 5})
    trainer.train()  # two single skips: below max_nonfinite_steps
    assert trainer.state.step == 5
    assert checkpoints(out) == ["checkpoint-3", "checkpoint-4"]
    assert read_json(out / "checkpoint-3" / "trainer_state.json")["step"] == 3
    printed = capsys.readouterr().out
    assert printed.count("checkpoint not saved") == 1 and "step 2: checkpoint not saved" in printed
    assert "step 5: no final checkpoint (the last update was skipped)" in printed


def test_resume_applies_a_new_learning_rate_and_restarts_the_nonfinite_count(data, tmp_path, capsys):
    """Run 1 (lr 1e-3, linear with 1 warmup step) ends with a checkpoint of step 6 holding a non-finite
    count of 2 (as a checkpoint written before this count was reset could). Run 2 resumes it with
    learning_rate 5e-4 and 9 steps: the lr of steps 7..9 in TensorBoard is 5e-4 x the schedule's
    multiplier at steps 6..8, the change is printed once, and a NaN at step 7 does not stop it (a
    carried count of 2 would make it the third in a row)."""
    common = ["--lr_scheduler=linear", "--lr_warmup_steps=1", "--max_nonfinite_steps=3", "--checkpointing_steps=0"]
    first = in_process(data, tmp_path / "one", "--max_train_steps=6", *common)
    first.train()
    first.state.nonfinite_in_row = 2
    first.checkpointer.save(6)  # re-saves checkpoint-6, now with the count
    assert read_json(tmp_path / "one" / "checkpoint-6" / "trainer_state.json")["nonfinite_in_row"] == 2
    assert scalars(tmp_path / "one", "train/lr")[6] == pytest.approx(1e-3 * lr_multiplier("linear", 5, 1, 6))
    capsys.readouterr()

    out = tmp_path / "two"
    out.mkdir()
    shutil.copytree(tmp_path / "one" / "checkpoint-6", out / "checkpoint-6")
    second = in_process(data, out, "--max_train_steps=9", "--learning_rate=5e-4", *common)
    assert second.state.step == 6 and second.state.nonfinite_in_row == 0
    optimizer, scheduler = second.engine.optimizer, second.engine.scheduler
    assert scheduler.last_epoch == 6 and scheduler.base_lrs == [5e-4]
    assert optimizer.param_groups[0]["initial_lr"] == 5e-4
    assert optimizer.param_groups[0]["lr"] == pytest.approx(5e-4 * lr_multiplier("linear", 6, 1, 9), rel=1e-12)
    nan_at(second, {7})
    second.train()
    assert second.state.step == 9
    lrs = scalars(out, "train/lr")
    assert sorted(lrs) == [7, 8, 9]
    for step, lr in lrs.items():  # step k updates at the schedule's position k - 1
        assert lr == pytest.approx(5e-4 * lr_multiplier("linear", step - 1, 1, 9), rel=1e-6), step
    assert sorted(scalars(out, "train/loss")) == [8, 9]  # step 7 skipped
    printed = capsys.readouterr().out
    assert printed.count("changed on resume:") == 1
    assert "changed on resume: learning_rate 0.001 -> 0.0005\n" in printed  # max_train_steps is no such value


@pytest.fixture(scope="module")
def engines_run(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("resume_lr")
    return {"out": out, "ranks": gloo_worker_results(WORKER, out)}


@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINES)
def test_every_engine_resumes_with_the_configured_learning_rate(engines_run, engine):
    """2 ranks, two param groups (lr and lr/2), linear over 10 steps: a checkpoint of step 1 at lr 1e-3
    loaded by an engine configured with 5e-4 (and weight decay 0.05) has both groups' base lrs from the
    config and lr = base x 0.9 (position 1), and its second step really moves the weights at that lr:
    AdamW's update is theta (1 - lr wd) - lr D with D independent of lr and wd, so the same step resumed
    at the old values gives D, and from it the new step's weights follow."""
    multiplier = 0.9
    for rank in (0, 1):
        record = engines_run["ranks"][rank][engine]
        for key, lr, wd in (("old", LR, 1e-2), ("new", NEW_LR, NEW_WEIGHT_DECAY)):
            loaded = record[f"loaded_{key}"]
            assert loaded["base_lrs"] == [lr, lr / 2], (engine, key)
            assert [g["initial_lr"] for g in loaded["groups"]] == [lr, lr / 2], (engine, key)
            assert [g["lr"] for g in loaded["groups"]] == pytest.approx([lr * multiplier, lr / 2 * multiplier])
            assert loaded["last_lr"] == pytest.approx([lr * multiplier, lr / 2 * multiplier])
            assert [g["weight_decay"] for g in loaded["groups"]] == [wd, wd], (engine, key)
            resumed = record[f"resumed_{key}"]
            assert resumed["updated"] and resumed["lr"] == pytest.approx(lr * multiplier, rel=1e-12), (engine, key)
            after = [g["lr"] for g in record[f"after_{key}"]["groups"]]
            assert after == pytest.approx([lr * 0.8, lr / 2 * 0.8], rel=1e-12), (engine, key)

    start, old, new = (
        read_safetensors(engines_run["out"] / f"{engine}_{k}.safetensors")[0] for k in ("step1", "old", "new")
    )
    is_low = recipe().is_low_lr
    assert old.keys() == new.keys() == start.keys()
    moved = 0.0
    for name, theta in start.items():
        half = 0.5 if is_low(name) else 1.0
        lr_old, lr_new = LR * half * multiplier, NEW_LR * half * multiplier
        direction = (theta * (1 - lr_old * 1e-2) - old[name]) / lr_old
        expected = theta * (1 - lr_new * NEW_WEIGHT_DECAY) - lr_new * direction
        torch.testing.assert_close(new[name], expected, rtol=0, atol=1e-6, msg=f"{engine} {name}")
        moved = max(moved, float((new[name] - old[name]).abs().max()))
    assert moved > 100 * 1e-6  # the two resumes differ far beyond the tolerance
