"""LoRA end to end through `train.main` with 2 gloo ranks (fp32), on a release folder whose DiT has a random
(non-zero) head, as a user fine-tunes a released model: only the adapter trains, checkpoints hold the
adapter and its optimizer state alone and resume bit for bit, every engine trains alike, and the
exported file and the merged folder are the adapter the run trained."""

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_runs import ENGINES, data, engine_run_args, losses, torchrun, write_release_folder

from tools.export_lora import export_lora
from tools.zero_to_bf16 import merge
from train.ema import ema_sources
from train.engines import REGISTRY
from wan import WanModel
from wan.modules.lora import lora_delta

__all__ = ["data"]  # a fixture

RANK, ALPHA = 4, 8.0
LORA = [f"--rank={RANK}", f"--network_alpha={ALPHA}", "--target_name=q,k,v,o,ffn.0,ffn.2"]


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("release")
    write_release_folder(root, head_std=0.02)
    return root


# zero3 refuses selective checkpointing with LoRA (train/engines/deepspeed.py preflight): full here.
EXTRA = {"zero3": ["--gradient_checkpointing=full"]}


def lora_run(data: Path, release: Path, out: Path, engine: str) -> Path:
    torchrun(
        data,
        out,
        f"--pretrained_model_name_or_path={release}",
        *engine_run_args(engine, *EXTRA.get(engine, [])),
        *LORA,
        nproc=2,
    )
    return out


def resume_from_step_3(data: Path, release: Path, run: Path, out: Path, engine: str) -> dict[int, float]:
    """A copy of `run` without its step-6 checkpoint and its curves, run again: it resumes at step 3."""
    shutil.copytree(run, out)
    shutil.rmtree(out / "checkpoint-6")
    shutil.rmtree(out / "tensorboard")
    proc = torchrun(
        data, out, f"--pretrained_model_name_or_path={release}", *engine_run_args(engine, *EXTRA.get(engine, [])),
        *LORA, nproc=2,
    )  # fmt: skip
    assert "checkpoint-3" in proc.stdout + proc.stderr
    return losses(out)


@pytest.fixture(scope="module")
def ddp_run(data, release, tmp_path_factory) -> Path:
    return lora_run(data, release, tmp_path_factory.mktemp("lora") / "ddp", "ddp")


@pytest.mark.slow
def test_ddp_lora_trains_the_adapter_only_and_resumes_exactly(data, release, ddp_run, tmp_path):
    run = losses(ddp_run)
    assert sorted(run) == list(range(1, 7)) and run[1] != run[6]
    saved = load_file(ddp_run / "checkpoint-6" / "model.safetensors")
    assert saved and all(".lora_A." in n or ".lora_B." in n for n in saved)  # the adapter alone
    assert len(saved) == 2 * 2 * 10  # 2 blocks x 10 layers (q, k, v, o twice, ffn.0, ffn.2) x (A, B)
    optimizer = load_file(ddp_run / "checkpoint-6" / "optimizer.safetensors")
    assert {n.rsplit(".", 1)[0] for n in optimizer} == set(saved)  # AdamW state of the adapter alone
    resumed = resume_from_step_3(data, release, ddp_run, tmp_path / "resumed", "ddp")
    assert {s: resumed[s] for s in (4, 5, 6)} == {s: run[s] for s in (4, 5, 6)}
    again = load_file(tmp_path / "resumed" / "checkpoint-6" / "model.safetensors")
    assert all(torch.equal(again[n], saved[n]) for n in saved)


@pytest.mark.slow
def test_exported_and_merged_weights_are_the_trained_adapter(ddp_run, release, tmp_path):
    """export_lora writes the checkpoint's adapter (fp32: the same numbers) in the ComfyUI layout, and
    zero_to_bf16 gives the base weights plus alpha / rank x B @ A, the frozen rest untouched."""
    checkpoint = ddp_run / "checkpoint-6"
    saved = load_file(checkpoint / "model.safetensors")
    tensors = export_lora(checkpoint, tmp_path / "lora.safetensors", dtype="fp32")
    assert load_file(tmp_path / "lora.safetensors").keys() == tensors.keys()
    for name, value in saved.items():
        assert torch.equal(tensors[f"diffusion_model.{name}"], value)
        if name.endswith("lora_A.weight"):
            assert tensors[f"diffusion_model.{name.rsplit('.', 2)[0]}.alpha"].item() == ALPHA
    merge(checkpoint, tmp_path / "merged", dtype="fp32", log=lambda _: None)
    merged = WanModel.from_pretrained(tmp_path / "merged", dtype=None).state_dict()
    base = WanModel.from_pretrained(release, dtype=None).state_dict()
    layers = {n.rsplit(".", 2)[0] for n in saved}
    for name, value in base.items():
        layer = name.removesuffix(".weight")
        if layer in layers and name.endswith(".weight"):
            expected = value + lora_delta(
                saved[f"{layer}.lora_A.weight"], saved[f"{layer}.lora_B.weight"], ALPHA / RANK
            )
            torch.testing.assert_close(merged[name], expected, rtol=0, atol=1e-6)
            assert not torch.equal(merged[name], value)
        else:
            assert torch.equal(merged[name], value), name


@pytest.mark.slow
@pytest.mark.heavy
@pytest.mark.parametrize("engine", [e for e in ENGINES if e != "ddp"])
def test_every_engine_trains_the_adapter_alike_and_resumes_exactly(data, release, ddp_run, engine, tmp_path):
    run_dir = lora_run(data, release, tmp_path / engine, engine)
    run, reference = losses(run_dir), losses(ddp_run)
    assert sorted(run) == sorted(reference)
    for step, value in reference.items():
        assert run[step] == pytest.approx(value, rel=1e-6), step
    resumed = resume_from_step_3(data, release, run_dir, tmp_path / f"{engine}-resumed", engine)
    assert {s: resumed[s] for s in (4, 5, 6)} == {s: run[s] for s in (4, 5, 6)}
    # The checkpoint holds the adapter, not the frozen base (read as tools/zero_to_bf16.py reads it).
    held = REGISTRY[engine].checkpoint_reader(run_dir / "checkpoint-6", 2, None)
    assert set(held) == set(load_file(ddp_run / "checkpoint-6" / "model.safetensors"))
    merge(run_dir / "checkpoint-6", tmp_path / "merged", dtype="fp32", log=lambda _: None)
    merge(ddp_run / "checkpoint-6", tmp_path / "merged-ddp", dtype="fp32", log=lambda _: None)
    mine = WanModel.from_pretrained(tmp_path / "merged", dtype=None).state_dict()
    ddp = WanModel.from_pretrained(tmp_path / "merged-ddp", dtype=None).state_dict()
    for name, value in ddp.items():
        torch.testing.assert_close(mine[name], value, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
def test_the_ema_of_a_lora_run_averages_the_adapter(data, release, tmp_path):
    """[ema] with [lora]: the average is of the adapter alone (the closed form of the adapters the
    checkpoints saved), and zero_to_bf16 --ema merges the averaged adapter into the base."""
    run = tmp_path / "run"
    decay = 0.5
    torchrun(
        data, run, f"--pretrained_model_name_or_path={release}", *engine_run_args("ddp"), *LORA,
        "--ema.enabled=true", f"--decay={decay}", "--checkpointing_steps=1", nproc=2,
    )  # fmt: skip
    average = None
    for s in range(1, 7):
        adapter = load_file(run / f"checkpoint-{s}" / "model.safetensors")
        average = adapter if s == 1 else {n: decay * average[n] + (1 - decay) * w for n, w in adapter.items()}
    saved = {name: source.read() for name, source in ema_sources(run / "checkpoint-6").items()}
    assert saved.keys() == average.keys()
    for name, value in average.items():
        torch.testing.assert_close(saved[name], value, rtol=0, atol=1e-6, msg=name)
    merge(run / "checkpoint-6", tmp_path / "merged", dtype="fp32", ema=True, log=lambda _: None)
    merged = WanModel.from_pretrained(tmp_path / "merged", dtype=None).state_dict()
    base = WanModel.from_pretrained(release, dtype=None).state_dict()
    layer = "blocks.1.ffn.2"
    delta = lora_delta(saved[f"{layer}.lora_A.weight"], saved[f"{layer}.lora_B.weight"], ALPHA / RANK)
    torch.testing.assert_close(merged[f"{layer}.weight"], base[f"{layer}.weight"] + delta, rtol=0, atol=1e-6)
