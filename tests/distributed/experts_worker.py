"""Subprocess side of tests/distributed/test_experts_training.py: one rank of a 2-process gloo group.
For each engine it builds, through train.setup.build_training as train.main does, a joint Wan2.2
A14B run (both debug experts) and the two single-expert runs ([experts] train_experts = ["high"],
["low"]), and feeds them the same draws: the joint run every step of its plan (the step's expert drawn
from (seed, step)), each single run the steps of its expert, in order. It records every step's loss
and lr and, on rank 0, each expert's final weights. It also measures the model-state bytes a rank holds
in a joint bf16 run of a mid-size expert pair under zero3 and fsdp, beside train.plan's.

    experts_worker.py OUT RANK PORT

Writes OUT/rank{r}.json and (rank 0) OUT/{engine}_{run}_{expert}.safetensors.
"""

import dataclasses
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from ranks import gloo_worker_main

from train.checkpoint_io import write_safetensors
from train.config import RunConfig
from train.distributed import ParallelLayout
from train.experts import ExpertPlan
from train.flow import FlowMatching
from train.models import model_boundary
from train.plan import dit_config, model_state_bytes, param_counts
from train.setup import build_training
from wan import WanModel, dit_preset
from wan.modules.dit_weights import EXPERT_FOLDERS

ENGINES = sys.argv[4].split(",") if len(sys.argv) > 4 else ["ddp", "fsdp"]
STEPS = 10


def config(engine: str, experts: list[str]) -> RunConfig:
    cfg = RunConfig()
    cfg.model.preset = "debug-t2v-A14B"
    cfg.train.mixed_precision = "fp32"
    cfg.parallel.engine = engine
    cfg.parallel.stage3_param_persistence_threshold = 0
    # A schedule that moves (so each expert's must count its own steps), clipping on, and a learning
    # rate per expert.
    cfg.optim = dataclasses.replace(cfg.optim, learning_rate=1e-3, lr_scheduler="linear", lr_warmup_steps=2)
    cfg.experts.train_experts = experts
    cfg.experts.learning_rate_low = 5e-4
    return cfg


def draw(step: int, rank: int, quantiles: tuple[float, float], flow: FlowMatching) -> tuple[torch.Tensor, ...]:
    """The step's micro-batch on this rank: latents, timesteps in the expert's range, text, target."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    x0, noise = torch.randn(2, 1, 16, 2, 4, 4, generator=g)
    sigmas = flow.sample_sigmas(7, step, [rank], 2, quantiles=quantiles)
    context = torch.randn(1, 12, 64, generator=g)
    return flow.add_noise(x0, noise, sigmas), flow.timesteps(sigmas), context, flow.target(x0, noise)


def train_step(engine, inputs) -> dict:
    x_t, t, context, target = inputs
    with engine.micro_step(True):
        loss = F.mse_loss(engine.forward(x_t, t, context).float(), target)
        engine.backward(loss)
    result = engine.step()
    return {"loss": loss.item(), "lr": result.lr, "updated": result.updated}


def build(cfg: RunConfig, layout: ParallelLayout, total_steps: int):
    flow = FlowMatching.from_config(cfg.train)
    plan = ExpertPlan.build(cfg.experts, flow, cfg.train.seed, model_boundary(cfg.model, cfg.experts))
    engine, _, _ = build_training(cfg, layout, total_steps, lambda line: None, plan)
    return engine, plan, flow


def weights(engine) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in engine.full_state()}  # collective


# A mid-size expert pair (about 17 M parameters each) for the model-state bytes: per rank, measured against
# train.plan's formula for the same run.
MID = dict(dit_preset("debug"), dim=512, ffn_dim=2048, num_heads=8, num_layers=4)


def measure_states(out: Path, rank: int, layout: ParallelLayout, engine_name: str) -> dict:
    folder = out / "midsize"
    if rank == 0 and not folder.exists():
        for seed, expert in enumerate(("high", "low")):
            torch.manual_seed(seed)
            WanModel(**MID).save_pretrained(folder / EXPERT_FOLDERS[expert][0])
    dist.barrier()
    cfg = config(engine_name, ["high", "low"])
    cfg.model.transformer_path, cfg.train.mixed_precision = str(folder), "bf16"
    engine, plan, flow = build(cfg, layout, 4)
    for step, expert in enumerate(("high", "low")):  # AdamW's state exists after a step of each
        engine.use(expert)
        train_step(engine, draw(step, rank, plan.quantiles(expert), flow))
    measured = sum(v for k, v in engine.model_state_bytes().items() if k != "buffers")
    planned = sum(v for k, v in model_state_bytes(cfg, param_counts(cfg, dit_config(cfg)[0]), gpus=2).items()
                  if k != "host")  # fmt: skip
    return {"measured": measured, "planned": planned}


def run(out: Path, rank: int) -> dict:
    layout = ParallelLayout.of_process_group(torch.device("cpu"))
    res: dict = {"states": {e: measure_states(out, rank, layout, e) for e in ("zero3", "fsdp")}}
    for name in ENGINES:
        joint, plan, flow = build(config(name, ["high", "low"]), layout, STEPS)
        experts = [plan.expert_of(s) for s in range(STEPS)]
        entry: dict = {"experts": experts, "joint": {"high": [], "low": []}}
        for step, expert in enumerate(experts):
            joint.use(expert)
            entry["joint"][expert].append(train_step(joint, draw(step, rank, plan.quantiles(expert), flow)))
        final = {e: weights(joint.engines[e]) for e in ("high", "low")}
        del joint
        for expert in ("high", "low"):
            steps = [s for s, e in enumerate(experts) if e == expert]
            single, single_plan, _ = build(config(name, [expert]), layout, len(steps))
            assert single_plan.names == [expert]
            entry[expert] = [
                train_step(single, draw(s, rank, plan.quantiles(expert), flow)) for s in steps
            ]  # the joint run's draws of those steps
            if rank == 0:
                for run_name, tensors in (("joint", final[expert]), ("single", weights(single.engines[expert]))):
                    write_safetensors(out / f"{name}_{run_name}_{expert}.safetensors", tensors, {"format": "pt"})
            else:
                weights(single.engines[expert])
            del single
        res[name] = entry
    return res


if __name__ == "__main__":
    gloo_worker_main(run)
