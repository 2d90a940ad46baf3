"""Wan2.2 TI2V-5B training (train_mode = "ti2v", the debug ti2v DiT on the debug Wan2.2 VAE): every
engine trains alike from the same start and data (2 gloo ranks, fp32, the losses equal within 1e-6 of
DDP's), and the first latent frame is the clip's first frame's clean latent with its tokens at
timestep 0, out of the loss (train/inputs.py condition_first_frame)."""

import pytest
import torch
from train_runs import ENGINE_ARGS, data, losses, torchrun

from tools.zero_to_bf16 import merge
from train.checkpoint_verify import find_latest
from train.inputs import condition_first_frame
from wan import WanModel

__all__ = ["data"]  # a fixture

TI2V = ["--preset=debug-ti2v", "--train_mode=ti2v", "--bucket_side_multiple=32", "--max_train_steps=4",
        "--checkpointing_steps=4"]  # fmt: skip
HEAVY = {"zero2", "zero3"}  # DeepSpeed's path: the heavy tier, for time


@pytest.fixture(scope="module")
def ddp_run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ti2v") / "ddp"
    torchrun(data, out, *TI2V, "--engine=ddp", nproc=2)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("engine", [pytest.param(e, marks=[pytest.mark.heavy] if e in HEAVY else []) for e in
                                    ("zero2", "zero3", "fsdp")])  # fmt: skip
def test_every_engine_trains_ti2v_as_ddp_does(data, tmp_path, ddp_run, engine):
    out = tmp_path / engine
    torchrun(data, out, *TI2V, f"--engine={engine}", *ENGINE_ARGS[engine], nproc=2)
    la, lb = losses(ddp_run), losses(out)
    assert sorted(la) == sorted(lb) == [1, 2, 3, 4]
    for step in la:
        assert lb[step] == pytest.approx(la[step], rel=1e-6), step
    merged = tmp_path / "merged"
    merge(find_latest(out), merged, dtype="fp32", log=lambda _: None)
    model = WanModel.from_pretrained(merged, dtype=None)
    assert model.model_type == "ti2v" and model.out_dim == 48


def test_first_frame_conditioning():
    g = torch.Generator().manual_seed(0)
    x0, x_t = torch.randn(2, 2, 48, 3, 4, 6, generator=g)
    t = torch.tensor([700.0, 20.0])
    cond, t_tokens, loss_from = condition_first_frame(x0, x_t, t)
    assert torch.equal(cond[:, :, 0], x0[:, :, 0]) and torch.equal(cond[:, :, 1:], x_t[:, :, 1:]) and loss_from == 1
    per_frame = 2 * 3
    assert t_tokens.shape == (2, 3 * per_frame)
    assert (t_tokens[:, :per_frame] == 0).all() and (t_tokens[:, per_frame:] == t[:, None]).all()
    image = condition_first_frame(x0[:, :, :1], x_t[:, :, :1], t)  # an image: nothing given, all predicted
    assert image[1] is None and image[2] == 0 and torch.equal(image[0], x_t[:, :, :1])


@pytest.mark.slow
def test_ti2v_model_trains_text_to_video_too(data, tmp_path, ddp_run):
    """train_mode = "normal" on the TI2V DiT: every frame noised and predicted (one timestep a sample): the
    same data and draws as the ti2v run, other losses."""
    out = tmp_path / "t2v"
    torchrun(data, out, *[a for a in TI2V if not a.startswith("--train_mode")], "--train_mode=normal", nproc=2)
    normal, conditioned = losses(out), losses(ddp_run)
    assert sorted(normal) == [1, 2, 3, 4]
    assert normal[1] != conditioned[1]
