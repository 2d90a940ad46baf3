"""Real processes for the multi-process tests: gloo ranks of a worker script on 127.0.0.1, and how
those workers end."""

import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(args: Callable[[int], list[str]], world_size: int = 2, timeout: float = 300) -> list[subprocess.Popen]:
    """Run `python *args(rank)` once per rank, concurrently (OMP_NUM_THREADS=1, the repo and tests/ on
    the path); returns the finished processes with `output` (stdout and stderr) set on each. A process
    still running at the timeout is killed, and so are the others."""
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}", "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, *args(r)], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for r in range(world_size)
    ]
    try:
        for p in procs:
            p.output = p.communicate(timeout=timeout)[0]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return procs


def outputs(procs: list[subprocess.Popen], tail: int = 3000) -> str:
    return "\n".join(getattr(p, "output", "")[-tail:] for p in procs)


def quick_exit() -> None:
    """Leave a worker without the interpreter's teardown once its results are on disk: destroying
    DeepSpeed's and gloo's background threads at exit aborts now and then on CPU ("terminate called
    without an active exception"), which would fail a test whose work succeeded."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
