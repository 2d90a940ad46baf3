"""Test helpers: diffusers' AutoencoderKLWan as an independent reference for our VAE."""

import torch
from diffusers import AutoencoderKLWan

from wan.modules.vae import LATENTS_MEAN, LATENTS_STD, WanVAE
from wan.modules.vae_weights import diffusers_to_official_key


def diffusers_kwargs(cfg: dict) -> dict:
    """Our config -> AutoencoderKLWan keyword arguments."""
    return dict(
        base_dim=cfg["dim"], z_dim=cfg["z_dim"], dim_mult=list(cfg["dim_mult"]), num_res_blocks=cfg["num_res_blocks"],
        temperal_downsample=list(cfg["temporal_downsample"]), attn_scales=[], dropout=0.0,
    )  # fmt: skip


@torch.no_grad()
def randomize(module: torch.nn.Module, seed: int) -> None:
    """Random values for every parameter, norm gains and biases included, so that a swapped or
    misnamed tensor changes the output. The last conv of the decoder is scaled down so that most of
    the decoded video stays inside [-1, 1] and the final clamp hides little."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        if name.endswith("gamma"):
            p.copy_(1 + 0.1 * noise)
        elif name.endswith("bias"):
            p.copy_(0.1 * noise)
        else:
            p.copy_(noise / p[0].numel() ** 0.5)
        if name.startswith("decoder.") and ("conv_out" in name or "head.2" in name):
            p.mul_(0.3)


def build_pair(cfg: dict, seed: int = 0) -> tuple[AutoencoderKLWan, WanVAE]:
    """A random diffusers VAE and ours holding the same weights (copied by our name mapping)."""
    torch.manual_seed(seed)
    ref = AutoencoderKLWan(**diffusers_kwargs(cfg)).eval()
    randomize(ref, seed)
    ours = WanVAE(**cfg).eval()
    blocks = cfg["num_res_blocks"]
    ours.load_state_dict({diffusers_to_official_key(k, blocks): v for k, v in ref.state_dict().items()}, strict=True)
    return ref, ours


def _stats() -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(LATENTS_MEAN).view(1, -1, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(LATENTS_STD).view(1, -1, 1, 1, 1)
    return mean, inv_std


@torch.no_grad()
def reference_encode(ref: AutoencoderKLWan, video: torch.Tensor) -> torch.Tensor:
    """diffusers' posterior mean, normalised as the diffusers Wan pipelines do: (mu - mean) * (1/std)."""
    mean, inv_std = _stats()
    return (ref.encode(video).latent_dist.mean - mean) * inv_std


@torch.no_grad()
def reference_decode(ref: AutoencoderKLWan, latents: torch.Tensor) -> torch.Tensor:
    """diffusers' decode of normalised latents, de-normalised as the pipelines do: z / (1/std) + mean."""
    mean, inv_std = _stats()
    return ref.decode(latents / inv_std + mean).sample


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()
