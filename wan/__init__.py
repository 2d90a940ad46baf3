"""Wan2.1 and Wan2.2 models, written from scratch: they load the official release files unchanged."""

from wan.configs import DIT_PRESETS, dit_preset
from wan.modules.clip import CLIP_PRESETS, CLIPVision
from wan.modules.model import WanModel
from wan.modules.t5 import T5_PRESETS, UMT5Encoder
from wan.modules.tokenizer import WanTokenizer
from wan.modules.vae import VAE_PRESETS, WanVAE, vae_preset
from wan.modules.vae2_2 import VAE22_PRESETS, WanVAE22, vae22_preset

__all__ = [
    "CLIP_PRESETS",
    "CLIPVision",
    "DIT_PRESETS",
    "T5_PRESETS",
    "UMT5Encoder",
    "VAE22_PRESETS",
    "VAE_PRESETS",
    "WanModel",
    "WanTokenizer",
    "WanVAE",
    "WanVAE22",
    "dit_preset",
    "vae22_preset",
    "vae_preset",
]
