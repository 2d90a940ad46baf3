"""Helpers for tests that run the trainer as a user does (torchrun, real processes, gloo) and read
what it wrote (TensorBoard losses, checkpoints)."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from train.checkpoint_verify import find_latest
from train.models import T5_FILE, TOKENIZER_DIR, VAE_FILE
from wan import T5_PRESETS, UMT5Encoder, WanModel, WanVAE, dit_preset, vae_preset
from wan.modules.tokenizer import DEBUG_TOKENIZER

REPO = Path(__file__).resolve().parents[1]


def write_release_folder(root: Path, seed: int = 7, head_std: float = 0.0) -> WanModel:
    """A tiny Wan2.1-T2V release folder in the official layout: DiT config.json + safetensors,
    Wan2.1_VAE.pth, the umT5 .pth in bf16, and the google/umt5-xxl tokenizer folder. head_std > 0
    gives the DiT a random head (the init's zero head would sample pure noise)."""
    torch.manual_seed(seed)
    dit = WanModel(**dit_preset("debug"))
    if head_std:
        torch.nn.init.normal_(dit.head.head.weight, std=head_std)
    dit.save_pretrained(root)
    torch.save(WanVAE(**vae_preset("debug")).state_dict(), root / VAE_FILE)
    t5 = UMT5Encoder(**T5_PRESETS["debug"])
    torch.save({k: v.to(torch.bfloat16) for k, v in t5.state_dict().items()}, root / T5_FILE)
    tokenizer = root / TOKENIZER_DIR
    tokenizer.mkdir(parents=True)
    shutil.copy(DEBUG_TOKENIZER, tokenizer / "spiece.model")
    (tokenizer / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "T5Tokenizer", "extra_ids": 0}))
    return dit


@pytest.fixture(scope="module")
def data(demo_data) -> Path:
    """The demo data set (tools/make_demo_data), one for the whole session (tests/conftest.py demo_data).
    Read-only: a test that changes files copies it first."""
    return demo_data


def base_args(data: Path, out: Path) -> list[str]:
    # No validation prompts and no held-out clips: the demo's (debug.toml) would sample in every test
    # run, an i2v run would need validation images, and a holdout changes the data plan; tests of
    # validation and of the eval loss give their own.
    return [
        "--cfg", str(REPO / "configs" / "debug.toml"), f"--train_data_dir={data}",
        f"--train_data_meta={data / 'metadata.json'}", f"--output_dir={out}", "--mixed_precision=fp32",
        "--progress_bar=false", "--dataloader_num_workers=0", "--validation_prompts=[]",
        "--eval_holdout=0",
    ]  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# One uninterrupted 2-rank run per engine, shared by the modules that resume from its checkpoints or
# compare with its losses (tests/conftest.py engine_runs): test_engines, test_checkpoint_integrity.

ENGINES = ("ddp", "zero2", "zero3", "fsdp")
ENGINE_STEPS = 6  # checkpoints at 3 and 6
# Tiny models never partition under ZeRO-3 below DeepSpeed's persistence threshold (1e5 elements):
# 0 makes every parameter sharded, so the runs exercise the real ZeRO-3 path.
# zero3 and fsdp checkpoint selectively (debug.toml: full), which gives the gradients of full checkpointing
# bit for bit (tests/reference/test_dit_checkpointing.py): their runs still equal DDP's, and cover selective
# checkpointing under sharded parameters.
ENGINE_ARGS = {
    "ddp": [], "zero2": [],
    "zero3": ["--stage3_param_persistence_threshold=0", "--gradient_checkpointing=selective"],
    "fsdp": ["--gradient_checkpointing=selective", "--selective_checkpoint_matmuls"],
}  # fmt: skip


def engine_run_args(engine: str, *extra: str) -> list[str]:
    """The options of the shared engine runs (on top of base_args); a rerun or resume passes the same."""
    return [
        f"--engine={engine}", *ENGINE_ARGS[engine], f"--max_train_steps={ENGINE_STEPS}", "--checkpointing_steps=3",
        "--checkpoints_total_limit=0", *extra,
    ]  # fmt: skip


@pytest.fixture
def one_thread():
    """In-process arithmetic compared with the torchrun ranks' (OMP_NUM_THREADS=1) runs on one thread too:
    CPU GEMMs split their sums by thread, so two threads give other last bits (measured: the validation
    videos of generate on the merged checkpoint then differ from the run's by a grey level on some
    pixels). One thread also keeps in-process trainers off oversubscribed cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def torchrun(
    data: Path,
    out: Path,
    *overrides: str,
    nproc: int = 1,
    env: dict | None = None,
    check: bool = True,
    base: bool = True,
):
    """train.main under torchrun with the debug config (base) and `overrides`; asserts exit 0 when check."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd += ["-m", "train.main", *(base_args(data, out) if base else []), *overrides]
    environ = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(cmd, cwd=REPO, env=environ, capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[:6000]
    return proc


def precompute(data: Path, cache: Path, *overrides: str, nproc: int = 1, check: bool = True, **popen):
    """tools.precompute with the debug config (base_args) under torchrun; asserts exit 0 when check.
    With popen options (stdout=...), the started process instead."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd += [
        "-m",
        "tools.precompute",
        *base_args(data, cache / "unused-output"),
        f"--latent_cache_dir={cache}",
        *overrides,
    ]
    environ = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    if popen:
        return subprocess.Popen(cmd, cwd=REPO, env=environ, **popen)
    proc = subprocess.run(cmd, cwd=REPO, env=environ, capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def losses(out: Path) -> dict[int, float]:
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    return {e.step: e.value for e in events.Scalars("train/loss")}


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(find_latest(out) / "model.safetensors")


def assert_close_runs(a: Path, b: Path, steps: int) -> None:
    la, lb = losses(a), losses(b)
    assert sorted(la) == sorted(lb) == list(range(1, steps + 1))
    for step in la:
        assert la[step] == pytest.approx(lb[step], rel=1e-5), step
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-4, atol=1e-6, msg=name)
    assert la[1] != la[steps]  # it trained


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
