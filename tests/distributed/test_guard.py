"""The job's hold on its processes and its output_dir (train/guard.py): ranks and DataLoader workers die
with the torchrun agent, even a SIGKILLed one; one job per output_dir, a second refused at once on
every rank naming the holder; stale locks taken over; the lock gone after clean, failed and SIGTERMed
runs."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ranks import descendants
from train_runs import REPO, base_args, data, torchrun

from train import guard
from train.checkpoint_verify import find_latest

__all__ = ["data"]  # a fixture


def write_lock(out: Path, pid: int, host: str | None = None) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / guard.LOCK_NAME
    info = {"host": host or socket.gethostname(), "pid": pid, "start_time": "2024-01-01T00:00:00+00:00", "command": "x"}
    path.write_text(json.dumps(info))
    return path


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])  # reaped at once: its pid names no process (reuse takes a while)
    proc.wait()
    return proc.pid


# --- the lock, in this process ------------------------------------------------------------------------


def test_a_held_lock_refuses_a_second_taker_naming_the_holder(tmp_path):
    lock = guard.take_output_dir_lock(tmp_path)
    info = json.loads((tmp_path / ".lock").read_text())
    assert info["host"] == socket.gethostname() and info["pid"] == os.getpid() and info["start_time"]
    with pytest.raises(ValueError, match=f"in use by another run: pid {os.getpid()} on host {socket.gethostname()}"):
        guard.take_output_dir_lock(tmp_path)  # the flock is held (as by another process)
    lock.release()
    assert not (tmp_path / ".lock").exists()
    guard.take_output_dir_lock(tmp_path).release()  # free again


def test_a_lock_naming_a_live_pid_is_refused_and_left_alone(tmp_path):
    path = write_lock(tmp_path, os.getpid())  # no flock held, but the pid lives: the holder may be real
    before = path.read_text()
    with pytest.raises(ValueError, match=f"pid {os.getpid()} on host .* started 2024-01-01"):
        guard.take_output_dir_lock(tmp_path)
    assert path.read_text() == before


@pytest.mark.slow
def test_a_stale_lock_is_taken_over_with_one_line(tmp_path, capsys):
    pid = dead_pid()
    write_lock(tmp_path, pid)
    lock = guard.take_output_dir_lock(tmp_path)
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    said = capsys.readouterr().out.splitlines()
    assert len(said) == 1 and "taking over the stale lock" in said[0] and f"pid {pid}" in said[0]
    lock.release()


@pytest.mark.slow
def test_a_lock_from_another_host_is_refused_with_how_to_remove_it(tmp_path):
    path = write_lock(tmp_path, dead_pid(), host="elsewhere-node-7")
    with pytest.raises(ValueError, match=f"host elsewhere-node-7.*cannot be checked.*delete {path}"):
        guard.take_output_dir_lock(tmp_path)
    assert path.exists()


def test_an_old_unreadable_lock_is_taken_over(tmp_path):
    path = tmp_path / ".lock"
    path.write_text("")  # a run that died between creating and writing it
    os.utime(path, (time.time() - 60, time.time() - 60))
    guard.take_output_dir_lock(tmp_path).release()
    assert not path.exists()


def test_only_the_taking_process_releases(tmp_path):
    lock = guard.take_output_dir_lock(tmp_path)
    lock.owner = -1  # as in a forked DataLoader worker that inherited it
    lock.release()
    assert (tmp_path / ".lock").exists()
    lock.owner = os.getpid()
    lock.release()
    assert not (tmp_path / ".lock").exists()


def test_hold_output_dir_keeps_a_lock_this_process_holds(tmp_path):
    guard.hold_output_dir(tmp_path / "new", rank=0)  # creates the folder
    guard.hold_output_dir(tmp_path / "new", rank=0)  # a second Trainer in the same process
    guard.hold_output_dir(tmp_path / "other", rank=1)  # not rank 0: takes nothing
    assert (tmp_path / "new" / ".lock").exists() and not (tmp_path / "other").exists()
    guard.release_output_dir()
    assert not (tmp_path / "new" / ".lock").exists()


# --- dying with the parent: a child that forks a grandchild, then exits ----------------------------------

ORPHAN = """
import os, sys, time
from train import guard
if sys.argv[1] == "watchdog":
    guard._set_parent_death_signal = lambda: False  # as where prctl is unavailable
parent = os.getpid()
pid = os.fork()
if pid == 0:
    if sys.argv[1] == "late":  # the parent is gone before the death signal is set: the check after it
        while os.getppid() == parent:
            time.sleep(0.01)
    guard.die_with_parent(parent)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)  # let go of the test's pipes, or it would wait for this process too
    os.dup2(null, 2)
    time.sleep(60)
    os._exit(0)
print(pid, flush=True)
time.sleep(1.0)  # the grandchild has set its death signal or started its watchdog
"""


def gone(pid: int, start: str | None = None) -> bool:
    """No such process, the pid reused by another process, or every thread of it dead (a zombie not yet
    reaped; the leader turns zombie before the other threads finish exiting and closing its files)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        if start is not None and stat[stat.rindex(")") + 2 :].split()[19] != start:
            return True
        states = []
        for task in Path(f"/proc/{pid}/task").iterdir():
            stat = (task / "stat").read_text()
            states.append(stat[stat.rindex(")") + 2])
    except OSError:
        return True
    return all(state in "ZX" for state in states)


def start_time(pid: int) -> str:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2 :].split()[19]


def wait_gone(pids: dict[int, str], limit: float) -> float:
    """Seconds until every pid is gone (pytest.fail after `limit`)."""
    t0 = time.monotonic()
    while not all(gone(pid, start) for pid, start in pids.items()):
        if time.monotonic() - t0 > limit:
            alive = [pid for pid, start in pids.items() if not gone(pid, start)]
            pytest.fail(f"still running {limit} s after their parent died: {alive}")
        time.sleep(0.02)
    return time.monotonic() - t0


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("how", ["prctl", "watchdog", "late"])
def test_a_child_dies_with_its_parent(how):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-c", ORPHAN, how]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    took = wait_gone({int(proc.stdout.split()[0]): None}, limit=3)
    print(f"{how}: the orphan died {took:.2f} s after its parent")


# --- real runs -------------------------------------------------------------------------------------------


def start_long_run(data: Path, out: Path, log: Path) -> subprocess.Popen:
    """A 2-rank run with one DataLoader worker per rank and far more steps than the test waits for,
    returned once its ranks have trained a few steps (the workers exist then)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "train.main"]
    cmd += [*base_args(data, out), "--dataloader_num_workers=1", "--max_train_steps=100000", "--log_every=1"]
    cmd += ["--checkpointing_steps=1000"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    with log.open("w") as sink:
        agent = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT)
    t0 = time.monotonic()
    while "step 3/" not in log.read_text():
        if agent.poll() is not None or time.monotonic() - t0 > 300:
            agent.kill()
            pytest.fail(f"the run did not get going:\n{log.read_text()[-5000:]}")
        time.sleep(0.1)
    return agent


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_killing_the_agent_ends_every_rank_and_worker_and_a_second_run_is_refused(data, tmp_path, capsys):
    out = tmp_path / "out"
    agent = start_long_run(data, out, tmp_path / "log")
    try:
        below = descendants(agent.pid)
        ranks = [pid for pid, ppid in below.items() if ppid == agent.pid]
        workers = [pid for pid, ppid in below.items() if ppid in ranks]
        assert len(ranks) == 2 and len(workers) >= 2, below
        holder = json.loads((out / ".lock").read_text())
        assert holder["pid"] in ranks and holder["agent_pid"] == agent.pid

        # A second job on the same folder, while the first trains: refused at once, on both ranks.
        config_before = (out / "config.toml").stat().st_mtime_ns
        t0 = time.monotonic()
        second = torchrun(data, out, "--max_train_steps=2", nproc=2, check=False)
        refused_in = time.monotonic() - t0
        said = second.stdout + second.stderr
        assert second.returncode != 0
        # The refusal is said once (local rank 0: main's "error: ...", no traceback); every rank exits.
        errors = [line for line in said.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1, said[-5000:]
        assert f"in use by another run: pid {holder['pid']} (torchrun agent pid {agent.pid})" in errors[0]
        assert f"host {holder['host']}, started {holder['start_time']}" in errors[0]
        assert (out / "config.toml").stat().st_mtime_ns == config_before  # it wrote nothing
        assert json.loads((out / ".lock").read_text()) == holder

        alive = {pid: start_time(pid) for pid in below}
        os.kill(agent.pid, signal.SIGKILL)
        agent.wait()
        took = wait_gone(alive, limit=10)
    finally:
        if agent.poll() is None:
            agent.kill()
    with capsys.disabled():
        print(f"\nsecond run refused in {refused_in:.1f} s; {len(ranks)} ranks and {len(workers)} workers gone "
              f"{took:.2f} s after the agent's SIGKILL")  # fmt: skip

    # The killed rank 0 left its lock behind: stale now (the pid is dead, its flock gone), so taken over.
    lock = guard.take_output_dir_lock(out)
    assert f"taking over the stale lock {out / '.lock'}" in capsys.readouterr().out
    lock.release()


@pytest.mark.slow
def test_sigterm_of_the_agent_releases_the_lock(data, tmp_path):
    out = tmp_path / "out"
    agent = start_long_run(data, out, tmp_path / "log")
    try:
        below = {pid: start_time(pid) for pid in descendants(agent.pid)}
        agent.send_signal(signal.SIGTERM)  # torchrun passes it on to its ranks
        agent.wait(timeout=60)
        wait_gone(below, limit=10)
    finally:
        if agent.poll() is None:
            agent.kill()
    assert (out / "config.toml").exists() and not (out / ".lock").exists()


@pytest.mark.slow
def test_a_stale_lock_is_taken_over_and_the_lock_is_gone_after_a_clean_run(data, tmp_path):
    pid = dead_pid()
    write_lock(tmp_path, pid)
    run = torchrun(data, tmp_path, "--max_train_steps=2", nproc=1)
    assert f"taking over the stale lock {tmp_path / '.lock'}: pid {pid}" in run.stdout
    assert find_latest(tmp_path).name == "checkpoint-2"
    assert not (tmp_path / ".lock").exists()


@pytest.mark.slow
def test_the_lock_is_gone_after_a_failed_run(data, tmp_path):
    # Every update overflows: the run stops with a RuntimeError (a traceback) at step 1 on both ranks.
    args = ["--max_train_steps=5", "--learning_rate=1e30", "--lr_warmup_steps=0", "--max_nonfinite_steps=1"]
    run = torchrun(data, tmp_path, *args, nproc=2, check=False)
    assert run.returncode != 0 and "non-finite" in run.stderr
    assert (tmp_path / "config.toml").exists() and not (tmp_path / ".lock").exists()
    # A setup error after the lock was taken (ValueError: exit 2 without a traceback) releases it too.
    run = torchrun(data, tmp_path, "--resume_from_checkpoint=checkpoint-9", nproc=1, check=False)
    assert run.returncode != 0 and "checkpoint-9 does not exist" in run.stderr
    assert not (tmp_path / ".lock").exists()
