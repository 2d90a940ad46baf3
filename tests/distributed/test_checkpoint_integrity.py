"""Verified checkpoints: every file's size and crc32 in COMPLETE, checked before a resume uses it.
Each kind of damage (flipped bytes of the same size, truncation, a missing file, an edited JSON, a
malformed marker) makes `latest` fall back to the previous checkpoint naming the file and the damage;
all damaged is refused; `python -m train.checkpoint verify` reports each. A save that fails for want of
room (a real full tmpfs, a file size limit) leaves nothing behind. Every engine falls back through
torchrun with 2 ranks and repeats the uninterrupted run from there."""

import contextlib
import io
import json
import logging
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from checkpoint_worker import Value
from ranks import private_tmpfs
from train_runs import ENGINE_STEPS, REPO, data, engine_run_args, losses, torchrun

from train.checkpoint import Checkpointer, remove_interrupted_saves
from train.checkpoint_io import _WRITTEN, read_safetensors, write_json, write_safetensors
from train.checkpoint_verify import read_marker, resolve_resume, verify_main
from train.engines.named_optimizer import load_named_optimizer_state, optimizer_state_to_named
from train.rng import RNGState

__all__ = ["data"]  # a fixture

WORKER = Path(__file__).with_name("checkpoint_worker.py")


# ----------------------------------------------------------------------------------------------------
# A checkpoint laid out as the DDP engine's, written by the same writers


class DDPLike:
    """The DDP engine's files (model.safetensors, optimizer.safetensors keyed by name, scheduler.json)
    for a small model after `step` AdamW updates, written by the writers DDPEngine.save uses."""

    def __init__(self, step: int):
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Linear(64, 8))
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-2)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: 1 / (s + 1))
        self.names = {p: n for n, p in self.model.named_parameters()}
        for i in range(step):
            torch.manual_seed(100 + i)
            self.model(torch.randn(4, 32)).square().mean().backward()
            self.optimizer.step()
            self.optimizer.zero_grad()
            self.scheduler.step()

    def save(self, folder: Path) -> list[str]:
        tensors, meta = optimizer_state_to_named(self.optimizer, self.names)
        write_safetensors(folder / "model.safetensors", dict(self.model.state_dict()), {"format": "pt"})
        write_safetensors(folder / "optimizer.safetensors", tensors, meta)
        write_json(folder / "scheduler.json", self.scheduler.state_dict())
        return ["model.safetensors", "optimizer.safetensors", "scheduler.json"]

    @torch.no_grad()
    def load(self, folder: Path) -> None:
        self.model.load_state_dict(read_safetensors(folder / "model.safetensors")[0])
        load_named_optimizer_state(self.optimizer, self.names, *read_safetensors(folder / "optimizer.safetensors"))
        self.scheduler.load_state_dict(json.loads((folder / "scheduler.json").read_text()))


def checkpointer(out: Path, step: int) -> tuple[Checkpointer, DDPLike, dict]:
    ckpt = Checkpointer(out, config_text=f"[train]\nstep = {step}\n", marker_info={"engine": "ddp"})
    engine = DDPLike(step)
    parts = {"trainer_state": Value({"step": step, "epoch": 0}), "sampler": Value({"epoch": 0, "consumed": step})}
    ckpt.register_files("engine", engine)
    for name, part in parts.items():
        ckpt.register(name, part)
    ckpt.register("rng", RNGState(), per_rank=True)
    return ckpt, engine, parts


def two_checkpoints(out: Path) -> tuple[Path, Path]:
    for step in (1, 2):
        checkpointer(out, step)[0].save(step)
    return out / "checkpoint-1", out / "checkpoint-2"


def verify_cli(folder: Path) -> subprocess.CompletedProcess:
    """`python -m train.checkpoint verify FOLDER`, run in this process (a fresh interpreter per call would
    cost seconds of imports; test_verify_runs_as_a_module runs the real command)."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = verify_main(["verify", str(folder)])
    return subprocess.CompletedProcess([], code, stdout.getvalue(), stderr.getvalue())


@pytest.mark.slow
def test_verify_runs_as_a_module(tmp_path):
    first, second = two_checkpoints(tmp_path)
    flip(second / "model.safetensors")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "train.checkpoint", "verify", str(tmp_path)]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert done.stdout.splitlines() == [
        f"{first}: OK",
        f"{second}: DAMAGED",
        "  model.safetensors has a checksum mismatch"
        + re.search(r" \(crc32 [0-9a-f]{8}, COMPLETE says [0-9a-f]{8}\)", done.stdout).group(0),
    ]
    assert "1 of 2 checkpoint(s) damaged" in done.stderr


# ----------------------------------------------------------------------------------------------------
# Damage, as a disk, a copy or a hand makes it


def flip(path: Path, count: int = 64) -> None:
    """Invert `count` bytes in the middle: same size, other contents."""
    data = bytearray(path.read_bytes())
    start = max(0, len(data) // 2 - count // 2)
    for i in range(start, min(len(data), start + count)):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def edit_number(path: Path) -> None:
    """Change one digit of the first number in a JSON file: valid JSON, same size, another state."""
    text = path.read_text()
    m = re.search(r": (\d)", text)
    path.write_text(text[: m.start(1)] + str((int(m.group(1)) + 1) % 10) + text[m.end(1) :])


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def grow(path: Path) -> None:
    path.write_bytes(path.read_bytes() + b"\n# more\n")


def remove(path: Path) -> None:
    path.unlink()


DAMAGE = [
    ("model.safetensors", flip, "model.safetensors has a checksum mismatch"),
    ("optimizer.safetensors", flip, "optimizer.safetensors has a checksum mismatch"),
    ("scheduler.json", flip, "scheduler.json has a checksum mismatch"),
    ("sampler.json", edit_number, "sampler.json has a checksum mismatch"),
    ("trainer_state.json", edit_number, "trainer_state.json has a checksum mismatch"),
    ("rng/rank_0.json", flip, r"rng/rank_0\.json has a checksum mismatch"),
    ("model.safetensors", truncate, r"model.safetensors is truncated \(\d+ bytes, COMPLETE says \d+\)"),
    ("config.toml", grow, r"config.toml has \d+ bytes, COMPLETE says \d+"),
    ("optimizer.safetensors", remove, "optimizer.safetensors is missing"),
    ("COMPLETE", remove, "checkpoint-2: the folder has no COMPLETE marker"),
]


def marker_edit(edit):
    def damage(path: Path) -> None:
        marker = json.loads(path.read_text())
        path.write_text(json.dumps(edit(marker)))

    return damage


def without(key: str):
    return marker_edit(lambda m: {k: v for k, v in m.items() if k != key})


def with_file_entry(value):
    return marker_edit(lambda m: {**m, "files": {**m["files"], "model.safetensors": value}})


MALFORMED = [
    (lambda p: p.write_text('{"step": 2, "files": {'), "malformed marker: not valid JSON"),
    (marker_edit(lambda m: [m]), "malformed marker: a list, not a JSON object"),
    (without("files"), "malformed marker: no 'files' field"),
    (without("world_size"), "malformed marker: no 'world_size' field"),
    (without("step"), "malformed marker: no 'step' field"),
    (marker_edit(lambda m: {**m, "step": "2"}), "malformed marker: 'step' is '2', not an int >= 0"),
    (marker_edit(lambda m: {**m, "step": 3}), "malformed marker: 'step' is 3, the folder is checkpoint-2"),
    (marker_edit(lambda m: {**m, "world_size": 0}), "malformed marker: 'world_size' is 0, not an int >= 1"),
    (marker_edit(lambda m: {**m, "files": None}), "malformed marker: 'files' is None"),
    (marker_edit(lambda m: {**m, "engine": 1}), "malformed marker: 'engine' is 1, not a string"),
    (with_file_entry(None), r"malformed marker: files\['model.safetensors'\] is None"),
    (with_file_entry({"crc32": "00000000"}), r"files\['model.safetensors'\]\['size'\] is None, not an int"),
    (with_file_entry({"size": 5, "crc32": 5}), r"files\['model.safetensors'\]\['crc32'\] is 5, not 8 lowercase"),
    (marker_edit(lambda m: {**m, "files": {"../x": 1}}), r"files\['../x'\] is not a file inside the checkpoint"),
]


def check_fallback(out: Path, expected: str, caplog) -> None:
    """`latest` skips checkpoint-2 naming `expected` and gives checkpoint-1; the explicit path and a
    load are refused naming it; verify reports it with a non-zero exit."""
    first, second = out / "checkpoint-1", out / "checkpoint-2"
    with caplog.at_level(logging.WARNING, logger="train.checkpoint_verify"):
        assert resolve_resume(out, "latest") == first
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping")]
    assert len(skipped) == 1 and skipped[0].startswith(f"skipping {second}: "), skipped
    assert re.search(expected, skipped[0]), skipped[0]
    with pytest.raises(ValueError, match=f"checkpoint-2 does not verify: .*{expected}"):
        resolve_resume(out, str(second))

    ckpt, engine, parts = checkpointer(out, 0)
    ckpt.load(resolve_resume(out, "latest"))  # the fallback loads what step 1 saved
    assert parts["trainer_state"].value == {"step": 1, "epoch": 0} and parts["sampler"].value["consumed"] == 1
    saved = DDPLike(1).model.state_dict()
    assert all(torch.equal(t, saved[n]) for n, t in engine.model.state_dict().items())

    done = verify_cli(out)
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"{first}: OK" in done.stdout and f"{second}: DAMAGED" in done.stdout
    assert re.search(expected, done.stdout), done.stdout
    single = verify_cli(second)
    assert single.returncode == 1 and re.search(expected, single.stdout)
    assert verify_cli(first).returncode == 0


@pytest.mark.parametrize("name, damage, expected", DAMAGE, ids=[f"{d[0]}-{d[1].__name__}" for d in DAMAGE])
def test_latest_falls_back_past_damage_naming_it(tmp_path, caplog, name, damage, expected):
    _, second = two_checkpoints(tmp_path)
    damage(second / name)
    check_fallback(tmp_path, expected, caplog)


@pytest.mark.parametrize("damage, expected", MALFORMED, ids=[m[1][:40] for m in MALFORMED])
def test_a_malformed_marker_is_a_clear_error(tmp_path, caplog, damage, expected):
    _, second = two_checkpoints(tmp_path)
    damage(second / "COMPLETE")
    check_fallback(tmp_path, expected, caplog)
    with pytest.raises(ValueError, match=expected):  # also loading it directly: a ValueError, not a traceback
        read_marker(second)


def test_all_damaged_is_refused_and_none_starts_fresh(tmp_path):
    first, second = two_checkpoints(tmp_path)
    flip(first / "model.safetensors")
    truncate(second / "optimizer.safetensors")
    with pytest.raises(ValueError) as err:
        resolve_resume(tmp_path, "latest")
    message = str(err.value)
    assert "no checkpoint in" in message and "--resume_from_checkpoint=none" in message
    assert f"{second}: optimizer.safetensors is truncated" in message
    assert f"{first}: model.safetensors has a checksum mismatch" in message
    assert resolve_resume(tmp_path, "none") is None and resolve_resume(tmp_path, "") is None
    assert resolve_resume(tmp_path / "empty", "latest") is None  # no checkpoint at all: a fresh start
    done = verify_cli(tmp_path)
    assert done.returncode == 1 and "2 of 2 checkpoint(s) damaged" in done.stderr


def test_every_file_is_listed_with_the_crc32_of_its_bytes(tmp_path):
    first, _ = two_checkpoints(tmp_path)
    marker = read_marker(first)
    listed = {p.relative_to(first).as_posix() for p in first.rglob("*") if p.is_file() and p.name != "COMPLETE"}
    assert set(marker["files"]) == listed
    for name, entry in marker["files"].items():
        data = (first / name).read_bytes()
        assert entry == {"size": len(data), "crc32": f"{zlib.crc32(data):08x}"}, name
    # Taken as the bytes were written: the writers' records of the save's files are used up.
    assert not [key for key in _WRITTEN if key.startswith(str(tmp_path))]


def test_markers_written_before_checksums_are_accepted_on_sizes(tmp_path, caplog):
    first, second = two_checkpoints(tmp_path)
    marker = json.loads((second / "COMPLETE").read_text())
    old = {**marker, "files": {name: entry["size"] for name, entry in marker["files"].items()}}
    (second / "COMPLETE").write_text(json.dumps(old))
    with caplog.at_level(logging.WARNING, logger="train.checkpoint_verify"):
        assert resolve_resume(tmp_path, "latest") == second
    assert f"{second}: its COMPLETE predates checksums: file sizes checked, contents not" in caplog.text
    done = verify_cli(second)
    assert done.returncode == 0 and "OK (sizes only" in done.stdout
    truncate(second / "model.safetensors")  # sizes still count
    assert resolve_resume(tmp_path, "latest") == first


# ----------------------------------------------------------------------------------------------------
# Failed saves leave nothing behind


class Failing:
    def state_dict(self):
        raise RuntimeError("this part cannot be saved")

    def load_state_dict(self, state) -> None:
        pass


def test_a_failed_save_removes_its_partial_files(tmp_path):
    first, _ = two_checkpoints(tmp_path)
    ckpt = checkpointer(tmp_path, 3)[0]
    ckpt.register("late", Failing())
    with pytest.raises(RuntimeError, match="cannot be saved") as err:
        ckpt.save(3)
    assert any("while saving" in note and "checkpoint-3" in note for note in err.value.__notes__)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1", "checkpoint-2"]
    assert resolve_resume(tmp_path, "latest") == tmp_path / "checkpoint-2"
    assert verify_cli(tmp_path).returncode == 0


def run_full_worker(out: Path, prefix: list[str] | None = None, preexec=None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [*(prefix or []), sys.executable, str(WORKER), "full", str(out)]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120, preexec_fn=preexec)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def check_full_report(report: dict, out: Path, code: int) -> None:
    assert report["errno"] == code and report["type"] == "OSError", report
    error = report["error"]
    assert f"saving {out / 'checkpoint-2'} failed and its partial files were removed" in error
    assert re.search(r"big\.safetensors: .* writing 1048\d\d\d bytes", error), error
    assert re.search(r"\d+ bytes are free in .* the newest checkpoint \(checkpoint-1\) holds \d+ bytes", error)
    assert not [f for f in report["files"] if not f.startswith("checkpoint-1")], report["files"]  # no .tmp/.part
    assert report["problems_1"] == [] and report["latest"] == "checkpoint-1"
    assert report["after_retry"] == ["checkpoint-1", "checkpoint-2"]


@pytest.mark.slow
def test_a_full_disk_leaves_no_partial_files(tmp_path):
    """A real ENOSPC: a 200 KiB tmpfs in a private mount namespace (unshare -rm)."""
    mnt, namespace = private_tmpfs(tmp_path, "200k")
    report = run_full_worker(mnt / "out", namespace)
    check_full_report(report, mnt / "out", 28)  # ENOSPC
    assert report["free_after"] == report["free_before"]  # the failed save holds no space


@pytest.mark.slow
def test_a_file_size_limit_leaves_no_partial_files(tmp_path):
    """The write fails with EFBIG (RLIMIT_FSIZE, SIGXFSZ ignored): the same path as a full disk."""

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    report = run_full_worker(tmp_path / "out", preexec=limit)
    check_full_report(report, tmp_path / "out", 27)  # EFBIG


def test_leftovers_of_interrupted_saves_are_removed_but_never_a_checkpoint(tmp_path, caplog):
    first, second = two_checkpoints(tmp_path)
    (tmp_path / "checkpoint-3.tmp" / "rng").mkdir(parents=True)  # a crashed save
    (tmp_path / "checkpoint-3.tmp" / "model.safetensors.part").write_bytes(b"x" * 1000)
    shutil.copytree(second, tmp_path / "checkpoint-2.old")  # a re-save that crashed after its swap
    shutil.copytree(first, tmp_path / "checkpoint-1.tmp")  # a finished save of checkpoint-1
    shutil.copytree(second, tmp_path / "checkpoint-7.tmp")  # the only copy of a step: kept
    (tmp_path / "checkpoint-7.tmp" / "COMPLETE").write_text((second / "COMPLETE").read_text().replace(": 2,", ": 7,"))
    with caplog.at_level(logging.WARNING, logger="train.checkpoint"):
        removed = remove_interrupted_saves(tmp_path)
    assert sorted(p.name for p in removed) == ["checkpoint-1.tmp", "checkpoint-2.old", "checkpoint-3.tmp"]
    assert "keeping" in caplog.text and "checkpoint-7.tmp" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1", "checkpoint-2", "checkpoint-7.tmp"]
    assert verify_cli(tmp_path).returncode == 0


# ----------------------------------------------------------------------------------------------------
# Every engine through torchrun: 2 ranks, the debug preset

# The runs are the session's shared ones (tests/conftest.py engine_runs: 6 steps, checkpoints 3 and 6,
# tests/train_runs.py engine_run_args), also test_engines' references.
# The file each engine's checkpoint-6 loses or gets flipped bytes in: rank 1's own files where the engine
# writes per-rank ones.
ENGINE_DAMAGE = {
    "ddp": ("model.safetensors", flip, "model.safetensors has a checksum mismatch"),
    "zero2": ("deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt", flip, "optim_states.pt has a checksum mismatch"),
    "zero3": ("deepspeed/zero_pp_rank_1_mp_rank_00_model_states.pt", remove, "model_states.pt is missing"),
    "fsdp": ("dcp/__1_0.distcp", flip, r"dcp/__1_0\.distcp has a checksum mismatch"),
}


@pytest.mark.slow
# Only fsdp's in make test; the other engines' run in the heavy tier (CI), for time.
@pytest.mark.parametrize(
    "engine", [pytest.param(e, marks=[pytest.mark.heavy] if e != "fsdp" else []) for e in ENGINE_DAMAGE]
)
def test_every_engine_falls_back_past_a_damaged_checkpoint(data, engine_runs, tmp_path, engine):
    """Checkpoints 3 and 6 of a 6-step run, 6 damaged: the rerun skips it naming the file, resumes from
    3, and steps 4 to 6 repeat the uninterrupted run's losses bit for bit (fp32 on CPU)."""
    straight = engine_runs(engine)  # the session's uninterrupted run: read-only
    out = tmp_path / "out"
    for step in (3, 6):
        shutil.copytree(straight / f"checkpoint-{step}", out / f"checkpoint-{step}")
    (out / "checkpoint-7.tmp").mkdir()  # a crashed save's leftovers: removed at the start
    name, damage, expected = ENGINE_DAMAGE[engine]
    damage(out / "checkpoint-6" / name)
    done = verify_cli(out)
    assert done.returncode == 1 and re.search(expected, done.stdout), done.stdout

    resumed = torchrun(data, out, *engine_run_args(engine), nproc=2)
    assert f"removed {out / 'checkpoint-7.tmp'}" in resumed.stdout
    assert re.search(f"skipping {out / 'checkpoint-6'}: .*{expected}", resumed.stderr), resumed.stderr[-3000:]
    assert f"resumed from {out / 'checkpoint-3'}" in resumed.stdout
    reference = losses(straight)
    assert losses(out) == {step: reference[step] for step in (4, 5, 6)}
    assert verify_cli(out).returncode == 0  # checkpoint-6 saved anew

    if engine != "ddp":
        return
    # Every checkpoint damaged: refused before any model is built, listing each; an explicit damaged path
    # too; --resume_from_checkpoint=none starts afresh.
    edit_number(out / "checkpoint-3" / "sampler.json")
    flip(out / "checkpoint-6" / "optimizer.safetensors")
    refused = torchrun(data, out, *engine_run_args(engine), nproc=2, check=False)
    assert refused.returncode != 0, refused.stderr[-3000:]
    assert "no checkpoint in" in refused.stderr and "--resume_from_checkpoint=none" in refused.stderr
    assert "sampler.json has a checksum mismatch" in refused.stderr
    assert "optimizer.safetensors has a checksum mismatch" in refused.stderr
    explicit = torchrun(data, out, *engine_run_args(engine), f"--resume_from_checkpoint={out / 'checkpoint-3'}",
                        nproc=2, check=False)  # fmt: skip
    assert explicit.returncode != 0 and "checkpoint-3 does not verify: sampler.json has a checksum" in explicit.stderr
    fresh = torchrun(data, out, *engine_run_args(engine), "--resume_from_checkpoint=none", nproc=2)
    assert f"training {ENGINE_STEPS} steps from step 0" in fresh.stdout
    assert verify_cli(out).returncode == 0  # both saved anew
