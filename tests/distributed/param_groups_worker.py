"""Subprocess side of tests/distributed/test_engine_param_groups.py: one rank of a 2-process gloo group. For each
engine (ddp, zero2, zero3, fsdp) it trains the debug DiT one AdamW step with trainable_modules and
trainable_modules_low_learning_rate set, saves, loads into a fresh engine and takes one more step on
both; it writes the weights and what the optimizers held for the test to compare.

    param_groups_worker.py OUT RANK PORT

Writes OUT/rank{r}.json; rank 0 writes OUT/{engine}_step1.safetensors, OUT/{engine}_step2.safetensors
and OUT/{engine}_resumed.safetensors (the trainable float32 weights).
"""

from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from fsdp_engine_worker import Weights, batch
from ranks import gloo_worker_main

from train.checkpoint_io import write_safetensors
from train.config import OptimConfig, ParallelConfig
from train.distributed import ParallelLayout
from train.engines import EngineSetup, build_engine
from train.models import DiTRecipe
from wan import dit_preset

ENGINES = ("ddp", "zero2", "zero3", "fsdp")
LR = 1e-3
TRAINABLE = ["blocks.0.", "head"]
LOW_LR = ["blocks.1.", "head.head"]  # head.head.* matches both lists: full lr (the first list wins)


def recipe() -> DiTRecipe:
    config = dit_preset("debug")
    return DiTRecipe(
        config, Weights("", config, seed=42), trainable_modules=TRAINABLE, trainable_modules_low_learning_rate=LOW_LR
    )


def setup(engine: str) -> EngineSetup:
    parallel = ParallelConfig(
        engine=engine,
        reduce_bucket_size=200_000,
        allgather_bucket_size=200_000,
        stage3_prefetch_bucket_size=200_000,
        stage3_param_persistence_threshold=0,  # tiny parameters would otherwise never be partitioned
    )
    # linear decay over 10 steps from step 0: the first update at the full lr, the lr moving after it (so
    # that a resume has a schedule to restore); no clipping, so the reference needs none.
    optim = OptimConfig(learning_rate=LR, lr_scheduler="linear", lr_warmup_steps=0, max_grad_norm=0.0)
    return EngineSetup(
        parallel, optim, "fp32", 1, 1, total_steps=10, layout=ParallelLayout.of_process_group(torch.device("cpu"))
    )


def step(engine, step: int, rank: int) -> dict:
    x, t, context, target = batch(step, rank, 1)
    with engine.micro_step(True):
        loss = F.mse_loss(engine.forward(x, t, context), target)
        engine.backward(loss)
    return {"loss": loss.item(), **vars(engine.step())}


def trainable(engine) -> dict[str, torch.Tensor]:
    if hasattr(engine, "trainable_state"):  # zero2, zero3, fsdp: collective
        return engine.trainable_state()
    return {n: p.detach().clone() for n, p in engine.named_trainable.items()}


def groups(engine) -> list[dict]:
    """Each param group's lr and (ddp, fsdp) parameter names, by identity with the module's parameters.
    ZeRO replaces the params of the torch optimizer's groups by its flat fp32 partitions: no names."""
    if hasattr(engine, "torch_optimizer"):
        return [{"lr": g["lr"], "names": None} for g in engine.torch_optimizer.param_groups]
    names = {id(p): n for n, p in engine.module.named_parameters()}
    return [{"lr": g["lr"], "names": sorted(names[id(p)] for p in g["params"])} for g in engine.optimizer.param_groups]


def run(out: Path, rank: int) -> dict:
    res: dict = {}
    for name in ENGINES:
        engine = build_engine(recipe(), setup(name))
        entry: dict = {"groups_before": groups(engine)}
        entry["step1"] = step(engine, 0, rank)
        entry["groups_after"] = groups(engine)
        weights = {"step1": trainable(engine)}
        engine.save(out / f"ckpt_{name}")
        dist.barrier()
        entry["step2"] = step(engine, 1, rank)
        weights["step2"] = trainable(engine)
        del engine

        fresh = build_engine(recipe(), setup(name))
        fresh.load(out / f"ckpt_{name}")
        entry["groups_loaded"] = groups(fresh)
        entry["resumed"] = step(fresh, 1, rank)
        weights["resumed"] = trainable(fresh)
        del fresh
        if rank == 0:
            for key, tensors in weights.items():
                write_safetensors(out / f"{name}_{key}.safetensors", tensors, {"format": "pt"})
        res[name] = entry
    return res


if __name__ == "__main__":
    gloo_worker_main(run)
