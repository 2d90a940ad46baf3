"""Wan2.2 release folders load: built here with the published file names and config.json fields (tiny
widths instead of the real ones: the real shapes are checked on the meta device in
tests/unit/test_dit_presets.py), in the official layout and in diffusers'.

Published layouts:
- Wan2.2-T2V-A14B / Wan2.2-I2V-A14B: high_noise_model/ and low_noise_model/, each config.json plus
  diffusion_pytorch_model-0000N-of-00006.safetensors and their index (I2V's config.json has no field
  telling that it lacks the CLIP branch: its tensors tell).
- Wan2.2-TI2V-5B: config.json (model_type "ti2v") and diffusion_pytorch_model-0000N-of-00003.safetensors.
- diffusers: transformer/ (the high-noise expert), transformer_2/ (the low-noise one), model_index.json
  with boundary_ratio.
"""

import json
from pathlib import Path

import pytest
import torch
from diffusers import WanTransformer3DModel
from dit_reference import build_pair, diffusers_kwargs, randomize, rel_err
from safetensors.torch import save_file

from wan import WanModel, dit_preset
from wan.modules.dit_weights import diffusers_boundary, expert_folders, read_dit_folder

TINY = dict(dim=128, num_heads=4, ffn_dim=160, num_layers=3, text_dim=4096)  # release configs omit text_dim


def release_config(cfg: dict) -> dict:
    """config.json as the Wan2.2 releases write it (no image_dim, no text_dim, no patch_size)."""
    keys = ("dim", "eps", "ffn_dim", "freq_dim", "in_dim", "model_type", "num_heads", "num_layers", "out_dim",
            "text_len")  # fmt: skip
    return {"_class_name": "WanModel", "_diffusers_version": "0.33.0", **{k: cfg[k] for k in keys}}


def write_official(folder: Path, cfg: dict, num_shards: int, seed: int) -> dict[str, torch.Tensor]:
    """A random DiT of `cfg` written as the release shards it: -> its tensors."""
    torch.manual_seed(seed)
    model = WanModel(**cfg)
    randomize(model, seed)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    folder.mkdir(parents=True)
    names = sorted(state)
    weight_map = {}
    for i in range(num_shards):
        file = f"diffusion_pytorch_model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        part = names[i::num_shards]
        save_file({k: state[k] for k in part}, folder / file)
        weight_map.update(dict.fromkeys(part, file))
    index = {"metadata": {"total_size": sum(t.numel() * 4 for t in state.values())}, "weight_map": weight_map}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text(json.dumps(release_config(model.config)))
    return state


def assert_loads(folder: Path, state: dict[str, torch.Tensor]) -> WanModel:
    model = WanModel.from_pretrained(folder)
    loaded = model.state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    return model


@pytest.mark.parametrize("kind", ["t2v", "i2v"])
def test_official_a14b_folder_loads_both_experts(tmp_path, kind):
    cfg = dict(dit_preset("debug" if kind == "t2v" else "debug-i2v-A14B"), **TINY)
    root = tmp_path / f"Wan2.2-{kind.upper()}-A14B"
    states = {e: write_official(root / f"{e}_noise_model", cfg, 6, seed) for e, seed in (("high", 1), ("low", 2))}
    experts = expert_folders(root)
    assert experts == {"high": root / "high_noise_model", "low": root / "low_noise_model"}
    models = {e: assert_loads(experts[e], states[e]) for e in experts}
    if kind == "i2v":  # told by the tensors: no img_emb, so no CLIP branch
        assert models["high"].image_dim is None and read_dit_folder(experts["low"])[1]["image_dim"] is None
        assert models["high"].in_dim == 36 and not hasattr(models["high"], "img_emb")
    with pytest.raises(ValueError, match="a Wan2.2 A14B folder holds two DiTs.*high_noise_model"):
        WanModel.from_pretrained(root)


def test_official_ti2v_5b_folder_loads(tmp_path):
    cfg = dict(dit_preset("debug-ti2v"), **TINY)
    root = tmp_path / "Wan2.2-TI2V-5B"
    state = write_official(root, cfg, 3, seed=3)
    assert expert_folders(root) is None
    model = assert_loads(root, state)
    assert model.model_type == "ti2v" and model.in_dim == model.out_dim == 48


def test_wan21_i2v_folder_keeps_its_clip_branch(tmp_path):
    """The tensors decide: a Wan2.1 I2V config.json (also without image_dim) with img_emb is Wan2.1's."""
    cfg = dict(dit_preset("debug-i2v"), **TINY, image_dim=1280)
    state = write_official(tmp_path / "i2v", cfg, 2, seed=4)
    assert assert_loads(tmp_path / "i2v", state).image_dim == 1280


def test_diffusers_a14b_pipeline_folder(tmp_path):
    cfg = dict(dit_preset("debug"), **TINY)
    root = tmp_path / "Wan2.2-T2V-A14B-Diffusers"
    refs = {}
    for expert, sub, seed in (("high", "transformer", 5), ("low", "transformer_2", 6)):
        refs[expert], _ = build_pair(cfg, seed=seed)
        refs[expert].save_pretrained(root / sub)
    (root / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline", "boundary_ratio": 0.875}))
    experts = expert_folders(root)
    assert experts == {"high": root / "transformer", "low": root / "transformer_2"}
    assert diffusers_boundary(root) == 0.875
    gen = torch.Generator().manual_seed(0)
    x, context, t = (
        torch.randn(1, 16, 2, 4, 6, generator=gen),
        torch.randn(1, 512, 4096, generator=gen),
        torch.tensor([900.0]),
    )
    for expert, ref in refs.items():
        ours = WanModel.from_pretrained(experts[expert])
        with torch.no_grad():
            assert rel_err(ours(x, t, context), ref(x, t, context, return_dict=False)[0]) <= 1e-5
    with pytest.raises(ValueError, match="two DiTs"):
        read_dit_folder(root)


def test_diffusers_ti2v_and_i2v_a14b_configs_map_to_their_model_types(tmp_path):
    for preset, model_type, image_dim in (("debug-ti2v", "ti2v", 1280), ("debug-i2v-A14B", "i2v", None)):
        cfg = dict(dit_preset(preset), **TINY)
        ref = WanTransformer3DModel(**diffusers_kwargs(cfg))
        ref.save_pretrained(tmp_path / preset)
        model = WanModel.from_pretrained(tmp_path / preset)
        assert model.model_type == model_type and model.config.get("image_dim", 1280) == image_dim


def test_half_an_a14b_folder_is_refused(tmp_path):
    cfg = dict(dit_preset("debug"), **TINY)
    write_official(tmp_path / "high_noise_model", cfg, 1, seed=1)
    with pytest.raises(ValueError, match="needs both experts; missing .*low_noise_model"):
        expert_folders(tmp_path)
