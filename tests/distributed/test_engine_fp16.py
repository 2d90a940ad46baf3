"""[train] mixed_precision = "fp16": fp16 autocast on fp32 master weights with dynamic loss scaling
(torch.amp.GradScaler) under ddp and fsdp; DeepSpeed's own fp16 loss scaler under zero2 / zero3 on CUDA
only, refused on the CPU before any model is built.

Measured on torch 2.13 CPU: CPU autocast computes in float16 (matmuls, SDPA); GradScaler("cpu") works;
with FSDP2 the gradients are DTensor shards and GradScaler.unscale_ reduces its inf check over them, so
an inf in one rank's shard makes both ranks skip and halve the scale. DeepSpeed 0.19's CPU accelerator
reports fp16 unsupported here (no oneDNN fp16)."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from fp16_engine_worker import INF_STEP, SAVE_AT, STEPS
from fsdp_engine_worker import Weights, batch
from ranks import gloo_worker_results

import train.engines.base
from train.config import OptimConfig, ParallelConfig, load_config
from train.distributed import ParallelLayout
from train.engines import EngineSetup, engine_traits
from train.engines.base import check_mixed_precision
from train.engines.ddp import DDPEngine
from train.engines.deepspeed import deepspeed_config
from train.engines.deepspeed_config import generated_config
from train.main import Trainer
from train.models import DiTRecipe
from wan import dit_preset

WORKER = Path(__file__).with_name("fp16_engine_worker.py")
CPU = torch.device("cpu")


# ----------------------------------------------------------------------------------------------------
# Where fp16 runs, and the refusals


@pytest.mark.parametrize("engine", ["zero2", "zero3"])
def test_deepspeed_fp16_is_refused_on_cpu(engine):
    with pytest.raises(ValueError) as err:
        check_mixed_precision("fp16", engine_traits(engine), CPU)
    message = str(err.value)
    for part in (
        "mixed_precision = 'fp16'",
        f"engine = {engine!r}",
        "on cpu",
        "DeepSpeed's CPU accelerator has no fp16",
    ):
        assert part in message
    assert "use mixed_precision = 'bf16'" in message and "'ddp' / 'fsdp'" in message


def test_fp16_runs_on_cpu_for_ddp_and_fsdp_and_other_precisions_anywhere():
    assert train.engines.base.autocast_supports("cpu", torch.float16)  # measured fact on this torch
    for engine in ("ddp", "fsdp"):
        check_mixed_precision("fp16", engine_traits(engine), CPU)
    for precision in ("bf16", "fp32"):
        for engine in ("ddp", "zero2", "zero3", "fsdp"):
            check_mixed_precision(precision, engine_traits(engine), CPU)


def test_fp16_refused_where_autocast_has_no_fp16(monkeypatch):
    monkeypatch.setattr(train.engines.base, "autocast_supports", lambda device_type, dtype: False)
    with pytest.raises(ValueError, match=r"engine = 'ddp' on cpu: torch .* has no fp16 autocast on cpu; use .*'bf16'"):
        check_mixed_precision("fp16", engine_traits("ddp"), CPU)


def test_trainer_refuses_before_building_anything(tmp_path):
    """The check runs right after the process setup: no output folder, data or model is touched (the
    data paths here do not even exist)."""
    out = tmp_path / "out"
    cfg = load_config(
        [
            "--train_data_dir=/nonexistent",
            "--train_data_meta=/nonexistent/meta.json",
            f"--output_dir={out}",
            "--engine=zero2",
            "--mixed_precision=fp16",
        ]  # fmt: skip
    )
    with pytest.raises(ValueError, match="DeepSpeed's CPU accelerator has no fp16"):
        Trainer(cfg)
    assert not out.exists()


def test_deepspeed_fp16_config_on_cuda(monkeypatch):
    """The config builder's fp16 section (a GPU path; no GPU needed to build it): dynamic loss scaling
    with GradScaler's rule, fp32 reduction; refused on the CPU."""
    monkeypatch.setattr(train.engines.base, "autocast_supports", lambda device_type, dtype: True)
    optim = OptimConfig()
    cuda = EngineSetup(
        ParallelConfig(engine="zero2"), optim, "fp16", 1, 1, 10, ParallelLayout.single(torch.device("cuda", 0))
    )
    config = generated_config(cuda, world_size=2)
    assert config["bf16"] == {"enabled": False}
    assert config["fp16"] == {
        "enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 2000, "hysteresis": 1,
        "consecutive_hysteresis": False, "min_loss_scale": 1,
    }  # fmt: skip
    assert config["communication_data_type"] == "fp32"
    cpu = EngineSetup(ParallelConfig(engine="zero3"), optim, "fp16", 1, 1, 10, ParallelLayout.single(CPU))
    with pytest.raises(ValueError, match="DeepSpeed's CPU accelerator has no fp16"):
        deepspeed_config(cpu, world_size=2)


# ----------------------------------------------------------------------------------------------------
# DDP, one process, against a plain fp16 autocast + GradScaler loop

LR, CLIP = 1e-3, 0.1
INF_PARAM = "blocks.0.ffn.0.weight"


def recipe() -> DiTRecipe:
    return DiTRecipe(dit_preset("debug"), Weights("", dit_preset("debug"), seed=42))


def ddp_engine() -> DDPEngine:
    optim = OptimConfig(learning_rate=LR, lr_scheduler="constant", max_grad_norm=CLIP)
    return DDPEngine(recipe(), EngineSetup(ParallelConfig(), optim, "fp16", 2, 1, 10, ParallelLayout.single(CPU)))


def engine_steps(engine: DDPEngine, steps, inf_at: int | None = None) -> list[dict]:
    out = []
    for s in steps:
        x, t, context, target = batch(s, 0, 2)
        with engine.micro_step(True):
            engine.backward(F.mse_loss(engine.forward(x, t, context).float(), target))
        if s == inf_at:
            engine.named_trainable[INF_PARAM].grad.view(-1)[0] = float("inf")
        out.append({**vars(engine.step()), "scale": engine.scaler.get_scale()})
    return out


def plain_steps(steps, inf_at: int | None = None) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """The textbook loop (torch's AMP recipe), written without train.engines."""
    model = recipe().materialize(CPU)
    o = OptimConfig()
    opt = torch.optim.AdamW(
        model.parameters(), lr=LR, betas=(o.adam_beta1, o.adam_beta2), weight_decay=o.adam_weight_decay,
        eps=o.adam_epsilon, foreach=True,
    )  # fmt: skip
    scaler = torch.amp.GradScaler("cpu")
    out = []
    for s in steps:
        x, t, context, target = batch(s, 0, 2)
        with torch.autocast("cpu", dtype=torch.float16):
            pred = model(x, t, context)
        scaler.scale(F.mse_loss(pred.float(), target)).backward()
        if s == inf_at:
            dict(model.named_parameters())[INF_PARAM].grad.view(-1)[0] = float("inf")
        scaler.unscale_(opt)
        norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP))
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        out.append({"grad_norm": norm, "scale": scaler.get_scale()})
    return {n: p.detach() for n, p in model.named_parameters()}, out


def test_ddp_fp16_equals_the_plain_amp_loop_and_skips_an_inf_step():
    """4 steps, clipping active, an inf gradient at step 1: the engine's weights equal the plain loop's
    bit for bit; step 1 is reported as not updated (weights untouched) and the scale halves."""
    engine = ddp_engine()
    before = None
    records = []
    for s in range(4):
        if s == 1:
            before = {n: p.detach().clone() for n, p in engine.named_trainable.items()}
        records += engine_steps(engine, [s], inf_at=1)
        if s == 1:
            assert all(torch.equal(before[n], p) for n, p in engine.named_trainable.items())
    expected, plain = plain_steps(range(4), inf_at=1)
    assert [r["updated"] for r in records] == [True, False, True, True]
    assert [r["scale"] for r in records] == [2.0**16, 2.0**15, 2.0**15, 2.0**15] == [p["scale"] for p in plain]
    assert not math.isfinite(records[1]["grad_norm"])
    assert [r["grad_norm"] for r in records if r["updated"]] == [p["grad_norm"] for i, p in enumerate(plain) if i != 1]
    assert all(r["lr"] == LR for r in records)
    for name, param in engine.named_trainable.items():
        assert torch.equal(param.detach(), expected[name]), name
    assert any(p.detach().dtype == torch.float32 for p in engine.named_trainable.values())  # fp32 masters


def test_ddp_fp16_resume_restores_the_scale(tmp_path):
    """Saved after the skipped step (scale 2**15, growth tracker reset): grad_scaler.json is one of the
    engine's files, a fresh engine loads the scaler state, and its next steps equal the uninterrupted run."""
    engine = ddp_engine()
    engine_steps(engine, range(2), inf_at=1)
    files = engine.save(tmp_path)
    assert "grad_scaler.json" in files
    saved = json.loads((tmp_path / "grad_scaler.json").read_text())
    assert saved["scale"] == 2.0**15 and saved["_growth_tracker"] == 0
    straight = engine_steps(engine, range(2, 4))

    resumed = ddp_engine()
    resumed.load(tmp_path)
    assert resumed.scaler.state_dict() == {**saved}
    assert engine_steps(resumed, range(2, 4)) == straight
    for name, param in engine.named_trainable.items():
        assert torch.equal(param, resumed.named_trainable[name]), name


def test_fp16_engine_loads_a_checkpoint_without_a_scaler(tmp_path):
    """A bf16 / fp32 checkpoint continued in fp16: the scale starts afresh (2**16), as a new fp16 run's."""
    optim = OptimConfig(learning_rate=LR, lr_scheduler="constant")
    fp32 = DDPEngine(recipe(), EngineSetup(ParallelConfig(), optim, "fp32", 2, 1, 10, ParallelLayout.single(CPU)))
    assert fp32.scaler is None and "grad_scaler.json" not in fp32.save(tmp_path)
    engine = ddp_engine()
    engine.load(tmp_path)
    assert engine.scaler.get_scale() == 2.0**16


# ----------------------------------------------------------------------------------------------------
# Two gloo ranks: ddp and fsdp


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("fp16")
    return {"out": out, "ranks": gloo_worker_results(WORKER, out)}


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_two_ranks_skip_together_and_resume_exactly(run, engine):
    """An inf on rank 1 only at step 1 (fsdp: in its own gradient shard): both ranks report the step as
    not updated, leave the weights untouched and halve the scale; the others update. The run trains
    like fp32 skipping the same step (losses within 1e-3 relative, measured 1.3e-5, but not equal: fp16
    did act). Resumed from the
    save after step 2, the scale is restored and the last steps repeat the run bit for bit."""
    for rank in (0, 1):
        res = run["ranks"][rank]
        fp16, fp32 = res[f"{engine}_fp16"], res[f"{engine}_fp32"]
        assert [r["updated"] for r in fp16] == [i != INF_STEP for i in range(STEPS)]
        assert fp16[INF_STEP]["unchanged"] and not math.isfinite(fp16[INF_STEP]["grad_norm"])
        assert [r["scale"] for r in fp16] == [2.0**16] + [2.0**15] * (STEPS - 1)
        assert res[f"{engine}_loaded_scale"]["scale"] == 2.0**15
        assert "grad_scaler.json" in fp16[SAVE_AT - 1]["files"] if rank == 0 else True
        assert res[f"{engine}_resumed"] == [{k: v for k, v in r.items() if k != "files"} for r in fp16[SAVE_AT:]]
        assert res[f"{engine}_resume_bitwise"]
        for a, b in zip(fp16, fp32, strict=True):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-3)
        assert any(a["loss"] != b["loss"] for a, b in zip(fp16, fp32, strict=True))
    assert run["ranks"][0][f"{engine}_fp16"][0]["loss"] != run["ranks"][1][f"{engine}_fp16"][0]["loss"]
