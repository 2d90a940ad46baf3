"""Validation during training: videos sampled from the DiT being trained, and an eval loss on held-out
clips at fixed timesteps (train/eval_loss.py). This file holds the [validation] config section and the
sampling of the validation prompts (`ValidationSampler`).

Sampling: prompt i always starts from the noise of validation_seed + i, so the videos of step N and
step M differ only by the weights. The DiT is the training engine's `inference_forward` (no_grad, the
training precision, the engine's own sharding); the frozen encoders are the trainer's. Prompt i is
sampled by rank i % world_size, one prompt at a time; every rank runs ceil(prompts / world_size)
denoising loops, a rank short of prompts running a padding loop on zeros whose result is dropped,
because the forward is a collective under zero3 and fsdp (done on every engine: simpler, and the
same on all). Each rank writes its videos to output_dir/samples/step-N/NNN-<slug>.mp4 (16 fps) and
NNN-<slug>.png (a contact sheet); rank 0 gathers small contact sheets and shows them in TensorBoard
(validation/NNN, with the prompt as text validation/NNN_prompt) with the pass's wall time
(validation/seconds, also in the console line).

Failures: reading a validation image, encoding a prompt, decoding or writing a video that raises on a
rank is reported by rank 0 in one line naming the prompt and the error, and training goes on (the
failing rank still runs its denoising loops, on padding inputs, and reaches the gather). On ddp and
zero2 an error inside the DiT forward is caught the same way. On zero3 and fsdp it is not recoverable:
the forward is a collective, and the ranks that did not fail would wait in it for the failed one, so
the error is raised and stops the run (its checkpoint of this step is already written).
"""

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from train.distributed import ParallelLayout
from wan.configs import latent_geometry
from wan.encoders import encode_first_frame
from wan.media import DEFAULT_FPS, contact_sheet, prompt_slug, video_to_frames, write_mp4, write_png
from wan.modules.model import has_image_branch
from wan.pipeline import (
    DEFAULT_NEGATIVE_PROMPT,
    SIZE_MULTIPLE,
    SamplingOptions,
    decode,
    denoise,
    encode_prompts,
    i2v_condition,
    initial_noise,
)
from wan.samplers import SAMPLERS

# The timestep quantiles the eval loss is measured at (of the training timestep distribution).
DEFAULT_EVAL_QUANTILES = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]


@dataclass
class ValidationConfig:
    validation_prompts: list[str] = field(default_factory=list)
    """Prompts the DiT being trained samples every validation_steps (VideoX-Fun's name); written to
    output_dir/samples/step-N/ as mp4 + contact sheet and shown in TensorBoard. Empty: no sampling."""
    validation_images: list[str] = field(default_factory=list)
    """i2v: first-frame images for the validation prompts, one per prompt or one for all
    (VideoX-Fun's validation_paths)."""
    validation_steps: int = 2000
    """Sample the validation prompts every N optimizer steps (0: never). Also once at the end of training."""
    validation_epochs: int = 0
    """Also sample at the end of every N-th epoch (0: never; VideoX-Fun's default is 5)."""
    validation_height: int = 0
    """Height of the validation videos in pixels (a multiple of 16); 0: video_sample_size."""
    validation_width: int = 0
    """Width of the validation videos in pixels (a multiple of 16); 0: video_sample_size."""
    validation_num_frames: int = 0
    """Frames of the validation videos (4k+1); 0: video_sample_n_frames."""
    validation_inference_steps: int = 50
    """Denoising steps of each validation video."""
    validation_guidance_scale: float = 5.0
    """Classifier-free guidance scale (the release's 5.0; 1.0 turns guidance off). Wan2.2 A14B: the
    high-noise expert's (the release's 4.0 t2v, 3.5 i2v)."""
    validation_guidance_scale_low: float = 0.0
    """Wan2.2 A14B: the low-noise expert's guidance scale (the release's 3.0 t2v, 3.5 i2v); 0: as
    validation_guidance_scale."""
    validation_shift: float = 0.0
    """Sampling sigma shift; 0: the training shift ([train] shift)."""
    validation_sampler: str = "unipc"
    """Sampler: "unipc" (the release's default) or "euler"."""
    validation_negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    """Negative prompt of classifier-free guidance (default: the release's)."""
    validation_seed: int = 0
    """Seed of the validation noise (prompt i always starts from the noise of seed + i), of the eval
    loss noise and of the eval_holdout choice, so runs that differ in [train] seed compare alike."""
    validation_data_meta: str = ""
    """Held-out clips for the eval loss (a metadata file or folder, as train_data_meta). Empty: with
    eval_holdout > 0, a seeded slice of the training set is kept out of training instead."""
    validation_data_dir: str = ""
    """Folder prefixed to relative paths of validation_data_meta (default: train_data_dir)."""
    eval_holdout: int = 0
    """Without validation_data_meta: training samples kept out of training for the eval loss (0: no eval)."""
    eval_steps: int = 500
    """Measure the eval loss every N optimizer steps (0: never), when there is a held-out set."""
    eval_quantiles: list[float] = field(default_factory=lambda: list(DEFAULT_EVAL_QUANTILES))
    """Quantiles of the training timestep distribution the eval loss is measured at (each in (0, 1))."""
    eval_max_samples: int = 64
    """At most this many held-out clips are evaluated (the first ones)."""

    def problems(self) -> list[str]:
        out = [
            f"{n} must be >= 0, got {getattr(self, n)}"
            for n in ("validation_steps", "validation_epochs", "validation_height", "validation_width",
                      "validation_num_frames", "eval_holdout", "eval_steps")
            if getattr(self, n) < 0
        ]  # fmt: skip
        if self.validation_inference_steps < 1:
            out.append(f"validation_inference_steps must be >= 1, got {self.validation_inference_steps}")
        if self.eval_max_samples < 1:
            out.append(f"eval_max_samples must be >= 1, got {self.eval_max_samples}")
        for n in ("validation_height", "validation_width"):
            if getattr(self, n) % 16:
                out.append(f"{n} must be a multiple of 16 (VAE 8x, patch 2x), got {getattr(self, n)}")
        if self.validation_num_frames and (self.validation_num_frames - 1) % 4:
            out.append(f"validation_num_frames must be 4k+1 (the VAE's 4x time), got {self.validation_num_frames}")
        for n in ("validation_guidance_scale", "validation_guidance_scale_low"):
            if not getattr(self, n) >= 0:
                out.append(f"{n} must be >= 0, got {getattr(self, n)}")
        if not self.validation_shift >= 0:
            out.append(f"validation_shift must be >= 0 (0: the training shift), got {self.validation_shift}")
        if self.validation_sampler not in SAMPLERS:
            out.append(f"validation_sampler must be one of {', '.join(SAMPLERS)}, got {self.validation_sampler!r}")
        if not 0 <= self.validation_seed < 2**63:
            out.append(f"validation_seed must be in [0, 2**63), got {self.validation_seed}")
        bad = [q for q in self.eval_quantiles if not 0 < q < 1]
        if bad or not self.eval_quantiles:
            out.append(f"eval_quantiles must be a non-empty list of numbers in (0, 1), got {self.eval_quantiles}")
        if self.validation_data_meta and self.eval_holdout:
            out.append("validation_data_meta and eval_holdout both set: use one held-out set")
        return out

    def eval_enabled(self) -> bool:
        return bool(self.eval_steps) and bool(self.validation_data_meta or self.eval_holdout)

    def sampling_enabled(self) -> bool:
        return bool(self.validation_prompts) and bool(self.validation_steps or self.validation_epochs)


# Frames of a TensorBoard contact sheet are shrunk to this width (the .png on disk keeps full size): a
# 16-frame sheet of 832x480 frames would be ~20 MB per prompt per validation in the event file.
TENSORBOARD_FRAME_WIDTH = 256


def sampling_options(
    config: ValidationConfig,
    video_sample_size: int,
    video_sample_n_frames: int,
    train_shift: float,
    multiple: int = SIZE_MULTIPLE,
) -> SamplingOptions:
    """The [validation] section as SamplingOptions, its zeros resolved: the size from video_sample_size
    (rounded down to a multiple of `multiple`: 16, the Wan2.2 VAE's 32), the frames from
    video_sample_n_frames (rounded down to 4k + 1), the shift from training. `seed` is validation_seed:
    prompt i uses seed + i."""
    size = max(multiple, video_sample_size // multiple * multiple)
    frames = config.validation_num_frames or max(1, (video_sample_n_frames - 1) // 4 * 4 + 1)
    options = SamplingOptions(
        num_frames=frames, height=config.validation_height or size, width=config.validation_width or size,
        num_inference_steps=config.validation_inference_steps, guidance_scale=config.validation_guidance_scale,
        guidance_scale_low=config.validation_guidance_scale_low or None,
        shift=config.validation_shift or train_shift, sampler=config.validation_sampler,
        negative_prompt=config.validation_negative_prompt, seed=config.validation_seed,
    )  # fmt: skip
    options.check()
    return options


def read_first_frame(path: str | Path, height: int, width: int) -> torch.Tensor:
    """An image file -> [3, height, width] float32 in [-1, 1]: scaled (bicubic, aspect kept) to cover
    height x width, then centre-cropped to it."""
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")
        scale = max(width / image.width, height / image.height)
        w, h = max(width, round(image.width * scale)), max(height, round(image.height * scale))
        image = image.resize((w, h), Image.Resampling.BICUBIC)
        left, top = (w - width) // 2, (h - height) // 2
        image = image.crop((left, top, left + width, top + height))
        pixels = np.asarray(image, dtype=np.float32)
    return torch.from_numpy(pixels / 127.5 - 1.0).permute(2, 0, 1).contiguous()


@dataclass
class SampleOutcome:
    """What rank 0 needs of one prompt's sample (gathered from the rank that made it)."""

    index: int
    prompt: str
    seed: int
    video: str = ""  # the mp4 written, "" when sampling failed
    sheet: np.ndarray | None = None  # the TensorBoard contact sheet, uint8 [H, W, 3]
    error: str = ""


@dataclass
class ValidationReport:
    """A validation pass as rank 0 sees it (other ranks: their own outcomes only)."""

    step: int
    seconds: float
    outcomes: list[SampleOutcome]
    folder: Path

    @property
    def failed(self) -> list[SampleOutcome]:
        return [o for o in self.outcomes if o.error]


class ValidationSampler:
    """Samples the validation prompts with the DiT being trained; built once by the Trainer, `run(step)`
    on every rank together (a collective: see the module docstring).

    models: the frozen encoders (train.models.Models: text, vae, clip for i2v), or None with `encoders`, a
    context manager factory that lends them while a pass samples (training from a cache); engine: the training
    engine (its inference_forward is the DiT); collective: whether that forward is a collective (the
    engine's traits: parameters gathered from every rank);
    dit_config: the DiT's WanModel keyword arguments (for the padding inputs); options: from
    `sampling_options`; layout: the run's ranks (train/distributed.py); metrics: the run's Metrics (NullMetrics off rank 0); offload: the run's
    low_vram (encoders move to the device only while they work)."""

    def __init__(
        self,
        config: ValidationConfig,
        options: SamplingOptions,
        *,
        models,
        engine,
        collective: bool,
        dit_config: dict,
        layout: "ParallelLayout",
        output_dir: str | Path,
        metrics,
        offload: bool = False,
        encoders=None,
    ):
        self.prompts = list(config.validation_prompts)
        self.images = list(config.validation_images)
        self.every_steps, self.every_epochs = config.validation_steps, config.validation_epochs
        self.options = options
        self.models, self.engine, self.dit_config = models, engine, dit_config
        self.collective = collective
        # Prompts are split over the data-parallel ranks; a sequence group's ranks sample the same prompts
        # together (its forward is a collective) and its first rank decodes and writes them.
        self.layout = layout
        self.rank, self.world_size, self.device = layout.dp_rank, layout.dp_size, layout.device
        self.writes = layout.sp_rank == 0
        self.output_dir, self.metrics, self.offload = Path(output_dir), metrics, offload
        # Training from a cache, models is None and `encoders()` (a context manager) lends them while sampling.
        self.encoders = encoders
        model_type = dit_config.get("model_type", "t2v")
        self.i2v = model_type == "i2v"  # y (and CLIP features for a Wan2.1 i2v DiT)
        self.first_frame = model_type == "ti2v" and bool(self.images)  # Wan2.2 TI2V: the image's latent as frame 0
        self.geometry = latent_geometry(dit_config)
        if (self.i2v or self.first_frame) and len(self.images) not in (1, len(self.prompts)):
            raise ValueError(
                f"{model_type} validation needs one validation image for all prompts or one per prompt "
                f"({len(self.prompts)}), got {len(self.images)}"
            )
        self._inputs: dict[int, dict] = {}  # prompt -> its DiT inputs but the noise (the same every pass)

    # --- when --------------------------------------------------------------------------------------

    def due_after_step(self, step: int) -> bool:
        return bool(self.prompts) and bool(self.every_steps) and step % self.every_steps == 0

    def due_after_epoch(self, epochs_done: int) -> bool:
        return bool(self.prompts) and bool(self.every_epochs) and epochs_done % self.every_epochs == 0

    # --- one pass ----------------------------------------------------------------------------------

    def mine(self) -> list[int | None]:
        """This rank's prompts, in order, None for a padding loop: every rank gets as many entries."""
        n, w = len(self.prompts), self.world_size
        return [i if i < n else None for i in (r * w + self.rank for r in range(math.ceil(n / w)))]

    def seed(self, index: int) -> int:
        return self.options.seed + index

    def stem(self, step: int, index: int) -> Path:
        return self.output_dir / "samples" / f"step-{step}" / f"{index:03d}-{prompt_slug(self.prompts[index], 40)}"

    @torch.no_grad()
    def prepare(self, index: int) -> dict:
        """Prompt `index`'s conditioning (context, negative context; y and clip_fea for i2v) on the
        device, computed once and kept: it does not change between passes."""
        if index not in self._inputs:
            o = self.options
            negative = o.negative_prompt if o.guided else None
            context, negative_context = encode_prompts(
                self.models.text, [self.prompts[index]], negative, self.device, self.offload
            )
            inputs = {"context": context, "negative_context": negative_context}
            if self.i2v or self.first_frame:
                path = self.images[index if len(self.images) > 1 else 0]
                image = read_first_frame(path, o.height, o.width).to(self.device)
            if self.i2v:
                y, clip_fea = i2v_condition(
                    self.models.vae, self.models.clip, image[None], o.num_frames, (o.height, o.width), self.offload
                )
                inputs["y"] = y.float()
                if clip_fea is not None:  # a Wan2.1 i2v DiT's
                    inputs["clip_fea"] = clip_fea.float()
            if self.first_frame:
                inputs["first_frame"] = encode_first_frame(self.models.vae, image[None], self.offload).float()
            self._inputs[index] = inputs
        return self._inputs[index]

    def padding(self) -> dict:
        """Zeros of the shapes a sample's DiT calls take: the padding loop runs the same calls as a real
        sample (so a collective forward lines up across ranks) on inputs no encoder had to make."""
        c = self.dit_config
        channels, t, h, w = self.options.latent_shape(self.geometry)
        zeros = {"context": torch.zeros(1, 1, c["text_dim"], device=self.device)}
        zeros["negative_context"] = zeros["context"] if self.options.guided else None
        if self.i2v:
            zeros["y"] = torch.zeros(1, c["in_dim"] - channels, t, h, w, device=self.device)
            if has_image_branch(c):
                zeros["clip_fea"] = torch.zeros(1, 1, c.get("image_dim", 1280), device=self.device)
        if self.first_frame:
            zeros["first_frame"] = torch.zeros(1, channels, 1, h, w, device=self.device)
        return zeros

    def dit(self, *args, **kwargs) -> torch.Tensor:
        return self.engine.inference_forward(*args, **kwargs)

    @torch.no_grad()
    def run(self, step: int) -> ValidationReport:
        """Sample every prompt with the current weights; every rank calls it at the same point. Rank 0
        logs a line and the TensorBoard entries; its report holds every prompt's outcome."""
        start = time.perf_counter()
        borrowed = self.models is None  # training from a cache: the encoders for this pass only
        with self.encoders() if borrowed else contextlib.nullcontext(self.models) as models:
            self.models = models
            try:
                outcomes = [self._sample(step, index) for index in self.mine()]
            finally:
                if borrowed:
                    self.models = None
        outcomes = self._gather([o for o in outcomes if o is not None])
        seconds = time.perf_counter() - start
        report = ValidationReport(step, seconds, outcomes, self.output_dir / "samples" / f"step-{step}")
        if self.layout.rank == 0:
            self._report(report)
        return report

    def _sample(self, step: int, index: int | None) -> SampleOutcome | None:
        """One denoising loop: prompt `index`'s sample written to disk, or a padding loop (None)."""
        outcome = None
        inputs = None
        if index is not None:
            outcome = SampleOutcome(index, self.prompts[index], self.seed(index))
            try:
                inputs = self.prepare(index)
            except Exception as err:
                outcome.error = f"{type(err).__name__}: {err}"
        if inputs is None:
            inputs = self.padding()
        noise = initial_noise([self.seed(index or 0)], self.options.latent_shape(self.geometry)).to(self.device)
        try:
            latents = denoise(
                self.dit, noise, inputs["context"], inputs["negative_context"], self.options,
                clip_fea=inputs.get("clip_fea"), y=inputs.get("y"), first_frame=inputs.get("first_frame"),
            )  # fmt: skip
        except Exception as err:
            if self.collective:  # the other ranks wait in the forward: stop rather than hang (docstring)
                raise RuntimeError(
                    f"validation at step {step}: the DiT forward failed on rank {self.layout.rank} "
                    f"({type(err).__name__}: {err}); under a sharded engine the run cannot go on"
                ) from err
            if outcome is not None and not outcome.error:
                outcome.error = f"{type(err).__name__}: {err}"
            return outcome
        if outcome is None or outcome.error or not self.writes:
            return outcome
        try:
            video = decode(self.models.vae, latents, self.offload, out_device="cpu")[0]
            frames = video_to_frames(video)
            stem = self.stem(step, index)
            write_mp4(stem.with_name(stem.name + ".mp4"), frames, fps=DEFAULT_FPS)
            write_png(stem.with_name(stem.name + ".png"), contact_sheet(frames))
            outcome.video = str(stem.with_name(stem.name + ".mp4"))
            outcome.sheet = contact_sheet(frames, max_frame_width=TENSORBOARD_FRAME_WIDTH)
        except Exception as err:
            outcome.error = f"{type(err).__name__}: {err}"
        return outcome

    def _gather(self, mine: list[SampleOutcome]) -> list[SampleOutcome]:
        """Every data-parallel rank's outcomes on rank 0 (a sequence group's first rank speaks for it), in
        prompt order (small: shrunk uint8 sheets)."""
        world, rank = self.layout.world_size, self.layout.rank
        if world == 1 or not dist.is_initialized():
            return sorted(mine, key=lambda o: o.index)
        gathered: list | None = [None] * world if rank == 0 else None
        dist.gather_object(mine if self.writes else [], gathered, dst=0)
        if rank != 0:
            return mine
        return sorted((o for part in gathered for o in part), key=lambda o: o.index)

    def _report(self, report: ValidationReport) -> None:
        m, step = self.metrics, report.step
        for o in report.outcomes:
            if o.error:
                m.log_text(f"validation at step {step}: prompt {o.index} {o.prompt!r} failed: {o.error}")
                continue
            m.add_image(f"validation/{o.index:03d}", o.sheet, step)
            m.add_text(f"validation/{o.index:03d}_prompt", f"{o.prompt}\n\n(seed {o.seed}, {Path(o.video).name})", step)
        m.add_scalar("validation/seconds", report.seconds, step)
        done = len(report.outcomes) - len(report.failed)
        o = self.options
        m.log_text(
            f"validation at step {step}: {done} of {len(report.outcomes)} videos ({o.num_frames} frames "
            f"{o.width}x{o.height}, {o.num_inference_steps} steps) in {report.seconds:.1f} s -> {report.folder}"
        )
