"""The EMA ([ema], train/ema.py) end to end through `train.main` with 2 gloo ranks (fp32, the debug preset):
every engine's average equals the closed form computed from the weights its checkpoints saved at each
step, a resumed run's average is the uninterrupted one's bit for bit, each rank holds half of it, the
eval loss runs on it (equal to a fresh run's baseline on the merged average) and training is untouched
by the swaps (the same losses as a run without EMA)."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from train_runs import ENGINES, data, engine_run_args, losses, torchrun

from tools.zero_to_bf16 import CheckpointDiT, merge
from train.ema import EMA_DIR, ema_sources
from wan import WanModel

__all__ = ["data"]  # a fixture

DECAY, START, EVERY = 0.5, 1, 2
EMA = ["--ema.enabled=true", f"--decay={DECAY}", f"--ema.start_step={START}", f"--update_every={EVERY}",
       "--checkpointing_steps=1"]  # fmt: skip
EXTRA = {"zero3": ["--gradient_checkpointing=full"]}


def ema_run(data: Path, out: Path, engine: str, *extra: str) -> Path:
    # engine_run_args saves at 3 and 6; EMA's --checkpointing_steps=1 (later) saves every step's weights.
    torchrun(data, out, *engine_run_args(engine, *EXTRA.get(engine, []), *EMA, *extra), nproc=2)
    return out


def closed_form(run: Path, steps: int) -> dict[str, torch.Tensor]:
    """The average after `steps` from the trained weights of checkpoint-1..steps (module docstring of
    train/ema.py; no warmup, every update applied)."""
    average = None
    for s in range(1, steps + 1):
        dit = CheckpointDiT(run / f"checkpoint-{s}", None)
        weights = {name: dit.read(name, torch.float32).float() for name in dit.expected}
        if s <= START:
            average = weights
        elif (s - START) % EVERY == 0:
            average = {name: DECAY * average[name] + (1 - DECAY) * w for name, w in weights.items()}
    return average


def saved_average(checkpoint: Path) -> dict[str, torch.Tensor]:
    return {name: source.read() for name, source in ema_sources(checkpoint).items()}


@pytest.fixture(scope="module")
def ddp_run(data, tmp_path_factory) -> Path:
    return ema_run(data, tmp_path_factory.mktemp("ema") / "ddp", "ddp")


def check_engine_run(data: Path, run: Path, engine: str, tmp_path: Path) -> None:
    for steps in (3, 6):
        expected, got = closed_form(run, steps), saved_average(run / f"checkpoint-{steps}")
        assert got.keys() == expected.keys()  # every parameter trains in these runs
        for name, value in expected.items():
            torch.testing.assert_close(got[name], value, rtol=0, atol=1e-6, msg=f"{engine} step {steps} {name}")
    # Sharded: each rank holds half of the average (the pieces cover every element once).
    sizes = []
    for path in sorted((run / "checkpoint-6" / EMA_DIR).glob("rank_*.safetensors")):
        with safe_open(path, "pt") as f:
            sizes.append(sum(f.get_slice(name).get_shape()[0] for name in f.keys()))
    total = sum(v.numel() for v in expected.values())
    assert len(sizes) == 2 and sum(sizes) == total and max(sizes) <= 0.55 * total, (engine, sizes, total)
    # Resumed from step 3: the same average at step 6, bit for bit.
    resumed = tmp_path / f"{engine}-resumed"
    shutil.copytree(run, resumed)
    for s in (4, 5, 6):
        shutil.rmtree(resumed / f"checkpoint-{s}")
    proc = torchrun(data, resumed, *engine_run_args(engine, *EXTRA.get(engine, []), *EMA), nproc=2)
    assert "checkpoint-3" in proc.stdout + proc.stderr
    again, first = saved_average(resumed / "checkpoint-6"), saved_average(run / "checkpoint-6")
    assert all(torch.equal(again[name], first[name]) for name in first), engine


@pytest.mark.slow
def test_ddp_average_is_the_closed_form_sharded_and_resumes_exactly(data, ddp_run, tmp_path):
    check_engine_run(data, ddp_run, "ddp", tmp_path)


@pytest.mark.slow
@pytest.mark.heavy
@pytest.mark.parametrize("engine", [e for e in ENGINES if e != "ddp"])
def test_every_engine_averages_alike(data, engine, ddp_run, tmp_path):
    run = ema_run(data, tmp_path / engine, engine)
    check_engine_run(data, run, engine, tmp_path)
    mine, ddp = saved_average(run / "checkpoint-6"), saved_average(ddp_run / "checkpoint-6")
    for name, value in ddp.items():
        torch.testing.assert_close(mine[name], value, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
def test_the_eval_loss_runs_on_the_average_and_training_is_untouched(data, tmp_path):
    """An EMA run evaluating on its average: the same training losses as a run without EMA (the swaps
    restore the weights exactly), and its eval loss at step 4 equals a fresh run's step-0 eval loss from
    the merged average of checkpoint-4 (zero_to_bf16 --ema, fp32)."""
    evals = ["--eval_holdout=3", "--eval_steps=2", "--max_train_steps=4", "--checkpointing_steps=2"]
    plain = tmp_path / "plain"
    torchrun(data, plain, *evals, nproc=2)
    averaged = tmp_path / "averaged"
    torchrun(data, averaged, *evals, "--ema.enabled=true", "--decay=0.7", nproc=2)
    assert losses(plain) == losses(averaged)
    merge(averaged / "checkpoint-4", tmp_path / "merged", dtype="fp32", ema=True, log=lambda _: None)
    merged = WanModel.from_pretrained(tmp_path / "merged", dtype=None).state_dict()
    merge(averaged / "checkpoint-4", tmp_path / "trained", dtype="fp32", log=lambda _: None)
    trained = WanModel.from_pretrained(tmp_path / "trained", dtype=None).state_dict()
    assert any(not torch.equal(merged[n], trained[n]) for n in merged)  # the average is not the weights
    fresh = tmp_path / "fresh"
    torchrun(data, fresh, *evals, "--max_train_steps=1", f"--transformer_path={tmp_path / 'merged'}", nproc=2)

    def eval_at(run: Path) -> dict[int, float]:
        lines = [json.loads(line) for line in (run / "eval_loss.jsonl").read_text().splitlines()]
        return {line["step"]: line["loss"] for line in lines}

    assert eval_at(averaged)[4] == pytest.approx(eval_at(fresh)[0], rel=1e-6)
    assert eval_at(averaged)[4] != pytest.approx(eval_at(plain)[4], rel=1e-4)
