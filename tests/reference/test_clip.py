"""The I2V CLIP image encoder against transformers' CLIPVisionModel (test-only reference), its
preprocessing against a computation written out here, and its loaders on official-layout .pth files
and Hugging Face folders, good and bad.

Parity tolerance: relative error ||ours - ref|| / ||ref|| <= 1e-4 in float32, against HF
`hidden_states[-2]` (eager attention). Measured: 2.2e-7 (debug preset) and 3.3e-7 (SMALL); with
bf16 weights (autocast) 5.8e-3 and 6.8e-3, checked against < 3e-2.
"""

import json

import pytest
import torch
import torch.nn.functional as F
from clip_reference import build_hf, official_state, ours_from_hf, rel_err
from safetensors.torch import load_file, save_file
from transformers import CLIPConfig, CLIPModel

from wan.modules.clip import CLIP_MEAN, CLIP_PRESETS, CLIP_STD, CLIPVision, preprocess

PARITY_RTOL = 1e-4
DEBUG = CLIP_PRESETS["debug"]
# A second tiny tower: other widths, 3x3 patches, more blocks.
SMALL = dict(image_size=42, patch_size=14, width=96, mlp_dim=160, num_heads=6, num_layers=4, eps=1e-5)


def hf_penultimate(hf, pixels: torch.Tensor) -> torch.Tensor:
    out = hf(pixel_values=pixels, output_hidden_states=True)
    # The embeddings (after pre_layrnorm) and one entry per layer: [-2] is after num_layers - 1 layers.
    assert len(out.hidden_states) == hf.config.num_hidden_layers + 1
    return out.hidden_states[-2]


def pixels(cfg: dict, batch: int = 2, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, cfg["image_size"], cfg["image_size"], generator=gen)


@pytest.fixture(scope="module", params=["debug", "small"])
def pair(request):
    cfg = DEBUG if request.param == "debug" else SMALL
    hf = build_hf(cfg, seed=1)
    return cfg, hf, ours_from_hf(cfg, hf)


def test_matches_hf_penultimate_layer(pair):
    cfg, hf, ours = pair
    x = pixels(cfg)
    with torch.no_grad():
        out = ours(x)
        expected = hf_penultimate(hf, x)
    tokens = 1 + (cfg["image_size"] // cfg["patch_size"]) ** 2
    assert out.shape == (2, tokens, cfg["width"]) == (2, ours.num_tokens, ours.out_dim)
    assert out.dtype == torch.float32
    assert rel_err(out, expected) <= PARITY_RTOL
    # Not the last layer's output: the last block is not run (nor built).
    assert len(ours.transformer) == cfg["num_layers"] - 1
    with torch.no_grad():
        assert rel_err(out, hf(pixel_values=x).last_hidden_state) > 1e-2


def test_encode_image_is_forward_of_preprocess(pair):
    cfg, hf, ours = pair
    gen = torch.Generator().manual_seed(5)
    images = torch.rand(3, 3, 37, 61, generator=gen) * 2 - 1
    with torch.no_grad():
        feats = ours.encode_image(images)
        expected = hf_penultimate(hf, preprocess(images, cfg["image_size"]))
    assert feats.shape == (3, ours.num_tokens, cfg["width"]) and feats.dtype == torch.float32
    assert rel_err(feats, expected) <= PARITY_RTOL


def test_vit_h_preset_matches_the_release():
    cfg = CLIP_PRESETS["vit-h-14"]
    with torch.device("meta"):
        model = CLIPVision(**cfg)
    assert (model.num_tokens, model.out_dim) == (257, 1280)
    assert list(model.pos_embedding.shape) == [1, 257, 1280]
    assert list(model.patch_embedding.weight.shape) == [1280, 3, 14, 14] and model.patch_embedding.bias is None
    assert list(model.transformer[0].mlp[0].weight.shape) == [5120, 1280]
    assert len(model.transformer) == 31 and model.transformer[0].attn.num_heads == 16


def test_meta_construction_then_init_weights():
    with torch.device("meta"):
        model = CLIPVision(**DEBUG)
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    model.init_weights()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    with torch.no_grad():
        assert torch.isfinite(model.encode_image(torch.rand(1, 3, 50, 50) * 2 - 1)).all()


def test_bf16_weights_stay_close():
    hf = build_hf(SMALL, seed=2)
    ours = ours_from_hf(SMALL, hf).to(torch.bfloat16)
    x = pixels(SMALL)
    with torch.no_grad():
        out = ours(x)
        expected = hf_penultimate(hf, x)
    assert out.dtype == torch.float32
    assert rel_err(out, expected) < 3e-2


# --------------------------------------------------------------------------------------------------
# Preprocessing


def reference_preprocess(images: torch.Tensor, size: int) -> torch.Tensor:
    """Written out independently: map to [0, 1] first, resize, then normalise channel by channel.
    The resize stays float32 as in the reference: torch's float32 bicubic computes source
    coordinates in float32, so a float64 resize differs by up to ~1e-4 on noise images."""
    x = F.interpolate((images + 1) / 2, size=(size, size), mode="bicubic", align_corners=False).double()
    channels = [(x[:, c] - CLIP_MEAN[c]) / CLIP_STD[c] for c in range(3)]
    return torch.stack(channels, dim=1)


@pytest.mark.parametrize("hw", [(480, 832), (224, 224), (100, 300), (17, 16)])
def test_preprocess_matches_independent_computation(hw):
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, *hw, generator=gen) * 2 - 1
    out = preprocess(images, 224)
    assert out.shape == (2, 3, 224, 224) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), reference_preprocess(images, 224), rtol=0, atol=1e-5)


def test_preprocess_does_not_clamp_bicubic_overshoot():
    images = -torch.ones(1, 3, 8, 8)
    images[..., 4:] = 1.0  # a hard edge: bicubic rings past [-1, 1]
    out = preprocess(images, 224)
    upper = (1.0 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert (out.amax(dim=(0, 2, 3)) > upper + 1e-3).all()


def test_preprocess_at_native_size_only_normalises():
    images = torch.rand(1, 3, 28, 28) * 2 - 1
    expected = (images * 0.5 + 0.5 - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(preprocess(images, 28), expected, rtol=0, atol=1e-6)


def test_bad_inputs_are_refused():
    model = CLIPVision(**DEBUG)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        model.encode_image(torch.rand(3, 40, 40))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        model.encode_image(torch.rand(1, 4, 40, 40))
    with pytest.raises(ValueError, match="floating"):
        model.encode_image(torch.zeros(1, 3, 40, 40, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"preprocessed images \[B, 3, 28, 28\]"):
        model(torch.rand(1, 3, 27, 28))
    with pytest.raises(ValueError, match="preprocessed"):
        model(torch.rand(3, 28, 28))
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        CLIPVision(**dict(DEBUG, image_size=30))
    with pytest.raises(ValueError, match="num_heads"):
        CLIPVision(**dict(DEBUG, num_heads=5))


# --------------------------------------------------------------------------------------------------
# Official .pth files


@pytest.fixture(scope="module")
def small_hf():
    return build_hf(SMALL, seed=3)


def assert_loaded_matches(model: CLIPVision, hf, cfg: dict):
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters())
    x = pixels(cfg, seed=7)
    with torch.no_grad():
        assert rel_err(model(x), hf_penultimate(hf, x)) <= PARITY_RTOL


def test_official_pth_loads_strictly_and_matches(tmp_path, small_hf):
    state = {k: v.half() for k, v in official_state(small_hf).items()}  # the release stores fp16
    torch.save(state, tmp_path / "clip.pth")
    model = CLIPVision.from_pretrained(tmp_path / "clip.pth", config=SMALL)
    assert not model.training
    reference = ours_from_hf(SMALL, small_hf)
    for name, tensor in model.state_dict().items():  # every tensor came from the file
        torch.testing.assert_close(tensor, reference.state_dict()[name].half().float(), rtol=0, atol=0)
    x = pixels(SMALL, seed=7)
    with torch.no_grad():
        assert rel_err(model(x), hf_penultimate(small_hf, x)) < 5e-3  # fp16-rounded weights

    torch.save(official_state(small_hf), tmp_path / "clip32.pth")
    assert_loaded_matches(CLIPVision.from_pretrained(tmp_path / "clip32.pth", config=SMALL), small_hf, SMALL)
    bf16 = CLIPVision.from_pretrained(tmp_path / "clip32.pth", dtype=torch.bfloat16, config=SMALL)
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())


def test_official_keys_without_visual_prefix_load(tmp_path, small_hf):
    state = {k.removeprefix("visual."): v for k, v in official_state(small_hf, extras=False).items()}
    torch.save(state, tmp_path / "vision.pth")
    assert_loaded_matches(CLIPVision.from_pretrained(tmp_path / "vision.pth", config=SMALL), small_hf, SMALL)


def test_default_config_is_vit_h(tmp_path, small_hf):
    torch.save(official_state(small_hf), tmp_path / "clip.pth")
    with pytest.raises(ValueError, match=r"visual\.pos_embedding.*\[1, 10, 96\].*\[1, 257, 1280\]"):
        CLIPVision.from_pretrained(tmp_path / "clip.pth")


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda s: s.update({"visual.transformer.0.attn.extra": torch.zeros(3)}), r"unexpected key 'visual\.transformer\.0\.attn\.extra'"),
        (lambda s: s.pop("visual.transformer.1.mlp.2.bias"), r"missing from clip\.pth: transformer\.1\.mlp\.2\.bias"),
        (lambda s: s.update({"visual.pos_embedding": torch.zeros(1, 5, 96)}), r"'visual\.pos_embedding' has shape \[1, 5, 96\].*\[1, 10, 96\]"),
        # The unbuilt last block is still checked.
        (lambda s: s.pop("visual.transformer.3.norm2.weight"), r"last block.*\n.*missing from clip\.pth: transformer\.3\.norm2\.weight"),
        (lambda s: s.update({"visual.transformer.3.mlp.0.weight": torch.zeros(7, 96)}), r"'visual\.transformer\.3\.mlp\.0\.weight' has shape \[7, 96\]"),
        (lambda s: s.update({"visual.transformer.4.norm1.weight": torch.zeros(96)}), r"unexpected key 'visual\.transformer\.4\.norm1\.weight'"),
        (lambda s: s.update({"transformer.0.norm1.weight": torch.zeros(96)}), r"'transformer\.0\.norm1\.weight'.*also appears"),
    ],
)  # fmt: skip
def test_bad_official_files_are_refused(tmp_path, small_hf, edit, message):
    state = official_state(small_hf)
    edit(state)
    torch.save(state, tmp_path / "clip.pth")
    with pytest.raises(ValueError, match=message):
        CLIPVision.from_pretrained(tmp_path / "clip.pth", config=SMALL)


def test_unreadable_official_files_are_refused(tmp_path, small_hf):
    torch.save(official_state(small_hf), tmp_path / "clip.pth")
    data = (tmp_path / "clip.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut\.pth: not a readable torch state dict"):
        CLIPVision.from_pretrained(tmp_path / "cut.pth", config=SMALL)
    torch.save([torch.zeros(3)], tmp_path / "list.pth")
    with pytest.raises(ValueError, match=r"list\.pth: holds a list"):
        CLIPVision.from_pretrained(tmp_path / "list.pth", config=SMALL)
    torch.save({"visual.cls_embedding": 3}, tmp_path / "notensor.pth")
    with pytest.raises(ValueError, match=r"notensor\.pth: not a state dict of tensors.*visual\.cls_embedding"):
        CLIPVision.from_pretrained(tmp_path / "notensor.pth", config=SMALL)
    with pytest.raises(ValueError, match="no such file"):
        CLIPVision.from_pretrained(tmp_path / "absent.pth", config=SMALL)


# --------------------------------------------------------------------------------------------------
# Hugging Face folders


def test_hf_folder_written_by_transformers_loads(tmp_path, small_hf):
    small_hf.save_pretrained(tmp_path)
    model = CLIPVision.from_pretrained(tmp_path)
    assert model.config == SMALL
    assert_loaded_matches(model, small_hf, SMALL)
    for name, tensor in ours_from_hf(SMALL, small_hf).state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name


def test_hf_folder_with_vision_model_prefix_loads(tmp_path, small_hf):
    """transformers 4.x writes CLIPVisionModel keys under `vision_model.`."""
    small_hf.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    assert not any(k.startswith("vision_model.") for k in state)  # transformers 5.x
    save_file({"vision_model." + k: v for k, v in state.items()}, tmp_path / "model.safetensors")
    assert_loaded_matches(CLIPVision.from_pretrained(tmp_path), small_hf, SMALL)


def test_hf_clip_model_folder_loads_its_vision_tower(tmp_path):
    config = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=99),
        vision_config=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                           image_size=28, patch_size=14, hidden_act="gelu", layer_norm_eps=1e-5),
        projection_dim=16,
    )  # fmt: skip
    full = CLIPModel(config).eval()
    full.save_pretrained(tmp_path)
    model = CLIPVision.from_pretrained(tmp_path)
    assert model.config == DEBUG
    x = pixels(DEBUG)
    with torch.no_grad():
        expected = full.vision_model(pixel_values=x, output_hidden_states=True).hidden_states[-2]
        assert rel_err(model(x), expected) <= PARITY_RTOL


def rewrite(folder, edit):
    state = load_file(folder / "model.safetensors")
    edit(state)
    save_file(state, folder / "model.safetensors")


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda s: s.pop("encoder.layers.1.self_attn.k_proj.bias"), r"'encoder\.layers\.1\.self_attn\.q_proj\.bias \+ .*v_proj\.bias' present but k_proj missing"),
        (lambda s: s.update({"encoder.layers.0.self_attn.v_proj.weight": torch.zeros(96, 95)}), r"q/k/v shapes differ.*v_proj\.weight' \[96, 95\]"),
        (lambda s: s.update({"embeddings.class_embedding": torch.zeros(95)}), r"'embeddings\.class_embedding' has shape \[1, 1, 95\]"),
        (lambda s: s.update({"encoder.layers.0.extra.weight": torch.zeros(2)}), r"unexpected key 'encoder\.layers\.0\.extra\.weight'"),
        (lambda s: s.pop("encoder.layers.3.mlp.fc2.weight"), r"last block.*\n.*missing from model\.safetensors: transformer\.3\.mlp\.2\.weight"),
        (lambda s: s.pop("pre_layrnorm.bias"), r"missing from model\.safetensors: pre_norm\.bias"),
    ],
)  # fmt: skip
def test_bad_hf_folders_are_refused(tmp_path, small_hf, edit, message):
    small_hf.save_pretrained(tmp_path)
    rewrite(tmp_path, edit)
    with pytest.raises(ValueError, match=message):
        CLIPVision.from_pretrained(tmp_path)


def test_bad_hf_configs_and_files_are_refused(tmp_path, small_hf):
    small_hf.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(cfg, hidden_act="quick_gelu")))
    with pytest.raises(ValueError, match=r"config\.json.*hidden_act 'quick_gelu'"):
        CLIPVision.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(dict(cfg, num_hidden_layers=5)))
    with pytest.raises(ValueError, match=r"last block.*\n.*missing from .*: transformer\.4\.norm1\.weight"):
        CLIPVision.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="do not pass config"):
        CLIPVision.from_pretrained(tmp_path, config=SMALL)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-100])
    with pytest.raises(ValueError, match=r"model\.safetensors: key .* truncated"):
        CLIPVision.from_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="neither model.safetensors"):
        CLIPVision.from_pretrained(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(ValueError, match="no config.json"):
        CLIPVision.from_pretrained(tmp_path)
