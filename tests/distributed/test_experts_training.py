"""Wan2.2 A14B: both experts trained in one run (train/experts.py, train/engines/experts.py).

A joint run equals two single-expert runs fed the same draws, per expert, within 1e-6 (losses, learning
rates and final weights; gloo, 2 ranks, ddp and fsdp: experts_worker.py); train.plan counts both experts'
model states (measured on 2 ranks, bf16, a mid-size pair of 17 M-parameter experts: zero3 292.4 MiB a rank,
planned 292.4; fsdp 292.6 and 292.4 MiB); and a 2-rank zero3 joint run through train.main trains and resumes
bit for bit, its checkpoint holding each expert in its folder, tools/zero_to_bf16.py writing both.
"""

import shutil
from pathlib import Path

import pytest
import torch
from ranks import gloo_worker_results
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from train_runs import data, losses, torchrun

from tools.zero_to_bf16 import merge
from train.checkpoint_verify import find_latest
from wan import WanModel
from wan.modules.dit_weights import expert_folders

__all__ = ["data"]  # a fixture

WORKER = Path(__file__).with_name("experts_worker.py")


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> tuple[list[dict], Path]:
    out = tmp_path_factory.mktemp("experts")
    return gloo_worker_results(WORKER, out), out


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_joint_run_equals_two_single_expert_runs(results, engine):
    ranks, out = results
    for res in ranks:
        entry = res[engine]
        assert set(entry["experts"]) == {"high", "low"}  # both experts drawn over the 10 steps
        for expert in ("high", "low"):
            joint, single = entry["joint"][expert], entry[expert]
            assert len(joint) == len(single) == entry["experts"].count(expert)
            for a, b in zip(joint, single, strict=True):
                assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=0) and a["lr"] == b["lr"]
        # Each expert's schedule counts its own steps: the first step of each runs at the warmup's lr 0.
        assert entry["joint"]["high"][0]["lr"] == entry["joint"]["low"][0]["lr"] == 0.0
    for expert in ("high", "low"):
        joint = load_file(out / f"{engine}_joint_{expert}.safetensors")
        single = load_file(out / f"{engine}_single_{expert}.safetensors")
        assert joint.keys() == single.keys()
        for name in joint:
            torch.testing.assert_close(joint[name], single[name], rtol=1e-6, atol=1e-6, msg=name)
    high, low = (load_file(out / f"{engine}_joint_{e}.safetensors") for e in ("high", "low"))
    assert not torch.equal(high["blocks.0.ffn.0.weight"], low["blocks.0.ffn.0.weight"])  # two experts


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["zero3", "fsdp"])
def test_plan_counts_both_experts_model_states(results, engine):
    """train.plan's per-rank model-state bytes of a joint run (both experts' engines) against a measured
    mid-size joint run (2 ranks, bf16), within 15%; and the release A14B's at 8 and 16 GPUs: both experts,
    twice the 14B's."""
    from train.config import load_config
    from train.plan import dit_config, model_state_bytes, param_counts

    for res in results[0]:
        s = res["states"][engine]
        assert s["planned"] == pytest.approx(s["measured"], rel=0.15), s
    for gpus in (8, 16):
        per_gpu = {}
        for preset in ("t2v-A14B", "14B"):
            cfg = load_config(
                [f"--preset={preset}", f"--engine={engine}", "--train_data_dir=.", "--mixed_precision=bf16"]
            )
            states = model_state_bytes(cfg, param_counts(cfg, dit_config(cfg)[0]), gpus)
            per_gpu[preset] = sum(v for k, v in states.items() if k != "host")
        assert per_gpu["t2v-A14B"] == 2 * per_gpu["14B"]
        # 16 bytes a parameter (bf16 params and grads, fp32 master and AdamW; fsdp: fp32 params and grads
        # with AdamW), 14.29 B parameters an expert, over the GPUs.
        assert per_gpu["t2v-A14B"] == pytest.approx(2 * 16 * 14.29e9 / gpus, rel=0.01)


A14B = ["--preset=debug-t2v-A14B", "--engine=zero3", "--stage3_param_persistence_threshold=0",
        "--max_train_steps=6", "--checkpointing_steps=3", "--checkpoints_total_limit=0"]  # fmt: skip


@pytest.mark.slow
def test_zero3_joint_run_trains_and_resumes_bit_for_bit(data, tmp_path):
    whole = tmp_path / "whole"
    proc = torchrun(data, whole, *A14B, nproc=2)
    assert "high-noise expert on the zero3 engine: 589,248 of 589,248 parameters train" in proc.stdout
    assert "low-noise expert" in proc.stdout
    la = losses(whole)
    assert sorted(la) == list(range(1, 7)) and la[6] != la[1]
    events = EventAccumulator(str(whole / "tensorboard"))
    events.Reload()
    per_expert = {e: {x.step: x.value for x in events.Scalars(f"train/loss_{e}")} for e in ("high", "low")}
    assert sorted([*per_expert["high"], *per_expert["low"]]) == list(range(1, 7))  # each step's loss, its expert's
    assert all(la[step] == value for curve in per_expert.values() for step, value in curve.items())
    ckpt = find_latest(whole)
    assert (ckpt / "high").is_dir() and (ckpt / "low").is_dir()
    # The run as if stopped after step 3: its folder with checkpoint-3 only, resumed by the same command.
    resumed = Path(shutil.copytree(whole, tmp_path / "resumed"))
    shutil.rmtree(resumed / "checkpoint-6")
    shutil.rmtree(resumed / "tensorboard")
    proc = torchrun(data, resumed, *A14B, nproc=2)
    assert "resumed from" in proc.stdout and "at step 3" in proc.stdout
    lb = losses(resumed)
    assert sorted(lb) == [4, 5, 6] and all(lb[s] == la[s] for s in lb), (la, lb)
    # tools/zero_to_bf16.py writes both experts in the release's layout: the same weights, bit for bit.
    for run in (whole, resumed):
        merge(find_latest(run), tmp_path / f"{run.name}_merged", dtype="fp32", log=lambda _: None)
    folders = [expert_folders(tmp_path / f"{run}_merged") for run in ("whole", "resumed")]
    assert folders[0]["high"].name == "high_noise_model" and folders[0]["low"].name == "low_noise_model"
    for expert in ("high", "low"):
        a, b = (WanModel.from_pretrained(f[expert], dtype=None).state_dict() for f in folders)
        assert all(torch.equal(a[k], b[k]) for k in a)
    high, low = (WanModel.from_pretrained(folders[0][e], dtype=None).state_dict() for e in ("high", "low"))
    assert not torch.equal(high["blocks.1.ffn.2.weight"], low["blocks.1.ffn.2.weight"])


@pytest.mark.slow
@pytest.mark.heavy  # CI's heavy tier, for time
def test_a_resume_must_train_the_same_experts(data, tmp_path):
    """A checkpoint of both experts does not resume as a run of one (nor a one-DiT checkpoint as A14B):
    refused before any model is built, naming what differs and the way on."""
    out = tmp_path / "run"
    torchrun(data, out, "--preset=debug-t2v-A14B", "--max_train_steps=1", "--checkpointing_steps=1")
    proc = torchrun(data, out, "--preset=debug-t2v-A14B", "--train_experts=high", "--max_train_steps=2", check=False)
    assert proc.returncode != 0
    assert "holds the Wan2.2 A14B experts ['high', 'low'], this run trains the Wan2.2 A14B experts ['high']" in (
        proc.stdout + proc.stderr
    )
    proc = torchrun(data, out, "--preset=debug", "--max_train_steps=2", check=False)
    assert "this run trains one DiT (no experts)" in proc.stdout + proc.stderr


@pytest.mark.slow
@pytest.mark.heavy  # CI's heavy tier, for time
def test_ema_and_consolidated_weights_per_expert(data, tmp_path):
    """[ema] keeps an average per expert (ema/ in each expert's folder) that a resume continues bit for bit;
    zero_to_bf16 --ema writes both averages; the consolidated export is a release-layout pair that loads."""
    args = ["--preset=debug-t2v-A14B", "--engine=zero2", "--max_train_steps=4", "--checkpointing_steps=2",
            "--checkpoints_total_limit=0", "--ema.enabled=true", "--ema.decay=0.5", "--save_consolidated_weights=true",
            "--lr_warmup_steps=0"]  # fmt: skip
    whole = tmp_path / "whole"
    torchrun(data, whole, *args, nproc=2)
    ckpt = find_latest(whole)
    assert all((ckpt / e / "ema").is_dir() for e in ("high", "low"))
    consolidated = expert_folders(ckpt / "consolidated")
    assert consolidated is not None and WanModel.from_pretrained(consolidated["low"]).model_type == "t2v"
    resumed = Path(shutil.copytree(whole, tmp_path / "resumed"))
    shutil.rmtree(resumed / "checkpoint-4")
    torchrun(data, resumed, *args, nproc=2)
    for run in (whole, resumed):
        merge(find_latest(run), tmp_path / f"{run.name}_ema", dtype="fp32", ema=True, log=lambda _: None)
        merge(find_latest(run), tmp_path / f"{run.name}_weights", dtype="fp32", log=lambda _: None)
    for expert in ("high", "low"):
        a, b, w = (
            WanModel.from_pretrained(expert_folders(tmp_path / name)[expert], dtype=None).state_dict()
            for name in ("whole_ema", "resumed_ema", "whole_weights")
        )
        assert all(torch.equal(a[k], b[k]) for k in a)
        if expert == "low":  # trained on most of the 4 steps (the high-noise expert on at most one)
            assert any(not torch.equal(a[k], w[k]) for k in a)  # an average, not the weights


@pytest.mark.slow
def test_lora_on_both_experts_exports_an_adapter_per_expert(data, tmp_path):
    """[lora] on an A14B run: each expert trains its own adapter; tools/export_lora.py writes one file per
    expert (--expert), refusing to guess; zero_to_bf16 merges each into its expert."""
    from tools.export_lora import export_lora

    out = tmp_path / "lora"
    torchrun(data, out, "--preset=debug-t2v-A14B", "--rank=4", "--network_alpha=4", "--max_train_steps=3",
             "--checkpointing_steps=3", "--lr_warmup_steps=0", nproc=2)  # fmt: skip
    ckpt = find_latest(out)
    with pytest.raises(ValueError, match="an adapter per expert: give --expert high or low"):
        export_lora(ckpt, tmp_path / "x.safetensors")
    files = {e: export_lora(ckpt, tmp_path / f"{e}.safetensors", expert=e) for e in ("high", "low")}
    assert files["high"].keys() == files["low"].keys()
    assert any("lora_B" in k for k in files["low"])
    merge(ckpt, tmp_path / "merged", dtype="fp32", log=lambda _: None)
    assert expert_folders(tmp_path / "merged") is not None
