"""Text-to-video and image-to-video sampling with the Wan2.1 and Wan2.2 models, in stages a caller can drive:

    context, negative = encode_prompts(text, prompts, options.negative_prompt, device)
    y, clip_fea = i2v_condition(vae, clip, images, options.num_frames)         # i2v only
    noise = initial_noise(seeds, options.latent_shape())
    latents = denoise(dit, noise, context, negative, options, clip_fea, y)
    video = decode(vae, latents)

or all at once with generate(). `dit` is any callable dit(x, t, context, clip_fea=None, y=None) ->
velocity (our WanModel, or a training engine's forward), so the trainer's validation can sample
through its distributed engine; or for Wan2.2 A14B an `Experts` pair of such callables.

Wan2.2, as its release and diffusers' WanPipeline (transformer, transformer_2, boundary_ratio,
expand_timesteps) do it:
- A14B: the high-noise expert denoises the steps whose timestep t >= boundary * 1000, the low-noise
  expert the rest, each with its own guidance scale (`guidance_scale`, `guidance_scale_low`).
- TI2V-5B (the Wan2.2 VAE: 48 channels, 16x spatial): with an image, its latent is the first latent
  frame of every DiT input and those tokens get timestep 0 (`first_frame`); the others get t.

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
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from wan.encoders import TextEncoder, encode_first_frame, encode_i2v_condition, on_device
from wan.modules.clip import CLIPVision
from wan.modules.vae import WanVAE
from wan.samplers import SAMPLERS, build_sampler

# The release's default negative prompt (Wan2.1 wan/configs/shared_config.py, sample_neg_prompt).
DEFAULT_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)

LATENT_CHANNELS = 16  # the Wan2.1 VAE's; a VAE passed to latent_shape may say otherwise (z_dim)
VAE_STRIDE = (4, 8, 8)  # frames, height, width
SIZE_MULTIPLE = 16  # VAE stride 8 x DiT patch 2
PATCH = 2  # the DiT's spatial patch: a side must be a multiple of 2 x the VAE's spatial stride

Dit = Callable[..., torch.Tensor]
Progress = Callable[[int, int], None]


@dataclass
class Experts:
    """Wan2.2 A14B's two DiTs (each a Dit callable): `high` denoises the steps with timestep
    t >= boundary * 1000 (the noisy start), `low` the rest. The release's boundary: 0.875 t2v, 0.9 i2v."""

    high: Dit
    low: Dit
    boundary: float

    def __post_init__(self):
        if not 0.0 <= self.boundary <= 1.0:
            raise ValueError(
                f"the expert boundary must be in [0, 1] (a fraction of 1000 timesteps), got {self.boundary}"
            )

    def modules(self) -> list:
        return [self.high, self.low]


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
    """Classifier-free guidance scale; 1.0 turns guidance off (one DiT pass per step instead of two).
    With Wan2.2 A14B experts: the high-noise expert's."""
    guidance_scale_low: float | None = None
    """Wan2.2 A14B: the low-noise expert's guidance scale (the release: 3.0 t2v, 3.5 i2v); None: the
    same as guidance_scale."""
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
        for name in ("guidance_scale", "guidance_scale_low"):
            v = getattr(self, name)
            if (v is not None or name == "guidance_scale") and (
                not isinstance(v, (int, float)) or not 0 <= v < float("inf")
            ):
                out.append(f"{name} must be a finite number >= 0 (1 = no guidance), got {v!r}")
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
    def low_noise_guidance(self) -> float:
        return self.guidance_scale if self.guidance_scale_low is None else self.guidance_scale_low

    @property
    def guided(self) -> bool:
        """Whether sampling runs the unconditional pass (a guidance scale != 1)."""
        return self.guidance_scale != 1.0 or self.low_noise_guidance != 1.0

    def latent_shape(self, vae=None) -> tuple[int, int, int, int]:
        """(C, T, h, w) of one video's latents: (16, 1 + (F - 1) / 4, H / 8, W / 8) for the Wan2.1 VAE,
        or for `vae` (its z_dim, temporal_factor and spatial_factor: the Wan2.2 VAE's 48, 4, 16)."""
        c, t, s = (
            (LATENT_CHANNELS, *VAE_STRIDE[:2]) if vae is None else (vae.z_dim, vae.temporal_factor, vae.spatial_factor)
        )
        if self.height % (s * PATCH) or self.width % (s * PATCH):
            raise ValueError(
                f"height and width must be multiples of {s * PATCH} for this VAE (stride {s} x patch {PATCH}), "
                f"got {self.height}x{self.width}"
            )
        return (c, 1 + (self.num_frames - 1) // t, self.height // s, self.width // s)


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
    clip: CLIPVision | None,
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
    if clip_fea is not None and any(tuple(img.shape[-2:]) != size for img in originals):
        # CLIP of the images as given (one more small ViT pass, only when an image was resized).
        with _working(clip, frames.device, offload):
            clip_fea = torch.cat([clip.encode_image(img) for img in originals])
    return y, clip_fea


def _step_model(dit: "Dit | Experts", t: torch.Tensor, options: SamplingOptions) -> tuple[Dit, float]:
    """The DiT and guidance scale of the step at timestep t (an A14B expert by the boundary)."""
    if not isinstance(dit, Experts):
        return dit, float(options.guidance_scale)
    if int(t) >= dit.boundary * 1000:  # as the release and diffusers compare (timestep vs boundary x 1000)
        return dit.high, float(options.guidance_scale)
    return dit.low, float(options.low_noise_guidance)


def first_frame_timesteps(t: torch.Tensor, batch: int, latent_shape: tuple[int, ...]) -> torch.Tensor:
    """TI2V's per-token timesteps [B, S] at step timestep t (a scalar): 0 for the tokens of the first
    latent frame (the image's latent, clean), t for the rest; S = T * (h / 2) * (w / 2), the DiT's
    tokens in (f, h, w) order."""
    frames, h, w = latent_shape[-3:]
    per_frame = (h // PATCH) * (w // PATCH)
    out = t.reshape(1, 1).expand(batch, frames * per_frame).clone()
    out[:, :per_frame] = 0
    return out


@torch.no_grad()
def denoise(
    dit: "Dit | Experts",
    x: torch.Tensor,
    context: torch.Tensor,
    negative_context: torch.Tensor | None,
    options: SamplingOptions,
    clip_fea: torch.Tensor | None = None,
    y: torch.Tensor | None = None,
    progress: Progress | None = None,
    batch_cfg: bool = True,
    first_frame: torch.Tensor | None = None,
) -> torch.Tensor:
    """Noise x [B, C, T, h, w] -> latents [B, C, T, h, w] float32, on x's device.

    dit: a Dit, or Wan2.2 A14B `Experts` (each step runs the expert of its timestep, with its guidance).
    context / negative_context [B, L, dim] (negative only needed when a guidance scale != 1);
    clip_fea [B, 257, 1280] (Wan2.1) and y [B, 20, T, h, w] for i2v; first_frame [B, C, 1, h, w] for
    TI2V with an image: the first latent frame of every DiT input, at timestep 0, and of the result.
    With guidance, the conditional and unconditional passes run as one DiT call on a batch of 2B
    (batch_cfg, faster), or as two calls of B (less memory). progress(done, total) is called after each
    step, done = 1 .. total."""
    options.check()
    if options.guided and negative_context is None:
        raise ValueError(f"guidance_scale {options.guidance_scale} needs a negative context (1.0 turns guidance off)")
    sampler = build_sampler(options.sampler, options.num_inference_steps, options.shift)
    x = x.float()
    b = x.shape[0]
    if first_frame is not None:
        if first_frame.shape != (*x.shape[:2], 1, *x.shape[3:]):
            raise ValueError(f"first_frame must be [B, C, 1, h, w] = {[*x.shape[:2], 1, *x.shape[3:]]}, "
                             f"got {list(first_frame.shape)}")  # fmt: skip
        first_frame = first_frame.to(x.device, torch.float32)
    cond = {k: v for k, v in (("clip_fea", clip_fea), ("y", y)) if v is not None}
    if options.guided and batch_cfg:
        both_context = torch.cat([context, negative_context])
        both_cond = {k: torch.cat([v, v]) for k, v in cond.items()}
    for i, t in enumerate(sampler.timesteps):
        model, g = _step_model(dit, t, options)
        t = t.to(x.device)
        if first_frame is None:
            x_in, t_in = x, t.expand(b)
        else:  # the image's latent as frame 0, clean: timestep 0 on its tokens
            x_in, t_in = torch.cat([first_frame, x[:, :, 1:]], dim=2), first_frame_timesteps(t, b, x.shape)
        if g == 1.0:
            v = model(x_in, t_in, context, **cond).float()
        else:
            if batch_cfg:
                both_t = torch.cat([t_in, t_in])
                v_cond, v_uncond = model(torch.cat([x_in, x_in]), both_t, both_context, **both_cond).float().chunk(2)
            else:
                v_cond = model(x_in, t_in, context, **cond).float()
                v_uncond = model(x_in, t_in, negative_context, **cond).float()
            v = v_uncond + g * (v_cond - v_uncond)
        x = sampler.step(v, x)
        if progress is not None:
            progress(i + 1, options.num_inference_steps)
    if first_frame is not None:
        x = torch.cat([first_frame, x[:, :, 1:]], dim=2)
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


class _OneExpertResident:
    """With offload, Experts whose members move to `device` when their steps begin and back to the CPU
    when the other expert's begin: one 14B expert on the GPU at a time (the trajectory switches once)."""

    def __init__(self, experts: Experts, device: torch.device):
        self.experts, self.device = experts, device
        self.resident, self.stack = None, ExitStack()

    def wrapped(self) -> Experts:
        return Experts(self._caller(self.experts.high), self._caller(self.experts.low), self.experts.boundary)

    def _caller(self, module: Dit) -> Dit:
        def call(*args, **kwargs):
            if self.resident is not module:
                self.stack.close()
                self.stack.enter_context(_working(module, self.device, True))
                self.resident = module
            return module(*args, **kwargs)

        return call

    def close(self) -> None:
        self.stack.close()


def _model_type(dit: "Dit | Experts") -> tuple[str | None, bool]:
    """(the DiT's model_type, whether it takes CLIP features), when it says (a WanModel)."""
    model = dit.high if isinstance(dit, Experts) else dit
    return getattr(model, "model_type", None), getattr(model, "image_dim", None) is not None


@torch.no_grad()
def generate(
    dit: "Dit | Experts",
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
    model_type: str | None = None,
) -> torch.Tensor:
    """Prompts (B) -> videos [B, 3, F, H, W] float32 in [-1, 1] on the CPU.

    images: first frames in [-1, 1], one per prompt or one for all, any size (resized to the video's
    for the VAE). How they condition depends on model_type (default: the DiT's `model_type`): "i2v" as
    y (mask + latents), with `clip` features too for a Wan2.1 i2v DiT (Wan2.2's I2V-A14B takes none);
    "ti2v" as the first latent frame (Wan2.2 TI2V-5B). latents: the starting noise [B, C, T, h, w]
    (default: initial_noise with seeds seed + i). offload: every module (text encoder, DiT or experts
    when nn.Modules, VAE, CLIP) waits on the CPU and moves to `device` only while it works (one A14B
    expert at a time); without it they run where they are."""
    options.check()
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be a non-empty list of strings")
    own_type, takes_clip = _model_type(dit)
    model_type = model_type or own_type or ("i2v" if clip is not None else "t2v")
    if model_type == "i2v" and (images is None or (takes_clip and clip is None)):
        raise ValueError("image-to-video with a Wan2.1 i2v DiT needs both `images` and `clip` (Wan2.2: `images`)")
    if clip is not None and (images is None or model_type != "i2v"):
        raise ValueError("`clip` serves image-to-video with a Wan2.1 i2v DiT: give `images` too")
    if model_type == "t2v" and images is not None:
        raise ValueError("`images` were given for a t2v DiT")
    device = torch.device(device)
    b = len(prompts)
    shape = options.latent_shape(vae)
    if latents is None:
        latents = initial_noise([options.seed + i for i in range(b)], shape)
    elif tuple(latents.shape) != (b, *shape):
        raise ValueError(
            f"latents must be [{b}, {', '.join(map(str, shape))}] for these options, got {list(latents.shape)}"
        )
    dits = dit.modules() if isinstance(dit, Experts) else [dit]
    if offload:  # the modules wait on the CPU
        for module in (text.model, *dits, vae, clip):
            if isinstance(module, nn.Module):
                module.to("cpu")

    negative = options.negative_prompt if options.guided else None
    context, negative_context = encode_prompts(text, prompts, negative, device, offload)
    clip_fea = y = first_frame = None
    if images is not None:
        frames = [img.to(device) for img in _as_batch(images, b)]
        size = (options.height, options.width)
        if model_type == "ti2v":
            resized = torch.cat([resize_images(img.unsqueeze(0), *size) for img in frames])
            first_frame = encode_first_frame(vae, resized, offload)
        else:
            y, clip_fea = i2v_condition(vae, clip, frames, options.num_frames, size, offload)

    def run(model: "Dit | Experts", where: torch.device) -> torch.Tensor:
        return denoise(model, latents.to(where), context.to(where), _to(negative_context, where), options,
                       _to(clip_fea, where), _to(y, where), progress, batch_cfg, _to(first_frame, where))  # fmt: skip

    if isinstance(dit, Experts) and offload:
        resident = _OneExpertResident(dit, device)
        try:
            out = run(resident.wrapped(), device)
        finally:
            resident.close()
    else:
        with ExitStack() as stack:
            where = [stack.enter_context(_working(module, device, offload)) for module in dits][0]
            out = run(dit, where)
    return decode(vae, out.to(device), offload, out_device="cpu")


def _to(x: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if x is None else x.to(device)
