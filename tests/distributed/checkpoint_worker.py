"""Subprocess side of tests/distributed/test_checkpoint.py: saves checkpoints in a process of its own, so that a
test can SIGKILL it mid-save or run several ranks over gloo.

    checkpoint_worker.py save OUTPUT_DIR STEP [STEP ...]      one process, saves each step in turn
    checkpoint_worker.py dist OUTPUT_DIR RANK WORLD_SIZE PORT  one rank of a gloo group on 127.0.0.1
    checkpoint_worker.py full OUTPUT_DIR                       saves step 1, then a step 2 too big for the
                                                               disk (or file size limit); prints a JSON report
"""

import json
import random
import sys
from pathlib import Path

import torch

from train.checkpoint import Checkpointer, install_test_hooks_from_env
from train.checkpoint_io import read_safetensors, write_safetensors
from train.rng import RNGState


class Value:
    """A JSON checkpoint part holding a plain value."""

    def __init__(self, value=None):
        self.value = value

    def state_dict(self):
        return self.value

    def load_state_dict(self, state) -> None:
        self.value = state


class RankFiles:
    """A file part like an engine's: each rank writes its own shard, `shards/rank_{r}.safetensors`."""

    def __init__(self, rank: int, tensors: dict[str, torch.Tensor] | None = None):
        self.rank, self.tensors = rank, tensors

    def save(self, folder: Path) -> list[str]:
        name = f"shards/rank_{self.rank}.safetensors"
        write_safetensors(folder / name, self.tensors, {"format": "pt"})
        return [name]

    def load(self, folder: Path) -> None:
        self.tensors = read_safetensors(folder / f"shards/rank_{self.rank}.safetensors")[0]


def shard(step: int, rank: int) -> dict[str, torch.Tensor]:
    """Rank `rank`'s tensors of checkpoint `step`, equal in every process that builds them."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    return {"blocks.0.weight": torch.randn(64, 64, generator=g), "head.bias": torch.randn(64, generator=g)}


def trainer_state(step: int) -> dict:
    return {"step": step, "epoch": 0, "tag": f"step {step}"}


def build(output_dir: str, rank: int, world_size: int, step: int, total_limit: int = 0):
    checkpointer = Checkpointer(
        output_dir, rank=rank, world_size=world_size, total_limit=total_limit,
        config_text=f"[train]\nstep = {step}\n", marker_info={"engine": "test"},
    )  # fmt: skip
    parts = {"files": RankFiles(rank, shard(step, rank)), "trainer_state": Value(trainer_state(step))}
    checkpointer.register_files("engine", parts["files"])
    checkpointer.register("trainer_state", parts["trainer_state"])
    checkpointer.register("rng", RNGState(), per_rank=True)
    return checkpointer, parts


def save(output_dir: str, steps: list[int]) -> None:
    for step in steps:
        build(output_dir, 0, 1, step)[0].save(step)


def dist_rank(output_dir: str, rank: int, world_size: int, port: int) -> None:
    import torch.distributed as dist

    from train.rng import capture_rng_state

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    random.seed(rank)
    torch.manual_seed(rank)
    for step in (1, 2):
        rng = json.loads(json.dumps(capture_rng_state()))
        checkpointer, _ = build(output_dir, rank, world_size, step, total_limit=1)
        path = checkpointer.save(step)
        random.random()  # the state moves on
        fresh, parts = build(output_dir, rank, world_size, 0)
        fresh.load(path)
        assert capture_rng_state() == rng, f"rank {rank}: RNG state differs after loading"
        assert all(torch.equal(parts["files"].tensors[k], v) for k, v in shard(step, rank).items())
        assert parts["trainer_state"].value == trainer_state(step)
    dist.barrier()
    dist.destroy_process_group()
    print(f"rank {rank} ok")


def full(output_dir: str) -> None:
    """Step 1 fits; step 2 carries a 1 MiB tensor that does not. Reports, as JSON on stdout, the error
    and what the failed save left: what a test outside a mount namespace cannot look at afterwards."""
    import shutil

    from train.checkpoint_verify import checkpoint_problems, find_latest

    out = Path(output_dir)
    build(output_dir, 0, 1, 1)[0].save(1)
    free_before = shutil.disk_usage(out).free
    checkpointer, _ = build(output_dir, 0, 1, 2)
    checkpointer.register_files("big", BigFile())
    report: dict = {"free_before": free_before}
    try:
        checkpointer.save(2)
        report["error"] = None
    except OSError as err:
        report.update(error=str(err), errno=err.errno, type=type(err).__name__)
    report["free_after"] = shutil.disk_usage(out).free
    report["files"] = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    report["problems_1"] = checkpoint_problems(out / "checkpoint-1")
    latest = find_latest(out)
    report["latest"] = latest.name if latest else None
    # Nothing of the failed save holds room: step 2 at its usual size saves now.
    build(output_dir, 0, 1, 2)[0].save(2)
    report["after_retry"] = sorted(p.name for p in out.iterdir())
    print(json.dumps(report))


class BigFile:
    def save(self, folder: Path) -> list[str]:
        write_safetensors(folder / "big.safetensors", {"x": torch.ones(512, 512)}, {"format": "pt"})
        return ["big.safetensors"]

    def load(self, folder: Path) -> None:
        pass


if __name__ == "__main__":
    install_test_hooks_from_env()  # as train.main does: the test's SIGKILL switch
    mode, out, *rest = sys.argv[1:]
    if mode == "save":
        save(out, [int(s) for s in rest])
    elif mode == "dist":
        dist_rank(out, *map(int, rest))
    elif mode == "full":
        full(out)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
