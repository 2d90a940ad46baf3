"""A new engine is one file plus one registry line: a test-only engine, registered here, trains through
train.main like the shipped ones (config accepted, checkpoint marked with its name, resumed by it), and
its traits, not its name, decide what the rest of the code does."""

import json
import signal

import pytest
from train_runs import base_args, data, losses

import train.main
from train.engines import REGISTRY, engine_traits, register_engine
from train.engines.base import EngineTraits
from train.engines.ddp import DDPEngine

__all__ = ["data"]  # a fixture


class CountingEngine(DDPEngine):
    """DDP's arithmetic, counting its optimizer steps: proof the loop used this engine."""

    steps = 0

    def step(self):
        CountingEngine.steps += 1
        return super().step()


COUNTING = EngineTraits(
    name="counting", summary="test only: ddp that counts its steps", build=CountingEngine, low_precision_params=False,
    memory=engine_traits("ddp").memory, checkpoint_reader=engine_traits("ddp").checkpoint_reader,
)  # fmt: skip


@pytest.fixture
def counting_engine():
    register_engine(COUNTING)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}  # train.main installs its own
    yield COUNTING
    REGISTRY.pop(COUNTING.name)
    for s, handler in handlers.items():
        signal.signal(s, handler)


def run_main(args: list[str]) -> None:
    train.main.main(args)


def test_a_registered_engine_trains_through_train_main(data, tmp_path, counting_engine, capsys):
    out = tmp_path / "out"
    args = [*base_args(data, out), "--engine=counting", "--max_train_steps=4", "--checkpointing_steps=2"]
    CountingEngine.steps = 0
    run_main(args)
    said = capsys.readouterr().out
    assert "DiT on the counting engine" in said
    assert CountingEngine.steps == 4
    marker = json.loads((out / "checkpoint-4" / "COMPLETE").read_text())
    assert marker["engine"] == "counting"
    # The same arithmetic as ddp: the losses of a ddp run from the same start, bit for bit.
    ddp = tmp_path / "ddp"
    run_main([*base_args(data, ddp), "--engine=ddp", "--max_train_steps=4", "--checkpointing_steps=2"])
    assert losses(out) == losses(ddp)
    # Its checkpoints resume with it, and only with it (the marker names it).
    run_main([*args, "--max_train_steps=5", "--resume_from_checkpoint=latest"])
    assert "resumed from" in capsys.readouterr().out and CountingEngine.steps == 5
    with pytest.raises(SystemExit):
        run_main([*base_args(data, out), "--engine=ddp", "--max_train_steps=6", "--resume_from_checkpoint=latest"])
    assert "written by the counting engine" in capsys.readouterr().err


def test_an_unregistered_engine_is_refused_with_the_registered_ones_listed(data, tmp_path, capsys):
    with pytest.raises(SystemExit):
        run_main([*base_args(data, tmp_path / "out"), "--engine=counting"])
    err = capsys.readouterr().err
    assert "counting" in err and all(name in err for name in REGISTRY)
