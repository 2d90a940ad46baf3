"""Our Wan2.1 VAE against diffusers' AutoencoderKLWan (test-only reference), same random weights.

Tolerance: relative error ||ours - ref|| / ||ref|| <= 1e-4 in float32, for the normalised latents
(diffusers' latent_dist.mean normalised as its pipelines do, (mu - mean) * (1/std)) and for the
decoded video (diffusers decodes z / (1/std) + mean). Measured on the debug config (width 8),
1-17 frames, batch 1-2, non-square: encode 2.5e-7 .. 4.8e-7, decode 6.3e-7 .. 1.2e-6 (the same sums
in another order: the conv's own spatial padding, the zero-tap skip on the first chunk, the per-frame
Conv2d run as a 1x3x3 Conv3d). With spatial tiling against diffusers' tiling: encode 3.6e-7, decode 1.2e-6.
"""

import io
import json

import pytest
import torch
from vae_reference import build_pair, diffusers_kwargs, reference_decode, reference_encode, rel_err

from wan.modules.vae import VAE_PRESETS, WanVAE, vae_preset
from wan.modules.vae_weights import OFFICIAL_NAME, diffusers_to_official_key

PARITY_RTOL = 1e-4
CASES = [  # (batch, frames, height, width): T = 1 + 4k, non-square sizes
    (1, 1, 16, 24),
    (2, 5, 24, 16),
    (1, 9, 16, 40),
    (1, 17, 8, 16),
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The debug tensors are tiny: one thread is fastest, and on a loaded machine OpenMP threads
    waiting for each other made this file 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pair():
    return build_pair(vae_preset("debug"), seed=1)


def video(b, t, h, w, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, t, h, w, generator=gen) * 2 - 1


def latents(b, f, h, w, seed=0):
    return torch.randn(b, 16, f, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("b,t,h,w", CASES)
def test_encode_matches_diffusers(pair, b, t, h, w):
    ref, ours = pair
    x = video(b, t, h, w)
    z = ours.encode(x)
    assert z.shape == (b, 16, 1 + (t - 1) // 4, h // 8, w // 8) and z.dtype == torch.float32
    assert rel_err(z, reference_encode(ref, x)) <= PARITY_RTOL


@pytest.mark.parametrize("b,t,h,w", CASES)
def test_decode_matches_diffusers(pair, b, t, h, w):
    ref, ours = pair
    z = latents(b, 1 + (t - 1) // 4, h // 8, w // 8)
    out = ours.decode(z)
    expected = reference_decode(ref, z)
    assert out.shape == (b, 3, t, h, w) and out.dtype == torch.float32
    assert out.abs().max() <= 1.0
    assert (expected.abs() < 1).float().mean() > 0.8  # the clamp hides little of the comparison
    assert rel_err(out, expected) <= PARITY_RTOL


def test_causal_streaming(pair):
    """Frame 0 is encoded alone and latent frame 0 decoded alone: a longer clip leaves them unchanged."""
    _, ours = pair
    x = video(1, 9, 16, 16, seed=3)
    torch.testing.assert_close(ours.encode(x)[:, :, :1], ours.encode(x[:, :, :1]), rtol=0, atol=1e-6)
    z = latents(1, 3, 2, 2, seed=4)
    torch.testing.assert_close(ours.decode(z)[:, :, :5], ours.decode(z[:, :, :2]), rtol=0, atol=1e-6)


def test_official_pth_loads_strictly(pair, tmp_path):
    _, ours = pair
    torch.save(ours.state_dict(), tmp_path / OFFICIAL_NAME)
    x = video(1, 5, 16, 8)
    expected = ours.encode(x)
    for source in (tmp_path / OFFICIAL_NAME, tmp_path):  # the file, or a folder holding it
        loaded = WanVAE.from_pretrained(source)
        assert loaded.config == ours.config and not loaded.training
        loaded_state = loaded.state_dict()
        assert loaded_state.keys() == ours.state_dict().keys()
        assert all(torch.equal(loaded_state[k], v) for k, v in ours.state_dict().items())
        torch.testing.assert_close(loaded.encode(x), expected, rtol=0, atol=0)


def test_pth_widths_read_from_the_file_structure_from_config(tmp_path):
    """A .pth has no config: dim and z_dim come from its shapes, the rest is the release structure
    unless `config` says otherwise."""
    cfg = dict(vae_preset("debug"), dim=4, num_res_blocks=1)
    model = WanVAE(**cfg)
    torch.save(model.state_dict(), tmp_path / "custom.pth")
    with pytest.raises(ValueError, match=r"custom.pth.*\n.*missing from custom.pth"):
        WanVAE.from_pretrained(tmp_path / "custom.pth")
    loaded = WanVAE.from_pretrained(tmp_path / "custom.pth", config={"num_res_blocks": 1})
    assert loaded.config == model.config


def test_bf16_weights(pair, tmp_path):
    """bf16 weights: convolutions in bf16, norms and latent statistics in float32, float32 out."""
    ref, ours = pair
    torch.save(ours.state_dict(), tmp_path / OFFICIAL_NAME)
    bf16 = WanVAE.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert bf16.conv1.weight.dtype == torch.bfloat16
    x = video(1, 5, 16, 16)
    z = bf16.encode(x)
    assert z.dtype == torch.float32 and rel_err(z, reference_encode(ref, x)) < 5e-2
    out = bf16.decode(z)
    assert out.dtype == torch.float32 and rel_err(out, reference_decode(ref, z)) < 5e-2


def test_diffusers_folder_written_by_diffusers_loads(pair, tmp_path):
    ref, ours = pair
    ref.save_pretrained(tmp_path / "vae")
    (tmp_path / "model_index.json").write_text("{}")
    z = latents(1, 2, 2, 3)
    for source in (tmp_path / "vae", tmp_path):  # the VAE folder, or a pipeline folder with vae/
        loaded = WanVAE.from_pretrained(source)
        assert loaded.config == ours.config
        for name, tensor in ours.state_dict().items():
            assert torch.equal(loaded.state_dict()[name], tensor), name
        torch.testing.assert_close(loaded.decode(z), ours.decode(z), rtol=0, atol=0)


@pytest.mark.parametrize("preset", ["debug", "wan2.1"])
def test_name_mapping_agrees_with_diffusers_converter(preset):
    """diffusers' own official->diffusers converter (single_file_utils), inverted by our mapping, for
    every key; and the two models hold the same keys with the same shapes (release sizes on meta)."""
    from diffusers import AutoencoderKLWan
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    cfg = vae_preset(preset)
    with torch.device("meta"):
        ours = WanVAE(**cfg)
        ref = AutoencoderKLWan(**diffusers_kwargs(cfg))
    official = ours.state_dict()
    converted = convert_wan_vae_to_diffusers({k: k for k in official})  # value = the official key
    theirs = ref.state_dict()
    assert set(converted) == set(theirs)
    for diffusers_key, official_key in converted.items():
        assert diffusers_to_official_key(diffusers_key) == official_key
        assert official[official_key].shape == theirs[diffusers_key].shape, official_key
    if preset == "wan2.1":  # the size of Wan2.1_VAE.pth: 194 tensors, 126.9M parameters
        assert len(official) == len(theirs) == 194
        assert sum(t.numel() for t in official.values()) == sum(p.numel() for p in ref.parameters()) == 126_892_531


def test_presets():
    assert VAE_PRESETS["wan2.1"] == dict(
        z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, temporal_downsample=[False, True, True], dim=96
    )
    cfg = vae_preset("debug")
    cfg["dim_mult"].append(8)
    assert VAE_PRESETS["debug"]["dim_mult"] == [1, 2, 4, 4]  # a copy
    with pytest.raises(ValueError, match="unknown VAE preset"):
        vae_preset("huge")
    with pytest.raises(ValueError, match="temporal_downsample needs 3 entries"):
        WanVAE(**dict(vae_preset("debug"), temporal_downsample=[True]))


# --------------------------------------------------------------------------------------------------
# Bad files and bad inputs


@pytest.fixture
def pth(pair, tmp_path):
    _, ours = pair
    path = tmp_path / OFFICIAL_NAME
    torch.save(ours.state_dict(), path)
    return path


def test_truncated_file_refused(pth):
    data = pth.read_bytes()
    pth.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=rf"{OFFICIAL_NAME}.*not a readable torch state dict"):
        WanVAE.from_pretrained(pth)


def test_wrong_key_refused(pair, pth):
    state = dict(pair[1].state_dict())
    state["encoder.middle.1.norm.weight"] = state.pop("encoder.middle.1.norm.gamma")
    torch.save(state, pth)
    with pytest.raises(ValueError) as err:
        WanVAE.from_pretrained(pth)
    message = str(err.value)
    assert OFFICIAL_NAME in message
    assert "unexpected key 'encoder.middle.1.norm.weight'" in message
    assert "encoder.middle.1.norm.gamma" in message  # reported missing


def test_wrong_shape_refused(pair, pth):
    state = dict(pair[1].state_dict())
    state["decoder.upsamples.3.time_conv.weight"] = torch.zeros(1, 2, 3, 1, 1)
    torch.save(state, pth)
    with pytest.raises(ValueError, match=r"Wan2.1_VAE.pth: key 'decoder.upsamples.3.time_conv.weight' has shape"):
        WanVAE.from_pretrained(pth)


@pytest.mark.parametrize("obj", [[1, 2, 3], {"conv1.weight": 1.0}, torch.zeros(3)])
def test_pickle_that_is_not_a_state_dict_refused(pth, obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    pth.write_bytes(buffer.getvalue())
    with pytest.raises(ValueError, match=OFFICIAL_NAME):
        WanVAE.from_pretrained(pth)


def test_missing_and_unknown_sources_refused(tmp_path):
    with pytest.raises(ValueError, match="no such file or folder"):
        WanVAE.from_pretrained(tmp_path / "nothing.pth")
    with pytest.raises(ValueError, match="neither Wan2.1_VAE.pth nor a diffusers VAE folder"):
        WanVAE.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLWan", "attn_scales": [0.5]}))
    with pytest.raises(ValueError, match="attn_scales"):
        WanVAE.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(ValueError, match="not AutoencoderKLWan"):
        WanVAE.from_pretrained(tmp_path)


def test_diffusers_folder_with_a_bad_tensor_refused(pair, tmp_path):
    from safetensors.torch import load_file, save_file

    ref, _ = pair
    ref.save_pretrained(tmp_path)
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    state["decoder.up_blocks.0.upsamplers.0.resample.1.weight"] = torch.zeros(3, 3)
    save_file(state, weights)
    with pytest.raises(ValueError, match=r"key 'decoder.up_blocks.0.upsamplers.0.resample.1.weight' has shape"):
        WanVAE.from_pretrained(tmp_path)


def test_bad_inputs_refused(pair):
    _, ours = pair
    with pytest.raises(ValueError, match=r"T = 1 \+ 4k"):
        ours.encode(video(1, 4, 16, 16))
    with pytest.raises(ValueError, match="multiples of 8"):
        ours.encode(video(1, 5, 12, 16))
    with pytest.raises(ValueError, match="multiples of 8"):
        ours.encode(video(1, 1, 16, 20))
    with pytest.raises(ValueError, match=r"\[B, 3, T, H, W\]"):
        ours.encode(torch.zeros(1, 4, 1, 16, 16))
    with pytest.raises(ValueError, match=r"\[B, 3, T, H, W\]"):
        ours.encode(torch.zeros(3, 1, 16, 16))
    with pytest.raises(ValueError, match=r"latents \[B, 16, F, h, w\]"):
        ours.decode(torch.zeros(1, 32, 1, 2, 2))
    with pytest.raises(ValueError, match=r"latents \[B, 16, F, h, w\]"):
        ours.decode(torch.zeros(16, 1, 2, 2))


@pytest.mark.parametrize("tile,stride", [(32, 24), (32, 16), (24, 24)])
def test_spatial_tiling_matches_diffusers_tiling(pair, tile, stride):
    """Optional tiling blends like diffusers' enable_tiling; without it nothing is tiled."""
    ref, ours = pair
    ref.enable_tiling(tile, tile, stride, stride)
    try:
        x = video(1, 5, 48, 56, seed=5)
        z = ours.encode(x, tile_size=tile, tile_stride=stride)
        assert rel_err(z, reference_encode(ref, x)) <= PARITY_RTOL
        assert rel_err(z, ours.encode(x)) > 1e-3  # tiles do change the result
        out = ours.decode(z, tile_size=tile, tile_stride=stride)
        assert out.shape == x.shape and out.abs().max() <= 1.0
        assert rel_err(out, reference_decode(ref, z)) <= PARITY_RTOL
    finally:
        ref.disable_tiling()
    small = video(1, 1, 32, 24)  # not larger than a tile: the untiled path
    torch.testing.assert_close(ours.encode(small, tile_size=32), ours.encode(small), rtol=0, atol=0)
    with pytest.raises(ValueError, match="multiples of 8"):
        ours.encode(small, tile_size=30)
    with pytest.raises(ValueError, match="tile_stride <= tile_size"):
        ours.decode(latents(1, 1, 2, 2), tile_size=16, tile_stride=24)
