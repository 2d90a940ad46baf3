"""Eval loss: the flow-matching loss of the DiT being trained on a fixed held-out set, at fixed timesteps,
with fixed noise, so its curve moves only when the weights do (the training loss draws new clips, timesteps
and noise every step, and is too noisy to read).

The held-out set ([validation] section, train/validation.py):
- `validation_data_meta` (+ `validation_data_dir`, default train_data_dir): clips read as train_data_meta
  is (missing sizes probed and cached alike; absurd sizes refused);
- or `eval_holdout = K`: K training files drawn with `validation_seed` and kept out of training
  (train/data/loader.py `hold_out`: they are not in the training dataset at all, so neither the sampler
  nor a bad file's replacement can serve them; the same K on every rank, rerun and resume).
The first `eval_max_samples` of them are evaluated; `output_dir/eval_clips.json` lists them.

Each clip i is loaded once, deterministically (`load_clip`: the first frames at video_sample_stride,
scaled and centre-cropped to the bucket the training would use for it, caption never dropped), encoded
once by the trainer's own `encode` (VAE latents, umT5 context; for i2v also y and the CLIP features)
on rank i % world_size, and its inputs cached on that rank's CPU. Each evaluation is then DiT forwards
only: clip i at quantile q is noised with sigma_q = `FlowMatching.sigma_quantile(q)` (the q-quantile of
the training sigma density, shift included; a run on part of the timesteps, train/experts.py, takes the
q-quantile of its range) and noise from a generator seeded by (validation_seed, i, q), independent of
the step, the rank and the world size; its loss is the plain float32 MSE of the
velocity (no loss weight and no motion term, so runs with other weighting schemes compare).

Cost of one evaluation: clips x quantiles predictions, split over the ranks by clip; a clip's quantiles
go through the DiT in forwards of up to train_batch_size (so ceil(Q / B) forwards per clip, never above
a training micro-batch in memory, and under no_grad). Under zero3 and fsdp every forward is a
collective, so every rank runs as many as the busiest one (the others repeat a cached input and discard
the result). The log line of each evaluation gives the forwards and the measured seconds; the one-time
encoding is logged once.

Reduction: every rank fills the rows of its clips in an [N, Q] float64 table of zeros, one all-reduce
sums the tables (x + 0 is exact, so the sum is every clip's own float32 value whatever the order), and
the means are math.fsum (exactly rounded) over the loaded clips: the numbers repeat bit for bit on a
rerun and do not depend on the world size for the same per-clip values.

Logged after the step's checkpoint is saved, every `eval_steps` optimizer steps, at the end of training,
and once at step 0 of a fresh run (the baseline): TensorBoard `eval/loss` (mean over clips and
quantiles), `eval/loss_q{q}` per quantile, `eval/seconds`, and one console line; rank 0 appends the
exact float64 numbers, per clip too, to `output_dir/eval_loss.jsonl`.

Failures never cost a checkpoint (the eval runs after the save) and do not stop training:
- a held-out file that does not load (MediaError) is left out of every evaluation of the run, listed once;
- any other error while loading or encoding, on any rank, turns the eval loss off for the rest of the run
  (every rank agrees through one gather, and rank 0 prints each rank's error);
- an error in a DiT forward does the same under ddp and zero2, whose eval forwards are local; under zero3
  and fsdp the forwards are collectives, so it propagates as a training-step error would (stopping the
  job; the step's checkpoint is already saved), since a rank leaving a collective mid-way cannot be
  recovered safely.
"""

import contextlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from train.data.buckets import bucket_table, nearest_ratio, valid_frame_count
from train.data.dataset import pixels_to_model
from train.data.loader import DataConfig, drop_implausible
from train.data.metadata import Sample, load_metadata
from train.data.probe import fill_sizes
from train.data.sampler import derive_seed
from train.data.video import MediaError, decode_frames, load_image, resize_cover_crop, to_frame_tensor
from train.distributed import ParallelLayout, all_gather_objects
from train.engines import engine_traits
from train.flow import FlowMatching
from train.inputs import condition_first_frame

EVAL_CLIPS_FILE = "eval_clips.json"
EVAL_LOSS_FILE = "eval_loss.jsonl"  # one line per evaluation: step, loss, per_quantile, per_clip (float64)


# --- the held-out clips -------------------------------------------------------------------------------


def clip_shape(sample: Sample, data: DataConfig) -> tuple[int, int, int]:
    """(frames, height, width) a held-out clip is evaluated at: the bucket the training would use for it
    at the base size (video_sample_size for videos, image_sample_size for images; a square without
    enable_bucket) and video_sample_n_frames frames (a shorter clip: the most 4k+1 frames it has)."""
    ratio = nearest_ratio(sample.height, sample.width) if data.enable_bucket else 1.0
    if sample.kind == "image":
        return (1, *bucket_table(data.image_sample_size, data.bucket_side_multiple)[ratio])
    frames = data.video_sample_n_frames
    if sample.num_frames:
        frames = min(frames, valid_frame_count(sample.num_frames))
    return (frames, *bucket_table(data.video_sample_size, data.bucket_side_multiple)[ratio])


def load_clip(sample: Sample, data: DataConfig) -> torch.Tensor:
    """A held-out clip as the loader would give it, without its random choices: [F, H, W, 3] uint8 of
    `clip_shape`, frames from the first one at video_sample_stride (closer together when the clip is too
    short for it, as in training). Raises MediaError for a file that does not load."""
    frames, height, width = clip_shape(sample, data)
    if sample.kind == "image":
        image = resize_cover_crop(to_frame_tensor(load_image(sample.path)), height, width, dtype=torch.uint8)
        return image.permute(1, 2, 3, 0).contiguous()  # [3, 1, H, W] -> [1, H, W, 3]
    total = sample.num_frames or frames
    stride = max(1, min(data.video_sample_stride, (total - 1) // max(frames - 1, 1)))
    out = decode_frames(sample.path, [i * stride for i in range(frames)], cover=(height, width))
    return torch.from_numpy(out)


def eval_samples(
    validation, data: DataConfig, held_out: list[Sample], cache_dir: Path | None, rank: int
) -> tuple[list[Sample], list[tuple[str, str]]]:
    """The clips to evaluate (at most eval_max_samples) and the ones refused up front as (path, reason).
    From validation_data_meta the missing sizes are probed (a collective under torch.distributed, like
    build_dataloader); else the training samples build_dataloader held out."""
    limit = validation.eval_max_samples
    skipped: list[tuple[str, str]] = []
    if not validation.validation_data_meta:
        return held_out[:limit], skipped
    meta = validation.validation_data_meta
    folder = validation.validation_data_dir or data.train_data_dir or None
    samples = load_metadata(meta, folder, skipped)[:limit]
    samples = fill_sizes(samples, meta, folder, cache_dir, skipped, rank=rank)
    return drop_implausible(samples, skipped), skipped


# --- the evaluation -------------------------------------------------------------------------------------


@dataclass
class EvalResult:
    step: int
    per_clip: torch.Tensor
    """[N, Q] float64: clip i's float32 MSE at quantile j (NaN for a clip that did not load)."""
    loss: float
    """Mean over the loaded clips and every quantile."""
    per_quantile: list[float]
    seconds: float
    forwards: int
    """DiT forwards per rank (the busiest rank's count; every rank runs it under zero3 and fsdp)."""


def quantile_tag(q: float) -> str:
    return f"eval/loss_q{q:g}"


class EvalLoss:
    """The eval loss of one run. `run(step)` is collective (every rank calls it at the same steps); the
    first call loads and encodes this rank's clips. Call `baseline`, `after_step` and `at_end` from the
    training loop: they decide when to run."""

    def __init__(
        self,
        samples: list[Sample],
        *,
        data: DataConfig,
        flow: FlowMatching,
        quantiles: list[float],
        seed: int,
        every: int,
        batch_size: int,
        encode,
        engine,
        collective: bool,
        layout: ParallelLayout,
        metrics=None,
        start_step: int = 0,
        output_dir: Path | None = None,
        encoders=contextlib.nullcontext,
        weights=contextlib.nullcontext,
        quantile_range: tuple[float, float] | None = None,
        first_frame: bool = False,
    ):
        """encoders: a context manager factory under which `encode` works (the trainer's, which loads the
        encoders for the while when the run trains from a cache); weights: one under which the engine
        computes with the weights to evaluate (the trainer's: the EMA's with [ema] validate_with_ema)."""
        if not samples:
            raise ValueError("the eval loss needs at least one held-out clip")
        self.samples, self.data, self.flow = samples, data, flow
        self.quantiles = [float(q) for q in quantiles]
        # A run on part of the timesteps (train/experts.py: one A14B expert, a timestep_range): the quantiles
        # of the density it trains on, i.e. q of the range [q_lo, q_hi] of the whole density.
        lo, hi = quantile_range or (0.0, 1.0)
        self.sigmas = [flow.sigma_quantile(lo + q * (hi - lo)) for q in self.quantiles]
        self.seed, self.every, self.batch_size = seed, every, batch_size
        self.first_frame = first_frame  # train_mode ti2v: each clip's first frame given, as training gives it
        self.encode, self.engine, self.collective, self.device = encode, engine, collective, layout.device
        self.encoders, self.weights = encoders, weights
        # Clips are split over the data-parallel ranks; a sequence group's ranks evaluate the same clips
        # together (its forward is a collective) and its first rank fills the table.
        self.layout = layout
        self.rank, self.world_size, self.metrics = layout.dp_rank, layout.dp_size, metrics
        self.start_step, self.out = start_step, None if output_dir is None else Path(output_dir)
        self.cache: dict[int, dict[str, torch.Tensor]] = {}  # clip -> its encoded inputs [1, ...] on the CPU
        self.loaded: list[bool] | None = None  # every clip's load, agreed by all ranks (None: not prepared)
        self.dummy: dict[str, torch.Tensor] | None = None  # the padding forwards' input (collective engines)
        self.disabled = False
        self.last_step: int | None = None
        self.results: list[EvalResult] = []

    # --- when -------------------------------------------------------------------------------------

    def baseline(self, step: int) -> None:
        """Before the first step of a fresh run: the untrained weights' eval loss at step 0."""
        if step == 0:
            self.run(step)

    def after_step(self, step: int) -> None:
        """After the step's checkpoint save: every `every` steps."""
        if self.every and step % self.every == 0:
            self.run(step)

    def at_end(self, step: int) -> None:
        """After the final save: the last weights, unless just evaluated or nothing was trained."""
        if step > self.start_step and self.last_step != step:
            self.run(step)

    # --- what -------------------------------------------------------------------------------------

    def owned(self) -> list[int]:
        return list(range(self.rank, len(self.samples), self.world_size))

    def _log(self, message: str) -> None:
        if self.metrics is not None:
            self.metrics.log_text(message)

    def _disable(self, what: str, errors: list) -> None:
        self.disabled = True
        lines = [f"  rank {r}: {e}" for r, e in enumerate(errors) if e]
        self._log(
            f"eval loss: {what} failed; no eval loss for the rest of this run, training goes on\n" + "\n".join(lines)
        )

    def _encode_one(self, sample: Sample) -> dict[str, torch.Tensor]:
        pixels = load_clip(sample, self.data)
        inputs = self.encode(pixels_to_model(pixels[None].to(self.device, non_blocking=True)), [sample.text])
        return {k: v.detach().to("cpu") for k, v in inputs.items()}

    def prepare(self) -> bool:
        """Load and encode this rank's clips once (collective); False when the eval loss is off."""
        start = time.perf_counter()
        bad: dict[int, str] = {}
        error = None
        try:
            with self.encoders():
                for i in self.owned():
                    try:
                        self.cache[i] = self._encode_one(self.samples[i])
                    except MediaError as err:
                        bad[i] = f"{err.path}: {err.reason}"
        except Exception as err:  # noqa: BLE001 -- reported on every rank and turned into "eval off"
            error = f"{type(err).__name__}: {err}"
        parts = all_gather_objects({"bad": bad, "error": error})
        if any(p["error"] for p in parts):
            self.cache.clear()
            self._disable("loading and encoding the held-out clips", [p["error"] for p in parts])
            return False
        bad = {i: reason for p in parts for i, reason in p["bad"].items()}
        self.loaded = [i not in bad for i in range(len(self.samples))]
        for i in sorted(bad):
            self._log(f"eval loss: held-out clip {i} left out: {bad[i]}")
        if not any(self.loaded):
            self._disable("every held-out clip", ["none of the held-out clips loads"])
            return False
        if self.collective and any(self.chunk_count(r) == 0 for r in range(self.world_size)):
            # A rank with no loaded clip still runs the collective forwards: it borrows the first clip's inputs.
            first = self.loaded.index(True)
            box = [self.cache.get(first)]
            if dist.is_initialized():
                dist.broadcast_object_list(box, src=first % self.world_size * self.layout.sp_size)  # its owner
            self.dummy = box[0]
        n, q, b = sum(self.loaded), len(self.quantiles), self.batch_size
        self._log(
            f"eval loss: {n} held-out clip(s) encoded once in {time.perf_counter() - start:.1f} s on "
            f"{self.world_size} rank(s); each evaluation: {n} clips x {q} quantiles = {n * q} DiT predictions, "
            f"{self.forwards_per_rank()} DiT forwards of up to {b} on the busiest rank (sigmas "
            + ", ".join(f"{s:.4f}" for s in self.sigmas)
            + ")"
        )
        return True

    def chunks(self, rank: int | None = None) -> list[tuple[int, list[int]]]:
        """(clip, quantile indices) of each forward of a rank, in order: a clip's quantiles in groups of
        up to batch_size, so a clip's forwards are the same whatever the world size."""
        rank = self.rank if rank is None else rank
        q, b = len(self.quantiles), self.batch_size
        return [
            (i, list(range(j, min(j + b, q))))
            for i in range(rank, len(self.samples), self.world_size)
            if self.loaded[i]
            for j in range(0, q, b)
        ]

    def chunk_count(self, rank: int) -> int:
        return len(self.chunks(rank))

    def forwards_per_rank(self) -> int:
        return max(self.chunk_count(r) for r in range(self.world_size))

    def noise(self, clip: int, quantile: float, shape: tuple[int, ...]) -> torch.Tensor:
        """Clip `clip`'s noise at `quantile`: float32 standard normal on the CPU, from (seed, clip, q) only."""
        g = torch.Generator().manual_seed(derive_seed("eval.noise", self.seed, clip, repr(quantile)))
        return torch.randn(shape, generator=g, dtype=torch.float32)

    def forward(self, inputs: dict[str, torch.Tensor], clip: int, qs: list[int]) -> torch.Tensor:
        """The float32 MSE [len(qs)] of one clip at quantiles qs, in one forward."""
        k = len(qs)
        x0 = inputs["x0"].to(self.device, torch.float32)
        x0 = x0.expand(k, *x0.shape[1:])
        noise = torch.stack([self.noise(clip, self.quantiles[j], tuple(x0.shape[1:])) for j in qs]).to(self.device)
        sigmas = torch.tensor([self.sigmas[j] for j in qs], dtype=torch.float32, device=self.device)
        x_t, t = self.flow.add_noise(x0, noise, sigmas), self.flow.timesteps(sigmas)
        target = self.flow.target(x0, noise)
        t_tokens, start = None, 0
        if self.first_frame:
            x_t, t_tokens, start = condition_first_frame(x0, x_t, t)
        rest = {name: inputs[name].to(self.device).expand(k, *inputs[name].shape[1:]) for name in ("y", "clip_fea")
                if name in inputs}  # fmt: skip
        context = inputs["context"].to(self.device)
        pred = self.engine.inference_forward(
            x_t, t if t_tokens is None else t_tokens, context.expand(k, *context.shape[1:]).contiguous(), **rest
        )
        return (pred[:, :, start:].float() - target[:, :, start:]).square().flatten(1).mean(1)

    def evaluate(self) -> torch.Tensor:
        """This rank's [N, Q] float64 table: its clips' losses, zeros elsewhere."""
        table = torch.zeros(len(self.samples), len(self.quantiles), dtype=torch.float64)
        mine = self.chunks()
        pad = self.forwards_per_rank() - len(mine) if self.collective else 0
        fills = self.layout.sp_rank == 0  # summed over every rank next: one rank of a sequence group counts
        for clip, qs in mine:
            losses = self.forward(self.cache[clip], clip, qs).double().cpu()
            if fills:
                table[clip, qs] = losses
        q, b = len(self.quantiles), self.batch_size
        groups = [list(range(j, min(j + b, q))) for j in range(0, q, b)]
        for k in range(pad):  # collective engines: as many forwards as the busiest rank, results discarded
            # The quantile group the busiest rank's forward of this index has (each clip's forwards walk the
            # groups in order): A14B experts route by timestep, so every rank calls the same expert.
            qs = groups[(len(mine) + k) % len(groups)]
            clip = mine[0][0] if mine else 0
            self.forward(self.cache[clip] if mine else self.dummy, clip, qs)
        return table

    @torch.no_grad()
    def run(self, step: int) -> EvalResult | None:
        """Measure and log the eval loss at `step` (collective). None when it is off."""
        if self.disabled or (self.loaded is None and not self.prepare()):
            return None
        start = time.perf_counter()
        if self.collective:
            with self.weights():
                table = self.evaluate()  # an error propagates: see the module docstring
        else:
            table, error = None, None
            try:
                with self.weights():
                    table = self.evaluate()
            except Exception as err:  # noqa: BLE001 -- local forwards: every rank can agree to stop evaluating
                error = f"{type(err).__name__}: {err}"
            errors = all_gather_objects(error)
            if any(errors):
                self._disable(f"the evaluation at step {step}", errors)
                return None
        table = table.to(self.device)
        if dist.is_initialized():
            dist.all_reduce(table)
        table = table.cpu()
        rows = [i for i, ok in enumerate(self.loaded) if ok]
        per_quantile = [math.fsum(table[i, j].item() for i in rows) / len(rows) for j in range(len(self.quantiles))]
        loss = math.fsum(table[i, j].item() for i in rows for j in range(len(self.quantiles))) / (
            len(rows) * len(self.quantiles)
        )
        table[[i for i, ok in enumerate(self.loaded) if not ok]] = math.nan
        result = EvalResult(step, table, loss, per_quantile, time.perf_counter() - start, self.forwards_per_rank())
        self.results.append(result)
        self.last_step = step
        self.report(result)
        return result

    def report(self, r: EvalResult) -> None:
        if self.layout.rank == 0 and self.out is not None:  # the exact numbers, per clip too (TensorBoard: float32)
            line = {"step": r.step, "loss": r.loss, "per_quantile": r.per_quantile, "per_clip": r.per_clip.tolist(),
                    "seconds": r.seconds}  # fmt: skip
            with open(self.out / EVAL_LOSS_FILE, "a") as f:
                f.write(json.dumps(line) + "\n")
        m = self.metrics
        if m is None:
            return
        m.add_scalar("eval/loss", r.loss, r.step)
        for q, value in zip(self.quantiles, r.per_quantile, strict=True):
            m.add_scalar(quantile_tag(q), value, r.step)
        m.add_scalar("eval/seconds", r.seconds, r.step)
        shown = " ".join(f"q{q:g} {v:.4f}" for q, v in zip(self.quantiles, r.per_quantile, strict=True))
        m.log_text(
            f"step {r.step}: eval loss {r.loss:.6f} ({shown}; {sum(self.loaded)} clips, {r.forwards} forwards "
            f"on the busiest rank, {r.seconds:.2f} s)"
        )

    def write_listing(self) -> None:
        """output_dir/eval_clips.json (rank 0): the clips in evaluation order with their shapes and seed."""
        if self.layout.rank != 0 or self.out is None:
            return
        clips = [
            {"index": i, "file_path": str(s.path), "text": s.text, "type": s.kind,
             "frames_height_width": list(clip_shape(s, self.data))}
            for i, s in enumerate(self.samples)
        ]  # fmt: skip
        listing = {"seed": self.seed, "quantiles": self.quantiles, "sigmas": self.sigmas, "clips": clips}
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / EVAL_CLIPS_FILE).write_text(json.dumps(listing, indent=1) + "\n")


def build_eval_loss(trainer, held_out: list[Sample]) -> EvalLoss | None:
    """The run's EvalLoss, or None when [validation] asks for none (a collective: every rank calls it).
    `trainer` is train.main.Trainer after its metrics are built; `held_out` what build_dataloader held out."""
    cfg = trainer.cfg
    v = cfg.validation
    if not v.eval_enabled():
        if held_out:
            trainer.log(f"eval_holdout: {len(held_out)} samples kept out of training, but eval_steps = 0: no eval loss")
        return None
    samples, skipped = eval_samples(v, cfg.data, held_out, trainer.out, trainer.rank)
    for path, reason in skipped:
        trainer.log(f"eval loss: held-out clip {path} refused: {reason}")
    if len(held_out) > len(samples) and not v.validation_data_meta:
        trainer.log(
            f"eval loss: {len(held_out)} samples held out of training (eval_holdout), the first {len(samples)} "
            f"evaluated (eval_max_samples)"
        )
    if not samples:
        trainer.log("eval loss: no usable held-out clip; no eval loss this run")
        return None
    evaluator = EvalLoss(
        samples, data=cfg.data, flow=trainer.flow, quantiles=v.eval_quantiles, seed=v.validation_seed,
        every=v.eval_steps, batch_size=cfg.train.train_batch_size, encode=trainer.inputs.encode, engine=trainer.engine,
        collective=engine_traits(cfg.parallel.engine).collective_inference or trainer.layout.sp_size > 1,
        layout=trainer.layout, metrics=trainer.metrics, start_step=trainer.state.step, output_dir=trainer.out,
        encoders=trainer.inputs.encoders, weights=trainer.eval_weights,
        quantile_range=trainer.plan.overall_quantiles() if trainer.plan is not None else None,
        first_frame=cfg.model.train_mode == "ti2v",
    )  # fmt: skip
    evaluator.write_listing()
    return evaluator
