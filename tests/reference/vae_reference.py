"""Test helpers: diffusers' AutoencoderKLWan as an independent reference for our VAEs (Wan2.1 and
Wan2.2), and the official Wan2.2 parameter names written out from the reference's module structure."""

import torch
from diffusers import AutoencoderKLWan

from wan.modules.vae import WanVAE
from wan.modules.vae2_2 import LATENTS_MEAN_22, LATENTS_STD_22, WanVAE22
from wan.modules.vae_weights import diffusers22_to_official_key, diffusers_to_official_key


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


def _stats(ref: AutoencoderKLWan) -> tuple[torch.Tensor, torch.Tensor]:
    """The latent statistics of the reference's config, as the diffusers pipelines read them (the
    Wan2.1 defaults unless the config names others)."""
    mean = torch.tensor(ref.config.latents_mean).view(1, -1, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(ref.config.latents_std).view(1, -1, 1, 1, 1)
    return mean, inv_std


@torch.no_grad()
def reference_encode(ref: AutoencoderKLWan, video: torch.Tensor) -> torch.Tensor:
    """diffusers' posterior mean, normalised as the diffusers Wan pipelines do: (mu - mean) * (1/std)."""
    mean, inv_std = _stats(ref)
    return (ref.encode(video).latent_dist.mean - mean) * inv_std


@torch.no_grad()
def reference_decode(ref: AutoencoderKLWan, latents: torch.Tensor) -> torch.Tensor:
    """diffusers' decode of normalised latents, de-normalised as the pipelines do: z / (1/std) + mean."""
    mean, inv_std = _stats(ref)
    return ref.decode(latents / inv_std + mean).sample


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# --------------------------------------------------------------------------------------------------
# Wan2.2


def diffusers22_kwargs(cfg: dict) -> dict:
    """Our WanVAE22 config -> AutoencoderKLWan keyword arguments with the Wan2.2 settings, as the
    Wan2.2-TI2V-5B-Diffusers vae/config.json has them (12 = 3 x 2 x 2 channels in and out); the
    release's statistics unless the config names others (as WanVAE22's defaults)."""
    return dict(
        base_dim=cfg["dim"], decoder_base_dim=cfg["dec_dim"], z_dim=cfg["z_dim"], dim_mult=list(cfg["dim_mult"]),
        num_res_blocks=cfg["num_res_blocks"], temperal_downsample=list(cfg["temporal_downsample"]), attn_scales=[],
        dropout=0.0, latents_mean=list(cfg.get("latents_mean", LATENTS_MEAN_22)),
        latents_std=list(cfg.get("latents_std", LATENTS_STD_22)), is_residual=True,
        in_channels=12, out_channels=12, patch_size=2, scale_factor_temporal=4, scale_factor_spatial=16,
    )  # fmt: skip


def official22_keys(cfg: dict) -> list[str]:
    """The parameter names of the reference's WanVAE_ (Wan2.2 wan/modules/vae2_2.py) for our config,
    spelled out from its module nesting: Encoder3d.downsamples[i] = Down_ResidualBlock whose
    `downsamples` Sequential holds num_res_blocks ResidualBlocks then (but the last stage) a Resample;
    Decoder3d.upsamples[i] = Up_ResidualBlock with num_res_blocks + 1 then a Resample; AvgDown3D and
    DupUp3D (`avg_shortcut`) hold no parameters."""
    keys: list[str] = []
    nrb, dim_mult = cfg["num_res_blocks"], cfg["dim_mult"]
    last = len(dim_mult) - 1

    def conv(name):
        keys.extend([f"{name}.weight", f"{name}.bias"])

    def resblock(name, in_dim, out_dim):
        keys.append(f"{name}.residual.0.gamma")
        conv(f"{name}.residual.2")
        keys.append(f"{name}.residual.3.gamma")
        conv(f"{name}.residual.6")
        if in_dim != out_dim:
            conv(f"{name}.shortcut")

    def middle(name, width):
        resblock(f"{name}.0", width, width)
        keys.append(f"{name}.1.norm.gamma")
        conv(f"{name}.1.to_qkv")
        conv(f"{name}.1.proj")
        resblock(f"{name}.2", width, width)

    dims = [cfg["dim"] * m for m in [1, *dim_mult]]
    conv("encoder.conv1")
    for i in range(len(dim_mult)):
        for j in range(nrb):
            resblock(f"encoder.downsamples.{i}.downsamples.{j}", dims[i] if j == 0 else dims[i + 1], dims[i + 1])
        if i != last:
            conv(f"encoder.downsamples.{i}.downsamples.{nrb}.resample.1")
            if cfg["temporal_downsample"][i]:
                conv(f"encoder.downsamples.{i}.downsamples.{nrb}.time_conv")
    middle("encoder.middle", dims[-1])
    keys.append("encoder.head.0.gamma")
    conv("encoder.head.2")
    conv("conv1")
    conv("conv2")
    dims = [cfg["dec_dim"] * m for m in [dim_mult[-1], *dim_mult[::-1]]]
    conv("decoder.conv1")
    middle("decoder.middle", dims[0])
    temporal_upsample = cfg["temporal_downsample"][::-1]
    for i in range(len(dim_mult)):
        for j in range(nrb + 1):
            resblock(f"decoder.upsamples.{i}.upsamples.{j}", dims[i] if j == 0 else dims[i + 1], dims[i + 1])
        if i != last:
            conv(f"decoder.upsamples.{i}.upsamples.{nrb + 1}.resample.1")
            if temporal_upsample[i]:
                conv(f"decoder.upsamples.{i}.upsamples.{nrb + 1}.time_conv")
    keys.append("decoder.head.0.gamma")
    conv("decoder.head.2")
    return keys


# The renames of diffusers' scripts/convert_wan_to_diffusers.py (convert_vae_22), as plain
# substring replacements: an official name -> its diffusers name.
_RESNET_PARTS = [(".residual.0.", ".norm1."), (".residual.2.", ".conv1."), (".residual.3.", ".norm2."),
                 (".residual.6.", ".conv2."), (".shortcut.", ".conv_shortcut.")]  # fmt: skip
_WHOLE = {"conv1.weight": "quant_conv.weight", "conv1.bias": "quant_conv.bias",
          "conv2.weight": "post_quant_conv.weight", "conv2.bias": "post_quant_conv.bias"}  # fmt: skip


def official22_to_diffusers_key(key: str) -> str:
    if key in _WHOLE:
        return _WHOLE[key]
    side, _, rest = key.partition(".")
    for old, new in [("conv1.", "conv_in."), ("head.0.", "norm_out."), ("head.2.", "conv_out.")]:
        if rest.startswith(old):
            return f"{side}.{new}{rest[len(old) :]}"
    if rest.startswith("middle."):
        parts = rest.split(".")
        index, tail = int(parts[1]), ".".join(parts[2:])
        if index == 1:
            return f"{side}.mid_block.attentions.0.{tail}"
        key = f"{side}.mid_block.resnets.{index // 2}.{tail}"
    else:
        way = "down" if side == "encoder" else "up"
        parts = key.split(".")  # side, {way}samples, stage, {way}samples, index, ...
        if ".residual." in key or ".shortcut." in key:
            key = ".".join([side, f"{way}_blocks", parts[2], "resnets", *parts[4:]])
        else:
            return ".".join([side, f"{way}_blocks", parts[2], f"{way}sampler", *parts[5:]])
    for old, new in _RESNET_PARTS:
        key = key.replace(old, new)
    return key


def build_pair22(cfg: dict, seed: int = 0) -> tuple[AutoencoderKLWan, WanVAE22]:
    """A random diffusers Wan2.2 VAE and our WanVAE22 holding the same weights (by our name mapping)."""
    torch.manual_seed(seed)
    ref = AutoencoderKLWan(**diffusers22_kwargs(cfg)).eval()
    randomize(ref, seed)
    ours = WanVAE22(**cfg).eval()
    blocks = cfg["num_res_blocks"]
    ours.load_state_dict({diffusers22_to_official_key(k, blocks): v for k, v in ref.state_dict().items()}, strict=True)
    return ref, ours
