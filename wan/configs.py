"""Named DiT configurations: the released models and tiny ones for CPU tests and the demo.

Values are WanModel keyword arguments (the official config.json names).
"""

import copy
from dataclasses import dataclass

_RELEASE = dict(patch_size=[1, 2, 2], text_len=512, freq_dim=256, text_dim=4096, out_dim=16, eps=1e-6)

DIT_PRESETS: dict[str, dict] = {
    # Tiny: 2 blocks, width 128, head_dim 32. text_dim 64 is the debug text encoder's width.
    "debug": dict(_RELEASE, model_type="t2v", in_dim=16, dim=128, ffn_dim=256, num_heads=4, num_layers=2, text_dim=64),
    # image_dim 64 is the debug CLIP's width (the release CLIP gives 1280).
    "debug-i2v": dict(
        _RELEASE,
        model_type="i2v",
        in_dim=36,
        dim=128,
        ffn_dim=256,
        num_heads=4,
        num_layers=2,
        text_dim=64,
        image_dim=64,
    ),  # fmt: skip
    "1.3B": dict(_RELEASE, model_type="t2v", in_dim=16, dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
    "14B": dict(_RELEASE, model_type="t2v", in_dim=16, dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
    "i2v-14B": dict(_RELEASE, model_type="i2v", in_dim=36, dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
    # Wan2.2. Each A14B release holds two such experts (high_noise_model/, low_noise_model/), Wan2.1 14B
    # networks; I2V-A14B's has no CLIP branch (image_dim None): y alone carries the image.
    "t2v-A14B": dict(_RELEASE, model_type="t2v", in_dim=16, dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
    "i2v-A14B": dict(
        _RELEASE, model_type="i2v", in_dim=36, dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, image_dim=None
    ),
    # TI2V-5B: 48 latent channels (the Wan2.2 VAE), per-token timesteps when an image is the first frame.
    "ti2v-5B": dict(
        _RELEASE, model_type="ti2v", in_dim=48, out_dim=48, dim=3072, ffn_dim=14336, num_heads=24, num_layers=30
    ),
    # Tiny Wan2.2 shapes: A14B experts (t2v, and i2v without CLIP), and a ti2v model on the debug Wan2.2
    # VAE's channels.
    "debug-t2v-A14B": dict(
        _RELEASE, model_type="t2v", in_dim=16, dim=128, ffn_dim=256, num_heads=4, num_layers=2, text_dim=64
    ),  # fmt: skip
    "debug-i2v-A14B": dict(
        _RELEASE,
        model_type="i2v",
        in_dim=36,
        dim=128,
        ffn_dim=256,
        num_heads=4,
        num_layers=2,
        text_dim=64,
        image_dim=None,
    ),  # fmt: skip
    "debug-ti2v": dict(
        _RELEASE,
        model_type="ti2v",
        in_dim=48,
        out_dim=48,
        dim=128,
        ffn_dim=256,
        num_heads=4,
        num_layers=2,
        text_dim=64,
    ),  # fmt: skip
}


# Wan2.2 A14B: the presets that are a pair of experts (high_noise_model/, low_noise_model/), and the
# release's boundary by model_type: the high-noise expert serves the timesteps t >= boundary x 1000.
EXPERT_PRESETS = ("t2v-A14B", "i2v-A14B", "debug-t2v-A14B", "debug-i2v-A14B")
A14B_BOUNDARY = {"t2v": 0.875, "i2v": 0.900}
EXPERTS = ("high", "low")  # the high-noise expert first: it denoises first


@dataclass(frozen=True)
class LatentGeometry:
    """The latents a DiT works on, as its VAE makes them (the attributes WanVAE and WanVAE22 have)."""

    z_dim: int
    temporal_factor: int
    spatial_factor: int


WAN21_LATENTS = LatentGeometry(16, 4, 8)
WAN22_LATENTS = LatentGeometry(48, 4, 16)  # the Wan2.2 VAE of TI2V-5B


def latent_geometry(dit_config: dict) -> LatentGeometry:
    """The VAE geometry of a DiT: the Wan2.2 VAE's for one that predicts its 48 channels, else Wan2.1's."""
    return WAN22_LATENTS if dit_config.get("out_dim", 16) == WAN22_LATENTS.z_dim else WAN21_LATENTS


def dit_preset(name: str) -> dict:
    """A fresh copy of a preset's WanModel keyword arguments."""
    if name not in DIT_PRESETS:
        raise ValueError(f"unknown DiT preset {name!r}; choose one of {', '.join(DIT_PRESETS)}")
    return copy.deepcopy(DIT_PRESETS[name])
