"""Text-to-video and image-to-video sampling with the Wan2.1 models, in stages a caller can drive:

    context, negative = encode_prompts(text, prompts, options.negative_prompt, device)
    y, clip_fea = i2v_condition(vae, clip, images, options.num_frames)         # i2v only
    noise = initial_noise(seeds, options.latent_shape())
    latents = denoise(dit, noise, context, negative, options, clip_fea, y)
    video = decode(vae, latents)

or all at once with generate(). `dit` is any callable dit(x, t, context, clip_fea=None, y=None) ->
velocity (our WanModel, or a training engine's forward), so the trainer's validation can sample
through its distributed engine.

What the release (and diffusers' WanPipeline / WanImageToVideoPipeline) does, and this does too:
prompts cleaned and padded to 512 tokens with zeros past each prompt; starting noise float32, kept
float32 between steps (the DiT decides its own precision: WanModel autocasts to its weights' dtype);
timesteps int64(sigma * 1000); guidance v = v_uncond + g * (v_cond - v_uncond); the VAE decode
clamped to [-1, 1]. Differences, on purpose: the noise of sample i comes from its own CPU generator
seeded seed + i (the release draws on the GPU), so a video depends neither on the device nor on the
batch it was sampled in; guidance_scale 1 skips the unconditional pass (the release always runs it;
the result is the same).
"""

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from wan.encoders import TextEncoder, encode_i2v_condition, on_device
from wan.modules.clip import CLIPVision
from wan.modules.vae import WanVAE
from wan.samplers import SAMPLERS, build_sampler

# The release's default negative prompt (Wan2.1 wan/configs/shared_config.py, sample_neg_prompt).
DEFAULT_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)

LATENT_CHANNELS = 16
VAE_STRIDE = (4, 8, 8)  # frames, height, width
SIZE_MULTIPLE = 16  # VAE stride 8 x DiT patch 2

Dit = Callable[..., torch.Tensor]
Progress = Callable[[int, int], None]


@dataclass
class SamplingOptions:
    """How to sample one batch of videos. Defaults: the release's T2V 480p settings."""

    num_frames: int = 81
    """Frames of each video: 4k + 1 (81 = 5 s at 16 fps)."""
    height: int = 480
    """Height in pixels, a multiple of 16."""
    width: int = 832
    """Width in pixels, a multiple of 16."""
    num_inference_steps: int = 50
    """Denoising steps (the release: 50 for T2V, 40 for I2V)."""
    guidance_scale: float = 5.0
    """Classifier-free guidance scale; 1.0 turns guidance off (one DiT pass per step instead of two)."""
    shift: float = 5.0
    """Sigma shift of the sampling grid (the release: 5.0 for T2V, 3.0 for I2V 480p)."""
    sampler: str = "unipc"
    """"unipc" (the release's) or "euler"."""
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    """The prompt guidance steers away from (default: the release's). "" is an empty prompt, as in
    diffusers (the release's command line maps "" to its default)."""
    seed: int = 42
    """Sample i of a call starts from the noise of seed + i, so a prompt gives the same video alone
    or inside a batch."""

    def problems(self) -> list[str]:
        """Every invalid field, described; empty when the options can be used."""
        out = []

        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        if not is_int(self.num_frames) or self.num_frames < 1 or (self.num_frames - 1) % VAE_STRIDE[0]:
            out.append(f"num_frames must be 4k + 1 (1, 5, ..., 81), got {self.num_frames!r}")
        for name in ("height", "width"):
            v = getattr(self, name)
            if not is_int(v) or v < SIZE_MULTIPLE or v % SIZE_MULTIPLE:
                out.append(f"{name} must be a positive multiple of {SIZE_MULTIPLE} pixels, got {v!r}")
        if not is_int(self.num_inference_steps) or self.num_inference_steps < 1:
            out.append(f"num_inference_steps must be an integer >= 1, got {self.num_inference_steps!r}")
        if not isinstance(self.guidance_scale, (int, float)) or not 0 <= self.guidance_scale < float("inf"):
            out.append(f"guidance_scale must be a finite number >= 0 (1 = no guidance), got {self.guidance_scale!r}")
        if not isinstance(self.shift, (int, float)) or not 0 < self.shift < float("inf"):
            out.append(f"shift must be a finite number > 0, got {self.shift!r}")
        if self.sampler not in SAMPLERS:
            out.append(f"sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        if not isinstance(self.negative_prompt, str):
            out.append(f"negative_prompt must be a string, got {type(self.negative_prompt).__name__}")
        if not is_int(self.seed) or not 0 <= self.seed < 2**63:
            out.append(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        return out

    def check(self) -> None:
        """Raise ValueError listing every problem."""
        problems = self.problems()
        if problems:
            raise ValueError("invalid sampling options: " + "; ".join(problems))

    @property
    def guided(self) -> bool:
        """Whether sampling runs the unconditional pass (guidance_scale != 1)."""
        return self.guidance_scale != 1.0

    def latent_shape(self) -> tuple[int, int, int, int]:
        """(C, T, h, w) of one video's latents: (16, 1 + (F - 1) / 4, H / 8, W / 8)."""
        t, s, _ = VAE_STRIDE
        return (LATENT_CHANNELS, 1 + (self.num_frames - 1) // t, self.height // s, self.width // s)


def initial_noise(seeds: list[int], shape: tuple[int, ...]) -> torch.Tensor:
    """Standard normal noise [B, *shape] float32 on the CPU, row i from a CPU generator seeded seeds[i]:
    the same on every machine and whatever the batch."""
    rows = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s)), dtype=torch.float32) for s in seeds]
    return torch.stack(rows)


@contextmanager
def _working(module, device: torch.device, offload: bool):
    """Yields the device `module` computes on. With offload, the module moves to `device` for the
    duration and back to where it was after; without, it runs where it is. From the CPU it goes by
    `on_device`: one kept (pinned) host copy, nothing copied back."""
    params = next(module.parameters(), None) if isinstance(module, nn.Module) else None
    if params is None:
        yield device
        return
    home = params.device
    if not offload or home == device:
        yield home
        return
    try:
        if home.type == "cpu":
            with on_device(module, device):
                yield device
        else:
            module.to(device)
            try:
                yield device
            finally:
                module.to(home)
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


@torch.no_grad()
def encode_prompts(
    text: TextEncoder,
    prompts: list[str],
    negative_prompt: str | None,
    device: str | torch.device,
    offload: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Prompts (B) -> (context [B, 512, dim], negative context [B, 512, dim] or None when
    negative_prompt is None), float32 on `device`, zero past each prompt's tokens. The negative
    prompt is encoded once and shared by the batch."""
    device = torch.device(device)
    texts = list(prompts) + ([negative_prompt] if negative_prompt is not None else [])
    ids, mask = text.tokenizer(texts)
    with _working(text.model, device, offload or text.offload) as where:
        out = text.model(ids.to(where), mask.to(where)).to(device, torch.float32)
    b = len(prompts)
    negative = out[b:].repeat(b, 1, 1) if negative_prompt is not None else None
    return out[:b], negative


def resize_images(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Images [B, 3, H, W] in [-1, 1] -> [B, 3, height, width], bicubic as the release resizes the I2V
    first frame (align_corners False, no antialiasing, not clamped). Unchanged at the same size."""
    if tuple(images.shape[-2:]) == (height, width):
        return images
    return F.interpolate(images.float(), size=(height, width), mode="bicubic", align_corners=False)


@torch.no_grad()
def i2v_condition(
    vae: WanVAE,
    clip: CLIPVision,
    images: torch.Tensor | list[torch.Tensor],
    num_frames: int,
    size: tuple[int, int] | None = None,
    offload: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """First frames -> (y [B, 20, T_lat, H/8, W/8], clip_fea [B, 257, 1280]) for the I2V DiT, float32,
    computed on the images' device (where the VAE and CLIP must be, or move to with offload).

    images: [B, 3, H, W] in [-1, 1], or a list of [3, H_i, W_i]; size: (height, width) of the video
    (default: the images'). As in the release, the VAE encodes each image resized to the video size
    while CLIP sees it as given (CLIP resizes to 224 itself)."""
    originals = [img.unsqueeze(0) for img in images] if isinstance(images, list) else [images]
    if any(img.ndim != 4 or img.shape[1] != 3 for img in originals):
        shapes = [list(img.shape) for img in originals]
        raise ValueError(f"I2V images must be [B, 3, H, W] or a list of [3, H, W], got {shapes}")
    size = tuple(size) if size is not None else tuple(originals[0].shape[-2:])
    frames = torch.cat([resize_images(img, *size) for img in originals])
    y, clip_fea = encode_i2v_condition(vae, clip, frames, num_frames, offload)
    if any(tuple(img.shape[-2:]) != size for img in originals):
        # CLIP of the images as given (one more small ViT pass, only when an image was resized).
        with _working(clip, frames.device, offload):
            clip_fea = torch.cat([clip.encode_image(img) for img in originals])
    return y, clip_fea


@torch.no_grad()
def denoise(
    dit: Dit,
    x: torch.Tensor,
    context: torch.Tensor,
    negative_context: torch.Tensor | None,
    options: SamplingOptions,
    clip_fea: torch.Tensor | None = None,
    y: torch.Tensor | None = None,
    progress: Progress | None = None,
    batch_cfg: bool = True,
) -> torch.Tensor:
    """Noise x [B, 16, T, h, w] -> latents [B, 16, T, h, w] float32, on x's device.

    context / negative_context [B, L, dim] (negative only needed when options.guidance_scale != 1);
    clip_fea [B, 257, 1280] and y [B, 20, T, h, w] for i2v. With guidance, the conditional and
    unconditional passes run as one DiT call on a batch of 2B (batch_cfg, faster), or as two calls of
    B (less memory). progress(done, total) is called after each step, done = 1 .. total."""
    options.check()
    guided = options.guided
    if guided and negative_context is None:
        raise ValueError(f"guidance_scale {options.guidance_scale} needs a negative context (1.0 turns guidance off)")
    sampler = build_sampler(options.sampler, options.num_inference_steps, options.shift)
    x = x.float()
    b = x.shape[0]
    cond = {k: v for k, v in (("clip_fea", clip_fea), ("y", y)) if v is not None}
    if guided and batch_cfg:
        both_context = torch.cat([context, negative_context])
        both_cond = {k: torch.cat([v, v]) for k, v in cond.items()}
    g = float(options.guidance_scale)
    for i, t in enumerate(sampler.timesteps):
        t = t.to(x.device).expand(b)
        if not guided:
            v = dit(x, t, context, **cond).float()
        else:
            if batch_cfg:
                v_cond, v_uncond = dit(torch.cat([x, x]), t.repeat(2), both_context, **both_cond).float().chunk(2)
            else:
                v_cond = dit(x, t, context, **cond).float()
                v_uncond = dit(x, t, negative_context, **cond).float()
            v = v_uncond + g * (v_cond - v_uncond)
        x = sampler.step(v, x)
        if progress is not None:
            progress(i + 1, options.num_inference_steps)
    return x


@torch.no_grad()
def decode(
    vae: WanVAE, latents: torch.Tensor, offload: bool = False, out_device: str | torch.device | None = None
) -> torch.Tensor:
    """Latents [B, 16, T, h, w] -> video [B, 3, 1 + 4(T - 1), 8h, 8w] float32 in [-1, 1] (clamped, as
    the references), on out_device (default: the latents'). Decodes one video at a time."""
    out_device = torch.device(out_device) if out_device is not None else latents.device
    with _working(vae, latents.device, offload) as where:
        return torch.cat([vae.decode(z.unsqueeze(0).to(where)).to(out_device) for z in latents])


def _as_batch(images: torch.Tensor | list[torch.Tensor], batch: int) -> list[torch.Tensor]:
    """One image per prompt: a tensor [B, 3, H, W] / [3, H, W] or a list; a single image serves all."""
    if isinstance(images, torch.Tensor):
        images = list(images) if images.ndim == 4 else [images]
    images = [img[0] if img.ndim == 4 and img.shape[0] == 1 else img for img in images]
    if len(images) == 1:
        images = images * batch
    if len(images) != batch or any(img.ndim != 3 for img in images):
        raise ValueError(f"give one first-frame image [3, H, W] per prompt ({batch}) or one for all, got {len(images)}")
    return images


@torch.no_grad()
def generate(
    dit: Dit,
    text: TextEncoder,
    vae: WanVAE,
    prompts: str | list[str],
    options: SamplingOptions,
    *,
    clip: CLIPVision | None = None,
    images: torch.Tensor | list[torch.Tensor] | None = None,
    latents: torch.Tensor | None = None,
    device: str | torch.device = "cpu",
    offload: bool = False,
    progress: Progress | None = None,
    batch_cfg: bool = True,
) -> torch.Tensor:
    """Prompts (B) -> videos [B, 3, F, H, W] float32 in [-1, 1] on the CPU.

    images (i2v, with clip): first frames in [-1, 1], one per prompt or one for all, any size (resized
    to the video's for the VAE). latents: the starting noise [B, 16, T, h, w] (default: initial_noise
    with seeds seed + i). offload: every module (text encoder, DiT when it is an nn.Module, VAE, CLIP)
    waits on the CPU and moves to `device` only while it works; without it they run where they are."""
    options.check()
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be a non-empty list of strings")
    if (images is None) != (clip is None):
        raise ValueError("image-to-video needs both `images` and `clip`; text-to-video neither")
    device = torch.device(device)
    b = len(prompts)
    shape = options.latent_shape()
    if latents is None:
        latents = initial_noise([options.seed + i for i in range(b)], shape)
    elif tuple(latents.shape) != (b, *shape):
        raise ValueError(
            f"latents must be [{b}, {', '.join(map(str, shape))}] for these options, got {list(latents.shape)}"
        )
    if offload:  # the modules wait on the CPU
        for module in (text.model, dit, vae, clip):
            if isinstance(module, nn.Module):
                module.to("cpu")

    negative = options.negative_prompt if options.guided else None
    context, negative_context = encode_prompts(text, prompts, negative, device, offload)
    clip_fea = y = None
    if images is not None:
        frames = [img.to(device) for img in _as_batch(images, b)]
        y, clip_fea = i2v_condition(vae, clip, frames, options.num_frames, (options.height, options.width), offload)
    with _working(dit, device, offload) as where:
        out = denoise(dit, latents.to(where), context.to(where), _to(negative_context, where), options,
                      _to(clip_fea, where), _to(y, where), progress, batch_cfg)  # fmt: skip
    return decode(vae, out.to(device), offload, out_device="cpu")


def _to(x: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if x is None else x.to(device)
