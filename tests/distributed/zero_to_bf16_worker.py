"""Training checkpoints for tests/distributed/test_zero_to_bf16.py and bench/merge_memory.py, saved the way the
engines save them. `train_checkpoint` (imported by both) runs this file as one rank of a gloo group per
process: it trains a seeded WanModel for a few steps under DeepSpeed ZeRO-2/3 or FSDP2 and saves a
checkpoint, plus the engine's own full fp32 weights for comparison; then config.toml and COMPLETE are
written as the checkpointer writes them.

    zero_to_bf16_worker.py ENGINE CKPT_DIR RANK WORLD_SIZE PORT SPEC_JSON

ENGINE is zero2, zero3 or fsdp. SPEC_JSON: {"config": WanModel kwargs, "seed": int, "mixed_precision":
"bf16"|"fp32", "trainable_modules": [substrings], "steps": int, "exclude_frozen": bool (DeepSpeed's
save_checkpoint(exclude_frozen_parameters=...))}.

Writes CKPT_DIR/deepspeed/ (DeepSpeed's save_checkpoint, tag "deepspeed") or CKPT_DIR/dcp/ (a DCP save
of {"model": get_model_state_dict, "optimizer": get_optimizer_state_dict}), and on rank 0
CKPT_DIR/../reference.safetensors: every persistent tensor by official name, float32, as the engine
holds it after the last step (frozen bf16 parameters upcast exactly).
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from ranks import free_port, outputs, quick_exit, run_ranks
from safetensors.torch import save_file

from train.models import apply_trainable_modules
from wan import WanModel

REPO = Path(__file__).resolve().parents[2]


def train_checkpoint(ckpt: Path, engine: str, spec: dict, world_size: int = 2, timeout: int = 600) -> Path:
    """Run this worker on `world_size` gloo ranks (OMP_NUM_THREADS=1), then write config.toml and
    COMPLETE. Returns the checkpoint folder; the reference weights are in ckpt.parent."""
    ckpt.mkdir(parents=True)
    port = str(free_port())
    procs = run_ranks(lambda r: [__file__, engine, str(ckpt), str(r), str(world_size), port, json.dumps(spec)],
                      world_size, timeout)  # fmt: skip
    if any(p.returncode for p in procs):
        raise RuntimeError(f"{engine} worker failed:\n" + outputs(procs))
    write_marker(ckpt, engine, spec, world_size)
    return ckpt


def list_files(ckpt: Path) -> dict[str, int]:
    """Every file under ckpt but COMPLETE, with its size: what a COMPLETE marker lists."""
    files = sorted(p for p in ckpt.rglob("*") if p.is_file() and p.name != "COMPLETE")
    return {str(p.relative_to(ckpt)): p.stat().st_size for p in files}


def write_marker(ckpt: Path, engine: str, spec: dict, world_size: int, pretrained: str = "") -> None:
    """config.toml ([model] preset debug unless `pretrained`, [train] seed, [parallel] engine) and the
    COMPLETE marker (step from the folder name, world size, engine, every file with its size)."""
    modules = ", ".join(json.dumps(m) for m in spec.get("trainable_modules", ["."]))
    (ckpt / "config.toml").write_text(
        f'[model]\npretrained_model_name_or_path = "{pretrained}"\npreset = "debug"\n'
        f'trainable_modules = [{modules}]\n[train]\nseed = {spec.get("seed", 42)}\n[parallel]\nengine = "{engine}"\n'
    )
    step = int(ckpt.name.rpartition("-")[2]) if ckpt.name.startswith("checkpoint-") else 0
    marker = {"step": step, "world_size": world_size, "engine": engine, "files": list_files(ckpt)}
    (ckpt / "COMPLETE").write_text(json.dumps(marker, indent=1) + "\n")


def batch(config: dict, rank: int, step: int) -> tuple[torch.Tensor, ...]:
    """A tiny input batch (one 1x4x4 latent, 8 text tokens) and a random target, different per rank."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(1, config["in_dim"], 1, 4, 4, generator=g)
    t = torch.rand(1, generator=g) * 1000
    context = torch.randn(1, 8, config["text_dim"], generator=g)
    target = torch.randn(1, config["out_dim"], 1, 4, 4, generator=g)
    return x, t, context, target


def build(spec: dict) -> WanModel:
    torch.manual_seed(spec["seed"])  # as train/models.py DiTWeights builds a preset's random init
    model = WanModel(**spec["config"])
    apply_trainable_modules(model, spec["trainable_modules"])
    return model


def run_deepspeed(stage: int, ckpt: Path, rank: int, world: int, spec: dict, model: WanModel) -> dict:
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    from train.engines.deepspeed import prepare_deepspeed

    prepare_deepspeed(torch.device("cpu"))  # as the engine does: no shm op build, no deprecation notices
    bf16 = spec["mixed_precision"] == "bf16"
    # As train/engines/deepspeed.py configures it (contiguous gradients, fp32 reduction under bf16, a torch
    # AdamW), with every parameter partitioned under ZeRO-3 (tiny tensors stay whole by default).
    ds_config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": stage, "contiguous_gradients": True, "stage3_param_persistence_threshold": 0},
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if bf16:
        ds_config["communication_data_type"] = "fp32"
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3, weight_decay=0.01)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    for step in range(spec["steps"]):
        x, t, context, target = batch(spec["config"], rank, step)
        pred = engine(x, t, context)
        loss = (pred.float() - target).square().mean()
        engine.backward(loss)
        engine.step()
    exclude = bool(spec.get("exclude_frozen"))
    engine.save_checkpoint(str(ckpt), tag="deepspeed", save_latest=False, exclude_frozen_parameters=exclude)

    reference = {}
    module = engine.module
    buffers = dict(module.named_buffers())
    for name, param in module.named_parameters():
        if param.requires_grad:
            full = safe_get_full_fp32_param(param)  # collective under ZeRO-3
        elif stage == 3:
            with deepspeed.zero.GatheredParameters([param]):
                full = param.data.float().clone()
        else:
            full = param.data.float().clone()
        reference[name] = full.detach().cpu().contiguous()
    for name in module.state_dict(keep_vars=True):
        if name not in reference:
            reference[name] = buffers[name].float().clone()
    return reference


def run_fsdp(ckpt: Path, rank: int, world: int, spec: dict, model: WanModel) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh("cpu", (world,))
    bf16 = spec["mixed_precision"] == "bf16"
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.01)
    for step in range(spec["steps"]):
        x, t, context, target = batch(spec["config"], rank, step)
        loss = (model(x, t, context).float() - target).square().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad()
    state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
    dcp.save(state, checkpoint_id=str(ckpt / "dcp"))
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {name: tensor.float().contiguous() for name, tensor in full.items()}


def main() -> None:
    engine, ckpt, rank, world, port, spec = sys.argv[1:]
    ckpt, rank, world, spec = Path(ckpt), int(rank), int(world), json.loads(spec)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank), WORLD_SIZE=str(world))
    os.environ.update(LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = build(spec)
    if engine in ("zero2", "zero3"):
        reference = run_deepspeed(int(engine[-1]), ckpt, rank, world, spec, model)
    elif engine == "fsdp":
        reference = run_fsdp(ckpt, rank, world, spec, model)
    else:
        raise SystemExit(f"unknown engine {engine!r}")
    if rank == 0:
        save_file(reference, str(ckpt.parent / "reference.safetensors"))
    dist.barrier()
    dist.destroy_process_group()
    print(f"rank {rank} ok", flush=True)
    quick_exit()


if __name__ == "__main__":
    main()
