"""Subprocess side of tests/distributed/test_engine_deepspeed.py: one rank of a 2-process gloo group that trains the
debug DiT with the DDP engine and a DeepSpeed engine on the same synthetic batches and writes what it
measured to OUT/rank_{r}.json for the test to check.

    deepspeed_engine_worker.py OUT ENGINE RANK WORLD_SIZE PORT     ENGINE: zero2 or zero3
"""

import json
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from ranks import quick_exit

from train.config import OptimConfig, ParallelConfig
from train.distributed import ParallelLayout
from train.engines import EngineSetup
from train.engines.ddp import DDPEngine
from train.engines.deepspeed import DeepSpeedEngine
from train.models import DiTRecipe, DiTWeights
from wan import dit_preset
from wan.modules.checkpointing import ActivationCheckpointing

STEPS = 6
SAVE_AT = 3
CLIPPED_STEPS = 4
LR = 1e-3


def recipe(trainable: list[str] | None = None) -> DiTRecipe:
    return DiTRecipe(
        dit_preset("debug"), DiTWeights("", dit_preset("debug"), seed=42), trainable_modules=trainable or ["."]
    )


def setup(engine: str, mixed: str = "fp32", accumulation: int = 1, micro: int = 1, clip: float = 1.0) -> EngineSetup:
    parallel = ParallelConfig(
        engine=engine,
        # Small buckets: DeepSpeed allocates its gradient buckets at this size (5e8 elements by default).
        reduce_bucket_size=200_000,
        allgather_bucket_size=200_000,
        stage3_prefetch_bucket_size=200_000,
        stage3_param_persistence_threshold=0,  # tiny parameters would otherwise never be partitioned
    )
    optim = OptimConfig(learning_rate=LR, lr_scheduler="linear", lr_warmup_steps=2, max_grad_norm=clip)
    return EngineSetup(
        parallel,
        optim,
        mixed,
        micro,
        accumulation,
        total_steps=10,
        layout=ParallelLayout.of_process_group(torch.device("cpu")),
    )


def batch(step: int, rank: int, size: int = 1, sample: int = 0) -> tuple[torch.Tensor, ...]:
    """Synthetic inputs and target for (step, rank): latents x, timesteps t, text context, target v."""
    g = torch.Generator().manual_seed(1000 * step + 10 * rank + sample)
    x = torch.randn(size, 16, 3, 8, 8, generator=g)
    t = torch.rand(size, generator=g) * 1000
    context = torch.randn(size, 8, 64, generator=g)
    target = torch.randn(size, 16, 3, 8, 8, generator=g)
    return x, t, context, target


def train_step(engine, step: int, rank: int, accumulation: int = 1, size: int = 1, nan: bool = False) -> dict:
    losses = []
    for i in range(accumulation):
        x, t, context, target = batch(step, rank, size, sample=i)
        with engine.micro_step(i == accumulation - 1):
            pred = engine.forward(x, t, context)
            loss = torch.nn.functional.mse_loss(pred.float(), target)
            if nan:
                loss = loss * float("nan")
            engine.backward(loss)
        losses.append(loss.item())
    result = engine.step()
    return {
        "loss": sum(losses) / len(losses),
        "grad_norm": result.grad_norm,
        "updated": result.updated,
        "lr": result.lr,
    }


def ddp_weights(engine: DDPEngine) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in engine.named_trainable.items()}


def compare(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict:
    assert a.keys() == b.keys(), (sorted(a)[:3], sorted(b)[:3])
    max_abs = max(float((a[n] - b[n]).abs().max()) for n in a)
    scale = max(float(t.abs().max()) for t in a.values())
    worst = max(a, key=lambda n: float((a[n] - b[n]).abs().max()))
    bitwise = all(torch.equal(a[n], b[n]) for n in a)
    # max_rel: relative to the largest weight (per-tensor ratios blow up on biases that started at 0).
    return {"max_abs": max_abs, "max_rel": max_abs / scale, "worst": worst, "bitwise": bitwise}


def rel_losses(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / abs(x) for x, y in zip(a, b, strict=True))


def run(out: Path, engine_name: str, rank: int, world: int) -> dict:
    res: dict = {"timings": {}}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        res["timings"][name] = round(now - clock, 2)
        clock = now

    # The DDP reference.
    ddp = DDPEngine(recipe(), setup("ddp"))
    ddp_steps = []
    for s in range(STEPS):
        ddp_steps.append(train_step(ddp, s, rank))
        if s + 1 == CLIPPED_STEPS:
            ddp_at_clipped_steps = ddp_weights(ddp)
        if s + 1 == SAVE_AT:
            ddp_at_save = ddp_weights(ddp)
    ddp_final = ddp_weights(ddp)
    trainable = sum(p.numel() for p in ddp.named_trainable.values())
    res["ddp"] = ddp_steps
    res["trainable_elements"] = trainable
    del ddp
    lap("ddp")

    # Clipping active (norms ~0.29 > 0.05): DeepSpeed's norm (an fp64 sum) and torch's (fp32) differ in the
    # last bits, so the clipped gradients differ by an ulp, which AdamW's per-element normalisation
    # amplifies in elements whose gradient is ~0. Measured against how much clipping changes DDP itself.
    ddp = DDPEngine(recipe(), setup("ddp", clip=0.05))
    res["ddp_clipped"] = [train_step(ddp, s, rank) for s in range(CLIPPED_STEPS)]
    ddp_clipped = ddp_weights(ddp)
    del ddp
    eng = DeepSpeedEngine(recipe(), setup(engine_name, clip=0.05))
    res["ds_clipped"] = [train_step(eng, s, rank) for s in range(CLIPPED_STEPS)]
    res["clipped_loss_rel_vs_ddp"] = rel_losses(
        [s["loss"] for s in res["ddp_clipped"]], [s["loss"] for s in res["ds_clipped"]]
    )
    res["clipped_weights_vs_ddp"] = compare(ddp_clipped, eng.trainable_state())
    res["clipping_effect_in_ddp"] = compare(ddp_clipped, ddp_at_clipped_steps)
    del eng
    lap("clipped")

    # (a) DeepSpeed on the same batches, (b) saving at SAVE_AT on the way.
    ckpt = out / "ckpt"
    eng = DeepSpeedEngine(recipe(), setup(engine_name))
    lap("build")
    if engine_name == "zero3":  # no rank holds a whole parameter (stage3_param_persistence_threshold 0)
        res["zero3_partitioned"] = all(p.data.numel() == 0 and p.ds_tensor.numel() > 0 for p in eng.module.parameters())
    ds_steps = []
    for s in range(STEPS):
        ds_steps.append(train_step(eng, s, rank))
        if s + 1 == SAVE_AT:
            files = eng.save(ckpt)
            res["saved_files"] = files
            dist.barrier()
            res["ckpt_listing"] = sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file())
    res["ds"] = ds_steps
    ds_final = eng.trainable_state()
    res["loss_rel_vs_ddp"] = rel_losses([s["loss"] for s in ddp_steps], [s["loss"] for s in ds_steps])
    res["weights_vs_ddp"] = compare(ddp_final, ds_final)
    full = dict(eng.full_state())
    res["full_state_names_ok"] = list(full) == list(recipe().build().state_dict())  # state_dict order
    res["full_state_names"] = list(full)
    res["full_state_equals_trainable"] = all(torch.equal(full[n], ds_final[n]) for n in ds_final)
    res["full_state_shapes_ok"] = all(
        list(full[n].shape) == list(t.shape) for n, t in recipe().build().state_dict().items()
    )
    res["rope_dtype"] = str(eng.module.rope.cos.dtype)
    del eng
    lap("ds_run")

    # (b) resume: a fresh engine loads the step-3 checkpoint and trains steps 4..6.
    eng = DeepSpeedEngine(recipe(), setup(engine_name))
    eng.load(ckpt)
    resumed = [train_step(eng, s, rank) for s in range(SAVE_AT, STEPS)]
    res["resumed"] = resumed
    res["resume_losses_bitwise"] = [s["loss"] for s in resumed] == [s["loss"] for s in ds_steps[SAVE_AT:]]
    res["resume_lrs_equal"] = [s["lr"] for s in resumed] == [s["lr"] for s in ds_steps[SAVE_AT:]]
    res["resume_weights"] = compare(ds_final, eng.trainable_state())
    lap("resume")

    # (c) a NaN loss on rank 1 only: no update anywhere, and the next step trains normally.
    before = eng.trainable_state()
    res["nan_step"] = train_step(eng, STEPS, rank, nan=rank == 1)
    res["nan_weights_unchanged"] = compare(before, eng.trainable_state())["bitwise"]
    res["after_nan_step"] = train_step(eng, STEPS + 1, rank)
    res["after_nan_weights_changed"] = not compare(before, eng.trainable_state())["bitwise"]
    lap("nan")

    # (d) a checkpoint missing rank 1's optimizer file, and one that claims a third rank.
    if rank == 0:
        broken = out / "broken"
        shutil.copytree(ckpt, broken)
        (broken / "deepspeed" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
        extra = out / "extra"
        shutil.copytree(ckpt, extra)
        shutil.copy(
            extra / "deepspeed" / "zero_pp_rank_1_mp_rank_00_optim_states.pt",
            extra / "deepspeed" / "zero_pp_rank_2_mp_rank_00_optim_states.pt",
        )
    dist.barrier()
    for name in ("broken", "extra"):
        try:
            eng.load(out / name)
            res[f"{name}_error"] = None
        except ValueError as err:
            res[f"{name}_error"] = str(err)
    del eng
    lap("refusals")

    # Accumulation: 2 micro-batches of 1 equal one batch of 2 (the same samples).
    acc = DeepSpeedEngine(recipe(), setup(engine_name, accumulation=2))
    acc_steps = [train_step(acc, s, rank, accumulation=2) for s in range(2)]
    acc_weights = acc.trainable_state()
    del acc
    big = DeepSpeedEngine(recipe(), setup(engine_name, micro=2))
    big_steps = []
    for s in range(2):
        xs = [batch(s, rank, sample=i) for i in range(2)]
        with big.micro_step(True):
            pred = big.forward(
                torch.cat([b[0] for b in xs]), torch.cat([b[1] for b in xs]), torch.cat([b[2] for b in xs])
            )
            loss = torch.nn.functional.mse_loss(pred, torch.cat([b[3] for b in xs]))
            big.backward(loss)
        big_steps.append({"loss": loss.item(), **vars(big.step())})
    res["accumulation_losses_rel"] = rel_losses([s["loss"] for s in big_steps], [s["loss"] for s in acc_steps])
    res["accumulation_grad_norms"] = [[s["grad_norm"] for s in acc_steps], [s["grad_norm"] for s in big_steps]]
    res["accumulation_weights"] = compare(big.trainable_state(), acc_weights)
    del big
    lap("accumulation")

    # Host offload (torch AdamW on the host partitions) and gradient checkpointing (non-reentrant, under
    # ZeRO-3 too) against DDP after SAVE_AT steps.
    r = recipe()
    r.checkpoint_policy = ActivationCheckpointing("full")
    offload = setup(engine_name)
    offload.parallel.offload_optimizer = True
    offload.parallel.offload_param = engine_name == "zero3"
    eng = DeepSpeedEngine(r, offload)
    res["offload_losses_rel"] = rel_losses(
        [s["loss"] for s in ddp_steps[:SAVE_AT]], [train_step(eng, s, rank)["loss"] for s in range(SAVE_AT)]
    )
    res["offload_weights"] = compare(ddp_at_save, eng.trainable_state())
    del eng
    lap("offload")

    # (e) memory, bf16 (the precision the memory budget is about) and fp32; a partly frozen model for
    # full_state.
    for mixed in ("bf16", "fp32"):
        eng = DeepSpeedEngine(recipe(), setup(engine_name, mixed=mixed))
        reference = recipe().weights
        master = eng.trainable_state()
        res[f"{mixed}_master_exact"] = all(torch.equal(master[n], reference.read(n)) for n in master)
        x, t, context, target = batch(0, rank)
        with eng.micro_step(True):
            loss = torch.nn.functional.mse_loss(eng.forward(x, t, context).float(), target)
            eng.backward(loss)
        result = eng.step()
        res[f"memory_{mixed}"] = eng.model_state_bytes()
        res[f"{mixed}_step"] = {"loss": loss.item(), **vars(result)}
        res[f"{mixed}_param_dtype"] = str(next(eng.module.parameters()).dtype)
        res[f"{mixed}_rope_dtype"] = str(eng.module.rope.cos.dtype)
        res[f"{mixed}_rope_ok"] = bool(
            torch.equal(eng.module.rope.cos, recipe().materialize(torch.device("cpu")).rope.cos)
        )
        if mixed == "bf16":  # a bf16 round trip: the master weights and the bf16 module come back
            res["bf16_saved_files"] = eng.save(out / "ckpt_bf16")
            other = DeepSpeedEngine(recipe(), setup(engine_name, mixed="bf16"))
            other.load(out / "ckpt_bf16")
            res["bf16_resume_master"] = compare(eng.trainable_state(), other.trainable_state())
            x, t, context, _ = batch(1, rank)
            with torch.no_grad():
                res["bf16_resume_forward_equal"] = bool(
                    torch.equal(eng.forward(x, t, context), other.forward(x, t, context))
                )
            del other
        else:
            try:
                eng.load(out / "ckpt_bf16")
                res["precision_error"] = None
            except ValueError as err:
                res["precision_error"] = str(err)
        del eng
    lap("memory")

    eng = DeepSpeedEngine(recipe(["blocks.0."]), setup(engine_name, mixed="bf16"))
    initial = recipe().weights.read("blocks.1.ffn.0.weight")
    train_step(eng, 0, rank)
    train_step(eng, 1, rank)
    full = dict(eng.full_state())
    res["partial_names_ok"] = list(full) == list(recipe().build().state_dict())
    res["partial_frozen_dtype"] = str(full["blocks.1.ffn.0.weight"].dtype)
    res["partial_frozen_equal"] = bool(torch.equal(full["blocks.1.ffn.0.weight"], initial.bfloat16()))
    res["partial_trainable_dtype"] = str(full["blocks.0.ffn.0.weight"].dtype)
    res["partial_trainable_changed"] = not torch.equal(
        full["blocks.0.ffn.0.weight"], recipe().weights.read("blocks.0.ffn.0.weight")
    )
    del eng
    lap("partial")
    # zero.Init must leave torch alone (DeepSpeed's memory_efficient_linear would replace F.linear for good).
    res["f_linear_untouched"] = torch.nn.functional.linear is torch._C._nn.linear
    return res


def main() -> None:
    out, engine_name, rank, world, port = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:])
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # The trainer initialises torch.distributed itself before building an engine; so do we.
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        res = run(Path(out), engine_name, rank, world)
    except Exception:
        res = {"error": traceback.format_exc()}
    (Path(out) / f"rank_{rank}.json").write_text(json.dumps(res, indent=1, default=str))
    if "error" in res:
        print(res["error"], file=sys.stderr)
        os._exit(1)  # a peer may be stuck in a collective: do not wait for it
    dist.barrier()
    dist.destroy_process_group()
    quick_exit()


if __name__ == "__main__":
    main()
