"""The frozen encoders as the trainer calls them: prompts -> DiT context, pixel clips -> latents,
first frames -> I2V conditioning. Everything here runs under no_grad.

`offload=True` (the trainer's `low_vram`) keeps an encoder's weights on the CPU and moves them to the
compute device only while it encodes.
"""

from contextlib import contextmanager

import torch
import torch.nn as nn

from wan.modules.clip import CLIPVision
from wan.modules.t5 import UMT5Encoder
from wan.modules.tokenizer import WanTokenizer
from wan.modules.vae import WanVAE


@contextmanager
def _on_device(module: nn.Module, device: torch.device, offload: bool):
    if not offload:
        yield
        return
    home = next(module.parameters()).device
    module.to(device)
    try:
        yield
    finally:
        module.to(home)


class TextEncoder:
    """Prompts -> context [B, max_length (512), dim] float32 (or `dtype`), zero past each prompt's
    tokens, as the DiT expects it."""

    def __init__(
        self, tokenizer: WanTokenizer, model: UMT5Encoder, device: str | torch.device = "cpu", offload: bool = False
    ):
        self.tokenizer = tokenizer
        self.model = model.eval().requires_grad_(False)
        self.device = torch.device(device)
        self.offload = offload
        if not offload:
            self.model.to(self.device)

    @torch.no_grad()
    def __call__(
        self, prompts: list[str], device: str | torch.device | None = None, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        ids, mask = self.tokenizer(prompts)
        with _on_device(self.model, self.device, self.offload):
            context = self.model(ids.to(self.device), mask.to(self.device))
        return context.to(device or self.device, dtype)


@torch.no_grad()
def encode_latents(vae: WanVAE, clips: torch.Tensor, mini_batch: int, offload: bool = False) -> torch.Tensor:
    """Pixel clips [B, 3, T, H, W] in [-1, 1] -> normalised latents [B, 16, 1 + (T-1)/4, H/8, W/8],
    encoding at most `mini_batch` clips at once (the trainer's `vae_mini_batch`)."""
    if mini_batch < 1:
        raise ValueError(f"vae_mini_batch must be >= 1, got {mini_batch}")
    with _on_device(vae, clips.device, offload):
        return torch.cat([vae.encode(chunk) for chunk in clips.split(mini_batch)])


def i2v_mask(num_frames: int, latent_height: int, latent_width: int, batch: int = 1, device=None) -> torch.Tensor:
    """The reference I2V mask [B, 4, T_lat, h, w]: ones where the conditioning frame is, zeros after.

    Built on pixel frames (frame 0 repeated 4 times so the first latent frame's group of 4 is all
    ones), then folded to groups of 4: channel c of latent frame i is pixel-frame slot 4i + c."""
    if (num_frames - 1) % 4:
        raise ValueError(f"num_frames must be 4k+1, got {num_frames}")
    mask = torch.zeros(batch, num_frames + 3, latent_height, latent_width, device=device)
    mask[:, :4] = 1  # frame 0 (the given image), repeated 4 times
    mask = mask.view(batch, (num_frames + 3) // 4, 4, latent_height, latent_width)
    return mask.transpose(1, 2)


@torch.no_grad()
def encode_i2v_condition(
    vae: WanVAE, clip: CLIPVision, first_frames: torch.Tensor, num_frames: int, offload: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """First frames [B, 3, H, W] in [-1, 1] of clips of num_frames frames -> (y, clip_fea):
    y [B, 4 + 16, T_lat, H/8, W/8] = [mask ; latents of (first frame, then zero frames)], the DiT's
    `y`; clip_fea [B, 257, 1280], the CLIP features of the first frame."""
    b, _, h, w = first_frames.shape
    video = torch.zeros(b, 3, num_frames, h, w, device=first_frames.device, dtype=first_frames.dtype)
    video[:, :, 0] = first_frames
    with _on_device(vae, first_frames.device, offload):
        latents = vae.encode(video)
    mask = i2v_mask(num_frames, latents.shape[-2], latents.shape[-1], b, latents.device).to(latents.dtype)
    with _on_device(clip, first_frames.device, offload):
        clip_fea = clip.encode_image(first_frames)
    return torch.cat([mask, latents], dim=1), clip_fea
