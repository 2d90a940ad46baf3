"""Fault-injection soak: a 2-rank run killed at random (SIGKILL of a rank, a DataLoader worker, the
torchrun agent, or a rank in the middle of a save) and restarted with resume_from_checkpoint = "latest"
until it has trained every step; then compared with an uninterrupted run.

    python bench/soak.py [--kills 30] [--steps 40] [--engine ddp] [--seed 0]

Prints a table: kills by target, and the three numbers that must be 0: lost runs (a restart that
could not continue), checkpoints marked complete that do not verify, and steps whose loss differs from
the uninterrupted run's (compared exactly: CPU runs resume bit for bit).
"""

import argparse
import logging
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tools.make_demo_data import make_demo_data  # noqa: E402
from train.checkpoint import KILL_ENV  # noqa: E402
from train.engines import DEFAULT_ENGINE  # noqa: E402

TARGETS = ("rank", "worker", "agent", "save")


def children(pid: int) -> list[int]:
    """Direct children of pid, from /proc (no psutil)."""
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        for child in children(todo.pop()):
            found.append(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def command(out: Path, data: Path, steps: int, engine: str) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "train.main",
        "--cfg", str(REPO / "configs" / "debug.toml"), f"--train_data_dir={data}",
        f"--train_data_meta={data / 'metadata.json'}", f"--output_dir={out}", "--mixed_precision=fp32",
        "--progress_bar=false", "--dataloader_num_workers=1", f"--max_train_steps={steps}", "--checkpointing_steps=4",
        "--checkpoints_total_limit=3", f"--engine={engine}", "--stage3_param_persistence_threshold=0",
    ]  # fmt: skip


def losses(out: Path) -> dict[int, float]:
    # Restarts rewrite the steps after their checkpoint; TensorBoard keeps the newest and says so per file.
    logging.getLogger("tensorboard").setLevel(logging.ERROR)
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return {e.step: e.value for e in events.Scalars("train/loss")}


def verify_all(out: Path) -> int:
    """Checkpoints whose COMPLETE marker exists but which do not verify."""
    bad = 0
    for folder in sorted(out.glob("checkpoint-*")):
        if folder.suffix or not (folder / "COMPLETE").exists():
            continue
        proc = subprocess.run([sys.executable, "-m", "train.checkpoint", "verify", str(folder)], cwd=REPO,
                              capture_output=True, text=True)  # fmt: skip
        bad += proc.returncode != 0
    return bad


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kills", type=int, default=30)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--engine", default=DEFAULT_ENGINE)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--start_s", type=float, default=5.0, help="seconds a restart takes to start training")
    parser.add_argument("--window_s", type=float, default=10.0, help="kills land in [start_s, start_s + window_s]")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="soak-"))
    data = root / "data"
    make_demo_data(data)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}

    t0 = time.monotonic()
    reference = subprocess.run(command(root / "reference", data, args.steps, args.engine), cwd=REPO, env=env,
                               capture_output=True, text=True)  # fmt: skip
    assert reference.returncode == 0, reference.stdout[-3000:] + reference.stderr[-3000:]
    reference_s = time.monotonic() - t0

    kills: Counter[str] = Counter()
    lost = restarts = not_verified = orphans = differ = compared = finished = 0
    out = root / "soak-0"
    want = losses(root / "reference")
    while True:
        target = rng.choice(TARGETS) if sum(kills.values()) < args.kills else None
        run_env = dict(env)
        if target == "save":  # a rank dies mid-save at a checkpoint this run has not reached yet
            done = max([int(c.name.split("-")[1]) for c in out.glob("checkpoint-*") if not c.suffix] or [0])
            ahead = [s for s in range(4, args.steps + 1, 4) if s > done]
            if ahead:
                run_env[KILL_ENV] = str(rng.choice(ahead))
            else:
                target = "rank"
        proc = subprocess.Popen(command(out, data, args.steps, args.engine), cwd=REPO, env=run_env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
        restarts += 1
        disturbed = target == "save"
        if target in ("rank", "worker", "agent"):
            time.sleep(rng.uniform(args.start_s, args.start_s + args.window_s))  # in training or a save
            ranks = children(proc.pid)
            victims = {"agent": [proc.pid], "rank": ranks, "worker": [w for r in ranks for w in children(r)]}[target]
            if victims and proc.poll() is None:
                family = descendants(proc.pid)
                os.kill(rng.choice(victims), signal.SIGKILL)
                kills[target] += 1
                disturbed = True
                if target == "agent":  # its ranks and workers must follow it within 10 s
                    deadline = time.monotonic() + 10
                    while time.monotonic() < deadline and any(alive(p) for p in family):
                        time.sleep(0.2)
                    left = [p for p in family if alive(p)]
                    orphans += len(left)
                    for p in left:
                        os.kill(p, signal.SIGKILL)
        try:
            output, _ = proc.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
        if target == "save" and proc.returncode != 0:
            kills["save"] += 1
        not_verified += verify_all(out)
        print(f"restart {restarts}: target {target}, {'killed' if disturbed else 'not killed'}, exit {proc.returncode}",
              file=sys.stderr, flush=True)  # fmt: skip
        if proc.returncode == 0:
            got = losses(out)
            if set(got) == set(want):  # a finished run: every step compared with the uninterrupted one
                differ += sum(got[step] != loss for step, loss in want.items())
                compared += len(want)
                finished += 1
                if sum(kills.values()) >= args.kills:
                    break
                out = root / f"soak-{finished}"
        elif not disturbed:
            lost += 1  # a restart nobody killed failed: the run could not continue
            print(output[-3000:])
            break
    total = sum(kills.values())
    print(
        f"\n{args.engine}, 2 ranks, {args.steps} steps, checkpoint every 4 (keep 3); uninterrupted run {reference_s:.0f} s"
    )
    print(
        "\n| kills | rank | worker | agent | mid-save | restarts | runs finished | lost runs "
        "| complete but not verifying | processes left 10 s after an agent kill | steps with another loss |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {total} | {kills['rank']} | {kills['worker']} | {kills['agent']} | {kills['save']} | {restarts} | "
          f"{finished} | {lost} | {not_verified} | {orphans} | {differ} of {compared} |")  # fmt: skip


if __name__ == "__main__":
    main()
