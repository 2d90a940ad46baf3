"""Subprocess side of tests/distributed/test_engine_fsdp.py: trains the debug DiT with FSDPEngine and DDPEngine on
seeded synthetic batches and writes what the tests compare.

    fsdp_engine_worker.py two OUT RANK PORT   one rank of a 2-rank gloo group: every 2-rank scenario
    fsdp_engine_worker.py one OUT             one process, no process group of its own: resumes the
                                              2-rank checkpoint OUT/ckpt-3, the refusals

Each process writes OUT/{mode}_rank{r}.json (losses, norms, flags, byte counts, errors) and rank 0
writes full weights as OUT/{run}.safetensors.
"""

import json
import math
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from ranks import quick_exit

from train.checkpoint_io import write_safetensors
from train.config import OptimConfig, ParallelConfig
from train.distributed import ParallelLayout
from train.engines import EngineSetup
from train.engines.ddp import DDPEngine
from train.engines.fsdp import FSDPEngine
from train.models import DiTRecipe, DiTWeights
from wan import dit_preset
from wan.modules.checkpointing import ActivationCheckpointing

STEPS = 6
SAVE_AT = 3
SUBSET = ["blocks.1", "head"]


class Weights(DiTWeights):
    """The debug preset's seeded random init, but with a random head: the released init zeroes
    head.head.weight, which makes the first prediction 0 and every other gradient of the first step
    0, so that losses would not tell engines apart."""

    def read(self, name: str) -> torch.Tensor:
        tensor = super().read(name)
        if name == "head.head.weight":
            tensor = torch.randn(tensor.shape, generator=torch.Generator().manual_seed(7)) * 0.05
        return tensor


def recipe(trainable: list[str] | None = None, checkpointing: bool = False) -> DiTRecipe:
    return DiTRecipe(
        config=dit_preset("debug"),
        weights=Weights("", dit_preset("debug"), seed=42),
        trainable_modules=trainable or ["."],
        checkpoint_policy=ActivationCheckpointing("full" if checkpointing else "none"),
    )


def setup(
    micro_batch: int = 1,
    accumulation: int = 1,
    precision: str = "fp32",
    max_grad_norm: float = 0.1,
    **parallel,
) -> EngineSetup:
    # lr 1e-3 so that six steps move the weights visibly; cosine so that the schedule's state matters
    # on resume; max_grad_norm 0.1 is below the norms of these runs: clipping acts.
    optim = OptimConfig(learning_rate=1e-3, lr_scheduler="cosine", max_grad_norm=max_grad_norm)
    return EngineSetup(
        ParallelConfig(engine="fsdp", **parallel),
        optim,
        precision,
        micro_batch,
        accumulation,
        STEPS,
        ParallelLayout.of_process_group(torch.device("cpu")),
    )


def sample(step: int, index: int) -> tuple[torch.Tensor, ...]:
    """Sample `index` of the global batch of `step`: the same on every rank and world size."""
    g = torch.Generator().manual_seed(10_000 * step + index)
    x = torch.randn(1, 16, 3, 8, 8, generator=g)
    t = torch.randint(0, 1000, (1,), generator=g).float()
    context = torch.randn(1, 8, 64, generator=g)
    target = torch.randn(1, 16, 3, 8, 8, generator=g)
    return x, t, context, target


def batch(step: int, first: int, size: int) -> tuple[torch.Tensor, ...]:
    parts = [sample(step, i) for i in range(first, first + size)]
    return tuple(torch.cat(p) for p in zip(*parts, strict=True))


def train(engine, steps, rank: int, micro_batch: int = 1, accumulation: int = 1, nan_at=None, save=None) -> list[dict]:
    """Steps over the global batch: rank r's micro-step m takes samples from (r * accumulation + m) *
    micro_batch on. The recorded loss is the mean of this rank's micro-step losses."""
    out = []
    for step in steps:
        losses = []
        for m in range(accumulation):
            x, t, context, target = batch(step, (rank * accumulation + m) * micro_batch, micro_batch)
            if nan_at == (step, rank):
                x[0, 0, 0, 0, 0] = math.nan
            with engine.micro_step(m == accumulation - 1):
                loss = F.mse_loss(engine.forward(x, t, context), target)
                engine.backward(loss)
            losses.append(loss.item())
        result = engine.step()
        out.append(
            {
                "loss": sum(losses) / len(losses),
                "grad_norm": result.grad_norm,
                "updated": result.updated,
                "lr": result.lr,
            }
        )
        if save is not None and step + 1 == save[0]:
            out[-1]["files"] = engine.save(save[1])
    return out


def write_weights(engine, path: Path, rank: int) -> None:
    state = dict(engine.full_state())  # collective: every rank iterates
    if rank == 0:
        write_safetensors(path, state, {"format": "pt"})


def two(out: Path, rank: int, port: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    res: dict = {}
    steps = range(STEPS)

    # (a) parity with DDP, all trainable (clipping acts), then a subset (max_grad_norm 0: no clipping).
    for name, engine_cls, trainable, norm in [
        ("ddp_full", DDPEngine, None, 0.1),
        ("fsdp_full", FSDPEngine, None, 0.1),
        ("ddp_sub", DDPEngine, SUBSET, 0.0),
        ("fsdp_sub", FSDPEngine, SUBSET, 0.0),
    ]:
        engine = engine_cls(recipe(trainable), setup(max_grad_norm=norm))
        save = (
            (SAVE_AT, out / "ckpt-3")
            if name == "fsdp_full"
            else (STEPS, out / "ckpt-sub")
            if name == "fsdp_sub"
            else None
        )
        res[name] = train(engine, steps, rank, save=save)
        write_weights(engine, out / f"{name}.safetensors", rank)
        if name.startswith("fsdp"):
            res[name + "_bytes"] = engine.model_state_bytes()
            res[name + "_trainable"] = sorted(engine.trainable_state())
        del engine

    # (b) a fresh engine loads the step-3 checkpoint and continues.
    engine = FSDPEngine(recipe(), setup())
    engine.load(out / "ckpt-3")
    res["fsdp_resumed"] = train(engine, range(SAVE_AT, STEPS), rank)
    write_weights(engine, out / "fsdp_resumed.safetensors", rank)
    del engine

    # Gradient checkpointing, no resharding after forward, CPU offload: none may change a number.
    engine = FSDPEngine(recipe(checkpointing=True), setup(reshard_after_forward=False, offload_param=True))
    res["fsdp_variants"] = train(engine, steps, rank)
    write_weights(engine, out / "fsdp_variants.safetensors", rank)
    del engine

    # Accumulation 2 x micro-batch 1 (both reduce modes) against micro-batch 2, three steps each.
    for name, kwargs in [
        ("acc_every", dict(micro_batch=1, accumulation=2)),
        ("acc_last", dict(micro_batch=1, accumulation=2, reduce_every_micro_step=False)),
        ("batch2", dict(micro_batch=2, accumulation=1)),
    ]:
        engine = FSDPEngine(recipe(), setup(**kwargs))
        res[name] = train(engine, range(3), rank, kwargs["micro_batch"], kwargs["accumulation"])
        write_weights(engine, out / f"{name}.safetensors", rank)
        del engine

    # (d) a NaN input on rank 1 at step 1: no update anywhere, then training goes on.
    engine = FSDPEngine(recipe(), setup())
    res["nan"] = train(engine, range(1), rank)
    before = engine.trainable_state()
    res["nan"] += train(engine, range(1, 2), rank, nan_at=(1, 1))
    after = engine.trainable_state()
    res["nan_unchanged"] = all(torch.equal(before[n], after[n]) for n in before)
    res["nan"] += train(engine, range(2, 3), rank)
    res["nan_changed_after"] = not all(torch.equal(after[n], t) for n, t in engine.trainable_state().items())
    del engine

    # (g) bf16 mixed precision, FSDP and DDP.
    for name, engine_cls in [("fsdp_bf16", FSDPEngine), ("ddp_bf16", DDPEngine)]:
        engine = engine_cls(recipe(), setup(precision="bf16"))
        res[name] = train(engine, steps, rank)
        if name == "fsdp_bf16":
            res["fsdp_bf16_param_dtype"] = str(next(engine.module.parameters()).dtype)
        del engine

    (out / f"two_rank{rank}.json").write_text(json.dumps(res, indent=1))
    dist.barrier()
    dist.destroy_process_group()
    quick_exit()


def one(out: Path) -> None:
    """One process, no process group: the engine makes its own 1-rank group."""
    res: dict = {}
    # (c) global batch kept: one rank, micro-batch 2 = the 2-rank run's two samples per step.
    engine = FSDPEngine(recipe(), setup(micro_batch=2))
    res["owns_group"] = engine.owns_process_group

    # (e) refusals, before anything is read: a missing shard file, a checkpoint of other trainables.
    shutil.copytree(out / "ckpt-3", out / "missing")
    (out / "missing" / "dcp" / "__1_0.distcp").unlink()
    for name, folder in [("missing_error", out / "missing"), ("subset_error", out / "ckpt-sub")]:
        try:
            engine.load(folder)
            res[name] = None
        except ValueError as err:
            res[name] = str(err)
    res["optimizer_state_after_refusals"] = len(engine.optimizer.state)

    # Saved before the first update: no AdamW state is invented, the weights are untouched.
    before = engine.trainable_state()
    engine.save(out / "unstepped")
    res["unstepped"] = {
        "state_after_save": len(engine.optimizer.state),
        "weights_unchanged": all(torch.equal(before[n], t) for n, t in engine.trainable_state().items()),
        "fsdp.json": json.loads((out / "unstepped" / "fsdp.json").read_text()),
    }
    engine.load(out / "unstepped")
    res["unstepped"]["state_after_load"] = len(engine.optimizer.state)

    engine.load(out / "ckpt-3")
    res["resumed"] = train(engine, range(SAVE_AT, STEPS), 0, micro_batch=2)
    write_weights(engine, out / "one_resumed.safetensors", 0)
    (out / "one_rank0.json").write_text(json.dumps(res, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    mode, folder, *rest = sys.argv[1:]
    if mode == "two":
        two(Path(folder), int(rest[0]), int(rest[1]))
    elif mode == "one":
        one(Path(folder))
    else:
        raise SystemExit(f"unknown mode {mode!r}")
