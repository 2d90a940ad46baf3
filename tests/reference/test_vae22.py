"""Our Wan2.2 VAE (WanVAE22) against diffusers' AutoencoderKLWan with the Wan2.2 settings (is_residual,
patch_size 2, 12 channels in and out, a decoder base width of its own), same random weights, loaded
into ours through a real diffusers folder (save_pretrained, then WanVAE22.from_pretrained).

Tolerance: relative error ||ours - ref|| / ||ref|| <= 1e-5 in float32, for the normalised latents
(diffusers' latent_dist.mean normalised as its pipelines do, (mu - mean) * (1/std)) and for the
decoded video (diffusers decodes z / (1/std) + mean). Measured on the tiny config (widths 8 / 12,
z_dim 8 with its own statistics), 1-9 frames, batch 1-2, non-square: encode 4.4e-7 .. 7.7e-7,
decode 4.6e-7 .. 7.0e-7; with temporal_downsample [True, True, False] (where the decoder's
first-chunk shortcut crop shows): encode 3.5e-7, decode 7.7e-7; spatial tiling against diffusers'
tiling: encode 6.3e-7, decode 5.8e-7; bf16 weights: 1e-2 (bound 5e-2). The float32 differences are
the same sums in another order: the conv's own spatial padding, the zero-tap skip on the first
chunk, the per-frame Conv2d run as a 1x3x3 Conv3d.
"""

import json

import pytest
import torch
from diffusers import AutoencoderKLWan
from vae_reference import (
    diffusers22_kwargs,
    diffusers_kwargs,
    official22_keys,
    official22_to_diffusers_key,
    randomize,
    reference_decode,
    reference_encode,
    rel_err,
)

from wan.modules.vae import WanVAE, vae_preset
from wan.modules.vae2_2 import VAE22_PRESETS, WanVAE22, load_any_vae, vae22_preset
from wan.modules.vae_weights import OFFICIAL_NAME, OFFICIAL_NAME_22, diffusers22_to_official_key

PARITY_RTOL = 1e-5
CASES = [  # (batch, frames, height, width): T = 1 + 4k, H and W multiples of 16, non-square
    (1, 1, 32, 48),
    (2, 5, 48, 32),
    (1, 9, 32, 64),
    (2, 9, 16, 48),
]


def tiny_config(**changes) -> dict:
    """The debug structure with z_dim 8 and statistics of its own (not the release's 48)."""
    gen = torch.Generator().manual_seed(7)
    stats = dict(latents_mean=(0.3 * torch.randn(8, generator=gen)).tolist(),
                 latents_std=(0.5 + torch.rand(8, generator=gen)).tolist())  # fmt: skip
    return dict(vae22_preset("debug"), z_dim=8, **stats, **changes)


def reference(cfg: dict, seed: int) -> AutoencoderKLWan:
    torch.manual_seed(seed)
    ref = AutoencoderKLWan(**diffusers22_kwargs(cfg)).eval()
    randomize(ref, seed)
    return ref


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tensors are tiny: one thread is fastest (see test_vae.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(diffusers reference, ours loaded from the folder diffusers wrote, that folder)."""
    ref = reference(tiny_config(), seed=1)
    folder = tmp_path_factory.mktemp("vae22") / "vae"
    ref.save_pretrained(folder)
    return ref, WanVAE22.from_pretrained(folder), folder


def video(b, t, h, w, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, t, h, w, generator=gen) * 2 - 1


def latents(b, f, h, w, z_dim=8, seed=0):
    return torch.randn(b, z_dim, f, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("b,t,h,w", CASES)
def test_encode_matches_diffusers(pair, b, t, h, w):
    ref, ours, _ = pair
    x = video(b, t, h, w)
    z = ours.encode(x)
    assert z.shape == (b, 8, 1 + (t - 1) // 4, h // 16, w // 16) and z.dtype == torch.float32
    assert rel_err(z, reference_encode(ref, x)) <= PARITY_RTOL


@pytest.mark.parametrize("b,t,h,w", CASES)
def test_decode_matches_diffusers(pair, b, t, h, w):
    ref, ours, _ = pair
    z = latents(b, 1 + (t - 1) // 4, h // 16, w // 16)
    out = ours.decode(z)
    expected = reference_decode(ref, z)
    assert out.shape == (b, 3, t, h, w) and out.dtype == torch.float32
    assert out.abs().max() <= 1.0
    assert (expected.abs() < 1).float().mean() > 0.8  # the clamp hides little of the comparison
    assert rel_err(out, expected) <= PARITY_RTOL


def test_first_chunk_shortcut_matches_diffusers():
    """With the release's temporal_downsample a temporal decoder stage keeps its width, so the frames
    its DupUp3D shortcut makes of one are equal and the first-chunk crop (keep the last) cannot show;
    [True, True, False] puts a width-halving stage at x2 in time, where it does (the first frame
    instead of the last moves the decoded video by ~0.27)."""
    cfg = tiny_config(temporal_downsample=[True, True, False])
    ref = reference(cfg, seed=2)
    ours = WanVAE22(**cfg).eval()
    ours.load_state_dict({diffusers22_to_official_key(k): v for k, v in ref.state_dict().items()}, strict=True)
    x = video(1, 9, 32, 48, seed=1)
    assert rel_err(ours.encode(x), reference_encode(ref, x)) <= PARITY_RTOL
    z = latents(1, 3, 2, 3, seed=1)
    assert rel_err(ours.decode(z), reference_decode(ref, z)) <= PARITY_RTOL


def test_causal_streaming(pair):
    """Frame 0 is encoded alone and latent frame 0 decoded alone: a longer clip leaves them unchanged."""
    _, ours, _ = pair
    x = video(1, 9, 32, 32, seed=3)
    torch.testing.assert_close(ours.encode(x)[:, :, :1], ours.encode(x[:, :, :1]), rtol=0, atol=1e-6)
    z = latents(1, 3, 2, 2, seed=4)
    torch.testing.assert_close(ours.decode(z)[:, :, :5], ours.decode(z[:, :, :2]), rtol=0, atol=1e-6)


def test_official_pth_round_trip(pair, tmp_path):
    """Our state dict saved as a plain dict under the release's name loads back strictly, as the file
    or its folder; widths come from the shapes, the statistics (not in a .pth) from `config`."""
    _, ours, _ = pair
    torch.save(dict(ours.state_dict()), tmp_path / OFFICIAL_NAME_22)
    stats = {k: ours.config[k] for k in ("latents_mean", "latents_std")}
    x, z = video(1, 5, 32, 16), latents(1, 2, 1, 2)
    for source in (tmp_path / OFFICIAL_NAME_22, tmp_path):
        loaded = WanVAE22.from_pretrained(source, config=stats)
        assert loaded.config == ours.config and not loaded.training
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in ours.state_dict().items())
        torch.testing.assert_close(loaded.encode(x), ours.encode(x), rtol=0, atol=0)
        torch.testing.assert_close(loaded.decode(z), ours.decode(z), rtol=0, atol=0)
    # The debug preset has the release's z_dim and statistics: its .pth needs no config.
    debug = WanVAE22(**vae22_preset("debug"))
    torch.save(debug.state_dict(), tmp_path / "debug.pth")
    assert WanVAE22.from_pretrained(tmp_path / "debug.pth").config == debug.config


@pytest.mark.parametrize("preset", ["debug", "wan2.2"])
def test_keys_are_the_official_names(preset):
    """Our parameter names are those of the reference's module nesting, for every key."""
    cfg = vae22_preset(preset)
    with torch.device("meta"):
        state = WanVAE22(**cfg).state_dict()
    assert sorted(state) == sorted(official22_keys(cfg))
    assert not any("avg_shortcut" in key for key in state)  # the stage shortcuts have no parameters
    if preset == "wan2.2":  # shapes of Wan2.2_VAE.pth (encoder 160 wide, decoder 256, 48 latent channels)
        shapes = {
            "encoder.conv1.weight": [160, 12, 3, 3, 3],  # 3 colours x a 2x2 patch
            "encoder.downsamples.0.downsamples.2.resample.1.weight": [160, 160, 3, 3],
            "encoder.downsamples.1.downsamples.0.shortcut.weight": [320, 160, 1, 1, 1],
            "encoder.downsamples.1.downsamples.2.time_conv.weight": [320, 320, 3, 1, 1],
            "encoder.downsamples.3.downsamples.1.residual.6.weight": [640, 640, 3, 3, 3],
            "encoder.head.2.weight": [96, 640, 3, 3, 3],
            "conv1.weight": [96, 96, 1, 1, 1],
            "conv2.weight": [48, 48, 1, 1, 1],
            "decoder.conv1.weight": [1024, 48, 3, 3, 3],
            "decoder.upsamples.0.upsamples.3.time_conv.weight": [2048, 1024, 3, 1, 1],
            "decoder.upsamples.2.upsamples.0.shortcut.weight": [512, 1024, 1, 1, 1],
            "decoder.upsamples.2.upsamples.3.resample.1.weight": [512, 512, 3, 3],  # keeps the width
            "decoder.upsamples.3.upsamples.2.residual.0.gamma": [256, 1, 1, 1],
            "decoder.head.2.weight": [12, 256, 3, 3, 3],
        }
        assert {k: list(state[k].shape) for k in shapes} == shapes
        assert "encoder.downsamples.3.downsamples.2.resample.1.weight" not in state  # the last stage: no resample
        assert "decoder.upsamples.3.upsamples.4.resample.1.weight" not in state


@pytest.mark.parametrize("preset", ["debug", "wan2.2"])
def test_name_mapping_agrees_with_diffusers(preset):
    """The official names renamed as diffusers' convert script does (vae_reference) are exactly
    AutoencoderKLWan's keys with the same shapes, and our diffusers -> official mapping inverts it
    (release sizes on meta: 196 tensors, 704.7M parameters, 2.82 GB in float32)."""
    cfg = vae22_preset(preset)
    with torch.device("meta"):
        ours = WanVAE22(**cfg).state_dict()
        theirs = AutoencoderKLWan(**diffusers22_kwargs(cfg)).state_dict()
    converted = {official22_to_diffusers_key(k): k for k in ours}
    assert len(converted) == len(ours) and set(converted) == set(theirs)
    for diffusers_key, official_key in converted.items():
        assert diffusers22_to_official_key(diffusers_key) == official_key
        assert ours[official_key].shape == theirs[diffusers_key].shape, official_key
    if preset == "wan2.2":
        assert len(ours) == len(theirs) == 196
        assert sum(t.numel() for t in ours.values()) == sum(t.numel() for t in theirs.values()) == 704_688_668


def test_presets():
    assert VAE22_PRESETS["wan2.2"] == dict(
        z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2, temporal_downsample=[False, True, True], dim=160, dec_dim=256
    )
    cfg = vae22_preset("debug")
    cfg["dim_mult"].append(8)
    assert VAE22_PRESETS["debug"]["dim_mult"] == [1, 2, 4, 4]  # a copy
    with pytest.raises(ValueError, match="unknown Wan2.2 VAE preset"):
        vae22_preset("huge")
    model = WanVAE22(**vae22_preset("debug"))
    assert (model.z_dim, model.temporal_factor, model.spatial_factor) == (48, 4, 16)
    assert model.latent_shape((2, 3, 17, 64, 96)) == (2, 48, 5, 4, 6)
    with pytest.raises(ValueError, match="latents_mean and latents_std need z_dim=8"):
        WanVAE22(**dict(vae22_preset("debug"), z_dim=8))


# --------------------------------------------------------------------------------------------------
# Families, bad files and bad inputs


def test_each_loader_takes_its_family(pair, tmp_path):
    ref, ours, folder = pair
    with pytest.raises(ValueError, match=r"a wan2.2 VAE \(config.json has is_residual: true\).*WanVAE22"):
        WanVAE.from_pretrained(folder)
    wan21 = WanVAE(**vae_preset("debug"))
    torch.save(wan21.state_dict(), tmp_path / OFFICIAL_NAME)
    with pytest.raises(ValueError, match=rf"{OFFICIAL_NAME}: a wan2.1 VAE .*WanVAE.from_pretrained"):
        WanVAE22.from_pretrained(tmp_path / OFFICIAL_NAME)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=rf"neither {OFFICIAL_NAME_22} nor a diffusers VAE folder"):
        WanVAE22.from_pretrained(tmp_path / "empty")
    wan21_ref = AutoencoderKLWan(**diffusers_kwargs(vae_preset("debug")))
    wan21_ref.save_pretrained(tmp_path / "wan21")
    assert type(load_any_vae(tmp_path / "wan21")) is WanVAE
    assert type(load_any_vae(tmp_path / OFFICIAL_NAME)) is WanVAE
    loaded = load_any_vae(folder)
    assert type(loaded) is WanVAE22 and loaded.config == ours.config
    torch.save(ours.state_dict(), tmp_path / OFFICIAL_NAME_22)
    with pytest.raises(ValueError, match="holds both"):
        load_any_vae(tmp_path)
    stats = {k: ours.config[k] for k in ("latents_mean", "latents_std")}
    assert type(load_any_vae(tmp_path / OFFICIAL_NAME_22, config=stats)) is WanVAE22


def test_strict_load_names_the_keys(pair, tmp_path):
    from safetensors.torch import load_file, save_file

    _, ours, folder = pair
    state = dict(ours.state_dict())
    state["decoder.head.2.weights"] = state.pop("decoder.head.2.weight")
    torch.save(state, tmp_path / OFFICIAL_NAME_22)
    with pytest.raises(ValueError) as err:
        WanVAE22.from_pretrained(
            tmp_path / OFFICIAL_NAME_22, config={"latents_mean": [0.0] * 8, "latents_std": [1.0] * 8}
        )
    message = str(err.value)
    assert OFFICIAL_NAME_22 in message and "unexpected key 'decoder.head.2.weights'" in message
    assert f"missing from {OFFICIAL_NAME_22}: decoder.head.2.weight" in message
    # A diffusers folder lacking a tensor: the official name of what is missing.
    copy = tmp_path / "diffusers"
    copy.mkdir()
    (copy / "config.json").write_text((folder / "config.json").read_text())
    weights = load_file(folder / "diffusion_pytorch_model.safetensors")
    del weights["decoder.up_blocks.1.upsampler.time_conv.weight"]
    save_file(weights, copy / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ValueError, match=r"missing from diffusion_pytorch_model.safetensors: .*"
                                         r"decoder.upsamples.1.upsamples.3.time_conv.weight"):  # fmt: skip
        WanVAE22.from_pretrained(copy)


def test_published_config_fields_accepted(pair, tmp_path):
    """The fields of Wan2.2-TI2V-5B-Diffusers' vae/config.json, `clip_output: false` (which the
    diffusers converter writes and no diffusers release reads) included, with our tiny widths."""
    _, ours, folder = pair
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(clip_output=False, _name_or_path="Wan-AI/Wan2.2-TI2V-5B-Diffusers", _diffusers_version="0.35.0.dev0")
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "vae" / "diffusion_pytorch_model.safetensors").symlink_to(
        folder / "diffusion_pytorch_model.safetensors"
    )
    (tmp_path / "model_index.json").write_text("{}")
    loaded = WanVAE22.from_pretrained(tmp_path)  # a pipeline folder: its vae/
    assert loaded.config == ours.config


@pytest.mark.parametrize(
    "change,message",
    [
        ({"patch_size": 1}, "patch_size 1 is not a Wan2.2 VAE"),
        ({"in_channels": 3}, "in_channels 3 is not a Wan2.2 VAE"),
        ({"scale_factor_spatial": 8}, r"scale_factor_spatial 8 \(this structure has 16\)"),
        ({"attn_scales": [0.5]}, "attn_scales"),
        ({"clip_output": "yes"}, "clip_output 'yes' is not a boolean"),
        ({"extra": 1}, "unknown field 'extra'"),
        ({"z_dim": "drop"}, "missing field 'z_dim'"),
    ],
)
def test_diffusers22_config_refused(tmp_path, change, message):
    """A config.json with is_residual true that is not the Wan2.2 structure is refused before any
    weights are read (there are none here), naming the field."""
    cfg = diffusers22_kwargs(dict(vae22_preset("wan2.2"), latents_mean=[0.0] * 48, latents_std=[1.0] * 48))
    cfg = {"_class_name": "AutoencoderKLWan", "clip_output": False, **cfg, **change}
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if v != "drop"}))
    with pytest.raises(ValueError, match=message):
        WanVAE22.from_pretrained(tmp_path)


def test_bad_inputs_refused(pair):
    _, ours, _ = pair
    with pytest.raises(ValueError, match=r"T = 1 \+ 4k"):
        ours.encode(video(1, 4, 32, 32))
    with pytest.raises(ValueError, match="multiples of 16"):
        ours.encode(video(1, 5, 24, 32))
    with pytest.raises(ValueError, match="multiples of 16"):
        ours.encode(video(1, 1, 8, 16))
    with pytest.raises(ValueError, match=r"\[B, 3, T, H, W\]"):
        ours.encode(torch.zeros(1, 12, 1, 16, 16))
    with pytest.raises(ValueError, match=r"latents \[B, 8, F, h, w\]"):
        ours.decode(torch.zeros(1, 48, 1, 2, 2))
    with pytest.raises(ValueError, match=r"latents \[B, 8, F, h, w\]"):
        ours.decode(torch.zeros(8, 1, 2, 2))


def test_bf16_weights(pair):
    """bf16 weights: convolutions in bf16, norms and latent statistics in float32, float32 out."""
    ref, _, folder = pair
    bf16 = WanVAE22.from_pretrained(folder, dtype=torch.bfloat16)
    assert bf16.conv1.weight.dtype == torch.bfloat16
    x = video(1, 5, 32, 32)
    z = bf16.encode(x)
    assert z.dtype == torch.float32 and rel_err(z, reference_encode(ref, x)) < 5e-2
    out = bf16.decode(z)
    assert out.dtype == torch.float32 and rel_err(out, reference_decode(ref, z)) < 5e-2


def test_spatial_tiling_matches_diffusers_tiling(pair):
    """Optional tiling blends like diffusers' enable_tiling. diffusers' tiled encode reads its tile
    sizes in patch units (half pixels), its tiled decode in pixels: the same tiles are
    enable_tiling(24, 24, 16, 16) for encode and enable_tiling(48, 48, 32, 32) for decode."""
    ref, ours, _ = pair
    x = video(1, 5, 80, 96, seed=5)
    try:
        ref.enable_tiling(24, 24, 16, 16)
        z = ours.encode(x, tile_size=48, tile_stride=32)
        assert rel_err(z, reference_encode(ref, x)) <= PARITY_RTOL
        assert rel_err(z, ours.encode(x)) > 1e-3  # tiles do change the result
        ref.enable_tiling(48, 48, 32, 32)
        out = ours.decode(z, tile_size=48, tile_stride=32)
        assert out.shape == x.shape and out.abs().max() <= 1.0
        assert rel_err(out, reference_decode(ref, z)) <= PARITY_RTOL
        assert rel_err(out, ours.decode(z)) > 1e-3
    finally:
        ref.disable_tiling()
    with pytest.raises(ValueError, match="multiples of 16"):
        ours.encode(x, tile_size=40)
