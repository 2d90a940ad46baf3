"""Subprocess side of tests/test_checkpoint.py: saves checkpoints in a process of its own, so that a
test can SIGKILL it mid-save or run several ranks over gloo.

    checkpoint_worker.py save OUTPUT_DIR STEP [STEP ...]      one process, saves each step in turn
    checkpoint_worker.py dist OUTPUT_DIR RANK WORLD_SIZE PORT  one rank of a gloo group on 127.0.0.1
"""

import json
import random
import sys

import torch

from train.checkpoint import capture_rng_state, load_checkpoint, save_checkpoint


def parts(step: int) -> dict:
    """The shared parts of checkpoint `step`, equal in every process that builds them."""
    g = torch.Generator().manual_seed(step)
    return {
        "model_tensors": {
            "blocks.0.weight": torch.randn(64, 64, generator=g),
            "head.bias": torch.randn(64, generator=g),
        },
        "scheduler_state": {"last_epoch": step, "base_lrs": [1e-4]},
        "sampler_state": {"epoch": 0, "consumed": step},
        "trainer_state": {"epoch": 0, "tag": f"step {step}"},
        "config_text": f"[train]\nstep = {step}\n",
    }


def save(output_dir: str, steps: list[int]) -> None:
    for step in steps:
        save_checkpoint(
            output_dir, step, rank=0, world_size=1, barrier=lambda: None, rng_state=capture_rng_state(), **parts(step)
        )


def dist_rank(output_dir: str, rank: int, world_size: int, port: int) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    random.seed(rank)
    torch.manual_seed(rank)
    for step in (1, 2):
        rng = capture_rng_state()
        path = save_checkpoint(
            output_dir,
            step,
            rank=rank,
            world_size=world_size,
            barrier=dist.barrier,
            rng_state=rng,
            total_limit=1,
            **parts(step),
        )
        loaded = load_checkpoint(path, rank)
        assert loaded.rng_state == json.loads(json.dumps(rng)), f"rank {rank}: RNG state differs after loading"
        random.random()  # the next save holds another state
    dist.barrier()
    dist.destroy_process_group()
    print(f"rank {rank} ok")


if __name__ == "__main__":
    mode, out, *rest = sys.argv[1:]
    if mode == "save":
        save(out, [int(s) for s in rest])
    elif mode == "dist":
        dist_rank(out, *map(int, rest))
    else:
        raise SystemExit(f"unknown mode {mode!r}")
