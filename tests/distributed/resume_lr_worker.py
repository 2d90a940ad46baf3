"""Subprocess side of tests/distributed/test_resume_changes.py: one rank of a 2-process gloo group. For each engine
(ddp, zero2, zero3, fsdp) it trains the debug DiT one AdamW step at LR (two param groups: LR and LR/2,
as param_groups_worker.py sets them up), saves, then loads that checkpoint into two fresh engines, one
built with LR and one with NEW_LR, and takes the same second step on both.

    resume_lr_worker.py OUT RANK PORT

Writes OUT/rank{r}.json (per engine: the loaded engine's param groups and schedule, each resumed
step's result); rank 0 writes OUT/{engine}_{step1,old,new}.safetensors (the trainable weights).
"""

import dataclasses
from pathlib import Path

import torch.distributed as dist
from param_groups_worker import ENGINES, LR, recipe, setup, step, trainable
from ranks import gloo_worker_main

from train.checkpoint_io import write_safetensors
from train.engines import build_engine

NEW_LR = LR / 2
# Also changed on resume: the AdamW values come from the config, not from the checkpoint.
NEW_WEIGHT_DECAY = 0.05


def new_setup(name: str):
    base = setup(name)
    optim = dataclasses.replace(base.optim, learning_rate=NEW_LR, adam_weight_decay=NEW_WEIGHT_DECAY)
    return dataclasses.replace(base, optim=optim)


def schedule(engine) -> dict:
    optimizer = getattr(engine, "torch_optimizer", None) or engine.optimizer  # ZeRO steps the torch AdamW's groups
    groups = [{k: g[k] for k in ("lr", "initial_lr", "weight_decay")} for g in optimizer.param_groups]
    return {"groups": groups, "base_lrs": list(engine.scheduler.base_lrs), "last_lr": engine.scheduler.get_last_lr()}


def run(out: Path, rank: int) -> dict:
    res: dict = {}
    for name in ENGINES:
        engine = build_engine(recipe(), setup(name))
        entry: dict = {"step1": step(engine, 0, rank)}
        weights = {"step1": trainable(engine)}
        engine.save(out / f"ckpt_{name}")
        dist.barrier()
        del engine
        for key, engine_setup in (("old", setup(name)), ("new", new_setup(name))):
            fresh = build_engine(recipe(), engine_setup)
            fresh.load(out / f"ckpt_{name}")
            entry[f"loaded_{key}"] = schedule(fresh)
            entry[f"resumed_{key}"] = step(fresh, 1, rank)
            entry[f"after_{key}"] = schedule(fresh)
            weights[key] = trainable(fresh)
            del fresh
        if rank == 0:
            for key, tensors in weights.items():
                write_safetensors(out / f"{name}_{key}.safetensors", tensors, {"format": "pt"})
        res[name] = entry
    return res


if __name__ == "__main__":
    gloo_worker_main(run)
