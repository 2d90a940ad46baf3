"""VideoX-Fun's model and logging options take effect in a run: transformer_path as one state-dict file
(a subset of tensors, VideoX-Fun's load_state_dict(strict=False)), vae_path, tokenizer_max_length,
scale_lr and logging_dir."""

import pytest
import torch
from safetensors.torch import save_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from train_runs import base_args, data

from train.config import load_config
from train.main import Trainer
from wan import WanModel, WanVAE, dit_preset, vae_preset

__all__ = ["data"]  # a fixture


def trainer(data, out, *flags: str) -> Trainer:
    return Trainer(load_config([*base_args(data, out), "--max_train_steps=1", *flags]))


def fresh_dit() -> WanModel:
    torch.manual_seed(42)  # the seeded random init of the debug preset, as train.models builds it
    return WanModel(**dit_preset("debug"))


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_transformer_path_file_replaces_the_tensors_it_holds(data, tmp_path, suffix):
    replaced = {"head.head.bias": torch.full_like(fresh_dit().head.head.bias, 0.5)}
    file = tmp_path / f"diffusion_pytorch_model{suffix}"
    if suffix == ".safetensors":
        save_file(replaced, file)
    else:
        torch.save({"state_dict": replaced}, file)  # VideoX-Fun also unwraps "state_dict"
    t = trainer(data, tmp_path / "out", f"--transformer_path={file}")
    loaded = dict(t.engine.module.named_parameters())
    assert torch.equal(loaded["head.head.bias"], replaced["head.head.bias"])
    for name, value in fresh_dit().named_parameters():
        if name != "head.head.bias":
            assert torch.equal(loaded[name], value), name


def test_transformer_path_file_with_unknown_or_misshaped_keys_is_refused(data, tmp_path):
    bias = fresh_dit().head.head.bias
    file = tmp_path / "bad.safetensors"
    save_file({"head.head.bias": torch.zeros(bias.numel() + 1), "not.a.key": torch.zeros(1)}, file)
    with pytest.raises(ValueError) as info:
        trainer(data, tmp_path / "out", f"--transformer_path={file}")
    assert "unexpected key 'not.a.key'" in str(info.value) and "head.head.bias" in str(info.value)


def test_vae_path_and_tokenizer_max_length(data, tmp_path):
    torch.manual_seed(3)
    vae = WanVAE(**vae_preset("debug"))
    torch.save(vae.state_dict(), tmp_path / "my_vae.pth")
    t = trainer(data, tmp_path / "out", f"--vae_path={tmp_path / 'my_vae.pth'}", "--tokenizer_max_length=32")
    mine = t.models.vae.state_dict()
    assert all(torch.equal(mine[k], v) for k, v in vae.state_dict().items())
    assert t.models.text(["a red fox"]).shape[1] == 32


def test_scale_lr_and_logging_dir(data, tmp_path):
    t = trainer(data, tmp_path / "out", "--scale_lr", "--train_batch_size=2", "--gradient_accumulation_steps=3",
                "--lr_scheduler=constant", "--logging_dir=logs")  # fmt: skip
    t.train()
    events = EventAccumulator(str(tmp_path / "out" / "logs"))
    events.Reload()
    (lr,) = [e.value for e in events.Scalars("train/lr")]
    assert lr == pytest.approx(1e-3 * 2 * 3)  # debug.toml's learning_rate x batch x accumulation x 1 rank
    assert not (tmp_path / "out" / "tensorboard").exists()
    assert load_config(["--cfg", str(tmp_path / "out" / "config.toml")]).optim.learning_rate == 1e-3  # as given
