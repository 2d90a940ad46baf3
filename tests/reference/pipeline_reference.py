"""Test helpers: diffusers' WanPipeline and WanImageToVideoPipeline holding the same tiny random weights
as our models (umT5, DiT, VAE, CLIP built pairwise by the *_reference helpers), with the same
tokenizer vocabulary, as an independent reference for wan/pipeline.py."""

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import clip_reference
import dit_reference
import numpy as np
import t5_reference
import torch
import torch.nn.functional as F
import vae_reference
from diffusers import UniPCMultistepScheduler, WanImageToVideoPipeline, WanPipeline
from transformers import AutoTokenizer, BatchFeature

from wan import CLIP_PRESETS, CLIPVision, WanModel, dit_preset
from wan.encoders import TextEncoder
from wan.modules.clip import CLIP_MEAN, CLIP_STD
from wan.modules.t5 import T5_PRESETS
from wan.modules.tokenizer import DEBUG_TOKENIZER, WanTokenizer
from wan.modules.vae import WanVAE, vae_preset

rel_err = dit_reference.rel_err


class ReleaseGridUniPC(UniPCMultistepScheduler):
    """diffusers' UniPC on the release's sigma grid. Its own set_timesteps(N) starts from
    linspace(1, 1/T, N + 1); the release's FlowUniPCMultistepScheduler from linspace(sigma_max, 0,
    N + 1) with sigma_max = float32(1 - 1/T). Given those unshifted sigmas, diffusers shifts them
    (flow_shift, in float64) and casts the timesteps to int64 exactly as the release does."""

    def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None, mu=None):
        if sigmas is None:
            t = self.config.num_train_timesteps
            sigmas = np.linspace(float(np.float32(1 - 1 / t)), 0.0, num_inference_steps + 1)[:-1]
        super().set_timesteps(device=device, sigmas=sigmas, mu=mu)


def release_scheduler(shift: float) -> ReleaseGridUniPC:
    """The scheduler WanPipeline is documented with (UniPC, flow_prediction, flow sigmas, flow_shift)."""
    return ReleaseGridUniPC(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift)


def hf_tokenizer(folder: Path):
    """A transformers tokenizer of the debug sentencepiece vocabulary (T5Tokenizer read from a folder:
    transformers 5.x T5TokenizerFast(vocab_file=...) would silently ignore the file)."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(DEBUG_TOKENIZER, folder / "spiece.model")
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "T5Tokenizer", "extra_ids": 0}))
    return AutoTokenizer.from_pretrained(str(folder))


def release_clip_input(images: torch.Tensor, size: int) -> torch.Tensor:
    """The release's CLIP preprocessing, written out independently of wan/: [-1, 1] images, bicubic
    resize (no crop), to [0, 1], normalised."""
    x = F.interpolate(images, size=(size, size), mode="bicubic", align_corners=False).mul(0.5).add(0.5)
    return (x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)


@dataclass
class Bundle:
    """Our models and diffusers' pipeline over the same weights."""

    ref: WanPipeline | WanImageToVideoPipeline
    dit: WanModel
    text: TextEncoder
    vae: WanVAE
    clip: CLIPVision | None = None
    hf_clip: torch.nn.Module | None = None
    low: WanModel | None = None  # Wan2.2 A14B: the low-noise expert (`dit` is the high-noise one)


def build_bundle(tmp: Path, i2v: bool, shift: float, seed: int = 0) -> Bundle:
    hf_t5, t5 = t5_reference.build_pair(T5_PRESETS["debug"], seed=seed)
    ref_dit, dit = dit_reference.build_pair(dit_preset("debug-i2v" if i2v else "debug"), seed=seed + 1)
    ref_vae, vae = vae_reference.build_pair(vae_preset("debug"), seed=seed + 2)
    parts = dict(
        tokenizer=hf_tokenizer(tmp / "tokenizer"), text_encoder=hf_t5, vae=ref_vae,
        scheduler=release_scheduler(shift), transformer=ref_dit,
    )  # fmt: skip
    text = TextEncoder(WanTokenizer.debug(), t5)
    if not i2v:
        return Bundle(WanPipeline(**parts), dit, text, vae)
    cfg = CLIP_PRESETS["debug"]
    hf_clip = clip_reference.build_hf(cfg, seed=seed + 3)
    clip = clip_reference.ours_from_hf(cfg, hf_clip)
    ref = WanImageToVideoPipeline(
        **parts, image_processor=ReleaseClipProcessor(cfg["image_size"]), image_encoder=hf_clip
    )
    return Bundle(ref, dit, text, vae, clip, hf_clip)


class ReleaseClipProcessor:
    """Stands in for the pipeline's CLIPImageProcessor (PIL resize of the shorter side, center crop)
    with the release's preprocessing, so that the pipeline's own encode_image runs its CLIP tower
    (hidden_states[-2]) on what the release feeds CLIP. Takes the pipeline's image input: [B, 3, H, W]
    in [0, 1]."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, images: torch.Tensor, return_tensors: str = "pt") -> BatchFeature:
        return BatchFeature({"pixel_values": release_clip_input(2.0 * images - 1.0, self.size)})


def build_a14b_bundle(tmp: Path, i2v: bool, shift: float, boundary: float, seed: int = 0) -> Bundle:
    """Wan2.2 A14B in tiny: two random experts (debug shapes; i2v without CLIP) and the Wan2.1 VAE,
    and diffusers' pipeline over them: transformer = the high-noise expert, transformer_2 = the
    low-noise one, boundary_ratio."""
    hf_t5, t5 = t5_reference.build_pair(T5_PRESETS["debug"], seed=seed)
    preset = "debug-i2v-A14B" if i2v else "debug"
    ref_high, high = dit_reference.build_pair(dit_preset(preset), seed=seed + 1)
    ref_low, low = dit_reference.build_pair(dit_preset(preset), seed=seed + 4)
    ref_vae, vae = vae_reference.build_pair(vae_preset("debug"), seed=seed + 2)
    parts = dict(
        tokenizer=hf_tokenizer(tmp / "tokenizer"), text_encoder=hf_t5, vae=ref_vae, scheduler=release_scheduler(shift),
        transformer=ref_high, transformer_2=ref_low, boundary_ratio=boundary,
    )  # fmt: skip
    ref = WanImageToVideoPipeline(**parts, image_processor=None, image_encoder=None) if i2v else WanPipeline(**parts)
    return Bundle(ref, high, TextEncoder(WanTokenizer.debug(), t5), vae, low=low)


def build_ti2v_bundle(tmp: Path, image: bool, shift: float, seed: int = 0) -> Bundle:
    """Wan2.2 TI2V in tiny: a debug ti2v DiT (48 channels) and the debug Wan2.2 VAE, and diffusers'
    pipeline over them with expand_timesteps (WanImageToVideoPipeline with an image, without CLIP)."""
    from wan.modules.vae2_2 import vae22_preset

    hf_t5, t5 = t5_reference.build_pair(T5_PRESETS["debug"], seed=seed)
    ref_dit, dit = dit_reference.build_pair(dit_preset("debug-ti2v"), seed=seed + 1)
    ref_vae, vae = vae_reference.build_pair22(vae22_preset("debug"), seed=seed + 2)
    parts = dict(
        tokenizer=hf_tokenizer(tmp / "tokenizer"), text_encoder=hf_t5, vae=ref_vae, scheduler=release_scheduler(shift),
        transformer=ref_dit, expand_timesteps=True,
    )  # fmt: skip
    ref = WanImageToVideoPipeline(**parts, image_processor=None, image_encoder=None) if image else WanPipeline(**parts)
    return Bundle(ref, dit, TextEncoder(WanTokenizer.debug(), t5), vae)
