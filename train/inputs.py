"""From a micro-batch of pixels to what the DiT trains on: latents and text context from the frozen
encoders (under no_grad), the copies training_with_video_token_length asks for, then flow matching's
noise and timesteps, drawn from (seed, step, position in the global batch) so that a resumed run
repeats an uninterrupted one whatever the split over ranks and micro-steps."""

import gc
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from train.config import RunConfig
from train.data.buckets import token_length_repeats
from train.distributed import ParallelLayout
from train.flow import FlowMatching, batch_positions
from train.metrics import StepTimer
from train.models import Models, build_models
from wan.encoders import encode_i2v_condition, encode_latents


@dataclass
class DiTInputs:
    """A micro-batch as the DiT sees it, with the target and the sigmas its loss needs."""

    x_t: torch.Tensor  # [B, C, F, H, W] noised latents
    t: torch.Tensor  # [B] timesteps in [0, 1000)
    target: torch.Tensor  # [B, C, F, H, W] the velocity
    sigmas: torch.Tensor  # [B]
    context: torch.Tensor  # [B, L, text_dim]
    clip_fea: torch.Tensor | None = None  # i2v
    y: torch.Tensor | None = None  # i2v
    t_tokens: torch.Tensor | None = None  # [B, S] per-token timesteps (ti2v: the first frame's at 0)
    loss_from: int = 0  # the first latent frame the loss covers (ti2v: 1, frame 0 is the given image)

    @property
    def dit_t(self) -> torch.Tensor:
        """The timesteps the DiT takes: per token where they differ, else per sample."""
        return self.t if self.t_tokens is None else self.t_tokens


def condition_first_frame(
    x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """Wan2.2 TI2V's image conditioning, as its pipelines sample (wan/pipeline.py): the first latent
    frame is the clean latent of the clip's first frame (a causal VAE encodes frame 0 alone, so it is
    x0's frame 0) and its tokens are at timestep 0. -> (x_t, per-token timesteps [B, S], the first frame
    the loss covers). A one-frame latent (an image) has nothing to predict from it: left as it is."""
    frames = x0.shape[2]
    if frames < 2:
        return x_t, None, 0
    x_t = torch.cat([x0[:, :, :1].to(x_t.dtype), x_t[:, :, 1:]], dim=2)
    per_frame = (x0.shape[3] // 2) * (x0.shape[4] // 2)  # tokens of a latent frame (patch 1x2x2)
    t_tokens = t[:, None].repeat(1, frames * per_frame)
    t_tokens[:, :per_frame] = 0
    return x_t, t_tokens, 1


class InputBuilder:
    def __init__(
        self, cfg: RunConfig, layout: ParallelLayout, models: Models | None, flow: FlowMatching, timer: StepTimer
    ):
        """models: the frozen encoders, None when the batches come from a cache (they carry the latents)."""
        self.cfg, self.layout, self.models, self.flow, self.timer = cfg, layout, models, flow, timer

    @contextmanager
    def encoders(self) -> Iterator[Models]:
        """The frozen encoders: the run's, or, training from a cache, built for the while (validation, the
        eval loss's held-out clips) and freed after, so no training step holds them."""
        if self.models is not None:
            yield self.models
            return
        self.models = build_models(self.cfg.model, self.layout.device, self.cfg.train.seed)
        try:
            yield self.models
        finally:
            self.models = None
            gc.collect()
            if self.layout.device.type == "cuda":
                torch.cuda.empty_cache()

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor, text: list[str]) -> dict:
        """The DiT's inputs for a micro-batch of pixels [B, 3, F, H, W]: x0 latents, context, and for
        i2v clip_fea and y. A sequence group's ranks hold the same micro-batch: its first rank encodes
        and sends the results to the others (collective within the group)."""
        if self.layout.sp_size == 1:
            return self.run_encoders(pixels, text)
        return self.share_in_group(self.run_encoders(pixels, text) if self.layout.sp_rank == 0 else None)

    def share_in_group(self, inputs: dict | None) -> dict:
        """The group's first rank's `inputs` on every rank of the group: the shapes over the host group
        (read from tensor metadata: no GPU synchronisation), then each tensor in one broadcast."""
        lay = self.layout
        first = lay.rank - lay.sp_rank
        header = [None if inputs is None else {k: (tuple(v.shape), v.dtype) for k, v in inputs.items()}]
        torch.distributed.broadcast_object_list(header, src=first, group=lay.sp_host_group)
        out = {}
        for name, (shape, dtype) in header[0].items():
            t = inputs[name].contiguous() if inputs is not None else torch.empty(shape, dtype=dtype, device=lay.device)
            torch.distributed.broadcast(t, src=first, group=lay.sp_group)
            out[name] = t
        return out

    def run_encoders(self, pixels: torch.Tensor, text: list[str]) -> dict:
        m, low_vram = self.models, self.cfg.model.low_vram
        x0 = encode_latents(m.vae, pixels, self.cfg.model.vae_mini_batch, offload=low_vram)
        inputs = {"x0": x0.float(), "context": m.text(text, device=self.layout.device)}
        if self.cfg.model.train_mode == "i2v":  # CLIP features too for a Wan2.1 i2v DiT (Wan2.2's has none)
            y, clip_fea = encode_i2v_condition(m.vae, m.clip, pixels[:, :, 0], pixels.shape[2], offload=low_vram)
            inputs.update(y=y, **({"clip_fea": clip_fea} if clip_fea is not None else {}))
        return inputs

    def copies(self, pixels_shape: torch.Size) -> int:
        """Times a micro-batch trains at once: training_with_video_token_length repeats batches far below
        its token budget 2x or 4x (VideoX-Fun's rule), each copy with its own noise and timestep. Every
        rank of a step has the same shape, so every rank repeats alike."""
        d = self.cfg.data
        if not d.training_with_video_token_length:
            return 1
        _, _, f, h, w = pixels_shape  # [B, 3, F, H, W]
        return token_length_repeats(f, h, w, d.token_sample_size, d.video_sample_n_frames)

    def build(self, batch: dict, micro: int, step: int, quantiles: tuple[float, float] | None = None) -> DiTInputs:
        """Micro-step `micro` of optimizer step `step` (0-based: the steps done before it); the batch's
        pixels are on the device in the VAE's layout and leave the batch here. quantiles: the step's
        timestep range (train/experts.py), None for the whole density."""
        copies = self.copies(batch["pixels"].shape if "pixels" in batch else batch["pixel_shape"])
        if "pixels" in batch:
            with self.timer.section("encode"):
                inputs = self.encode(batch.pop("pixels"), batch["text"])
        else:  # from a cache (train/data/cached.py): what encode gives, read
            inputs = {"x0": batch["latents"], "context": batch["context"]}
            inputs.update({k: batch[k] for k in ("y", "clip_fea") if k in batch})
        b = inputs["x0"].shape[0]
        # Position of each sample in the global batch: (micro-step, rank, index), as the sampler lays it out;
        # copy c of a sample sits at its position + c x the global batch.
        dp_rank, dp_size = self.layout.dp_rank, self.layout.dp_size
        positions = batch_positions(micro, dp_rank, dp_size, b)
        global_size = self.cfg.train.gradient_accumulation_steps * dp_size * b
        if copies > 1:
            inputs = {k: torch.cat([v] * copies) for k, v in inputs.items()}
            positions = [p + c * global_size for c in range(copies) for p in positions]
            global_size *= copies
        x0, seed, device = inputs["x0"], self.cfg.train.seed, self.layout.device
        sigmas = self.flow.sample_sigmas(seed, step, positions, global_size, quantiles=quantiles).to(device)
        noise = self.flow.sample_noise(seed, step, positions, tuple(x0.shape[1:])).to(device)
        x_t, t = self.flow.add_noise(x0, noise, sigmas), self.flow.timesteps(sigmas)
        t_tokens, loss_from = None, 0
        if self.cfg.model.train_mode == "ti2v":
            x_t, t_tokens, loss_from = condition_first_frame(x0, x_t, t)
        return DiTInputs(
            x_t=x_t, t=t, target=self.flow.target(x0, noise), sigmas=sigmas, context=inputs["context"],
            clip_fea=inputs.get("clip_fea"), y=inputs.get("y"), t_tokens=t_tokens, loss_from=loss_from,
        )  # fmt: skip
