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


def private_tmpfs(tmp_path: Path, size: str) -> tuple[Path, list[str]]:
    """A tmpfs of `size` (e.g. "200k") at tmp_path/mnt, mounted in a private mount namespace (unshare -rm)
    for one command: returns the mount point and the prefix to run that command under. Skips the test
    where user namespaces cannot mount (a real full disk needs no root this way)."""
    import pytest

    mnt = tmp_path / "mnt"
    mnt.mkdir()
    probe = subprocess.run(["unshare", "-rm", "mount", "-t", "tmpfs", "-o", "size=4k", "tmpfs", str(mnt)],
                           capture_output=True, text=True)  # fmt: skip
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a user namespace here: {probe.stderr.strip()}")
    script = f'mount -t tmpfs -o size={size} tmpfs "{mnt}" && exec "$@"'
    return mnt, ["unshare", "-rm", "sh", "-c", script, "sh"]


def outputs(procs: list[subprocess.Popen], tail: int = 3000) -> str:
    """Each rank's exit status and the tail of its output: a rank killed by a signal (a segfault in a
    library thread, the OOM killer) prints nothing itself."""
    return "\n".join(
        f"--- rank {r}: exit {p.returncode}\n" + getattr(p, "output", "")[-tail:] for r, p in enumerate(procs)
    )


def quick_exit() -> None:
    """Leave a worker without the interpreter's teardown once its results are on disk: destroying
    DeepSpeed's and gloo's background threads at exit aborts now and then on CPU ("terminate called
    without an active exception"), which would fail a test whose work succeeded."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def gloo_worker_main(run: Callable[[Path, int], dict]) -> None:
    """A 2-rank gloo worker's main (argv: out folder, rank, port): `run(out, rank)`'s dict, or the
    traceback under "error", goes to out/rank{r}.json, then the worker leaves (quick_exit)."""
    import json
    import traceback

    import torch
    import torch.distributed as dist

    out, rank, port = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)  # as the trainer does before any engine
    try:
        res = run(out, rank)
    except Exception:
        res = {"error": traceback.format_exc()}
    (out / f"rank{rank}.json").write_text(json.dumps(res, indent=1))
    if "error" in res:
        print(res["error"], file=sys.stderr)
        os._exit(1)  # a peer may be stuck in a collective: do not wait for it
    dist.barrier()
    dist.destroy_process_group()
    quick_exit()


def gloo_worker_results(worker: Path, out: Path, timeout: float = 600) -> list[dict]:
    """Run `worker` (a gloo_worker_main script) on 2 ranks; each rank's result dict, or a test failure
    showing the errors or the output."""
    import json

    import pytest

    port = str(free_port())
    procs = run_ranks(lambda r: [str(worker), str(out), str(r), port], timeout=timeout)
    results = [json.loads(p.read_text()) if (p := out / f"rank{r}.json").exists() else {} for r in (0, 1)]
    errors = [r["error"] for r in results if "error" in r]
    if [p.returncode for p in procs] != [0, 0] or errors:
        pytest.fail("\n".join(errors) or outputs(procs))
    return results


def descendants(root: int) -> dict[int, int]:
    """Every process below `root`: pid -> its parent's pid (from /proc/*/stat; psutil is not installed)."""
    parent = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parent[int(entry.name)] = int(stat[stat.rindex(")") + 2 :].split()[1])
    below, todo = {}, [root]
    while todo:
        p = todo.pop()
        for child, ppid in parent.items():
            if ppid == p and child not in below:
                below[child] = p
                todo.append(child)
    return below
