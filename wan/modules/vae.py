"""The Wan2.1 3D causal VAE: video [B, 3, T, H, W] <-> latents [B, 16, 1 + (T-1)/4, H/8, W/8].

Parameter names are the official `Wan2.1_VAE.pth` keys, so the release file loads with strict
checking (diffusers `AutoencoderKLWan` folders load through a name mapping, see vae_weights).

Streaming, as the reference does it and as exact parity needs: encode runs frame 0 alone, then
chunks of 4 frames; decode runs one latent frame at a time. Every causal conv keeps the last 2 frames
of its input between chunks (its `Cache` entry) in place of the zero padding in front, so activations
never span more than one chunk and memory stays flat as clips grow; outputs are written into one
preallocated tensor (no growing concatenation). Optional spatial tiling (`tile_size=`) bounds the
activations of large frames too, at the cost of exactness (diffusers' blending scheme).

Precision: with float32 weights (the default) everything runs in float32. With bf16 weights the
convolutions and attention run in bf16, the norms in float32, and the latent normalisation and the
returned video in float32.

Shapes: B batch, C channels, T/H/W pixel frames/height/width, F/h/w latent frames/height/width,
t frames of the chunk being processed.
"""

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from wan.modules import vae_weights

CACHE_FRAMES = 2  # frames of its input a causal 3x3x3 conv keeps for the next chunk

# Per-channel statistics of the Wan2.1 latents: encode returns (mu - mean) / std.
LATENTS_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]  # fmt: skip
LATENTS_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
               3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160]  # fmt: skip

_RELEASE = dict(z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, temporal_downsample=[False, True, True])
VAE_PRESETS: dict[str, dict] = {
    "wan2.1": dict(_RELEASE, dim=96),  # Wan2.1_VAE.pth, shared by every Wan2.1 model
    # Same structure at width 8 (8/16/32/32 channels): for CPU tests and the demo.
    "debug": dict(_RELEASE, dim=8),
}

# A streaming pass's state: for each causal layer, the frames it keeps from the previous chunk.
Cache = dict[nn.Module, torch.Tensor]
_SEEN = torch.empty(0)  # the cache entry of a temporal upsample that has seen the first chunk


def vae_preset(name: str) -> dict:
    """A fresh copy of a preset's WanVAE keyword arguments."""
    if name not in VAE_PRESETS:
        raise ValueError(f"unknown VAE preset {name!r}; choose one of {', '.join(VAE_PRESETS)}")
    return {k: list(v) if isinstance(v, list) else v for k, v in VAE_PRESETS[name].items()}


_MKLDNN_MIN_NUMEL = 2**18


def conv3d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride=1, padding=0) -> torch.Tensor:
    """F.conv3d, but on CPU large inputs always take oneDNN: torch's heuristic sends batch-1 inputs
    with C*T*H <= 20480 (few frames at small sizes) to its im2col path, up to 2x slower there."""
    if (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and x.numel() >= _MKLDNN_MIN_NUMEL
        and torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
    ):
        stride, padding = nn.modules.utils._triple(stride), nn.modules.utils._triple(padding)
        return torch.ops.aten.mkldnn_convolution(
            x.contiguous(), weight.contiguous(), bias, list(padding), list(stride), [1, 1, 1], 1
        )
    return F.conv3d(x, weight, bias, stride, padding)


class CausalConv3d(nn.Conv3d):
    """A Conv3d that is causal in time: the 2*pt frames of temporal padding all go in front.

    With a cache, the frames this conv kept from the previous chunk replace (part of) that padding,
    so a clip run chunk by chunk gives the same result as run whole. The spatial padding is the
    conv's own (no padded copy of the input); the weights are those of the reference's Conv3d.
    """

    def __init__(self, in_dim: int, out_dim: int, kernel_size, stride=1, padding=0):
        kernel_size = nn.modules.utils._triple(kernel_size)
        pt, ph, pw = nn.modules.utils._triple(padding)
        super().__init__(in_dim, out_dim, kernel_size, stride=stride, padding=(0, ph, pw))
        self.front = 2 * pt  # frames of zeros (or cached frames) in front

    def forward(self, x: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        if self.front == 0:
            return conv3d(x, self.weight, self.bias, self.stride, self.padding)
        prev = cache.get(self) if cache is not None else None
        if cache is not None:
            # Keep the last 2 input frames; a 1-frame chunk keeps the previous chunk's last frame too.
            keep = x[:, :, -CACHE_FRAMES:]
            cache[self] = (
                torch.cat([prev[:, :, -1:], keep], 2) if prev is not None and keep.shape[2] < 2 else keep.clone()
            )
        if prev is None and x.shape[2] == 1 and self.front == self.kernel_size[0] - 1:
            # One frame behind zeros: only the last temporal tap sees data, so skip the zero taps
            # (the first chunk of every stream; 1/3 of the work, same sums).
            return conv3d(x, self.weight[:, :, -1:], self.bias, self.stride, self.padding)
        if prev is not None:
            x = torch.cat([prev.to(x.dtype), x], 2)
        zeros = self.front - (prev.shape[2] if prev is not None else 0)
        if zeros > 0:
            x = F.pad(x, (0, 0, 0, 0, zeros, 0))
        return conv3d(x, self.weight, self.bias, self.stride, self.padding)


class RMSNorm(nn.Module):
    """x / ||x||_channels * sqrt(C) * gamma (no bias), over dim 1, in float32.

    gamma has shape [C, 1, 1, 1] (video, `images=False`) or [C, 1, 1] (frames), as in the release."""

    def __init__(self, dim: int, images: bool):
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, *((1, 1) if images else (1, 1, 1))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        b, c = x.shape[:2]
        # Sum of squares over channels as a [1, C] @ [C, N] product: on CPU, a reduction over the
        # strided channel dim is ~5x slower. rsqrt(max(s, 1e-24)) = 1 / max(||x||, 1e-12) as F.normalize.
        sq = torch.matmul(x32.new_ones(1, c), (x32 * x32).reshape(b, c, -1))  # [B, 1, N]
        inv = sq.clamp_min_(1e-24).rsqrt_().view(b, 1, *x.shape[2:])
        return (x32 * inv).mul_(self.gamma.float() * self.scale).to(x.dtype)


class ResidualBlock(nn.Module):
    """[RMS, SiLU, CConv 3x3x3, RMS, SiLU, Dropout, CConv 3x3x3] + shortcut (1x1x1 conv if widths differ)."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.0):
        super().__init__()
        self.residual = nn.Sequential(
            RMSNorm(in_dim, images=False),
            nn.SiLU(),
            CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMSNorm(out_dim, images=False),
            nn.SiLU(),
            nn.Dropout(dropout),
            CausalConv3d(out_dim, out_dim, 3, padding=1),
        )
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        norm1, _, conv1, norm2, _, dropout, conv2 = self.residual
        h = self.shortcut(x)
        # In-place activations and sum: the VAE runs without autograd (see WanVAE.encode).
        x = conv1(F.silu(norm1(x), inplace=True), cache)
        x = conv2(dropout(F.silu(norm2(x), inplace=True)), cache)
        return x.add_(h)


class AttentionBlock(nn.Module):
    """Single-head self-attention within each frame over its h*w positions, plus identity."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        b, c, t, h, w = x.shape
        y = self.norm(x.transpose(1, 2).reshape(b * t, c, h, w))
        q, k, v = self.to_qkv(y).flatten(2).transpose(1, 2).unsqueeze(1).chunk(3, dim=-1)  # [b*t, 1, h*w, C]
        # 4D (one head) so that CPU and CUDA pick a flash kernel: no [h*w, h*w] score matrix.
        y = F.scaled_dot_product_attention(q, k, v).squeeze(1)
        y = self.proj(y.transpose(1, 2).reshape(b * t, c, h, w))
        return x + y.view(b, t, c, h, w).transpose(1, 2)  # x first: the sum takes x's (contiguous) layout


class Upsample(nn.Upsample):
    """Nearest-exact x2 in float32 (as the reference; a parameter-free `resample.0`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).to(x.dtype)


class Resample(nn.Module):
    """Spatial /2 or x2 per frame (`resample.1`, a Conv2d), plus a causal temporal /2 or x2 (`time_conv`).

    Downsample: ZeroPad2d(0,1,0,1) + Conv2d(C, C, 3, stride 2); temporally, a stride-2 conv over
    [previous chunk's last frame, this chunk]; it is skipped on the first chunk (frame 0 stays alone).
    Upsample: nearest-exact x2 + Conv2d(C, C/2, 3, pad 1); temporally, a causal conv to 2C channels
    whose halves become frames 2i and 2i+1; skipped on the first chunk (frame 0 stays one frame).
    """

    def __init__(self, dim: int, mode: str):
        super().__init__()
        if mode not in ("upsample2d", "upsample3d", "downsample2d", "downsample3d"):
            raise ValueError(f"unknown resample mode {mode!r}")
        self.mode = mode
        if mode.startswith("up"):
            self.resample = nn.Sequential(
                Upsample(scale_factor=(2.0, 2.0), mode="nearest-exact"), nn.Conv2d(dim, dim // 2, 3, padding=1)
            )
        else:
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=(2, 2)))
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1), padding=(0, 0, 0))

    def _per_frame(self, x: torch.Tensor) -> torch.Tensor:
        # The Conv2d runs as a 1x3x3 Conv3d on [B, C, t, H, W]: same sums, no (b t) reshuffles.
        conv = self.resample[1]
        weight = conv.weight.unsqueeze(2)
        if self.mode.startswith("up"):
            x = F.interpolate(x.float(), scale_factor=(1.0, 2.0, 2.0), mode="nearest-exact").to(x.dtype)
            return conv3d(x, weight, conv.bias, padding=(0, 1, 1))
        return conv3d(F.pad(x, (0, 1, 0, 1)), weight, conv.bias, stride=(1, 2, 2))

    def forward(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        if self.mode == "upsample3d":
            if self in cache:
                # From the second chunk on. time_conv's own cache starts empty there, so the second
                # chunk sees zeros in front, as the reference's "Rep" marker arranges.
                b, c, t, h, w = x.shape
                x = self.time_conv(x, cache).view(b, 2, c, t, h, w)
                x = x.permute(0, 2, 3, 1, 4, 5).reshape(b, c, 2 * t, h, w)  # interleave the halves in time
            else:
                cache[self] = _SEEN  # the first chunk passes through as one frame
        x = self._per_frame(x)
        if self.mode == "downsample3d":
            prev = cache.get(self)
            cache[self] = x[:, :, -1:].clone()
            if prev is not None:
                x = self.time_conv(torch.cat([prev, x], 2))
        return x


def middle_blocks(width: int, dropout: float) -> nn.Sequential:
    """The encoder's and decoder's middle: residual, attention, residual at the widest width."""
    return nn.Sequential(
        ResidualBlock(width, width, dropout), AttentionBlock(width), ResidualBlock(width, width, dropout)
    )


def output_head(width: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(RMSNorm(width, images=False), nn.SiLU(), CausalConv3d(width, out_dim, 3, padding=1))


class Encoder(nn.Module):
    """conv1, the down stages (`downsamples`), the middle and the head. `stages` builds the down stages
    from the widths [in, out] of each (the Wan2.2 VAE's override it); in_channels: the pixels' (3)."""

    def __init__(self, dim, z_dim, dim_mult, num_res_blocks, temporal_downsample, dropout, in_channels: int = 3):
        super().__init__()
        dims = [dim * m for m in [1, *dim_mult]]
        self.conv1 = CausalConv3d(in_channels, dims[0], 3, padding=1)
        self.downsamples = self.stages(dims, num_res_blocks, temporal_downsample, dropout)
        self.middle = middle_blocks(dims[-1], dropout)
        self.head = output_head(dims[-1], z_dim)

    def stages(self, dims, num_res_blocks, temporal_downsample, dropout) -> nn.Sequential:
        layers = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            for _ in range(num_res_blocks):
                layers.append(ResidualBlock(in_dim, out_dim, dropout))
                in_dim = out_dim
            if i != len(dims) - 2:
                layers.append(Resample(out_dim, "downsample3d" if temporal_downsample[i] else "downsample2d"))
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        x = self.conv1(x, cache)
        for layer in (*self.downsamples, *self.middle):
            x = layer(x, cache)
        return self.head[2](F.silu(self.head[0](x), inplace=True), cache)


class Decoder(nn.Module):
    """conv1, the middle, the up stages (`upsamples`) and the head; `stages` as the Encoder's."""

    def __init__(self, dim, z_dim, dim_mult, num_res_blocks, temporal_upsample, dropout, out_channels: int = 3):
        super().__init__()
        dims = [dim * m for m in [dim_mult[-1], *dim_mult[::-1]]]
        self.conv1 = CausalConv3d(z_dim, dims[0], 3, padding=1)
        self.middle = middle_blocks(dims[0], dropout)
        self.upsamples = self.stages(dims, num_res_blocks, temporal_upsample, dropout)
        self.head = output_head(dims[-1], out_channels)

    def stages(self, dims, num_res_blocks, temporal_upsample, dropout) -> nn.Sequential:
        layers = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            if i > 0:
                in_dim //= 2  # each upsample halves the width
            for _ in range(num_res_blocks + 1):
                layers.append(ResidualBlock(in_dim, out_dim, dropout))
                in_dim = out_dim
            if i != len(dims) - 2:
                layers.append(Resample(out_dim, "upsample3d" if temporal_upsample[i] else "upsample2d"))
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        x = self.conv1(x, cache)
        for layer in (*self.middle, *self.upsamples):
            x = layer(x, cache)
        return self.head[2](F.silu(self.head[0](x), inplace=True), cache)


def _tiled(fn, x: torch.Tensor, out_shape, tile: int, stride: int, scale: float) -> torch.Tensor:
    """Run `fn` on overlapping spatial tiles of x (tile x tile, `stride` apart, in x's units) and put
    the results together in a new [.., H_out, W_out] tensor; `scale` is output units per input unit.

    As diffusers: tiles are visited row by row, each is blended in place with the (already blended)
    tile above and the one to its left, linearly over the overlap, then cropped to the stride. Only
    the previous row of tiles is kept."""
    out = torch.empty(out_shape, dtype=torch.float32, device=x.device)
    out_stride, blend = int(stride * scale), int((tile - stride) * scale)
    above: list[torch.Tensor] = []
    for i in range(0, x.shape[-2], stride):
        row: list[torch.Tensor] = []
        for j in range(0, x.shape[-1], stride):
            y = fn(x[..., i : i + tile, j : j + tile])
            if above:
                _blend(above[len(row)], y, blend, dim=-2)
            if row:
                _blend(row[-1], y, blend, dim=-1)
            row.append(y)
            oi, oj = i // stride * out_stride, j // stride * out_stride
            part = y[..., :out_stride, :out_stride]
            out[..., oi : oi + part.shape[-2], oj : oj + part.shape[-1]] = part[
                ..., : out.shape[-2] - oi, : out.shape[-1] - oj
            ]
        above = row
    return out


def _blend(a: torch.Tensor, b: torch.Tensor, extent: int, dim: int) -> None:
    """b's first `extent` rows (dim -2) or columns (dim -1) <- a's last ones * (1 - r) + b's * r, r = i/extent."""
    extent = min(a.shape[dim], b.shape[dim], extent)
    if extent <= 0:
        return
    r = torch.arange(extent, dtype=b.dtype, device=b.device) / extent
    r = r.view(-1, 1) if dim == -2 else r
    head = b.narrow(dim, 0, extent)
    head.copy_(a.narrow(dim, a.shape[dim] - extent, extent) * (1 - r) + head * r)


def structure_problems(z_dim, dim_mult, temporal_downsample, latents_mean, latents_std) -> list[str]:
    """What every Wan VAE constructor (WanVAE, WanVAE22) checks of the fields they share."""
    problems = []
    if len(temporal_downsample) != len(dim_mult) - 1:
        problems.append(f"temporal_downsample needs {len(dim_mult) - 1} entries (one per downsample), "
                        f"got {len(temporal_downsample)}")  # fmt: skip
    if len(latents_mean) != z_dim or len(latents_std) != z_dim:
        problems.append(f"latents_mean and latents_std need z_dim={z_dim} entries, "
                        f"got {len(latents_mean)} and {len(latents_std)}")  # fmt: skip
    return problems


class WanVAE(nn.Module):
    """The Wan2.1 video VAE. encode: video in [-1, 1] -> normalised latents; decode: the reverse.

    Keyword names follow the reference constructor (`temporal_downsample` is its
    `temperal_downsample`); `VAE_PRESETS` holds the release and a tiny debug configuration."""

    def __init__(
        self,
        *,
        dim: int = 96,
        z_dim: int = 16,
        dim_mult: list[int] | tuple[int, ...] = (1, 2, 4, 4),
        num_res_blocks: int = 2,
        temporal_downsample: list[bool] | tuple[bool, ...] = (False, True, True),
        dropout: float = 0.0,
        latents_mean: list[float] | tuple[float, ...] = tuple(LATENTS_MEAN),
        latents_std: list[float] | tuple[float, ...] = tuple(LATENTS_STD),
    ):
        super().__init__()
        dim_mult, temporal_downsample = [int(m) for m in dim_mult], [bool(t) for t in temporal_downsample]
        problems = structure_problems(z_dim, dim_mult, temporal_downsample, latents_mean, latents_std)
        if dim < 2 or num_res_blocks < 1:
            problems.append(f"dim ({dim}) must be >= 2 and num_res_blocks ({num_res_blocks}) >= 1")
        if problems:
            raise ValueError("invalid WanVAE config: " + "; ".join(problems))
        self.config = dict(
            dim=dim, z_dim=z_dim, dim_mult=dim_mult, num_res_blocks=num_res_blocks,
            temporal_downsample=temporal_downsample, dropout=dropout,
            latents_mean=[float(v) for v in latents_mean], latents_std=[float(v) for v in latents_std],
        )  # fmt: skip
        self.z_dim = z_dim
        self.temporal_factor = 2 ** sum(temporal_downsample)  # 4: pixel frames per latent frame after the first
        self.spatial_factor = 2 ** (len(dim_mult) - 1)  # 8

        self.encoder = Encoder(dim, z_dim * 2, dim_mult, num_res_blocks, temporal_downsample, dropout)
        self.conv1 = CausalConv3d(z_dim * 2, z_dim * 2, 1)  # -> (mu, logvar)
        self.conv2 = CausalConv3d(z_dim, z_dim, 1)
        self.decoder = Decoder(dim, z_dim, dim_mult, num_res_blocks, temporal_downsample[::-1], dropout)

    # ----------------------------------------------------------------------------------------------
    def _stats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """mean and 1/std as [1, z, 1, 1, 1] float32 (constants, so a cast or meta build never touches them)."""
        mean = torch.tensor(self.config["latents_mean"], dtype=torch.float32, device=device)
        inv_std = 1.0 / torch.tensor(self.config["latents_std"], dtype=torch.float32, device=device)
        return mean.view(1, -1, 1, 1, 1), inv_std.view(1, -1, 1, 1, 1)

    def latent_shape(self, video_shape) -> tuple[int, ...]:
        b, _, t, h, w = video_shape
        s = self.spatial_factor
        return (b, self.z_dim, 1 + (t - 1) // self.temporal_factor, h // s, w // s)

    def _check_video(self, video: torch.Tensor) -> None:
        s, k = self.spatial_factor, self.temporal_factor
        if video.ndim != 5 or video.shape[1] != 3:
            raise ValueError(f"WanVAE.encode expects video [B, 3, T, H, W], got shape {list(video.shape)}")
        _, _, t, h, w = video.shape
        if t < 1 or (t - 1) % k:
            raise ValueError(f"WanVAE.encode needs T = 1 + {k}k frames (1, 5, 9, ...), got T={t}")
        if h < s or w < s or h % s or w % s:
            raise ValueError(f"WanVAE.encode needs H and W to be positive multiples of {s}, got H={h}, W={w}")
        if not video.is_floating_point():
            raise ValueError(f"WanVAE.encode expects a floating-point video in [-1, 1], got {video.dtype}")

    @torch.no_grad()
    def encode(self, video: torch.Tensor, tile_size: int | None = None, tile_stride: int | None = None) -> torch.Tensor:
        """video [B, 3, T, H, W] in [-1, 1], T = 1 + 4k, H and W multiples of 8 -> normalised latents
        (mu - mean) / std [B, 16, 1 + k, H/8, W/8], float32. Frame 0 is encoded alone, then chunks of 4.

        tile_size (pixels, a multiple of 8): when H or W exceeds it, encode overlapping tiles of that
        size, tile_stride apart (default 3/4 of the size), each streamed over the whole clip, and blend
        them linearly over the overlap (diffusers' scheme). Off by default: tiles only approximate the
        reference, with less activation memory on large frames."""
        self._check_video(video)
        tiling = self._tiling(tile_size, tile_stride)
        out_shape = self.latent_shape(video.shape)
        if tiling is None or max(video.shape[3:]) <= tiling[0]:
            return self._encode_stream(video)
        s = self.spatial_factor
        return _tiled(self._encode_stream, video, out_shape, tiling[0], tiling[1], 1 / s)

    @torch.no_grad()
    def decode(
        self, latents: torch.Tensor, tile_size: int | None = None, tile_stride: int | None = None
    ) -> torch.Tensor:
        """Normalised latents [B, 16, F, h, w] -> video [B, 3, 1 + 4(F-1), 8h, 8w] in [-1, 1], float32.
        Decodes one latent frame at a time. tile_size / tile_stride (pixels): as for encode."""
        if latents.ndim != 5 or latents.shape[1] != self.z_dim:
            raise ValueError(f"WanVAE.decode expects latents [B, {self.z_dim}, F, h, w], got {list(latents.shape)}")
        if min(latents.shape[2:]) < 1:
            raise ValueError(f"WanVAE.decode got an empty latent {list(latents.shape)}")
        tiling = self._tiling(tile_size, tile_stride)
        b, _, f, h, w = latents.shape
        s, k = self.spatial_factor, self.temporal_factor
        out_shape = (b, 3, 1 + k * (f - 1), h * s, w * s)
        if tiling is None or max(h, w) * s <= tiling[0]:
            out = self._decode_stream(latents)
        else:
            out = _tiled(self._decode_stream, latents, out_shape, tiling[0] // s, tiling[1] // s, s)
        return out.clamp_(-1.0, 1.0)

    def _tiling(self, tile_size: int | None, tile_stride: int | None) -> tuple[int, int] | None:
        if tile_size is None:
            if tile_stride is not None:
                raise ValueError("tile_stride needs tile_size")
            return None
        s = self.spatial_factor
        tile_stride = tile_size * 3 // 4 // s * s if tile_stride is None else tile_stride
        if tile_size % s or tile_stride % s or not 0 < tile_stride <= tile_size:
            raise ValueError(
                f"tile_size ({tile_size}) and tile_stride ({tile_stride}) must be positive multiples of {s} "
                "with tile_stride <= tile_size"
            )
        return tile_size, tile_stride

    def _encode_stream(self, video: torch.Tensor) -> torch.Tensor:
        dtype = self.conv1.weight.dtype
        mean, inv_std = self._stats(video.device)
        out = torch.empty(self.latent_shape(video.shape), dtype=torch.float32, device=video.device)
        weight, bias = self.conv1.weight[: self.z_dim], self.conv1.bias[: self.z_dim]  # mu only
        cache: Cache = {}
        k = self.temporal_factor
        for i in range(out.shape[2]):
            chunk = video[:, :, :1] if i == 0 else video[:, :, 1 + k * (i - 1) : 1 + k * i]
            mu = F.conv3d(self.encoder(chunk.to(dtype), cache), weight, bias)  # [B, z, 1, h, w]
            out[:, :, i : i + 1] = (mu.float() - mean) * inv_std
        return out

    def _decode_stream(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> video, not yet clamped."""
        b, _, f, h, w = latents.shape
        s, k = self.spatial_factor, self.temporal_factor
        dtype = self.conv2.weight.dtype
        mean, inv_std = self._stats(latents.device)
        out = torch.empty(b, 3, 1 + k * (f - 1), h * s, w * s, dtype=torch.float32, device=latents.device)
        cache: Cache = {}
        for i in range(f):
            z = latents[:, :, i : i + 1].float() / inv_std + mean
            frames = self.decoder(self.conv2(z.to(dtype)), cache)  # 1 frame, then k per latent frame
            start = 0 if i == 0 else 1 + k * (i - 1)
            out[:, :, start : start + frames.shape[2]] = frames
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
    ) -> "WanVAE":
        """Load `Wan2.1_VAE.pth` (the file, or a folder holding it) or a diffusers AutoencoderKLWan
        folder (config.json + diffusion_pytorch_model.safetensors, or a pipeline folder with vae/).

        Strict: every key once with its shape, else a ValueError naming the file and the keys. Built on
        the meta device, so host memory holds one copy. The .pth carries no config: its widths are read
        from the tensor shapes and the rest is the release structure; `config` overrides any of it.
        dtype=None keeps the stored dtype. Returns the model in eval mode with requires_grad off."""
        return vae_weights.load_vae(cls, path, dtype, device, vae_preset("wan2.1"), config)
