"""Checks that need no model run first: missing paths are all listed by `python -m train.config` and by
the trainer before any data or model is read, and a DeepSpeed file that conflicts with the run is
refused before any model is built."""

import json
import subprocess
import sys

import pytest
from train_runs import REPO, base_args, data

import train.setup
from train.config import load_config
from train.main import Trainer

__all__ = ["data"]  # a fixture


@pytest.mark.slow
def test_python_m_train_config_lists_every_missing_path(data, tmp_path):
    release = tmp_path / "release"
    release.mkdir()
    (release / "Wan2.1_VAE.pth").write_bytes(b"")
    cmd = [
        sys.executable, "-m", "train.config", "--cfg", str(REPO / "configs" / "debug.toml"),
        f"--pretrained_model_name_or_path={release}", f"--vae_path={tmp_path / 'nope.pth'}",
        f"--train_data_meta={tmp_path / 'meta.json'}", f"--transformer_path={tmp_path / 'merged'}",
        "--cache_dir=c", f"--validation_data_meta={tmp_path / 'held.json'}", "--eval_holdout=0",
        f"--latent_cache_dir={tmp_path / 'latents'}",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    err = proc.stderr
    assert "--cache_dir: no effect here" in err
    for missing in ("models_t5_umt5-xxl-enc-bf16.pth", "google/umt5-xxl", "vae_path", "nope.pth",
                    "train_data_meta", "meta.json", "transformer_path", "merged", "held.json", "latent_cache_dir"):  # fmt: skip
        assert missing in err, missing
    assert "Wan2.1_VAE.pth" not in err.split("lacks:")[1].split("\n")[0]  # present, so not listed
    good = [*cmd[:5], f"--train_data_dir={data}", f"--train_data_meta={data / 'metadata.json'}"]
    ok = subprocess.run(good, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    (tmp_path / "resolved.toml").write_text(ok.stdout)  # the resolved config, readable back
    assert load_config(["--cfg", str(tmp_path / "resolved.toml")]).data.train_data_dir == str(data)


def no_model_builds(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was built before the run's inputs were checked")

    monkeypatch.setattr(train.setup, "build_models", refuse)
    monkeypatch.setattr(train.setup, "build_dit_recipe", refuse)


def test_the_trainer_checks_paths_before_reading_anything(data, tmp_path, monkeypatch):
    no_model_builds(monkeypatch)
    args = [*base_args(data, tmp_path / "out"), f"--vae_path={tmp_path / 'vae.pth'}",
            f"--deepspeed_config={tmp_path / 'ds.json'}", "--engine=zero2"]  # fmt: skip
    with pytest.raises(ValueError, match=r"problems\):\n  vae_path .*vae.pth: no such file\n  deepspeed_config"):
        Trainer(load_config(args))
    assert not (tmp_path / "out").exists()  # nothing written, no data read


def test_a_conflicting_deepspeed_file_is_refused_before_any_model(data, tmp_path, monkeypatch):
    no_model_builds(monkeypatch)
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4, "gradient_clipping": "auto"}))
    args = [*base_args(data, tmp_path / "out"), f"--deepspeed_config={ds}", "--engine=zero2"]
    with pytest.raises(ValueError, match="train_micro_batch_size_per_gpu = 4 conflicts"):
        Trainer(load_config(args))
