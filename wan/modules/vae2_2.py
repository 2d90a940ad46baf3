"""The Wan2.2 3D causal VAE (of Wan2.2 TI2V-5B): video [B, 3, T, H, W] <-> latents [B, 48, 1 + (T-1)/4, H/16, W/16].

What Wan2.2 changes from the Wan2.1 VAE (wan/modules/vae.py, whose blocks this file reuses):
- Each 2x2 pixel patch is folded into channels before the encoder (12 input channels) and unfolded
  after the decoder (12 output channels): with three /2 stages that makes 16x spatial compression.
- The encoder (decoder) is a list of stages, each its residual blocks plus one resample, with a
  parameter-free shortcut around the whole stage: AvgDown3D folds 2x2(x2) blocks of the stage's
  input into channels and averages groups of them; DupUp3D repeats channels and unfolds them.
- The decoder has its own base width (256 against the encoder's 160) and its upsamples keep the
  width (Wan2.1's halve it).
- On the first latent frame the decoder's temporal upsample lets one frame through; the stage's
  shortcut then unfolds to 2 frames and keeps the last (the reference's `first_chunk`).

Parameter names are the official `Wan2.2_VAE.pth` keys, so the release file loads with strict
checking; diffusers `AutoencoderKLWan` folders with `is_residual: true` load through a name mapping
(vae_weights). Streaming (frame 0 alone, then chunks of 4; decode one latent frame at a time), the
per-conv cache, precision and the optional spatial tiling are those of vae.py.

Shapes: B batch, C channels, T/H/W pixel frames/height/width, F/h/w latent frames/height/width,
t frames of the chunk being processed.
"""

from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from wan.modules import vae_weights
from wan.modules.vae import (
    _SEEN,
    Cache,
    CausalConv3d,
    Decoder,
    Encoder,
    Resample,
    ResidualBlock,
    WanVAE,
    _tiled,
    structure_problems,
    vae_preset,
)

PATCH = 2  # pixels per side of the patch folded into channels around the encoder and decoder

# Per-channel statistics of the Wan2.2 latents: encode returns (mu - mean) / std.
LATENTS_MEAN_22 = [-0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
                   -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
                   -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
                   -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
                   -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
                   0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667]  # fmt: skip
LATENTS_STD_22 = [0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
                  0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
                  0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
                  0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
                  0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
                  0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744]  # fmt: skip

_RELEASE = dict(z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2, temporal_downsample=[False, True, True])
VAE22_PRESETS: dict[str, dict] = {
    "wan2.2": dict(_RELEASE, dim=160, dec_dim=256),  # Wan2.2_VAE.pth (Wan2.2 TI2V-5B)
    # Same structure (48 latent channels, a decoder wider than the encoder) at widths 8 and 12: CPU tests.
    "debug": dict(_RELEASE, dim=8, dec_dim=12),
}


def vae22_preset(name: str) -> dict:
    """A fresh copy of a preset's WanVAE22 keyword arguments."""
    if name not in VAE22_PRESETS:
        raise ValueError(f"unknown Wan2.2 VAE preset {name!r}; choose one of {', '.join(VAE22_PRESETS)}")
    return {k: list(v) if isinstance(v, list) else v for k, v in VAE22_PRESETS[name].items()}


# --------------------------------------------------------------------------------------------------
# Folding space (and time) into channels


def _fold(x: torch.Tensor, ft: int, fs: int) -> torch.Tensor:
    """[B, C, T, H, W] -> [B, C*ft*fs*fs, T/ft, H/fs, W/fs]: each ft x fs x fs block of a channel becomes
    that many channels, ordered (c, frame, row, column) as the reference's shortcuts order them."""
    b, c, t, h, w = x.shape
    x = x.view(b, c, t // ft, ft, h // fs, fs, w // fs, fs).permute(0, 1, 3, 5, 7, 2, 4, 6)
    return x.reshape(b, c * ft * fs * fs, t // ft, h // fs, w // fs)


def _unfold(x: torch.Tensor, ft: int, fs: int) -> torch.Tensor:
    """The inverse of _fold: [B, C*ft*fs*fs, T, H, W] -> [B, C, T*ft, H*fs, W*fs]."""
    b, c, t, h, w = x.shape
    c //= ft * fs * fs
    x = x.view(b, c, ft, fs, fs, t, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
    return x.reshape(b, c, t * ft, h * fs, w * fs)


def _patch_view(x: torch.Tensor) -> torch.Tensor:
    """A contiguous video [B, C, T, H, W] seen, without a copy, as [B, C, 2, 2, T, H/2, W/2] indexed
    (c, column in the patch, row in the patch, ...): the reference's patch channel is c*4 + 2*col + row
    (columns before rows, unlike _fold)."""
    b, c, t, h, w = x.shape
    return x.view(b, c, t, h // PATCH, PATCH, w // PATCH, PATCH).permute(0, 1, 6, 4, 2, 3, 5)


def patchify(x: torch.Tensor) -> torch.Tensor:
    """[B, C, T, H, W] -> [B, 4C, T, H/2, W/2], each 2x2 pixel patch in 4 channels (as the reference)."""
    b, c, t, h, w = x.shape
    x = x.reshape(b, c, t, h // PATCH, PATCH, w // PATCH, PATCH).permute(0, 1, 6, 4, 2, 3, 5)
    return x.reshape(b, c * PATCH * PATCH, t, h // PATCH, w // PATCH)


def unpatchify(x: torch.Tensor) -> torch.Tensor:
    """The inverse of patchify: [B, 4C, T, h, w] -> [B, C, T, 2h, 2w]."""
    b, c, t, h, w = x.shape
    out = x.new_empty(b, c // PATCH**2, t, h * PATCH, w * PATCH)
    _patch_view(out).copy_(x.view(b, c // PATCH**2, PATCH, PATCH, t, h, w))
    return out


class AvgDown3D(nn.Module):
    """The parameter-free shortcut of an encoder stage: fold each ft x fs x fs block into channels, then
    average consecutive groups of in_dim*ft*fs*fs/out_dim channels. A chunk of frames that is not a
    multiple of ft gets zero frames in front (the first chunk: 1 frame in, 1 out, half of it zeros)."""

    def __init__(self, in_dim: int, out_dim: int, ft: int, fs: int):
        super().__init__()
        if in_dim * ft * fs * fs % out_dim:
            raise ValueError(f"AvgDown3D: {in_dim} channels x {ft * fs * fs} do not split into {out_dim} groups")
        self.out_dim, self.ft, self.fs = out_dim, ft, fs
        self.group = in_dim * ft * fs * fs // out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.ft == self.fs == self.group == 1:
            return x  # the last stage: same width, no resampling
        pad = -x.shape[2] % self.ft
        if pad:
            x = F.pad(x, (0, 0, 0, 0, pad, 0))
        x = _fold(x, self.ft, self.fs)
        b, _, t, h, w = x.shape
        return x.view(b, self.out_dim, self.group, t, h, w).mean(2)


class DupUp3D(nn.Module):
    """The parameter-free shortcut of a decoder stage: repeat each channel out_dim*ft*fs*fs/in_dim times,
    then unfold the channels into ft x fs x fs blocks. On the stream's first chunk the stage's
    temporal upsample passes one frame through, so only the last of the ft frames is kept."""

    def __init__(self, in_dim: int, out_dim: int, ft: int, fs: int):
        super().__init__()
        if out_dim * ft * fs * fs % in_dim:
            raise ValueError(f"DupUp3D: {out_dim} channels x {ft * fs * fs} are not a multiple of {in_dim}")
        self.ft, self.fs = ft, fs
        self.repeats = out_dim * ft * fs * fs // in_dim

    def forward(self, x: torch.Tensor, first_chunk: bool) -> torch.Tensor:
        x = _unfold(x.repeat_interleave(self.repeats, dim=1), self.ft, self.fs)
        return x[:, :, self.ft - 1 :] if first_chunk else x


class WideUpsample(Resample):
    """Wan2.1's upsample with a per-frame Conv2d that keeps the width (C -> C, not C -> C/2)."""

    def __init__(self, dim: int, mode: str):
        super().__init__(dim, mode)
        self.resample[1] = nn.Conv2d(dim, dim, 3, padding=1)


class DownStage(nn.Module):
    """Residual blocks and a downsample (`downsamples`), plus an AvgDown3D shortcut around them all."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, temporal: bool, down: bool, dropout: float):
        super().__init__()
        self.avg_shortcut = AvgDown3D(in_dim, out_dim, 2 if temporal else 1, 2 if down else 1)
        layers: list[nn.Module] = [
            ResidualBlock(in_dim if i == 0 else out_dim, out_dim, dropout) for i in range(num_res_blocks)
        ]
        if down:
            layers.append(Resample(out_dim, "downsample3d" if temporal else "downsample2d"))
        self.downsamples = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        shortcut = self.avg_shortcut(x)  # first: the input then goes as soon as the main path is done with it
        for layer in self.downsamples:
            x = layer(x, cache)
        return x.add_(shortcut)  # x is the main path's own new tensor


class UpStage(nn.Module):
    """num_res_blocks + 1 residual blocks and an upsample (`upsamples`), plus a DupUp3D shortcut around
    them; the last stage has neither upsample nor shortcut."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, temporal: bool, up: bool, dropout: float):
        super().__init__()
        self.avg_shortcut = DupUp3D(in_dim, out_dim, 2 if temporal else 1, 2) if up else None
        layers: list[nn.Module] = [
            ResidualBlock(in_dim if i == 0 else out_dim, out_dim, dropout) for i in range(num_res_blocks + 1)
        ]
        if up:
            layers.append(WideUpsample(out_dim, "upsample3d" if temporal else "upsample2d"))
        self.upsamples = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        main = x
        for layer in self.upsamples:
            main = layer(main, cache)
        if self.avg_shortcut is None:
            return main
        first_chunk = self not in cache
        cache[self] = _SEEN
        # After the main path: its input is smaller than the upsampled shortcut would be meanwhile.
        return main.add_(self.avg_shortcut(x, first_chunk))


class Encoder22(Encoder):
    """The Wan2.1 encoder's layout on 2x2-patched pixels (12 channels), its down stages DownStages."""

    def __init__(self, dim, z_dim, dim_mult, num_res_blocks, temporal_downsample, dropout):
        super().__init__(dim, z_dim, dim_mult, num_res_blocks, temporal_downsample, dropout, 3 * PATCH * PATCH)

    def stages(self, dims, num_res_blocks, temporal_downsample, dropout) -> nn.Sequential:
        last = len(dims) - 2
        return nn.Sequential(*(
            DownStage(dims[i], dims[i + 1], num_res_blocks, i < last and temporal_downsample[i], i < last, dropout)
            for i in range(len(dims) - 1)
        ))  # fmt: skip


class Decoder22(Decoder):
    """The Wan2.1 decoder's layout, its up stages UpStages, out to 2x2-patched pixels (12 channels)."""

    def __init__(self, dim, z_dim, dim_mult, num_res_blocks, temporal_upsample, dropout):
        super().__init__(dim, z_dim, dim_mult, num_res_blocks, temporal_upsample, dropout, 3 * PATCH * PATCH)

    def stages(self, dims, num_res_blocks, temporal_upsample, dropout) -> nn.Sequential:
        last = len(dims) - 2
        return nn.Sequential(*(
            UpStage(dims[i], dims[i + 1], num_res_blocks, i < last and temporal_upsample[i], i < last, dropout)
            for i in range(len(dims) - 1)
        ))  # fmt: skip


class WanVAE22(nn.Module):
    """The Wan2.2 video VAE. encode: video in [-1, 1] -> normalised latents; decode: the reverse.

    Same interface as WanVAE. Keyword names follow the reference constructor (`dec_dim` is the
    decoder's base width, `temporal_downsample` its `temperal_downsample`); `VAE22_PRESETS` holds the
    release and a tiny debug configuration."""

    def __init__(
        self,
        *,
        dim: int = 160,
        dec_dim: int = 256,
        z_dim: int = 48,
        dim_mult: list[int] | tuple[int, ...] = (1, 2, 4, 4),
        num_res_blocks: int = 2,
        temporal_downsample: list[bool] | tuple[bool, ...] = (False, True, True),
        dropout: float = 0.0,
        latents_mean: list[float] | tuple[float, ...] = tuple(LATENTS_MEAN_22),
        latents_std: list[float] | tuple[float, ...] = tuple(LATENTS_STD_22),
    ):
        super().__init__()
        dim_mult, temporal_downsample = [int(m) for m in dim_mult], [bool(t) for t in temporal_downsample]
        problems = structure_problems(z_dim, dim_mult, temporal_downsample, latents_mean, latents_std)
        if dim < 2 or dec_dim < 2 or num_res_blocks < 1:
            problems.append(f"dim ({dim}) and dec_dim ({dec_dim}) must be >= 2 and num_res_blocks "
                            f"({num_res_blocks}) >= 1")  # fmt: skip
        if problems:
            raise ValueError("invalid WanVAE22 config: " + "; ".join(problems))
        self.config = dict(
            dim=dim, dec_dim=dec_dim, z_dim=z_dim, dim_mult=dim_mult, num_res_blocks=num_res_blocks,
            temporal_downsample=temporal_downsample, dropout=dropout,
            latents_mean=[float(v) for v in latents_mean], latents_std=[float(v) for v in latents_std],
        )  # fmt: skip
        self.z_dim = z_dim
        self.temporal_factor = 2 ** sum(temporal_downsample)  # 4: pixel frames per latent frame after the first
        self.spatial_factor = PATCH * 2 ** (len(dim_mult) - 1)  # 16

        self.encoder = Encoder22(dim, z_dim * 2, dim_mult, num_res_blocks, temporal_downsample, dropout)
        self.conv1 = CausalConv3d(z_dim * 2, z_dim * 2, 1)  # -> (mu, logvar)
        self.conv2 = CausalConv3d(z_dim, z_dim, 1)
        self.decoder = Decoder22(dec_dim, z_dim, dim_mult, num_res_blocks, temporal_downsample[::-1], dropout)

    # The shape arithmetic, latent statistics and tiling checks are WanVAE's (they read only config,
    # z_dim and the two factors).
    latent_shape = WanVAE.latent_shape
    _stats = WanVAE._stats
    _tiling = WanVAE._tiling

    def _check_video(self, video: torch.Tensor) -> None:
        s, k = self.spatial_factor, self.temporal_factor
        if video.ndim != 5 or video.shape[1] != 3:
            raise ValueError(f"WanVAE22.encode expects video [B, 3, T, H, W], got shape {list(video.shape)}")
        _, _, t, h, w = video.shape
        if t < 1 or (t - 1) % k:
            raise ValueError(f"WanVAE22.encode needs T = 1 + {k}k frames (1, 5, 9, ...), got T={t}")
        if h < s or w < s or h % s or w % s:
            raise ValueError(f"WanVAE22.encode needs H and W to be positive multiples of {s}, got H={h}, W={w}")
        if not video.is_floating_point():
            raise ValueError(f"WanVAE22.encode expects a floating-point video in [-1, 1], got {video.dtype}")

    @torch.no_grad()
    def encode(self, video: torch.Tensor, tile_size: int | None = None, tile_stride: int | None = None) -> torch.Tensor:
        """video [B, 3, T, H, W] in [-1, 1], T = 1 + 4k, H and W multiples of 16 -> normalised latents
        (mu - mean) / std [B, 48, 1 + k, H/16, W/16], float32. Frame 0 is encoded alone, then chunks of 4.

        tile_size / tile_stride (pixels, multiples of 16): as WanVAE.encode, tiles blended linearly in
        latent space. (diffusers' tiled encode reads its tile sizes in patch units, i.e. half pixels:
        its enable_tiling(t/2, t/2, s/2, s/2) is our tile_size=t, tile_stride=s.)"""
        self._check_video(video)
        tiling = self._tiling(tile_size, tile_stride)
        if tiling is None or max(video.shape[3:]) <= tiling[0]:
            return self._encode_stream(video)
        return _tiled(self._encode_stream, video, self.latent_shape(video.shape), *tiling, 1 / self.spatial_factor)

    @torch.no_grad()
    def decode(
        self, latents: torch.Tensor, tile_size: int | None = None, tile_stride: int | None = None
    ) -> torch.Tensor:
        """Normalised latents [B, 48, F, h, w] -> video [B, 3, 1 + 4(F-1), 16h, 16w] in [-1, 1], float32.
        Decodes one latent frame at a time. tile_size / tile_stride (pixels): tiles of latents decoded
        and blended over the overlap in patch space, then unpatchified (diffusers' tiled decode)."""
        if latents.ndim != 5 or latents.shape[1] != self.z_dim:
            raise ValueError(f"WanVAE22.decode expects latents [B, {self.z_dim}, F, h, w], got {list(latents.shape)}")
        if min(latents.shape[2:]) < 1:
            raise ValueError(f"WanVAE22.decode got an empty latent {list(latents.shape)}")
        tiling = self._tiling(tile_size, tile_stride)
        s = self.spatial_factor
        if tiling is None or max(latents.shape[3:]) * s <= tiling[0]:
            out = self._decode_stream(latents, patches=False)
        else:
            b, _, f, h, w = latents.shape
            shape = (b, 3 * PATCH * PATCH, 1 + self.temporal_factor * (f - 1), h * s // PATCH, w * s // PATCH)
            stream = partial(self._decode_stream, patches=True)
            out = unpatchify(_tiled(stream, latents, shape, tiling[0] // s, tiling[1] // s, s // PATCH))
        return out.clamp_(-1.0, 1.0)

    def _encode_stream(self, video: torch.Tensor) -> torch.Tensor:
        dtype = self.conv1.weight.dtype
        mean, inv_std = self._stats(video.device)
        out = torch.empty(self.latent_shape(video.shape), dtype=torch.float32, device=video.device)
        weight, bias = self.conv1.weight[: self.z_dim], self.conv1.bias[: self.z_dim]  # mu only
        cache: Cache = {}
        k = self.temporal_factor
        for i in range(out.shape[2]):
            chunk = video[:, :, :1] if i == 0 else video[:, :, 1 + k * (i - 1) : 1 + k * i]
            # Patchified chunk by chunk (the same per-frame fold): no patchified copy of the whole clip.
            mu = F.conv3d(self.encoder(patchify(chunk.to(dtype)), cache), weight, bias)  # [B, z, 1, h, w]
            out[:, :, i : i + 1] = (mu.float() - mean) * inv_std
        return out

    def _decode_stream(self, latents: torch.Tensor, patches: bool) -> torch.Tensor:
        """Normalised latents -> video [B, 3, T, H, W] (patches=False) or its patchified
        [B, 12, T, H/2, W/2] (patches=True), not yet clamped."""
        b, _, f, h, w = latents.shape
        s, k = self.spatial_factor, self.temporal_factor
        t, hp, wp = 1 + k * (f - 1), h * s // PATCH, w * s // PATCH
        dtype = self.conv2.weight.dtype
        mean, inv_std = self._stats(latents.device)
        if patches:
            out = torch.empty(b, 3 * PATCH * PATCH, t, hp, wp, dtype=torch.float32, device=latents.device)
            target = out.view(b, 3, PATCH, PATCH, t, hp, wp)
        else:  # each decoded chunk is unpatchified straight into the video
            out = torch.empty(b, 3, t, hp * PATCH, wp * PATCH, dtype=torch.float32, device=latents.device)
            target = _patch_view(out)
        cache: Cache = {}
        for i in range(f):
            z = latents[:, :, i : i + 1].float() / inv_std + mean
            frames = self.decoder(self.conv2(z.to(dtype)), cache)  # [B, 12, n, hp, wp]: n = 1, then k
            start, n = (0 if i == 0 else 1 + k * (i - 1)), frames.shape[2]
            target[:, :, :, :, start : start + n] = frames.view(b, 3, PATCH, PATCH, n, hp, wp)
        return out

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """Reconstruction: decode(encode(video))."""
        return self.decode(self.encode(video))

    # ----------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        dtype: torch.dtype | None = torch.float32,
        device: torch.device | str = "cpu",
        config: dict | None = None,
    ) -> "WanVAE22":
        """Load `Wan2.2_VAE.pth` (the file, or a folder holding it) or a diffusers AutoencoderKLWan
        folder with `is_residual: true` (config.json + diffusion_pytorch_model.safetensors, or a
        pipeline folder with vae/). A Wan2.1 VAE is refused, naming the class that loads it.

        Strict, built on the meta device, widths of a .pth read from its shapes (dim, dec_dim, z_dim),
        `config` overrides, dtype=None keeps the stored dtype: as WanVAE.from_pretrained."""
        return vae_weights.load_vae(cls, path, dtype, device, vae22_preset("wan2.2"), config, family="wan2.2")


def load_any_vae(
    path: str | Path,
    dtype: torch.dtype | None = torch.float32,
    device: torch.device | str = "cpu",
    config: dict | None = None,
) -> WanVAE | WanVAE22:
    """A WanVAE or a WanVAE22, whichever `path` holds: an official .pth by its key structure, a
    diffusers folder by its config's `is_residual`. Arguments as their from_pretrained."""
    source = vae_weights.open_vae_source(path)
    if source.family == "wan2.2":
        return vae_weights.build_vae(WanVAE22, source, dtype, device, vae22_preset("wan2.2"), config)
    return vae_weights.build_vae(WanVAE, source, dtype, device, vae_preset("wan2.1"), config)
