"""Subprocess side of tests/distributed/test_engine_fp16.py: one rank of a 2-process gloo group training the debug
DiT in fp16 (loss scaling) with the ddp and fsdp engines.

    fp16_engine_worker.py OUT RANK PORT

Per engine: 4 steps where step 1 gets an inf gradient on rank 1 only (fsdp: in rank 1's own gradient
shard, after the reduce-scatter; ddp: a loss on rank 1 too large for the scale, so the all-reduce spreads
the inf), a save after step 2, a fresh engine resuming steps 3-4; the same in fp32 (skipping step 1
too, by its non-finite gradient norm) for comparison.
Writes OUT/rank{r}.json.
"""

from pathlib import Path

import torch
import torch.nn.functional as F
from fsdp_engine_worker import Weights, batch
from ranks import gloo_worker_main

from train.config import OptimConfig, ParallelConfig
from train.distributed import ParallelLayout
from train.engines import EngineSetup, build_engine
from train.engines.base import local_tensor
from train.models import DiTRecipe
from wan import dit_preset

STEPS = 4
INF_STEP = 1
SAVE_AT = 2
INF_PARAM = "blocks.0.ffn.0.weight"


def recipe() -> DiTRecipe:
    return DiTRecipe(dit_preset("debug"), Weights("", dit_preset("debug"), seed=42))


def setup(engine: str, precision: str) -> EngineSetup:
    optim = OptimConfig(learning_rate=1e-3, lr_scheduler="constant", max_grad_norm=0.1)
    return EngineSetup(
        ParallelConfig(engine=engine),
        optim,
        precision,
        1,
        1,
        STEPS,
        ParallelLayout.of_process_group(torch.device("cpu")),
    )


def trainable(engine) -> dict[str, torch.Tensor]:
    if hasattr(engine, "trainable_state"):
        return engine.trainable_state()
    return {n: p.detach().clone() for n, p in engine.named_trainable.items()}


def train(engine, name: str, steps, rank: int, inject: bool, save: Path | None = None) -> list[dict]:
    out = []
    for s in steps:
        x, t, context, target = batch(s, rank, 1)
        with engine.micro_step(True):
            loss = F.mse_loss(engine.forward(x, t, context).float(), target)
            overflow = inject and s == INF_STEP and rank == 1
            # fp16: finite, but past fp32 once multiplied by the loss scale; fp32 (no scaler): inf itself.
            huge = 1e35 if engine.scaler is not None else float("inf")
            engine.backward(loss * huge if overflow and name == "ddp" else loss)
        if overflow and name == "fsdp":
            local_tensor(dict(engine.module.named_parameters())[INF_PARAM].grad).view(-1)[0] = float("inf")
        before = trainable(engine) if s == INF_STEP else None
        result = engine.step()
        record = {"loss": loss.item(), **vars(result), "scale": engine.scaler.get_scale() if engine.scaler else None}
        if before is not None:
            after = trainable(engine)
            record["unchanged"] = all(torch.equal(before[n], after[n]) for n in before)
        out.append(record)
        if save is not None and s + 1 == SAVE_AT:
            record["files"] = engine.save(save)
    return out


def run(out: Path, rank: int) -> dict:
    res: dict = {}
    for name in ("ddp", "fsdp"):
        engine = build_engine(recipe(), setup(name, "fp16"))
        res[f"{name}_fp16"] = train(engine, name, range(STEPS), rank, inject=True, save=out / f"ckpt_{name}")
        final = trainable(engine)
        del engine
        resumed = build_engine(recipe(), setup(name, "fp16"))
        resumed.load(out / f"ckpt_{name}")
        res[f"{name}_loaded_scale"] = resumed.scaler.state_dict()
        res[f"{name}_resumed"] = train(resumed, name, range(SAVE_AT, STEPS), rank, inject=False)
        res[f"{name}_resume_bitwise"] = all(torch.equal(final[n], t) for n, t in trainable(resumed).items())
        del resumed
        engine = build_engine(recipe(), setup(name, "fp32"))
        res[f"{name}_fp32"] = train(engine, name, range(STEPS), rank, inject=True)  # the same skip
        del engine
    return res


if __name__ == "__main__":
    gloo_worker_main(run)
