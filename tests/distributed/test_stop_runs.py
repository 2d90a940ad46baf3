"""Stopping real runs with a signal: every rank finishes its step, saves a checkpoint, rank 0 says so in
one line, and the ranks exit 0; the next run resumes and repeats an uninterrupted run bit for bit (fp32
on CPU). SIGTERM on 2 ranks for ddp (sent to one rank only: the ranks agree at a step boundary), fsdp
(sent to the agent of launch/single_node.sh, as `scancel` does) and zero3 (to rank 0 only); SIGINT as a
terminal's Ctrl-C sends it to a plain `python -m train.main` and its DataLoader worker."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from train_runs import REPO, base_args, data, losses, torchrun

from train.checkpoint_verify import find_latest

__all__ = ["data"]  # a fixture

STEPS = 8
ENGINE_ARGS = {  # zero3: every parameter sharded (tiny models stay whole below the persistence threshold)
    "ddp": [], "fsdp": [], "zero3": ["--stage3_param_persistence_threshold=0"],
}  # fmt: skip
STOPPED = re.compile(r"stopped by (SIGINT|SIGTERM) at step (\d+) of (\d+) \(trained (\d+) steps \((\d+)-(\d+)\)")
SAVED = re.compile(r": saved (\S+); ")


def run_args(engine: str) -> list[str]:
    return [f"--engine={engine}", *ENGINE_ARGS[engine], f"--max_train_steps={STEPS}", "--log_every=1"]


def start(cmd: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    """`cmd` in a session of its own (as a terminal's foreground job: a process group to signal)."""
    environ = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}
    with log.open("w") as sink:
        return subprocess.Popen(
            cmd, cwd=REPO, env=environ, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )


def wait_for(proc: subprocess.Popen, log: Path, text: str, limit: float = 300) -> int:
    """Wait until `text` is in the log; returns the log's length then."""
    t0 = time.monotonic()
    while text not in (said := log.read_text()):
        if proc.poll() is not None or time.monotonic() - t0 > limit:
            proc.kill()
            pytest.fail(f"never printed {text!r}:\n{said[-5000:]}")
        time.sleep(0.05)
    return len(said)


def ranks_of(agent: int) -> dict[int, int]:
    """torchrun's ranks: RANK -> pid, from /proc (the agent's children)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            if int(stat[stat.rindex(")") + 2 :].split()[1]) != agent:
                continue
            environ = dict(
                item.split(b"=", 1) for item in (entry / "environ").read_bytes().split(b"\0") if b"=" in item
            )
        except (OSError, ValueError):
            continue
        if b"RANK" in environ:
            found[int(environ[b"RANK"])] = int(entry.name)
    return found


def check_stopped(said: str, out: Path, signame: str) -> int:
    """The stop's one line (rank 0's) and its checkpoint; returns the step it stopped at."""
    assert "Traceback" not in said, said[-6000:]
    lines = [line for line in said.splitlines() if "stopped by" in line]
    assert len(lines) == 1, said[-6000:]
    match = STOPPED.search(lines[0])
    assert match, lines[0]
    name, step, total, trained, first, last = match.groups()
    step = int(step)
    assert name == signame and int(total) == STEPS and 2 <= step < STEPS
    assert (int(trained), int(first), int(last)) == (step, 1, step)
    assert SAVED.search(lines[0])[1] == str(out / f"checkpoint-{step}")
    assert find_latest(out) == out / f"checkpoint-{step}"
    assert not (out / ".lock").exists()
    return step


def resume_and_compare(data: Path, tmp_path: Path, out: Path, engine: str, step: int) -> None:
    """The same command again resumes (debug.toml: resume_from_checkpoint = "latest"), says what this run
    trained, and the losses of both runs are an uninterrupted run's."""
    resumed = torchrun(data, out, *run_args(engine), nproc=2)
    assert f"resumed from {out / f'checkpoint-{step}'} at step {step}" in resumed.stdout
    assert f"trained {STEPS - step} steps ({step + 1}-{STEPS})" in resumed.stdout, resumed.stdout[-3000:]
    straight = torchrun(data, tmp_path / "straight", *run_args(engine), nproc=2)
    assert f"trained {STEPS} steps (1-{STEPS})" in straight.stdout
    expected = losses(tmp_path / "straight")
    assert sorted(expected) == list(range(1, STEPS + 1)) and expected[1] != expected[STEPS]
    assert losses(out) == expected


@pytest.mark.slow
@pytest.mark.parametrize(
    ("engine", "target"), [("ddp", 1), pytest.param("zero3", 0, marks=pytest.mark.heavy), ("fsdp", "agent")]
)
def test_sigterm_saves_and_the_resumed_run_repeats_an_uninterrupted_one(data, tmp_path, engine, target):
    out, log = tmp_path / "out", tmp_path / "log"
    if target == "agent":  # the launcher users run; exec keeps its pid for the agent
        cmd = ["bash", str(REPO / "launch" / "single_node.sh"), *base_args(data, out)[1:], *run_args(engine)]
        agent = start(cmd, log, env={"NPROC": "2", "PYTHON": sys.executable})
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "train.main"]
        agent = start([*cmd, *base_args(data, out), *run_args(engine)], log)
    try:
        wait_for(agent, log, f"step 2/{STEPS}")
        pid = agent.pid if target == "agent" else ranks_of(agent.pid)[target]
        os.kill(pid, signal.SIGTERM)
        code = agent.wait(timeout=300)
    finally:
        if agent.poll() is None:
            agent.kill()
    said = log.read_text()
    # Ranks stopped by a signal to themselves exit 0, and so does the agent; one the agent passed on ends
    # torchrun with 128 + its number (launch/torchrun.py, without torchrun's traceback).
    assert code == (128 + signal.SIGTERM if target == "agent" else 0), said[-6000:]
    step = check_stopped(said, out, "SIGTERM")
    resume_and_compare(data, tmp_path, out, engine, step)


@pytest.mark.slow
def test_ctrl_c_stops_a_plain_run_with_a_checkpoint_in_one_line(data, tmp_path):
    out, log = tmp_path / "out", tmp_path / "log"
    cmd = [sys.executable, "-m", "train.main", *base_args(data, out), *run_args("ddp"), "--dataloader_num_workers=1"]
    run = start(cmd, log)
    try:
        before = wait_for(run, log, f"step 2/{STEPS}")
        os.killpg(run.pid, signal.SIGINT)  # a terminal's Ctrl-C: the process and its DataLoader worker
        code = run.wait(timeout=300)
    finally:
        if run.poll() is None:
            run.kill()
    said = log.read_text()
    assert code == 0, said[-6000:]
    check_stopped(said, out, "SIGINT")
    # After the Ctrl-C: the steps finishing, the checkpoint's log line, and the one line that says so.
    after = [line for line in said[before:].splitlines() if line.strip()]
    other = [line for line in after if not line.startswith(("step ", "INFO train.checkpoint: saved", "stopped by"))]
    assert other == [] and sum(line.startswith("stopped by") for line in after) == 1, after
