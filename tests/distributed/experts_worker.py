"""Subprocess side of tests/distributed/test_experts_training.py: one rank of a 2-process gloo group.
For each engine it builds, through train.setup.build_training as train.main does, a joint Wan2.2
A14B run (both debug experts) and the two single-expert runs ([experts] train_experts = ["high"],
["low"]), and feeds them the same draws: the joint run every step of its plan (the step's expert drawn
from (seed, step)), each single run the steps of its expert, in order. It records every step's loss
and lr and, on rank 0, each expert's final weights.

    experts_worker.py OUT RANK PORT

Writes OUT/rank{r}.json and (rank 0) OUT/{engine}_{run}_{expert}.safetensors.
"""

import dataclasses
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from ranks import gloo_worker_main

from train.checkpoint_io import write_safetensors
from train.config import RunConfig
from train.distributed import ParallelLayout
from train.experts import ExpertPlan
from train.flow import FlowMatching
from train.models import model_boundary
from train.setup import build_training

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


def run(out: Path, rank: int) -> dict:
    layout = ParallelLayout.of_process_group(torch.device("cpu"))
    res: dict = {}
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
