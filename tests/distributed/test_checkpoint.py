"""Checkpoints: every part round-trips, exact optimizer resume, completeness, pruning, crashes mid-save,
and every rank's files listed in one marker."""

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from checkpoint_worker import RankFiles, Value, build, shard, trainer_state
from ranks import free_port, outputs, run_ranks
from safetensors import safe_open

from train.checkpoint import Checkpointer
from train.checkpoint_io import read_safetensors, write_safetensors
from train.checkpoint_verify import find_latest, read_marker, resolve_resume
from train.engines.named_optimizer import load_named_optimizer_state, optimizer_state_to_named
from train.rng import RNGState, capture_rng_state, restore_rng_state

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("checkpoint_worker.py")


def save(output_dir: Path, step: int, total_limit: int = 0, **values) -> Path:
    """A one-process save of the worker's parts for `step`; `values` add JSON parts."""
    checkpointer, _ = build(str(output_dir), 0, 1, step, total_limit=total_limit)
    for name, value in values.items():
        checkpointer.register(name, Value(value))
    return checkpointer.save(step)


def load(path: Path) -> dict:
    """The worker's parts as loaded from `path` by one process."""
    checkpointer, parts = build(str(path.parent), 0, 1, 0)
    checkpointer.load(path)
    return parts


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    )


def run_worker(*args, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env_extra or {})}
    return subprocess.run(
        [sys.executable, str(WORKER), *map(str, args)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )


# ----------------------------------------------------------------------------------------------------
# Round trips


def sample_tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "blocks.0.self_attn.q.weight": torch.randn(16, 8, generator=gen),
        "bf16": torch.randn(7, generator=gen).bfloat16(),
        "i64": torch.arange(-3, 6),
        "flag": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "strided": torch.randn(6, 4, generator=gen).t(),  # not contiguous
    }


def test_every_part_round_trips(tmp_path):
    tensors = sample_tensors()
    scheduler = {"base_lrs": [1e-4], "last_epoch": 3, "lr_lambdas": [None], "_last_lr": [5e-5]}
    sampler = {"epoch": 2, "consumed": 7, "carry_in": [1, 4]}
    rng = capture_rng_state()
    checkpointer = Checkpointer(tmp_path, config_text='[model]\nname = "wan-1.3b"\n', marker_info={"engine": "x"})
    checkpointer.register_files("engine", RankFiles(0, tensors))
    checkpointer.register("scheduler", Value(scheduler))
    checkpointer.register("sampler", Value(sampler))
    checkpointer.register("rng", RNGState(), per_rank=True)
    path = checkpointer.save(12)
    assert path == tmp_path / "checkpoint-12"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-12"]  # no tmp left behind
    marker = read_marker(path)
    assert marker["step"] == 12 and marker["world_size"] == 1 and marker["engine"] == "x"
    assert set(marker["files"]) == {
        "shards/rank_0.safetensors", "scheduler.json", "sampler.json", "config.toml", "rng/rank_0.json",
    }  # fmt: skip
    assert (path / "config.toml").read_text() == '[model]\nname = "wan-1.3b"\n'

    torch.manual_seed(99)  # the RNG moves on; loading puts it back
    files, sched, samp = RankFiles(0), Value(), Value()
    again = Checkpointer(tmp_path, marker_info={"engine": "x"})
    again.register_files("engine", files)
    again.register("scheduler", sched)
    again.register("sampler", samp)
    again.register("rng", RNGState(), per_rank=True)
    again.load(path)
    assert list(files.tensors) == list(tensors)
    for name, tensor in tensors.items():
        assert bitwise_equal(files.tensors[name], tensor.contiguous()), name
    assert sched.value == scheduler and samp.value == sampler
    assert capture_rng_state() == json.loads(json.dumps(rng))

    # The streamed writer produces files the safetensors library reads as its own.
    with safe_open(str(path / "shards/rank_0.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        for name, tensor in tensors.items():
            assert bitwise_equal(f.get_tensor(name), tensor.contiguous()), name

    wrong = Checkpointer(tmp_path, marker_info={"engine": "y"})
    with pytest.raises(ValueError, match="written with engine = 'x', this run has 'y'.*zero_to_bf16"):
        wrong.load(path)
    missing = Checkpointer(tmp_path, marker_info={"engine": "x"})
    missing.register("not_saved", Value())
    with pytest.raises(ValueError, match="has no not_saved.json"):
        missing.load(path)


def draws() -> tuple:
    return (
        [random.random() for _ in range(3)] + [random.gauss(0, 1)],
        np.random.standard_normal(3).tolist() + np.random.randint(0, 1000, 3).tolist(),
        torch.randn(5).tolist() + torch.randint(0, 1000, (3,)).tolist(),
    )


def test_rng_restore_replays_the_same_draws(tmp_path):
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    # Leave the Gaussian caches of python and numpy filled, which the state must carry too.
    random.gauss(0, 1)
    np.random.standard_normal(1)
    state = capture_rng_state()
    expected = draws()
    restore_rng_state(state)
    assert draws() == expected
    # And through the per-rank JSON file.
    restore_rng_state(state)
    save(tmp_path, 1)
    draws()
    load(tmp_path / "checkpoint-1")
    assert draws() == expected


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_rng_round_trips():
    state = capture_rng_state()
    assert len(state["cuda"]) == torch.cuda.device_count()
    expected = torch.randn(5, device="cuda").tolist()
    restore_rng_state(json.loads(json.dumps(state)))
    assert torch.randn(5, device="cuda").tolist() == expected


# ----------------------------------------------------------------------------------------------------
# Optimizer state keyed by name: exact resume


def make_training(seed: int = 0):
    """A small model, AdamW with two param groups, a LambdaLR schedule, and a fixed stream of grads."""
    torch.manual_seed(seed)
    model = torch.nn.ModuleDict(
        {"encoder": torch.nn.Linear(4, 6), "decoder": torch.nn.Linear(6, 3), "late": torch.nn.Linear(3, 2)}
    )
    decay = [model["encoder"].weight, model["decoder"].weight, model["late"].weight]
    no_decay = [model["encoder"].bias, model["decoder"].bias, model["late"].bias]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0, "lr": 3e-3}], lr=1e-3
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 3))
    names = {p: n for n, p in model.named_parameters()}
    return model, optimizer, scheduler, names


def train_step(model, optimizer, scheduler, step: int) -> None:
    gen = torch.Generator().manual_seed(1000 + step)
    optimizer.zero_grad(set_to_none=True)
    x = torch.randn(8, 4, generator=gen)
    h = model["decoder"](torch.tanh(model["encoder"](x)))
    loss = h.square().mean()
    if step >= 3:  # "late" gets no grad (so no optimizer state) until step 3
        loss = loss + model["late"](h).square().mean()
    loss.backward()
    optimizer.step()
    scheduler.step()


def test_optimizer_round_trip_continues_bitwise(tmp_path):
    model, optimizer, scheduler, names = make_training()
    for step in range(2):
        train_step(model, optimizer, scheduler, step)
    tensors, meta = optimizer_state_to_named(optimizer, names)
    assert "late.weight.exp_avg" not in tensors and json.loads(meta["state"]).keys() == {
        "encoder.weight",
        "encoder.bias",
        "decoder.weight",
        "decoder.bias",
    }
    assert tensors["encoder.weight.step"].dim() == 0  # step stays a tensor
    write_safetensors(tmp_path / "model.safetensors", dict(model.state_dict()), {"format": "pt"})
    write_safetensors(tmp_path / "optimizer.safetensors", tensors, meta)
    scheduler_state = json.loads(json.dumps(scheduler.state_dict()))

    # A fresh process would build everything anew (other initial weights), then load.
    model2, optimizer2, scheduler2, names2 = make_training(seed=1)
    model2.load_state_dict(read_safetensors(tmp_path / "model.safetensors")[0])
    load_named_optimizer_state(optimizer2, names2, *read_safetensors(tmp_path / "optimizer.safetensors"))
    scheduler2.load_state_dict(scheduler_state)
    assert optimizer2.param_groups[0]["betas"] == (0.9, 0.999)  # tuples stay tuples

    before, after = optimizer.state_dict(), optimizer2.state_dict()
    assert before["param_groups"] == after["param_groups"]
    assert before["state"].keys() == after["state"].keys()
    for index, state in before["state"].items():
        for key, value in state.items():
            assert bitwise_equal(after["state"][index][key], value), (index, key)

    for step in range(2, 6):
        train_step(model, optimizer, scheduler, step)
        train_step(model2, optimizer2, scheduler2, step)
    for (name, p), p2 in zip(model.named_parameters(), model2.parameters(), strict=True):
        assert bitwise_equal(p.detach(), p2.detach()), name
    assert scheduler.get_last_lr() == scheduler2.get_last_lr()


def test_optimizer_load_refuses_other_parameters():
    model, optimizer, scheduler, names = make_training()
    train_step(model, optimizer, scheduler, 3)
    tensors, meta = optimizer_state_to_named(optimizer, names)

    # Another model: one parameter renamed, one with another shape.
    other = torch.nn.ModuleDict(
        {"encoder": torch.nn.Linear(4, 6), "decoder": torch.nn.Linear(6, 3), "last": torch.nn.Linear(3, 2)}
    )
    other["decoder"].weight = torch.nn.Parameter(torch.zeros(3, 7))
    params = list(other.parameters())
    opt = torch.optim.AdamW([{"params": params[0::2]}, {"params": params[1::2]}])
    with pytest.raises(ValueError) as err:
        load_named_optimizer_state(
            opt, {p: n for n, p in other.named_parameters()}, tensors, meta, "ckpt/optimizer.safetensors"
        )
    message = str(err.value)
    assert "ckpt/optimizer.safetensors" in message
    assert "lacks last.weight" in message and "the optimizer does not: late.weight" in message
    assert "decoder.weight.exp_avg has shape [3, 6], the parameter [3, 7]" in message

    with pytest.raises(ValueError, match="it has 2 param groups, the optimizer has 1"):
        load_named_optimizer_state(torch.optim.AdamW(model.parameters()), names, tensors, meta)
    with pytest.raises(ValueError, match="does not name"):
        optimizer_state_to_named(optimizer, {})


# ----------------------------------------------------------------------------------------------------
# Completeness, resume, pruning


def test_find_latest_takes_the_newest_complete_checkpoint(tmp_path):
    assert find_latest(tmp_path / "nothing-here") is None
    for step in (1, 2, 3, 4, 5):
        save(tmp_path, step)
    (tmp_path / "checkpoint-5" / "COMPLETE").unlink()  # an interrupted save or copy
    (tmp_path / "checkpoint-4" / "trainer_state.json").unlink()  # the marker lists a missing file
    shard3 = tmp_path / "checkpoint-3" / "shards" / "rank_0.safetensors"
    shard3.write_bytes(shard3.read_bytes()[:-10])  # truncated
    (tmp_path / "checkpoint-9.tmp").mkdir()  # a save in progress, even with a marker
    (tmp_path / "checkpoint-9.tmp" / "COMPLETE").write_text(json.dumps({"step": 9, "files": {}}))
    (tmp_path / "checkpoint-8").write_text("a file")
    (tmp_path / "checkpoint-7-copy").mkdir()
    assert find_latest(tmp_path) == tmp_path / "checkpoint-2"
    assert load(find_latest(tmp_path))["trainer_state"].value == trainer_state(2)


def test_resolve_resume(tmp_path):
    assert resolve_resume(tmp_path, "") is None
    assert resolve_resume(tmp_path, "latest") is None  # a fresh start
    save(tmp_path, 1)
    save(tmp_path, 2)
    assert resolve_resume(tmp_path, "latest") == tmp_path / "checkpoint-2"
    assert resolve_resume(tmp_path, str(tmp_path / "checkpoint-1")) == tmp_path / "checkpoint-1"
    assert resolve_resume(tmp_path, "checkpoint-1") == tmp_path / "checkpoint-1"  # relative to output_dir

    with pytest.raises(ValueError, match="checkpoint-7 does not exist"):
        resolve_resume(tmp_path, str(tmp_path / "checkpoint-7"))
    (tmp_path / "checkpoint-2" / "COMPLETE").unlink()
    with pytest.raises(ValueError, match="checkpoint-2 does not verify: .*checkpoint-2: the folder has no COMPLETE"):
        resolve_resume(tmp_path, str(tmp_path / "checkpoint-2"))
    (tmp_path / "checkpoint-1" / "optimizer.safetensors").write_text("stray")  # not listed: harmless
    (tmp_path / "checkpoint-1" / "config.toml").write_text("edited")
    with pytest.raises(ValueError, match=r"checkpoint-1 does not verify: config\.toml is truncated \(6 bytes"):
        resolve_resume(tmp_path, str(tmp_path / "checkpoint-1"))
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        load(tmp_path / "checkpoint-1")


def test_pruning_keeps_the_newest_complete_ones(tmp_path):
    save(tmp_path, 0)
    (tmp_path / "checkpoint-0" / "COMPLETE").unlink()  # incomplete: does not count, is not deleted
    (tmp_path / "checkpoint-3.tmp").mkdir()  # leftovers of crashed saves
    (tmp_path / "checkpoint-9.old").mkdir()
    (tmp_path / "notes.txt").write_text("mine")
    for step in (1, 2, 3, 4, 5):
        save(tmp_path, step, total_limit=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-0", "checkpoint-4", "checkpoint-5", "notes.txt"]

    # Resumed from an older step: the newest two stay, and so does the one just written.
    save(tmp_path, 3, total_limit=2)
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == [
        "checkpoint-0",
        "checkpoint-3",
        "checkpoint-4",
        "checkpoint-5",
    ]
    save(tmp_path, 6, total_limit=2)
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-0", "checkpoint-5", "checkpoint-6"]


def test_resaving_a_step_replaces_it(tmp_path):
    save(tmp_path, 3, note="first")
    save(tmp_path, 3, note="second")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3"]
    assert json.loads((tmp_path / "checkpoint-3" / "note.json").read_text()) == "second"


def test_refuses_values_json_would_change(tmp_path):
    with pytest.raises(ValueError, match=r"scheduler\.json: scheduler\['lr_lambdas'\]\[0\] is a function"):
        save(tmp_path, 1, scheduler={"lr_lambdas": [lambda s: s]})
    with pytest.raises(ValueError, match=r"sampler\.json: sampler has the key 3"):
        save(tmp_path, 1, sampler={3: "x"})
    with pytest.raises(ValueError, match="registered twice"):
        save(tmp_path, 1, trainer_state={"step": 5})
    assert find_latest(tmp_path) is None


# ----------------------------------------------------------------------------------------------------
# Real processes


@pytest.mark.slow
def test_sigkill_mid_save_loses_nothing(tmp_path):
    result = run_worker("save", tmp_path, 1, 2, env_extra={"WAN_TRAIN_KILL_DURING_SAVE": "2"})
    assert result.returncode == -signal.SIGKILL, result.stderr
    # Killed with the files of checkpoint 2 written, before its marker.
    assert (tmp_path / "checkpoint-2.tmp" / "shards" / "rank_0.safetensors").is_file()
    assert not (tmp_path / "checkpoint-2.tmp" / "COMPLETE").exists()
    assert not (tmp_path / "checkpoint-2").exists()

    latest = find_latest(tmp_path)
    assert latest == tmp_path / "checkpoint-1"
    parts = load(latest)
    for name, tensor in shard(1, 0).items():
        assert bitwise_equal(parts["files"].tensors[name], tensor), name
    assert parts["trainer_state"].value == trainer_state(1)

    # A fresh process saves step 2 over the stale tmp folder.
    result = run_worker("save", tmp_path, 2)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1", "checkpoint-2"]
    assert find_latest(tmp_path) == tmp_path / "checkpoint-2"
    assert load(tmp_path / "checkpoint-2")["trainer_state"].value == trainer_state(2)


@pytest.mark.slow
def test_two_gloo_ranks_save_one_checkpoint(tmp_path):
    port = free_port()
    procs = run_ranks(lambda r: [str(WORKER), "dist", str(tmp_path), str(r), "2", str(port)], timeout=120)
    assert [p.returncode for p in procs] == [0, 0], outputs(procs)
    # Saved steps 1 and 2 with total_limit=1: one checkpoint, one marker listing both ranks' files.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2"]
    path = tmp_path / "checkpoint-2"
    assert sorted(p.name for p in (path / "rng").iterdir()) == ["rank_0.json", "rank_1.json"]
    assert len(list(path.rglob("COMPLETE"))) == 1
    marker = read_marker(path)
    assert marker["world_size"] == 2
    assert {"shards/rank_0.safetensors", "shards/rank_1.safetensors", "rng/rank_1.json"} <= set(marker["files"])

    # One rank's file missing: the folder is not a checkpoint, and the error names the file.
    (path / "shards" / "rank_1.safetensors").unlink()
    assert find_latest(tmp_path) is None
    with pytest.raises(ValueError, match=r"shards/rank_1\.safetensors is missing"):
        resolve_resume(tmp_path, str(path))
