"""The run's models: the DiT that trains, and the frozen encoders that turn a batch into its inputs.

From a Wan2.1 release folder (the files the official code reads), or, with no folder, built with
random weights from a preset: the debug presets for tests and the demo (tiny models, the debug
tokenizer), the release sizes for benchmarks.
"""

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from wan import (
    CLIP_PRESETS,
    T5_PRESETS,
    CLIPVision,
    UMT5Encoder,
    WanModel,
    WanTokenizer,
    WanVAE,
    dit_preset,
    vae_preset,
)
from wan.encoders import TextEncoder
from wan.modules.dit_weights import read_dit_folder

log = logging.getLogger(__name__)

# The file names of a release folder, as the official code opens them.
VAE_FILE = "Wan2.1_VAE.pth"
T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
TOKENIZER_DIR = "google/umt5-xxl"
CLIP_FILE = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"


@dataclass
class Models:
    dit: WanModel
    vae: WanVAE
    text: TextEncoder
    clip: CLIPVision | None  # i2v only


def release_files(root: Path, i2v: bool) -> dict[str, Path]:
    """The files the run needs from a release folder; every missing one listed in one error."""
    files = {"dit": root, "vae": root / VAE_FILE, "t5": root / T5_FILE, "tokenizer": root / TOKENIZER_DIR}
    if i2v:
        files["clip"] = root / CLIP_FILE
    missing = [str(p) for p in files.values() if not p.exists()]
    if missing:
        raise ValueError(f"pretrained_model_name_or_path {root} lacks: " + ", ".join(missing))
    return files


def build_models(
    pretrained: str, preset: str, train_mode: str, device: torch.device, seed: int, low_vram: bool = False
) -> Models:
    """The DiT in float32 on `device` (master weights; autocast runs the matmuls in bf16), the frozen
    encoders in their own precision (umT5 stays bf16 as released), offloaded when `low_vram`."""
    i2v = train_mode == "i2v"
    home = torch.device("cpu") if low_vram else device
    if pretrained:
        _, dit_config, _ = read_dit_folder(pretrained)  # the mode is checked before anything loads
        check_mode(dit_config["model_type"], dit_config["in_dim"], train_mode, pretrained)
        files = release_files(Path(pretrained), i2v)
        dit = WanModel.from_pretrained(files["dit"], dtype=torch.float32, device=device)
        vae = WanVAE.from_pretrained(files["vae"], dtype=torch.float32, device=home)
        t5 = UMT5Encoder.from_pretrained(files["t5"], device=home)
        tokenizer = WanTokenizer(files["tokenizer"])
        clip = CLIPVision.from_pretrained(files["clip"], device=home) if i2v else None
    else:
        debug = preset.startswith("debug")
        torch.manual_seed(seed)  # the same random weights on every rank (DDP also broadcasts them)
        dit = WanModel(**dit_preset(preset)).to(device)
        vae = WanVAE(**vae_preset("debug" if debug else "wan2.1")).to(home)
        t5 = UMT5Encoder(**T5_PRESETS["debug" if debug else "umt5-xxl"]).to(home)
        # Random weights need no real vocabulary: the debug tokenizer's ids fit any umT5 vocabulary.
        tokenizer = WanTokenizer.debug()
        clip = CLIPVision(**CLIP_PRESETS["debug" if debug else "vit-h-14"]).to(home) if i2v else None
    check_mode(dit.model_type, dit.in_dim, train_mode, pretrained or f"preset {preset}")
    for frozen in (vae, t5, clip):
        if frozen is not None:
            frozen.eval().requires_grad_(False)
    return Models(dit, vae, TextEncoder(tokenizer, t5, device=device, offload=low_vram), clip)


def check_mode(model_type: str, in_dim: int, train_mode: str, source: str) -> None:
    """A t2v DiT cannot train in i2v mode, nor the reverse: the patch embedding's input width differs."""
    i2v = train_mode == "i2v"
    if (model_type == "i2v") != i2v:
        raise ValueError(
            f"train_mode={train_mode!r} needs a{'n i2v' if i2v else ' t2v'} DiT, but {source} is {model_type} "
            f"(patch_embedding input width {in_dim}; "
            f"{'36 = 16 noisy + 4 mask + 16 first-frame latent channels' if i2v else '16 latent channels'} expected)"
        )


def apply_trainable_modules(dit: WanModel, patterns: list[str]) -> tuple[int, int]:
    """Freeze every parameter whose name matches none of the substrings ("." matches all names).
    Returns (trainable, total) parameter counts; no match at all is an error."""
    trainable = total = 0
    for name, param in dit.named_parameters():
        keep = any(p in name for p in patterns)
        param.requires_grad_(keep)
        total += param.numel()
        trainable += param.numel() if keep else 0
    if trainable == 0:
        raise ValueError(f"trainable_modules {patterns} matches no DiT parameter (names look like blocks.0.ffn.0)")
    return trainable, total
