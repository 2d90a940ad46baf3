"""The training loop end to end on the debug models and the demo dataset, with real processes (gloo):
2 ranks equal 1 rank at the same global batch, accumulation equals a larger batch, a SIGKILL in the
middle of a checkpoint save loses nothing and the resumed run is bitwise the uninterrupted one,
trainable_modules freezes the rest, i2v trains, bad configs are refused with every problem listed,
and non-finite losses skip updates and stop the run."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ranks import free_port
from safetensors.torch import load_file
from train_runs import REPO, assert_close_runs, base_args, data, final_weights, losses, torchrun

from train.checkpoint import KILL_ENV
from train.checkpoint_verify import find_latest
from train.config import load_config
from train.main import Trainer
from train.models import T5_FILE
from wan import WanModel, dit_preset

__all__ = ["data"]  # a fixture


@pytest.fixture(scope="module")
def two_ranks(data, tmp_path_factory) -> Path:
    """6 steps on 2 ranks of batch 1 (debug.toml's), run once: the reference of the 1-rank and of the
    two-node runs. Read-only."""
    out = tmp_path_factory.mktemp("two_ranks") / "two"
    torchrun(data, out, "--max_train_steps=6", "--train_batch_size=1", nproc=2)
    return out


@pytest.mark.slow
def test_two_ranks_equal_one_rank_at_the_same_global_batch(data, two_ranks, tmp_path):
    torchrun(data, tmp_path / "one", "--max_train_steps=6", "--train_batch_size=2", nproc=1)
    assert_close_runs(two_ranks, tmp_path / "one", 6)


@pytest.mark.slow
def test_accumulation_equals_a_larger_batch(data, tmp_path):
    torchrun(data, tmp_path / "accum", "--max_train_steps=6", "--train_batch_size=1", "--gradient_accumulation_steps=2")
    torchrun(data, tmp_path / "batch", "--max_train_steps=6", "--train_batch_size=2")
    assert_close_runs(tmp_path / "accum", tmp_path / "batch", 6)


@pytest.mark.slow
def test_kill_during_save_then_resume_is_bitwise_the_uninterrupted_run(data, tmp_path):
    args = ["--max_train_steps=8", "--checkpointing_steps=4", "--dataloader_num_workers=1", "--lr_scheduler=cosine"]
    torchrun(data, tmp_path / "straight", *args, nproc=2)

    crashed = torchrun(data, tmp_path / "crash", *args, nproc=2, env={KILL_ENV: "8"}, check=False)
    assert crashed.returncode != 0
    assert find_latest(tmp_path / "crash").name == "checkpoint-4"  # the half-written 8 does not count
    assert (tmp_path / "crash" / "checkpoint-8.tmp").exists()
    resumed = torchrun(data, tmp_path / "crash", *args, nproc=2)  # resume_from_checkpoint = "latest"
    assert "resumed from" in resumed.stdout and "checkpoint-4" in resumed.stdout

    assert find_latest(tmp_path / "crash").name == "checkpoint-8"
    assert losses(tmp_path / "crash") == losses(tmp_path / "straight")  # bitwise, steps 1..8
    straight, again = final_weights(tmp_path / "straight"), final_weights(tmp_path / "crash")
    assert straight.keys() == again.keys()
    assert all(torch.equal(straight[k], again[k]) for k in straight)
    optim = [load_file(tmp_path / run / "checkpoint-8" / "optimizer.safetensors") for run in ("straight", "crash")]
    assert all(torch.equal(optim[0][k], optim[1][k]) for k in optim[0])
    with pytest.raises(ValueError, match="global batch is 1 x 2 x 1.*1 x 1 x 1"):  # 1 process, other batch
        in_process(data, tmp_path / "crash", "--max_train_steps=12")


def in_process(data: Path, out: Path, *overrides: str) -> Trainer:
    return Trainer(load_config([*base_args(data, out), *overrides]))


def fresh_dit(preset: str, seed: int = 42) -> WanModel:
    torch.manual_seed(seed)  # as train.models builds it
    return WanModel(**dit_preset(preset))


def test_trainable_modules_freezes_the_rest(data, tmp_path):
    trainer = in_process(data, tmp_path, "--max_train_steps=3", "--trainable_modules=blocks.1.ffn,head.head")
    trainer.train()
    trained = dict(trainer.engine.module.named_parameters())
    before = dict(fresh_dit("debug").named_parameters())
    names = {n for n in trained if "blocks.1.ffn" in n or "head.head" in n}
    assert names and set(final_weights(tmp_path)) == names  # the checkpoint holds exactly those
    for name, param in trained.items():
        if name in names:
            assert not torch.equal(param, before[name]), name
            assert param.requires_grad
        else:
            assert torch.equal(param, before[name]), name
            assert param.grad is None and not param.requires_grad
    state = trainer.engine.optimizer.state
    assert {trainer.engine.names_by_param[p] for p in state} == names  # no optimizer state for frozen ones


def test_i2v_mode_trains_on_the_debug_preset(data, tmp_path):
    trainer = in_process(data, tmp_path, "--max_train_steps=3", "--preset=debug-i2v", "--train_mode=i2v")
    trainer.train()
    assert set(losses(tmp_path)) == {1, 2, 3}
    before = dict(fresh_dit("debug-i2v").named_parameters())
    after = dict(trainer.engine.module.named_parameters())
    # The image path learns: CLIP features reach img_emb, the first-frame latents the patch embedding.
    assert not torch.equal(after["img_emb.proj.1.weight"], before["img_emb.proj.1.weight"])
    assert not torch.equal(after["patch_embedding.weight"], before["patch_embedding.weight"])


def test_non_finite_losses_skip_updates_then_stop_the_run(data, tmp_path):
    trainer = in_process(data, tmp_path, "--max_train_steps=10", "--max_nonfinite_steps=3")
    with torch.no_grad():
        trainer.engine.module.head.head.bias.fill_(float("nan"))  # every prediction NaN
    weights = {n: p.clone() for n, p in trainer.engine.module.named_parameters()}
    with pytest.raises(RuntimeError, match="3 steps in a row had a non-finite loss"):
        trainer.train()
    assert trainer.state.step == 3
    for name, param in trainer.engine.module.named_parameters():  # no update was applied
        assert torch.equal(param, weights[name]) or torch.isnan(weights[name]).all(), name


@pytest.mark.slow
def test_bad_config_is_refused_with_every_problem(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[optim]\nlearning_rate = "fast"\n[train]\ntrain_batch_size = 0\nbogus = 1\n')
    cmd = [sys.executable, "-m", "train.main", "--cfg", str(bad), "--lr_scheduler=wavy", "--engine=zero4"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2
    for expected in ("learning_rate", "train_batch_size", "bogus", "wavy", "zero4", "train_data", str(bad)):
        assert expected in proc.stderr, expected
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_help_lists_every_option():
    proc = subprocess.run(
        [sys.executable, "-m", "train.main", "--help"], cwd=REPO, capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert proc.returncode == 0
    for key in ("learning_rate", "train_data_meta", "checkpoints_total_limit", "engine", "trainable_modules"):
        assert key in proc.stdout


@pytest.mark.slow
def test_two_nodes_by_rendezvous_train_as_one_node(data, two_ranks, tmp_path):
    """launch/multi_node.sh twice on 127.0.0.1 (NNODES=2, one process each) = one node of 2 processes
    (the module's 2-rank run)."""
    env = {
        **os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHON": sys.executable, "NNODES": "2",
        "NPROC": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RDZV_ID": "test",
    }  # fmt: skip
    cmd = ["launch/multi_node.sh", *base_args(data, tmp_path / "two_nodes")[1:], "--max_train_steps=6"]
    nodes = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)]
    nodes.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert all(node.returncode == 0 for node in nodes), "\n".join(o[-3000:] for o in outputs)
    assert_close_runs(tmp_path / "two_nodes", two_ranks, 6)


def test_trains_from_a_release_folder(data, release_folder, tmp_path):
    released = dict(fresh_dit("debug", seed=7).named_parameters())  # what write_release_folder saved
    trainer = in_process(
        data, tmp_path / "out", "--max_train_steps=2", f"--pretrained_model_name_or_path={release_folder}"
    )
    loaded = dict(trainer.engine.module.named_parameters())
    assert all(torch.equal(loaded[k], released[k]) for k in released)  # the release weights, not a random init
    trainer.train()
    assert set(losses(tmp_path / "out")) == {1, 2}
    assert not torch.equal(trainer.engine.module.head.head.bias, released["head.head.bias"])


def test_release_folder_errors_name_what_is_wrong(data, release_folder, copy_release, tmp_path):
    release = copy_release()
    (release / T5_FILE).unlink()
    with pytest.raises(ValueError, match=f"lacks: .*{T5_FILE}"):
        in_process(data, tmp_path / "a", f"--pretrained_model_name_or_path={release}")
    with pytest.raises(ValueError, match="needs an i2v DiT.*input width 16"):  # a t2v folder in i2v mode
        in_process(data, tmp_path / "b", f"--pretrained_model_name_or_path={release_folder}", "--train_mode=i2v")
