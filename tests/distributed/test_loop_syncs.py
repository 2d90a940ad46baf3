"""The loop reads device values on the host (a GPU synchronisation each) once per optimizer step where
nothing is logged: the step's loss, counts and stop flags in one all-reduce. Counted by wrapping the
tensor methods that copy to the host, on a real run of the debug models (one process, CPU: the calls
are the ones a GPU would wait on). A resume parses the COMPLETE marker once."""

import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from train_runs import REPO, base_args, data

from train.config import load_config
from train.guard import release_output_dir
from train.main import Trainer

__all__ = ["data"]  # a fixture

HOST_READS = ("item", "tolist", "cpu", "__float__", "__bool__", "__int__")


def count_host_reads(monkeypatch, events: list) -> None:
    """Append (method, caller file) for every host read the trainer's own code makes (train/)."""
    train_dir = str(REPO / "train")
    pipeline = str(REPO / "train" / "data")  # the loader's own host tensors (batch indices): no device read
    for name in HOST_READS:
        real = getattr(torch.Tensor, name)

        def wrapper(self, *args, _real=real, _name=name, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(train_dir) and not caller.startswith(pipeline):
                events.append((_name, str(Path(caller).relative_to(REPO))))
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, wrapper)


def test_a_step_that_logs_nothing_reads_the_device_once(data, tmp_path, monkeypatch):
    args = [*base_args(data, tmp_path / "out"), "--max_train_steps=4", "--log_every=4", "--checkpointing_steps=0",
            "--gradient_accumulation_steps=2", "--progress_bar=false"]  # fmt: skip
    trainer = Trainer(load_config(args))
    events: list = []
    real_after_step = trainer.after_step

    def after_step(*a, **kw):
        real_after_step(*a, **kw)
        events.append(("step", trainer.state.step))

    trainer.after_step = after_step
    count_host_reads(monkeypatch, events)
    try:
        trainer.train()
    finally:
        monkeypatch.undo()
        release_output_dir()
    steps: list[Counter] = [Counter()]
    for kind, where in events:
        if kind == "step":
            steps.append(Counter())
        else:
            steps[-1][where] += 1
    per_step = steps[:4]
    print("host reads per optimizer step (file: count):", [dict(c) for c in per_step])
    # Steps 2 and 3 log nothing (log_every 4; step 1 prints its line): the loop reads the device once,
    # the engine once (the global gradient norm, which decides the update on every rank alike).
    for counts in per_step[1:3]:
        assert counts["train/main.py"] + counts["train/distributed.py"] == 1, counts
        assert sum(n for where, n in counts.items() if where.startswith("train/engines/")) <= 1, counts
    # The log window's end gathers the timesteps and per-sample losses of its steps once.
    assert per_step[3]["train/main.py"] + per_step[3]["train/distributed.py"] >= 2


@pytest.fixture(autouse=True)
def _no_leftover_hooks():
    yield
    assert torch.Tensor.item.__name__ == "item"


def test_a_resume_parses_the_checkpoint_marker_once(data, tmp_path, monkeypatch):
    """Verification, the resume checks and the load all read the COMPLETE marker as parsed once."""
    import train.checkpoint_verify

    args = [
        *base_args(data, tmp_path / "out"),
        "--max_train_steps=2",
        "--checkpointing_steps=2",
        "--progress_bar=false",
    ]
    try:
        Trainer(load_config(args)).train()
    finally:
        release_output_dir()
    parsed: list[Path] = []
    real = train.checkpoint_verify.parse_marker

    def parse_marker(path):
        parsed.append(Path(path))
        return real(path)

    monkeypatch.setattr(train.checkpoint_verify, "parse_marker", parse_marker)
    try:
        trainer = Trainer(load_config([*args, "--max_train_steps=3", "--resume_from_checkpoint=latest"]))
    finally:
        release_output_dir()
    assert trainer.state.step == 2
    assert parsed == [tmp_path / "out" / "checkpoint-2"]
