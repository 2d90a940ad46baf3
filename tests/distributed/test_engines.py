"""Every engine end to end through `train.main` with 2 gloo ranks on the debug preset, as a user runs it:
ddp, zero2, zero3 and fsdp train alike from the same start and data (fp32), each resumes exactly after
a SIGKILL in the middle of a save, ddp and fsdp checkpoints resume on 1 rank at the same global batch,
a checkpoint missing one rank's file is refused naming it, and two torchrun agents acting as two nodes
train and checkpoint with zero3. The shipped configs parse and resolve as documented."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ranks import free_port
from safetensors.torch import load_file
from train_runs import ENGINE_STEPS, ENGINES, REPO, base_args, data, engine_run_args, losses, torchrun

from tools.zero_to_bf16 import merge
from train.checkpoint import KILL_ENV
from train.checkpoint_verify import find_latest, read_marker
from train.config import load_config
from train.main import Trainer
from train.plan import guess_preset
from wan import WanModel, dit_preset

__all__ = ["data"]  # a fixture

STEPS = ENGINE_STEPS
# Losses of different engines differ by float summation order only (measured: equal to float32 precision).
RTOL = 1e-6
run_args = engine_run_args


@pytest.fixture(scope="module")
def straight(engine_runs) -> dict[str, Path]:
    """One uninterrupted 2-rank run per engine (tests/conftest.py engine_runs, shared with
    test_checkpoint_integrity): 6 steps, checkpoints at 3 and 6, consolidated weights. Read-only."""
    return {engine: engine_runs(engine) for engine in ENGINES}


@pytest.mark.slow
def test_every_engine_trains_alike(straight):
    reference = losses(straight["ddp"])
    assert sorted(reference) == list(range(1, STEPS + 1))
    assert reference[1] != reference[STEPS]  # it trained
    for engine in ENGINES[1:]:
        got = losses(straight[engine])
        assert sorted(got) == sorted(reference), engine
        for step, value in reference.items():
            assert got[step] == pytest.approx(value, rel=RTOL), (engine, step)
        marker = read_marker(find_latest(straight[engine]))
        assert marker["engine"] == engine and marker["world_size"] == 2 and marker["step"] == STEPS


@pytest.mark.slow
def test_merged_and_consolidated_weights_are_the_engines_weights(data, straight, tmp_path):
    """zero_to_bf16 of each engine's last checkpoint: fp32 equals DDP's trained weights up to summation
    order; bf16 equals the consolidated/ folder each engine wrote during training, bit for bit; a new
    run starts from a merged folder."""
    ddp = load_file(straight["ddp"] / "checkpoint-6" / "model.safetensors")  # every parameter trains
    torch.manual_seed(42)  # the run's seed: the random start, as train.models builds it
    start = WanModel(**dit_preset("debug")).state_dict()
    moved = max((ddp[name] - start[name]).abs().max().item() for name in start)
    assert moved > 1e-3  # the runs compared did train
    for engine in ENGINES:
        checkpoint = straight[engine] / "checkpoint-6"
        merge(checkpoint, tmp_path / engine / "fp32", dtype="fp32", log=lambda _: None)
        merge(checkpoint, tmp_path / engine / "bf16", log=lambda _: None)
        fp32 = dict(WanModel.from_pretrained(tmp_path / engine / "fp32", dtype=None).state_dict())
        bf16 = dict(WanModel.from_pretrained(tmp_path / engine / "bf16", dtype=None).state_dict())
        consolidated = dict(WanModel.from_pretrained(checkpoint / "consolidated", dtype=None).state_dict())
        assert fp32.keys() == ddp.keys() == bf16.keys() == consolidated.keys()
        for name, expected in ddp.items():
            assert bf16[name].dtype == consolidated[name].dtype == torch.bfloat16
            assert torch.equal(bf16[name], consolidated[name]), (engine, name)
            assert torch.equal(bf16[name], fp32[name].bfloat16()), (engine, name)
            if engine == "ddp":
                assert torch.equal(fp32[name], expected), name
            else:
                torch.testing.assert_close(fp32[name], expected, rtol=1e-4, atol=1e-6, msg=f"{engine} {name}")

    # A new run starts from the merged folder ([model] transformer_path): another engine, other ranks.
    trainer = Trainer(
        load_config([*base_args(data, tmp_path / "next"), f"--transformer_path={tmp_path / 'zero3' / 'fp32'}"])
    )
    merged = WanModel.from_pretrained(tmp_path / "zero3" / "fp32", dtype=None).state_dict()
    started = trainer.engine.module.state_dict()
    assert all(torch.equal(started[name], merged[name]) for name in merged)


@pytest.mark.slow
# zero2 and zero3 in the heavy tier (CI): make test keeps fsdp's.
@pytest.mark.parametrize("engine", [pytest.param("zero2", marks=pytest.mark.heavy),
                                    pytest.param("zero3", marks=pytest.mark.heavy), "fsdp"])  # fmt: skip
def test_kill_mid_save_then_resume_repeats_the_run(data, straight, tmp_path, engine):
    """A SIGKILL of both ranks inside the save of step 6 leaves checkpoint-3 as the latest; the rerun
    resumes from it and repeats the uninterrupted run's losses bit for bit (fp32 on CPU)."""
    out = tmp_path / engine
    crashed = torchrun(data, out, *run_args(engine), nproc=2, env={KILL_ENV: "6"}, check=False)
    assert crashed.returncode != 0
    assert find_latest(out).name == "checkpoint-3"  # the half-written 6 does not count
    assert (out / "checkpoint-6.tmp").exists()
    resumed = torchrun(data, out, *run_args(engine), nproc=2)  # resume_from_checkpoint = "latest"
    assert "resumed from" in resumed.stdout and "checkpoint-3" in resumed.stdout
    assert find_latest(out).name == "checkpoint-6"
    assert losses(out) == losses(straight[engine])


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_resume_on_one_rank_of_a_two_rank_checkpoint(data, straight, tmp_path, engine):
    """The global batch kept (1 rank x batch 2 = 2 ranks x batch 1): the data order and every draw
    continue, so steps 4..6 give the uninterrupted 2-rank run's losses."""
    out = tmp_path / engine
    out.mkdir()
    shutil.copytree(straight[engine] / "checkpoint-3", out / "checkpoint-3")
    torchrun(data, out, *run_args(engine, "--train_batch_size=2"), nproc=1)
    got, expected = losses(out), losses(straight[engine])
    assert sorted(got) == [4, 5, 6]
    for step in got:
        assert got[step] == pytest.approx(expected[step], rel=RTOL), step


@pytest.mark.slow
def test_zero_checkpoint_refuses_another_world_size_and_a_missing_rank_file(data, straight, tmp_path):
    source = straight["zero3"] / "checkpoint-3"
    out = tmp_path / "out"
    out.mkdir()
    shutil.copytree(source, out / "checkpoint-3")
    one = torchrun(data, out, *run_args("zero3", "--train_batch_size=2"), nproc=1, check=False)
    assert one.returncode != 0 and "tied to the number of ranks" in one.stderr and "zero_to_bf16" in one.stderr

    rank_file = next(name for name in read_marker(source)["files"] if "zero_pp_rank_1" in name)
    (out / "checkpoint-3" / rank_file).unlink()
    explicit = f"--resume_from_checkpoint={out / 'checkpoint-3'}"
    refused = torchrun(data, out, *run_args("zero3"), explicit, nproc=2, check=False)
    assert refused.returncode != 0 and f"{rank_file} is missing" in refused.stderr


@pytest.mark.slow
def test_two_nodes_train_and_checkpoint_with_zero3(data, straight, tmp_path):
    """launch/multi_node.sh twice on 127.0.0.1 (NNODES=2, one process each) = one node of 2 processes."""
    env = {
        **os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHON": sys.executable, "NNODES": "2",
        "NPROC": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RDZV_ID": "zero3",
    }  # fmt: skip
    out = tmp_path / "two_nodes"
    cmd = ["launch/multi_node.sh", *base_args(data, out)[1:], *run_args("zero3")]
    nodes = [
        subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert all(node.returncode == 0 for node in nodes), "\n".join(o[-3000:] for o in outputs)
    assert losses(out) == pytest.approx(losses(straight["zero3"]), rel=RTOL)
    marker = read_marker(find_latest(out))
    assert marker["world_size"] == 2 and any("zero_pp_rank_1" in name for name in marker["files"])


# ----------------------------------------------------------------------------------------------------
# The shipped configs

SHIPPED = sorted((REPO / "configs").glob("*.toml"))
DATA_ARGS = ["--train_data_dir=/data", "--train_data_meta=/data/meta.json"]


def test_every_shipped_config_parses():
    engines = {}
    for path in SHIPPED:
        cfg = load_config(["--cfg", str(path), *DATA_ARGS])
        engines[path.name] = cfg.parallel.engine
    assert engines == {
        "debug.toml": "ddp", "debug_lora.toml": "ddp", "1.3b_ddp.toml": "ddp", "1.3b_zero2.toml": "zero2", "14b_zero2.toml": "zero2",
        "14b_zero3.toml": "zero3", "14b_fsdp.toml": "fsdp", "14b_i2v_zero3.toml": "zero3", "14b_720p_sp.toml": "fsdp",
        "a14b_t2v_fsdp.toml": "fsdp", "a14b_i2v_zero3.toml": "zero3", "ti2v_5b_zero2.toml": "zero2",
    }  # fmt: skip


@pytest.mark.parametrize("name, engine", [("14b_zero2.toml", "zero2"), ("14b_zero3.toml", "zero3")])
def test_videox_fun_use_deepspeed_resolves_with_the_seed_values(name, engine):
    """VideoX-Fun's --use_deepspeed on our 14B configs: the engine it names, with its train.sh values."""
    cfg = load_config(["--cfg", str(REPO / "configs" / name), *DATA_ARGS, "--use_deepspeed"])
    assert cfg.parallel.engine == engine and cfg.parallel.use_deepspeed
    d, t, o, c = cfg.data, cfg.train, cfg.optim, cfg.checkpoint
    assert (d.image_sample_size, d.video_sample_size, d.token_sample_size) == (1024, 256, 512)
    assert (d.video_sample_stride, d.video_sample_n_frames) == (3, 81)
    assert (o.learning_rate, o.lr_scheduler, o.lr_warmup_steps) == (2e-5, "constant_with_warmup", 100)
    assert (o.adam_weight_decay, o.adam_epsilon, o.max_grad_norm) == (3e-2, 1e-10, 0.05)
    assert (c.checkpointing_steps, t.mixed_precision, cfg.model.gradient_checkpointing) == (50, "bf16", "full")


# Wan2.2's configs run their own paths (experts, TI2V) tested on every engine elsewhere: CI's heavy tier, for time.
WAN22_CONFIGS = {"a14b_t2v_fsdp.toml", "a14b_i2v_zero3.toml", "ti2v_5b_zero2.toml"}


@pytest.mark.slow
@pytest.mark.parametrize(
    "path",
    [pytest.param(p, marks=[pytest.mark.heavy] if p.name in WAN22_CONFIGS else []) for p in SHIPPED
     if p.name != "debug.toml"],
    ids=lambda p: p.name,
)  # fmt: skip
def test_each_shipped_config_trains_on_the_debug_preset(data, tmp_path, path):
    """The config as shipped, with only the model, data and sizes made tiny: 2 steps on 2 ranks (sequence
    parallel over both where the config has sp > 1)."""
    shipped = load_config(["--cfg", str(path), *DATA_ARGS])
    # The tiny preset of the config's release (its folder name): Wan2.2's experts and TI2V included.
    release = guess_preset(shipped.model.pretrained_model_name_or_path.lower(), shipped.model.train_mode == "i2v")
    tiny = {"t2v-A14B": "debug-t2v-A14B", "i2v-A14B": "debug-i2v-A14B", "ti2v-5B": "debug-ti2v", "i2v-14B": "debug-i2v"}
    extra = [
        "--cfg", str(path), "--pretrained_model_name_or_path=", "--transformer_path=",
        f"--preset={tiny.get(release, 'debug')}",
        "--max_train_steps=2", "--token_sample_size=64", "--video_sample_size=64", "--image_sample_size=64",
        "--video_sample_n_frames=9", "--video_sample_stride=2", "--checkpointing_steps=2", "--low_vram=false",
        *(["--sp=2"] if shipped.parallel.sp > 1 else []),
    ]  # fmt: skip
    io = [f"--train_data_dir={data}", f"--train_data_meta={data / 'metadata.json'}", f"--output_dir={tmp_path}",
          "--progress_bar=false", "--dataloader_num_workers=0"]  # fmt: skip
    run = torchrun(data, tmp_path, *io, *extra, nproc=2, base=False)  # bf16, as shipped
    assert sorted(losses(tmp_path)) == [1, 2], run.stdout[-2000:]
    assert read_marker(find_latest(tmp_path))["engine"] == load_config(["--cfg", str(path), *DATA_ARGS]).parallel.engine


@pytest.mark.slow
@pytest.mark.heavy  # ~100-200 s: peak host memory of three engines loading a release folder
def test_sharded_engines_load_a_release_folder_without_a_whole_copy(tmp_path):
    """bench/engines.py on a mid-size DiT (width 1024, 8 blocks, 148 M parameters) saved as a release
    folder, bf16, 2 ranks. While a rank builds the DiT and reads the weights its resident memory peaks at
    what the engine keeps (its shards: under zero3 the bf16 parameter, bf16 gradient and fp32 master
    partitions) plus a transient that, under zero3 and fsdp, stays far below one fp32 copy of the model
    (one module or tensor at a time); DDP's rank holds the whole model. Model states per rank (after a
    step, AdamW included) are about half of DDP's."""
    out = tmp_path / "rows.json"
    # The step's input is the smallest (1 latent frame of 4x4: 4 tokens): what is measured is memory (the
    # load, and the model states after one AdamW step), which the input's size does not change.
    cmd = [sys.executable, "bench/engines.py", "--engines=ddp,zero3,fsdp", "--layers=8", "--steps=1", "--warmup=0",
           "--frames=1", "--size=4", "--no-merge", "--precision=bf16", "--bucket=10000000", f"--json={out}"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {row["engine"]: row for row in json.loads(out.read_text())["rows"]}
    assert rows["ddp"]["load_peak_of_full"] > 1.0  # the measurement sees a whole copy where there is one
    assert rows["fsdp"]["load_peak_of_full"] < 0.75  # half the model in fp32 shards, plus one tensor
    for engine in ("zero3", "fsdp"):
        assert rows[engine]["load_transient_of_full"] < 0.35, (engine, rows[engine])
        assert rows[engine]["state_mib"] < 0.55 * rows["ddp"]["state_mib"], (engine, rows[engine])
