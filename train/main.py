"""Train Wan2.1: `torchrun --nproc_per_node N -m train.main --cfg configs/X.toml [--section.key=value ...]`.

Setup in order (config, processes, models, data, engine, schedule, resume, metrics), then one loop:
each optimizer step takes `gradient_accumulation_steps` micro-batches, encodes them with the frozen
VAE / umT5 / CLIP under no_grad, noises the latents (flow matching), and trains the DiT to predict the
velocity. Every random draw of a step (noise, timesteps; in the data: frames, caption dropout) is
derived from (seed, step, position in the global batch), so a resumed run repeats an uninterrupted one
and the result does not depend on how the global batch is split over ranks and micro-steps.
"""

# A rank ties itself to the torchrun agent between the light imports and the heavy ones (below).
# ruff: noqa: E402

import dataclasses
import datetime
import gc
import io
import itertools
import logging
import math
import os
import signal
import sys
import time
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from train import guard

# Before torch and the rest (seconds; more on a shared filesystem): an agent killed meanwhile, or before
# this rank started, takes it along (guard.tie_rank_to_launcher); only under torchrun.
guard.tie_rank_to_launcher()

import torch
import torch.distributed as dist

from train.checkpoint import (
    CONFIG_FILE,
    MERGE_ADVICE,
    Checkpointer,
    RNGState,
    checkpoint_dir,
    read_json,
    read_marker,
    remove_interrupted_saves,
    resolve_resume,
)
from train.config import (
    ConfigError,
    RunConfig,
    check_run,
    config_to_toml,
    help_text,
    load_config,
    load_run_config,
    run_device,
    wants_help,
)
from train.data.buckets import token_length_repeats
from train.data.dataset import BadDataError, BadSampleTracker, pixels_to_model
from train.data.loader import build_dataloader
from train.engines import DEFAULT_ENGINE, EngineSetup, StepResult, build_engine, engine_traits
from train.engines.consolidated import ConsolidatedWeights
from train.eval_loss import build_eval_loss
from train.flops import device_peak_tflops, micro_batch_flops
from train.flow import FlowMatching, batch_positions
from train.guard import hold_output_dir, release_output_dir
from train.metrics import StepStats, StepTimer, build_metrics
from train.models import CompileWatch, Models, build_dit_recipe, build_models
from train.validation import ValidationSampler, sampling_options
from wan.encoders import encode_i2v_condition, encode_latents
from wan.modules.attention import device_label, set_attention_backend

log = logging.getLogger("train")


def init_distributed(backend: str) -> tuple[int, int, torch.device]:
    """torchrun's environment -> (rank, world_size, device); a plain `python -m train.main` is one rank."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = run_device()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
    if world_size > 1:
        backend = ("nccl" if cuda else "gloo") if backend == "auto" else backend
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    return rank, world_size, device


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    if not dist.is_initialized():
        return t
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return torch.cat(out)


def count_steps(sampler, cfg: RunConfig) -> int:
    """Optimizer steps of the run: max_train_steps, or every step of num_train_epochs epochs (epochs
    differ by the remainders carried between them, so each is counted)."""
    if cfg.train.max_train_steps > 0:
        return cfg.train.max_train_steps
    epoch = sampler.epoch
    total = 0
    for e in range(cfg.train.num_train_epochs):
        sampler.set_epoch(e)
        total += sampler.batches_per_epoch()
    sampler.set_epoch(epoch)
    return total


# (section, key) of the values a resume takes from this run's config where they differ from the
# checkpoint's: the lr schedule's base lr and shape (its position comes from the checkpoint), clipping,
# the AdamW values and the non-finite limit.
RESUME_CHANGEABLE = (
    ("optim", "learning_rate"), ("optim", "scale_lr"), ("optim", "lr_scheduler"), ("optim", "lr_warmup_steps"),
    ("optim", "max_grad_norm"), ("optim", "adam_beta1"), ("optim", "adam_beta2"), ("optim", "adam_weight_decay"),
    ("optim", "adam_epsilon"), ("train", "max_nonfinite_steps"),
)  # fmt: skip


class TrainingStopped(RuntimeError):
    """The run stopped on purpose (a streak of non-finite steps): said in one line, no traceback."""


@dataclass
class TrainerState:
    """The loop's position and counters: a checkpoint part (trainer_state.json)."""

    step: int = 0
    epoch: int = 0
    epoch_step: int = 0
    nonfinite_in_row: int = 0
    tracker: BadSampleTracker | None = None
    # Not saved: this run's checkpointing. A scheduled save is put off while the last step was
    # non-finite and made after the next finite one; last_saved is the step saved last.
    save_due: bool = False
    last_saved: int = -1
    stop_signal: str | None = None  # the signal the ranks agreed to stop on (after_step)

    def state_dict(self) -> dict:
        t = self.tracker
        return {
            "step": self.step, "epoch": self.epoch, "epoch_step": self.epoch_step,
            "nonfinite_in_row": self.nonfinite_in_row, "served": t.served, "skips": t.skips,
        }  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        self.step, self.epoch, self.epoch_step = state["step"], state["epoch"], state["epoch_step"]
        # A resume is the advised way out of a non-finite streak (often with a lower learning_rate): it
        # gets max_nonfinite_steps afresh, not the rest of the streak that stopped the run.
        self.nonfinite_in_row = 0
        self.tracker.served, self.tracker.skips = state["served"], state["skips"]


class SamplerState:
    """The sampler's position as a checkpoint part: the steps of the epoch the loop finished (the
    loader's workers run ahead)."""

    def __init__(self, sampler, state: TrainerState):
        self.sampler, self.state = sampler, state

    def state_dict(self) -> dict:
        return self.sampler.state_dict(consumed=self.state.epoch_step)

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)


@dataclass
class MicroStats:
    """What one micro-step hands to the step's metrics."""

    loss: float
    timesteps: torch.Tensor  # [B] on the CPU
    per_sample_loss: torch.Tensor  # [B]
    tokens: int
    flops: float = 0.0  # model FLOPs (forward x 3, recompute excluded) from x0's real shape


class Trainer:
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.rank, self.world_size, self.device = init_distributed(cfg.parallel.backend)
        # Checks that need no model come first (train.config's check_run: precision, every path, the
        # DeepSpeed file, the attention kernel); the data and the checkpoint to resume follow, still
        # before any model is built. main() made the same check already; a Trainer built directly has not.
        problems = check_run(cfg, self.device, self.world_size)
        if problems:
            raise ConfigError(problems)
        t = cfg.train
        self.flow = FlowMatching(
            shift=t.shift, weighting_scheme=t.weighting_scheme, logit_mean=t.logit_mean, logit_std=t.logit_std,
            uniform_sampling=t.uniform_sampling, mode_scale=t.mode_scale, motion_sub_loss=t.motion_sub_loss,
            motion_sub_loss_ratio=t.motion_sub_loss_ratio,
        )  # fmt: skip
        if self.device.type == "cuda":  # TF32 for fp32 matmuls and convolutions only when asked (torch's default)
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = t.allow_tf32
        if self.rank != 0:  # console logs from rank 0 only; other ranks' bad files reach it at the end
            logging.getLogger().setLevel(logging.ERROR)
        # The global RNGs only seed what is not derived per step (nothing in the loop draws from them);
        # they are still saved and restored per rank for code that might.
        torch.manual_seed(cfg.train.seed + self.rank)
        self.out = Path(cfg.train.output_dir)
        hold_output_dir(self.out, self.rank)  # one job per output_dir: before anything is written there
        if self.rank == 0:
            # A crashed or failed save's leftovers may hold the disk space the coming saves need.
            for leftover in remove_interrupted_saves(self.out):
                self.log(f"removed {leftover}, left by an interrupted or failed save")
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.toml").write_text(config_to_toml(cfg))
        barrier()

        m = cfg.model
        self.accumulation = t.gradient_accumulation_steps
        held_out: list = []  # eval_holdout: training samples kept out of training for the eval loss
        self.loader, self.sampler, self.tracker = build_dataloader(
            cfg.data, t.train_batch_size, self.rank, self.world_size, t.seed,
            pin_memory=self.device.type == "cuda", accumulation_steps=self.accumulation, cache_dir=self.out,
            holdout=cfg.validation.eval_holdout, holdout_seed=cfg.validation.validation_seed, held_out=held_out,
        )  # fmt: skip
        self.total_steps = count_steps(self.sampler, cfg)
        resume = resolve_resume(self.out, cfg.checkpoint.resume_from_checkpoint)
        if resume is not None:
            self.check_resumable(resume)  # before minutes of model building
            self.report_resume_changes(resume)
        optim = cfg.optim
        if optim.scale_lr:  # VideoX-Fun's: the lr grows with the global batch (the config keeps the base lr)
            factor = t.train_batch_size * self.accumulation * self.world_size
            optim = dataclasses.replace(optim, learning_rate=optim.learning_rate * factor)
            self.log(f"scale_lr: learning_rate {cfg.optim.learning_rate:g} x {factor} = {optim.learning_rate:g}")
        setup = EngineSetup(
            parallel=cfg.parallel, optim=optim, mixed_precision=t.mixed_precision,
            micro_batch_size=t.train_batch_size, accumulation_steps=self.accumulation,
            total_steps=self.total_steps, device=self.device,
        )  # fmt: skip
        # The attention kernel, chosen explicitly (check_run refused an unavailable one).
        kernel = set_attention_backend(m.attention_backend, self.device)
        self.log(f"attention: {kernel if kernel != 'default' else 'torch default'} ({device_label(self.device)})")
        recipe = build_dit_recipe(m, t.seed)
        self.dit_config = recipe.config  # the step's FLOPs are counted from it (train/flops.py)
        self.models: Models = build_models(m, self.device, t.seed)
        self.engine = build_engine(recipe, setup)
        trainable, total = recipe.parameter_counts()
        self.log(
            f"DiT on the {cfg.parallel.engine} engine: {trainable:,} of {total:,} parameters train "
            f"({100 * trainable / total:.1f}%)"
        )
        self.compile_watch = CompileWatch() if m.compile else None  # graphs torch.compile makes, logged
        self.state = TrainerState(tracker=self.tracker)
        self.checkpointer = Checkpointer(
            self.out, rank=self.rank, world_size=self.world_size,
            total_limit=cfg.checkpoint.checkpoints_total_limit, config_text=config_to_toml(cfg),
            marker_info={"engine": cfg.parallel.engine},
        )  # fmt: skip
        # Load order = registration order: the RNG last, after everything that might draw.
        self.checkpointer.register_files("engine", self.engine)
        if cfg.checkpoint.save_consolidated_weights:
            self.checkpointer.register_files("consolidated", ConsolidatedWeights(self.engine, recipe.config))
        self.checkpointer.register("trainer_state", self.state)
        self.checkpointer.register("sampler", SamplerState(self.sampler, self.state))
        self.checkpointer.register("rng", RNGState(), per_rank=True)
        if resume is not None:
            self.checkpointer.load(resume)
            s = self.state
            s.last_saved = s.step  # a run with no step left does not write it again
            self.log(f"resumed from {resume} at step {s.step} (epoch {s.epoch}, step {s.epoch_step} of it)")
        self.metrics = build_metrics(
            self.out, rank=self.rank, total_steps=self.total_steps, start_step=self.state.step,
            log_every=cfg.logging.log_every, progress_bar=cfg.logging.progress_bar,
            loss_smoothing=cfg.logging.loss_smoothing, timestep_bins=cfg.logging.timestep_bins,
            log_dir=cfg.logging.logging_dir, peak_tflops=device_peak_tflops(self.device, cfg.logging.peak_tflops),
        )  # fmt: skip
        self.metrics.add_text("config", f"```toml\n{config_to_toml(cfg)}\n```", self.state.step)
        self.timer = StepTimer(self.device)
        self.validation: ValidationSampler | None = None
        if cfg.validation.sampling_enabled():  # prompts, and validation_steps or validation_epochs
            d = cfg.data
            self.validation = ValidationSampler(
                cfg.validation, sampling_options(cfg.validation, d.video_sample_size, d.video_sample_n_frames, t.shift),
                models=self.models, engine=self.engine, collective=engine_traits(cfg.parallel.engine).collective_inference, dit_config=recipe.config,
                rank=self.rank, world_size=self.world_size, device=self.device, output_dir=self.out,
                metrics=self.metrics, offload=m.low_vram,
            )  # fmt: skip
        self.last_validated = self.state.step  # a resumed run samples again only after a step of its own
        self.eval_loss = build_eval_loss(self, held_out)  # None unless [validation] asks for one

    def report_compiles(self, what: str, seconds: float) -> None:
        """[model] compile: one line when torch.compile made new graphs (a new bucket shape, or the first
        no_grad pass), and the TensorBoard scalar train/recompiles (graphs compiled so far)."""
        fresh = self.compile_watch.new()
        if fresh:
            total = self.compile_watch.seen
            self.log(
                f"torch.compile: {fresh} new graph(s) of the DiT blocks for {what} ({seconds:.1f} s with the "
                f"compile), {total} so far"
            )
            self.metrics.add_scalar("train/recompiles", total, self.state.step + 1)

    def log(self, message: str) -> None:
        if self.rank == 0:
            print(message, flush=True)

    def check_resumable(self, path: Path) -> None:
        """Refuse a checkpoint this run cannot continue, before any model is built."""
        marker = read_marker(path)
        engine, saved = self.cfg.parallel.engine, marker.get("engine", DEFAULT_ENGINE)
        if saved != engine:
            raise ValueError(f"{path} was written by the {saved} engine, this run uses {engine}; {MERGE_ADVICE}")
        if marker["world_size"] != self.world_size and engine_traits(engine).tied_to_world_size:
            raise ValueError(
                f"{path} was written by {marker['world_size']} ranks, this run has {self.world_size}: {engine} "
                f"checkpoints are tied to the number of ranks; {MERGE_ADVICE}"
            )
        try:  # the data plan needs the same global batch (loaded again with the other parts)
            self.sampler.load_state_dict(read_json(path / "sampler.json"))
        except ValueError as err:
            raise ValueError(f"{path}: cannot continue its data order: {err}{self.holdout_hint(path)}") from None

    def holdout_hint(self, path: Path) -> str:
        """Why the data changed when the held-out clips did: they are not in the training data."""
        try:
            saved = load_config(["--cfg", str(path / CONFIG_FILE)]).validation
        except (ConfigError, OSError):
            return ""
        now = self.cfg.validation
        if (saved.eval_holdout, saved.validation_seed if saved.eval_holdout else 0) == (
            now.eval_holdout,
            now.validation_seed if now.eval_holdout else 0,
        ):
            return ""
        return (
            f" (eval_holdout {saved.eval_holdout} / validation_seed {saved.validation_seed} in the checkpoint, "
            f"{now.eval_holdout} / {now.validation_seed} now: held-out clips are taken out of the training data, "
            "so resume with the checkpoint's values)"
        )

    def report_resume_changes(self, path: Path) -> None:
        """Say which values this run changes against the checkpoint's own config: the engines take the
        lr and AdamW values from the config, not the checkpoint (a lower learning_rate is the advice
        after non-finite steps), and the loop reads the rest from it every step."""
        saved_file = path / CONFIG_FILE
        if not saved_file.is_file():
            return  # nothing to compare with
        try:
            saved = load_config(["--cfg", str(saved_file)])
        except ConfigError as err:
            self.log(f"{saved_file}: not compared with this run's config: {err}")
            return
        changes = [
            f"{key} {getattr(getattr(saved, section), key)} -> {getattr(getattr(self.cfg, section), key)}"
            for section, key in RESUME_CHANGEABLE
            if getattr(getattr(saved, section), key) != getattr(getattr(self.cfg, section), key)
        ]
        if changes:
            self.log("changed on resume: " + ", ".join(changes))

    # --- one optimizer step -----------------------------------------------------------------------

    def optimizer_steps(self) -> Iterator[Iterator[dict]]:
        """Each optimizer step's micro-batches (a lazy iterator, so a batch's shared buffer goes back to
        its worker before the next is taken), across epochs until total_steps."""
        s = self.state
        while s.step < self.total_steps:
            self.sampler.set_epoch(s.epoch)  # the same epoch keeps a resumed offset
            batches = iter(self.loader)
            while s.step < self.total_steps:
                # The GPU is synchronised at section edges only on the steps whose sections are logged.
                self.timer.synchronize = self.metrics.times_sections(s.step + 1)
                with self.timer.section("data_wait"):
                    first = next(batches, None)
                if first is None:
                    break  # the sampler yields whole optimizer steps
                yield itertools.chain([first], self.timed(batches, self.accumulation - 1))
            else:
                return
            s.epoch, s.epoch_step = s.epoch + 1, 0
            if self.validation is not None and self.validation.due_after_epoch(s.epoch):
                self.validate()  # the epoch's last step (and its checkpoint) is done

    def timed(self, batches: Iterator[dict], count: int) -> Iterator[dict]:
        for _ in range(count):
            with self.timer.section("data_wait"):
                batch = next(batches)
            yield batch

    @torch.no_grad()
    def encode(self, batch: dict) -> dict:
        """The DiT's inputs for a micro-batch: x0 latents, context, and for i2v clip_fea and y."""
        m = self.models
        pixels = pixels_to_model(batch["pixels"].to(self.device, non_blocking=True))  # [B, 3, F, H, W]
        del batch["pixels"]  # the shared buffer goes back to its worker
        x0 = encode_latents(m.vae, pixels, self.cfg.model.vae_mini_batch, offload=self.cfg.model.low_vram)
        inputs = {"x0": x0.float(), "context": m.text(batch["text"], device=self.device)}
        if m.clip is not None:
            y, clip_fea = encode_i2v_condition(
                m.vae, m.clip, pixels[:, :, 0], pixels.shape[2], offload=self.cfg.model.low_vram
            )
            inputs.update(y=y, clip_fea=clip_fea)
        return inputs

    def copies(self, pixels_shape: torch.Size) -> int:
        """Times a micro-batch trains at once: training_with_video_token_length repeats batches far below
        its token budget 2x or 4x (VideoX-Fun's rule), each copy with its own noise and timestep. Every
        rank of a step has the same shape, so every rank repeats alike."""
        d = self.cfg.data
        if not d.training_with_video_token_length:
            return 1
        _, f, h, w, _ = pixels_shape  # [B, F, H, W, 3] as decoded
        return token_length_repeats(f, h, w, d.token_sample_size, d.video_sample_n_frames)

    def micro_step(self, batch: dict, micro: int) -> MicroStats:
        # Summed over the ranks before any forward: every rank stops at the same micro-step, out of no
        # collective, and never trains on a batch slot that no sample could fill (BadSampleTracker).
        self.tracker.update(batch, self.device, step=self.state.step + 1)
        copies = self.copies(batch["pixels"].shape)
        with self.timer.section("encode"):
            inputs = self.encode(batch)
        b = inputs["x0"].shape[0]
        # Position of each sample in the global batch: (micro-step, rank, index), as the sampler lays it out;
        # copy c of a sample sits at its position + c x the global batch.
        positions = batch_positions(micro, self.rank, self.world_size, b)
        global_size = self.accumulation * self.world_size * b
        if copies > 1:
            inputs = {k: torch.cat([v] * copies) for k, v in inputs.items()}
            positions = [p + c * global_size for c in range(copies) for p in positions]
            global_size *= copies
        x0 = inputs["x0"]
        b = x0.shape[0]
        seed, step = self.cfg.train.seed, self.state.step
        sigmas = self.flow.sample_sigmas(seed, step, positions, global_size).to(self.device)
        noise = self.flow.sample_noise(seed, step, positions, tuple(x0.shape[1:])).to(self.device)
        x_t = self.flow.add_noise(x0, noise, sigmas)
        target = self.flow.target(x0, noise)
        t = self.flow.timesteps(sigmas)
        started = time.perf_counter()
        with self.engine.micro_step(last=micro == self.accumulation - 1):
            with self.timer.section("forward"):
                pred = self.engine.forward(
                    x_t, t, inputs["context"], clip_fea=inputs.get("clip_fea"), y=inputs.get("y")
                )
                loss, per_sample = self.flow.loss(pred, target, sigmas)
            with self.timer.section("backward"):
                self.engine.backward(loss)
        if self.compile_watch is not None:
            self.report_compiles(f"latents {list(x0.shape)}", time.perf_counter() - started)
        _, f, h, w = x0.shape[1:]
        tokens = b * f * (h // 2) * (w // 2)  # latent patches of 1x2x2
        flops = micro_batch_flops(self.dit_config, tuple(x0.shape), self.cfg.model).model
        return MicroStats(loss.item(), t.detach().cpu(), per_sample.detach().cpu(), tokens, flops)

    def train(self) -> None:
        cfg, s, t0, start = self.cfg, self.state, time.perf_counter(), self.state.step
        self.log(
            f"training {self.total_steps - s.step} steps from step {s.step} to {self.total_steps}: "
            f"{self.world_size} rank(s) x batch {cfg.train.train_batch_size} x {self.accumulation} micro-steps "
            f"on {self.device}"
        )
        guard.stop_gracefully()  # SIGINT / SIGTERM from here on: finish the step, save, exit 0
        if self.eval_loss is not None:
            self.eval_loss.baseline(s.step)  # step 0 of a fresh run: the starting weights' eval loss
        for micro_batches in self.optimizer_steps():
            step_start = time.perf_counter()
            micro = [self.micro_step(batch, i) for i, batch in enumerate(micro_batches)]
            with self.timer.section("optimizer"):
                result = self.engine.step()
            s.step, s.epoch_step = s.step + 1, s.epoch_step + 1
            self.after_step(step_start, micro, result)
            if s.stop_signal is not None:
                break
        if s.stop_signal is not None:  # after_step saved the checkpoint; no final sampling or eval
            self.metrics.close()
            self.log(self.stop_message(start, t0))
            return
        if s.nonfinite_in_row:  # no checkpoint of a skipped step (see after_step)
            self.metrics.log_text(f"step {s.step}: no final checkpoint (the last update was skipped)")
        elif s.last_saved != s.step:
            self.save_checkpoint()  # the final state, unless the last step just saved it
        if self.validation is not None and self.last_validated != s.step:
            self.validate()  # the final weights, unless the last step just sampled them
        if self.eval_loss is not None:
            self.eval_loss.at_end(s.step)  # the final weights, unless just evaluated
        first, last = self.metrics.first_and_last_smoothed()
        self.metrics.close()
        self.log_bad_samples()
        if first is not None:
            trend = "fell" if last < first else "did NOT fall"
            self.log(
                f"smoothed loss: first {first:.4f}, last {last:.4f}: it {trend} "
                f"({trained_range(start, s.step)}, {time.perf_counter() - t0:.0f} s)"
            )
        self.log(f"TensorBoard: tensorboard --logdir {self.out / cfg.logging.logging_dir}")

    def stop_message(self, start: int, t0: float) -> str:
        """The one line a stopped run ends with: what it trained and the checkpoint to resume from."""
        s, resume_from = self.state, self.cfg.checkpoint.resume_from_checkpoint
        resume = "the same command resumes" if resume_from == "latest" else "--resume_from_checkpoint=latest resumes"
        if s.last_saved == s.step:
            saved = f"saved {checkpoint_dir(self.out, s.step)}; {resume} from it"
        else:  # the last update was skipped (after_step saves no such step)
            saved = f"no checkpoint of it (its update was skipped); {resume} from the newest one"
        return (
            f"stopped by {s.stop_signal} at step {s.step} of {self.total_steps} ({trained_range(start, s.step)}, "
            f"{time.perf_counter() - t0:.0f} s): {saved}"
        )

    def log_bad_samples(self) -> None:
        """Every rank's bad files with their failed loads, listed by rank 0 (the counts are already
        global: micro_step sums them). A collective: every rank calls it."""
        listing = self.tracker.listing(self.tracker.gather())
        self.log(listing)

    def after_step(self, step_start: float, micro: list[MicroStats], result: StepResult) -> None:
        cfg, s = self.cfg, self.state
        with self.timer.section("logging"):
            mine = [sum(m.loss for m in micro), sum(len(m.timesteps) for m in micro), sum(m.tokens for m in micro),
                    sum(m.flops for m in micro)]  # fmt: skip
            # The ranks agree on a stop (a signal may reach some ranks only, or at different steps) on
            # the reduction every step makes anyway: a count per signal, no collective or host sync of its
            # own. A signal landing after it is agreed on at the next step.
            stop = guard.stop_requested()
            mine += [float(stop == signal.SIGINT), float(stop == signal.SIGTERM)]
            loss_sum, samples, tokens, flops, sigint, sigterm = all_reduce_sum(mine, self.device)
            if sigint or sigterm:
                s.stop_signal = "SIGINT" if sigint else "SIGTERM"
            loss = loss_sum / (self.accumulation * self.world_size)
            skipped = not result.updated or not math.isfinite(loss)
            s.nonfinite_in_row = s.nonfinite_in_row + 1 if skipped else 0
            timesteps = all_gather_cat(torch.cat([m.timesteps for m in micro]).to(self.device)).cpu()
            per_sample = all_gather_cat(torch.cat([m.per_sample_loss for m in micro]).to(self.device)).cpu()
        sections = self.timer.reset()
        stats = StepStats(
            loss=loss, lr=result.lr, grad_norm=result.grad_norm, samples=int(samples), tokens=int(tokens),
            step_time=time.perf_counter() - step_start, data_wait=sections.pop("data_wait", 0.0),
            timesteps=timesteps, per_sample_loss=per_sample, sections=sections, skipped=skipped, flops=flops,
            ranks=self.world_size,
        )  # fmt: skip
        self.metrics.log_step(s.step, stats)
        if skipped:
            # fp16: a finite loss with an overflowing gradient is the loss scaler at work (it halves its
            # scale and skips); from 2^16 it may take up to 16 such steps to reach a scale that fits.
            overflow = cfg.train.mixed_precision == "fp16" and math.isfinite(loss)
            what = "loss scale overflow" if overflow else f"non-finite loss {loss} / grad norm {result.grad_norm}"
            self.metrics.log_text(f"step {s.step}: {what}: update skipped")
            if s.nonfinite_in_row >= cfg.train.max_nonfinite_steps + (16 if overflow else 0):
                raise TrainingStopped(
                    f"{s.nonfinite_in_row} steps in a row had a non-finite loss or gradient (max_nonfinite_steps="
                    f"{cfg.train.max_nonfinite_steps}); lower the learning rate or check the data and resume "
                    f"from the last checkpoint"
                )
        every = cfg.checkpoint.checkpointing_steps
        scheduled = bool(every) and s.step % every == 0
        if skipped and scheduled:
            # The skipped update left the weights as the last finite step did; saving now would only
            # let checkpoints_total_limit prune the last good checkpoint during a non-finite streak.
            s.save_due = True
            self.metrics.log_text(
                f"step {s.step}: checkpoint not saved (update skipped); saving after the next finite step"
            )
        elif not skipped and (scheduled or s.save_due):
            self.save_checkpoint()
        if s.stop_signal is not None:
            # Stopping: this step's checkpoint (a skipped update has none, as above), nothing else. What
            # bounds the time a stop takes: the rest of the step (a signal during an eval or sampling
            # waits for it too) and the save. torchrun SIGKILLs its ranks --shutdown_timeout seconds
            # (TORCH_ELASTIC_SHUTDOWN_TIMEOUT, 30 by default; launch/*.sh raise it) after passing a
            # signal on, and SLURM KillWait / GraceTime seconds after its SIGTERM.
            if not skipped and s.last_saved != s.step:
                self.save_checkpoint()
            return
        if self.eval_loss is not None:
            self.eval_loss.after_step(s.step)  # after the checkpoint: an eval never costs the run a save
        if self.validation is not None and self.validation.due_after_step(s.step) and s.step < self.total_steps:
            # After the step's checkpoint, so sampling never costs the run; the last step's follows
            # the final checkpoint (train).
            self.validate()

    def validate(self) -> None:
        """Collective: sample the validation prompts with the current weights (train/validation.py)."""
        s = self.state
        if self.last_validated == s.step:  # the epoch's end fell on a validation step
            return
        started = time.perf_counter()
        self.validation.run(s.step)
        self.last_validated = s.step
        if self.compile_watch is not None:
            self.report_compiles("validation sampling", time.perf_counter() - started)

    def save_checkpoint(self) -> None:
        """Collective: checkpoint-{step}, only ever after a finite step (the callers see to it)."""
        s = self.state
        self.checkpointer.save(s.step)
        s.save_due, s.last_saved = False, s.step


# How long a rank other than local rank 0 waits before it says a setup error itself (see fail_setup).
SETUP_ERROR_WAIT_S = 10.0


def trained_range(start: int, end: int) -> str:
    """What a run trained, resumed or not: "trained 50 steps (51-100)"."""
    count = end - start
    if count <= 0:
        return "trained no step"
    if count == 1:
        return f"trained 1 step ({end})"
    return f"trained {count} steps ({start + 1}-{end})"


def fail_setup(message: str, code: int = 2) -> typing.NoReturn:
    """Say a setup error once per node and exit with `code`.

    Every rank of a node checks the same config against the same files, so local rank 0 speaks for
    them (decided from torchrun's environment: there may be no process group yet). The others do not
    exit first: torchrun's agent would then end local rank 0 with SIGTERM, maybe before it printed.
    They wait for that SIGTERM instead, which local rank 0's exit brings, and exit with the same code;
    a problem local rank 0 did not share leaves the job running, so after SETUP_ERROR_WAIT_S they say
    it themselves."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if local_rank != 0:
        signal.signal(signal.SIGTERM, lambda *_: os._exit(code))
        time.sleep(SETUP_ERROR_WAIT_S)
        message = f"rank {os.environ.get('RANK', local_rank)}: {message}"
    print(message, file=sys.stderr, flush=True)
    raise SystemExit(code)


def write_whole_lines() -> None:
    """Each line of stdout and stderr in one write. Under PYTHONUNBUFFERED (or -u) `print` writes the
    text and its newline separately, so two ranks sharing torchrun's pipe interleave mid-line; a line
    of up to PIPE_BUF (4 KiB) bytes written at once stays whole."""
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(line_buffering=True, write_through=False)


def main(argv: list[str] | None = None) -> None:
    write_whole_lines()
    guard.install_stop_handlers()  # SIGINT / SIGTERM: quiet during setup, a checkpoint once training
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    if wants_help(argv):
        if int(os.environ.get("LOCAL_RANK", 0)) == 0:
            print(help_text())
        raise SystemExit(0)
    notes: list[str] = []
    try:  # the config and every check that needs no data or model, all listed at once (train.config's)
        cfg = load_run_config(argv, notes, run_device(), int(os.environ.get("WORLD_SIZE", 1)))
    except ConfigError as err:
        fail_setup("\n".join([*notes, f"error: {err}"]))
    if notes and int(os.environ.get("RANK", 0)) == 0:  # what VideoX-Fun options do here, said once
        print("\n".join(notes), flush=True)
    try:
        trainer = Trainer(cfg)
    except ValueError as err:  # a user error found during setup (data, weights, checkpoint): no traceback
        fail_setup(f"error: {err}")
    try:
        trainer.train()
    except (TrainingStopped, BadDataError) as err:  # every rank stops alike; the message says why and what next
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    # Only after a clean finish (a collective teardown while another rank failed would hang): every rank
    # done, the DDP reducer and loader workers freed while the process group still exists, then the
    # group. Exiting with live gloo work threads aborted ~1 in 4 CPU runs ("terminate called without an
    # active exception").
    barrier()
    release_output_dir()  # every rank is done; the caller may leave with os._exit, which skips atexit
    del trainer
    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # Everything is on disk (checkpoints fsynced, TensorBoard closed). Leave without the interpreter's
    # teardown: DeepSpeed keeps module-level references to its engine and groups, and destroying their
    # C++ threads at exit still aborted now and then ("terminate called without an active exception",
    # seen once in a 2-node zero3 CI run), turning a finished run into a failed job.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
