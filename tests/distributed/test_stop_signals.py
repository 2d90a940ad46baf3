"""How a process takes SIGINT and SIGTERM (train/guard.py's stop handlers), each case in a process of
its own: quiet during setup; once training, the first signal is a request the loop reads, a repeat of it
is the same request, and a later Ctrl-C exits at once, in one line, with the output_dir lock given back.
The messages a run ends with (train/main.py's trained_range)."""

import os
import signal
import subprocess
import sys

import pytest
from train_runs import REPO

SCRIPT = """
import os, signal, sys, time
from train import guard

case, out = sys.argv[1], sys.argv[2]
guard.hold_output_dir(out, rank=0)
guard.install_stop_handlers()

def send(signum, then=0.0):
    os.kill(os.getpid(), signum)  # its handler runs before the next line
    requested = guard.stop_requested()
    print("alive", requested.name if requested else None, flush=True)
    time.sleep(then)

if case == "setup":
    send(signal.SIGINT)
if case == "sigterm first":
    guard.stop_gracefully()
    send(signal.SIGTERM)
    send(signal.SIGTERM, then=guard.REPEAT_WINDOW_S + 0.2)  # from the scheduler and from torchrun
    send(signal.SIGTERM)  # a later repeat: still the same request
    send(signal.SIGINT)  # Ctrl-C
if case == "sigint first":
    guard.stop_gracefully()
    send(signal.SIGINT)
    send(signal.SIGINT, then=guard.REPEAT_WINDOW_S + 0.2)  # one Ctrl-C delivered twice
    send(signal.SIGTERM)  # torchrun's agent at a second Ctrl-C
time.sleep(10)
print("survived", flush=True)
"""


def run(case: str, tmp_path, rank: str = "0") -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "RANK": rank}
    cmd = [sys.executable, "-c", SCRIPT, case, str(tmp_path)]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.slow
def test_a_signal_during_setup_ends_the_process_quietly(tmp_path):
    proc = run("setup", tmp_path)
    assert proc.returncode == -signal.SIGINT, proc.stdout + proc.stderr
    assert proc.stdout == "" and proc.stderr == ""  # no traceback, no request kept
    assert not (tmp_path / ".lock").exists()


@pytest.mark.slow
def test_repeated_sigterms_are_one_request_and_a_ctrl_c_then_exits_at_once(tmp_path):
    proc = run("sigterm first", tmp_path)
    assert proc.returncode == -signal.SIGINT, proc.stdout + proc.stderr
    assert proc.stdout.splitlines() == ["alive SIGTERM"] * 3
    assert proc.stderr == "a second stop signal (SIGINT): exiting now, without a checkpoint\n"
    assert not (tmp_path / ".lock").exists()


@pytest.mark.slow
def test_a_second_ctrl_c_exits_at_once_and_one_delivered_twice_does_not(tmp_path):
    proc = run("sigint first", tmp_path, rank="1")
    assert proc.returncode == -signal.SIGTERM, proc.stdout + proc.stderr
    assert proc.stdout.splitlines() == ["alive SIGINT"] * 2
    assert proc.stderr == ""  # rank 0 speaks for the job
    assert not (tmp_path / ".lock").exists()


def test_trained_range_counts_this_runs_steps():
    from train.main import trained_range  # here: the other tests need no torch

    assert trained_range(50, 100) == "trained 50 steps (51-100)"
    assert trained_range(0, 100) == "trained 100 steps (1-100)"
    assert trained_range(7, 8) == "trained 1 step (8)"
    assert trained_range(100, 100) == "trained no step"
