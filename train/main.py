"""Train Wan2.1 / Wan2.2: `torchrun --nproc_per_node N -m train.main --cfg configs/X.toml [--section.key=value ...]`.

Setup in order (config, processes, models, data, engine, schedule, resume, metrics), then one loop:
each optimizer step takes `gradient_accumulation_steps` micro-batches, encodes them with the frozen
VAE / umT5 / CLIP under no_grad, noises the latents (flow matching), and trains the DiT to predict the
velocity. Every random draw of a step (noise, timesteps; in the data: frames, caption dropout) is
derived from (seed, step, position in the global batch), so a resumed run repeats an uninterrupted one
and the result does not depend on how the global batch is split over ranks and micro-steps.
"""

# A rank ties itself to the torchrun agent between the light imports and the heavy ones (below).
# ruff: noqa: E402

import contextlib
import gc
import itertools
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from train import guard

# Before torch and the rest (seconds; more on a shared filesystem): an agent killed meanwhile, or before
# this rank started, takes it along (guard.tie_rank_to_launcher); only under torchrun.
guard.tie_rank_to_launcher()

import torch
import torch.distributed as dist

from train.checkpoint import install_test_hooks_from_env
from train.checkpoint_verify import checkpoint_dir, resolve_resume_point
from train.config import (
    ConfigError,
    RunConfig,
    check_run,
    config_to_toml,
    help_text,
    load_run_config,
    run_device,
    wants_help,
)
from train.data.dataset import BadDataError, pixels_to_model
from train.distributed import (
    all_gather_cat,
    all_reduce_sum,
    apply_sequence_parallel,
    barrier,
    fail_setup,
    init_distributed,
    write_whole_lines,
)
from train.engines import StepResult
from train.engines.experts import ExpertEngines
from train.eval_loss import build_eval_loss
from train.experts import ExpertPlan
from train.flops import device_peak_tflops, micro_batch_flops
from train.flow import FlowMatching
from train.guard import release_output_dir
from train.inputs import InputBuilder
from train.metrics import StepStats, StepTimer, build_metrics
from train.models import CompileWatch, model_boundary
from train.resume import check_resumable, report_resume_changes
from train.setup import (
    build_checkpointer,
    build_data,
    build_ema,
    build_training,
    build_validation,
    prepare_output_dir,
    set_process_defaults,
)
from train.state import TrainerState

log = logging.getLogger("train")


class TrainingStopped(RuntimeError):
    """The run stopped on purpose (a streak of non-finite steps): said in one line, no traceback."""


@dataclass
class MicroStats:
    """What one micro-step hands to the step's metrics: device tensors, read on the host only where the
    step reduces them (no synchronisation per micro-step)."""

    loss: torch.Tensor  # [] the micro-batch mean, detached
    timesteps: torch.Tensor  # [B]
    per_sample_loss: torch.Tensor  # [B]
    tokens: int
    flops: float = 0.0  # model FLOPs (forward x 3, recompute excluded) from x0's real shape


@dataclass
class StepOutcome:
    """A step's values summed over the ranks (Trainer.reduce_step)."""

    loss: float
    samples: int
    tokens: int
    flops: float
    skipped: bool


class Trainer:
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.layout = layout = init_distributed(cfg.parallel.backend, run_device())
        self.rank, self.world_size, self.device = layout.rank, layout.world_size, layout.device
        # Checks that need no model come first (train.config's check_run: precision, every path, the
        # DeepSpeed file, the attention kernel); the data and the checkpoint to resume follow, still
        # before any model is built. main() made the same check already; a Trainer built directly has not.
        problems = check_run(cfg, self.device, self.world_size)
        if problems:
            raise ConfigError(problems)
        self.layout = layout = apply_sequence_parallel(layout, cfg.parallel.sp)
        self.flow = FlowMatching.from_config(cfg.train)
        set_process_defaults(cfg, layout)
        self.out = Path(cfg.train.output_dir)
        prepare_output_dir(cfg, self.out, layout, self.log)
        self.accumulation = cfg.train.gradient_accumulation_steps
        data = build_data(cfg, layout, self.out)
        self.loader, self.sampler, self.tracker = data.loader, data.sampler, data.tracker
        self.total_steps = data.total_steps
        resume = resolve_resume_point(self.out, cfg.checkpoint.resume_from_checkpoint)  # the marker parsed once
        if resume is not None:  # before minutes of model building
            check_resumable(cfg, resume.path, resume.marker, self.world_size, self.sampler)
            report_resume_changes(cfg, resume.path, self.log)
        # Wan2.2 A14B: which expert each step trains and the timesteps it draws (train/experts.py); also a
        # timestep_range's draws. None: a single DiT on the whole range.
        self.plan = ExpertPlan.build(cfg.experts, self.flow, cfg.train.seed, model_boundary(cfg.model, cfg.experts))
        self.engine, self.models, recipe = build_training(cfg, layout, self.total_steps, self.log, self.plan)
        self.expert_engines = self.engine if isinstance(self.engine, ExpertEngines) else None
        self.dit_config = recipe.config  # the step's FLOPs are counted from it (train/flops.py)
        self.compile_watch = CompileWatch() if cfg.model.compile else None  # graphs torch.compile makes, logged
        self.state = TrainerState(tracker=self.tracker)
        # The average of the trainable weights ([ema]): taken of the starting weights, registered with the
        # checkpointer (a resume reloads it), folded in after every applied update.
        self.ema = build_ema(cfg, self.engine, layout, self.plan)
        self.checkpointer = build_checkpointer(
            cfg, self.out, layout, self.engine, self.state, self.sampler, recipe.config, self.ema
        )
        if resume is not None:
            self.checkpointer.load(resume)
            s = self.state
            s.last_saved = s.step  # a run with no step left does not write it again
            self.log(f"resumed from {resume.path} at step {s.step} (epoch {s.epoch}, step {s.epoch_step} of it)")
        self.metrics = build_metrics(
            cfg.logging, self.out, rank=self.rank, total_steps=self.total_steps, start_step=self.state.step,
            peak_tflops=device_peak_tflops(self.device, cfg.logging.peak_tflops),
        )  # fmt: skip
        self.metrics.add_text("config", f"```toml\n{config_to_toml(cfg)}\n```", self.state.step)
        self.timer = StepTimer(self.device)
        self.inputs = InputBuilder(cfg, layout, self.models, self.flow, self.timer)
        self.pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # the log window's (timesteps, per-sample losses)
        self.validation = build_validation(
            cfg, layout, self.models, self.engine, recipe.config, self.out, self.metrics, self.inputs.encoders
        )
        self.last_validated = self.state.step  # a resumed run samples again only after a step of its own
        self.eval_loss = build_eval_loss(self, data.held_out)  # None unless [validation] asks for one

    def eval_weights(self) -> contextlib.AbstractContextManager:
        """Collective: the weights validation and the eval loss run on: the EMA's with [ema] validate_with_ema."""
        if self.ema is not None and self.cfg.ema.validate_with_ema:
            return self.ema.swapped()
        return contextlib.nullcontext()

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
                rest = self.timed(batches, self.accumulation - 1)
                yield (self.on_device(batch) for batch in itertools.chain([first], rest))
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

    def on_device(self, batch: dict) -> dict:
        """Count the batch's bad samples, then its pixels on the device in the VAE's layout [B, 3, F, H, W].
        The count is summed over the ranks (on the host group: no GPU synchronisation) before any
        forward, so every rank stops at the same micro-step, out of no collective, and never trains on
        a batch slot no sample could fill (BadSampleTracker)."""
        self.tracker.update(batch, self.device, step=self.state.step + 1, group=self.layout.host_group)
        with self.timer.section("encode"):
            if "pixels" not in batch:  # from a cache: the encoders' outputs
                return {k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) and k != "index" else v
                        for k, v in batch.items()}  # fmt: skip
            pixels = pixels_to_model(batch.pop("pixels").to(self.device, non_blocking=True))
        return {**batch, "pixels": pixels}  # the shared buffer went back to its worker with the pop

    def micro_step(self, batch: dict, micro: int) -> MicroStats:
        # The step's timestep range: its expert's (own_step: step s + 1, drawn once and kept).
        quantiles = self.plan.quantiles(self.plan.own_step(self.state.step + 1)[0]) if self.plan is not None else None
        x = self.inputs.build(batch, micro, self.state.step, quantiles)
        started = time.perf_counter()
        with self.engine.micro_step(last=micro == self.accumulation - 1):
            with self.timer.section("forward"):
                pred = self.engine.forward(x.x_t, x.dit_t, x.context, clip_fea=x.clip_fea, y=x.y)
                # ti2v: the given first frame is no prediction (loss_from 1).
                loss, per_sample = self.flow.loss(pred[:, :, x.loss_from :], x.target[:, :, x.loss_from :], x.sigmas)
            with self.timer.section("backward"):
                # Engines average gradients over every rank; a sequence group's ranks each hold their
                # tokens' share of one sample's gradient (wan/modules/ulysses.py): x sp_size makes the
                # average one over samples, as without sequence parallel.
                self.engine.backward(loss * self.layout.sp_size if self.layout.sp_size > 1 else loss)
        shape = tuple(x.x_t.shape)  # [B, C, F, H, W] latents
        if self.compile_watch is not None:
            self.report_compiles(f"latents {list(shape)}", time.perf_counter() - started)
        b, _, f, h, w = shape
        tokens = b * f * (h // 2) * (w // 2)  # latent patches of 1x2x2
        flops = micro_batch_flops(self.dit_config, shape, self.cfg.model).model
        return MicroStats(loss.detach(), x.t.detach(), per_sample.detach(), tokens, flops)

    def train(self) -> None:
        cfg, s, t0, start = self.cfg, self.state, time.perf_counter(), self.state.step
        self.log(
            f"training {self.total_steps - s.step} steps from step {s.step} to {self.total_steps}: "
            f"{self.layout.dp_size} data-parallel rank(s) x batch {cfg.train.train_batch_size} x {self.accumulation} "
            f"micro-steps on {self.device}"
            + (f", each sample on {self.layout.sp_size} ranks (sequence parallel)" if self.layout.sp_size > 1 else "")
        )
        guard.stop_gracefully()  # SIGINT / SIGTERM from here on: finish the step, save, exit 0
        if self.eval_loss is not None:
            self.eval_loss.baseline(s.step)  # step 0 of a fresh run: the starting weights' eval loss
        for micro_batches in self.optimizer_steps():
            step_start = time.perf_counter()
            if self.expert_engines is not None:  # the step's expert, the same on every rank
                self.expert_engines.use(self.plan.own_step(s.step + 1)[0])
            micro = [self.micro_step(batch, i) for i, batch in enumerate(micro_batches)]
            with self.timer.section("optimizer"):
                result = self.engine.step()
                if self.ema is not None:
                    self.ema.after_step(s.step + 1, result.updated)
            s.step, s.epoch_step = s.step + 1, s.epoch_step + 1
            self.after_step(step_start, micro, result)
            if s.stop_signal is not None:
                break
        if s.stop_signal is not None:  # after_step saved the checkpoint; no final sampling or eval
            self.metrics.close()
            self.log(self.stop_message(start, t0))
            return
        if s.nonfinite_in_row:  # no checkpoint of a skipped step (see maybe_save)
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
        else:  # the last update was skipped (maybe_save saves no such step)
            saved = f"no checkpoint of it (its update was skipped); {resume} from the newest one"
        return (
            f"stopped by {s.stop_signal} at step {s.step} of {self.total_steps} ({trained_range(start, s.step)}, "
            f"{time.perf_counter() - t0:.0f} s): {saved}"
        )

    def log_bad_samples(self) -> None:
        """Every rank's bad files with their failed loads, listed by rank 0 (the counts are already
        global: on_device sums them). A collective: every rank calls it."""
        listing = self.tracker.listing(self.tracker.gather())
        self.log(listing)

    # --- after a step: reduce, the non-finite policy, maybe save ------------------------------------

    def after_step(self, step_start: float, micro: list[MicroStats], result: StepResult) -> None:
        s = self.state
        with self.timer.section("logging"):
            outcome = self.reduce_step(micro, result)
            self.gather_window_samples(micro, outcome.skipped)
        sections = self.timer.reset()
        stats = StepStats(
            loss=outcome.loss, lr=result.lr, grad_norm=result.grad_norm, samples=outcome.samples,
            tokens=outcome.tokens, step_time=time.perf_counter() - step_start,
            data_wait=sections.pop("data_wait", 0.0), timesteps=None, per_sample_loss=None, sections=sections,
            skipped=outcome.skipped, flops=outcome.flops, ranks=self.world_size,
        )  # fmt: skip
        self.metrics.log_step(s.step, stats)
        if self.expert_engines is not None and not outcome.skipped:  # each A14B expert's own loss curve
            self.metrics.add_scalar(f"train/loss_{self.expert_engines.active}", outcome.loss, s.step)
        if outcome.skipped:
            self.apply_nonfinite_policy(outcome.loss, result.grad_norm)
        self.maybe_save(outcome.skipped)
        if s.stop_signal is not None:
            return  # this step's checkpoint (maybe_save), nothing else
        if self.eval_loss is not None:
            self.eval_loss.after_step(s.step)  # after the checkpoint: an eval never costs the run a save
        if self.validation is not None and self.validation.due_after_step(s.step) and s.step < self.total_steps:
            # After the step's checkpoint, so sampling never costs the run; the last step's follows
            # the final checkpoint (train).
            self.validate()

    def reduce_step(self, micro: list[MicroStats], result: StepResult) -> StepOutcome:
        """The step's loss, counts and stop requests summed over the ranks in one all-reduce, read on the
        host once: the one synchronisation a step makes besides the engine's gradient norm. The ranks
        agree on a stop there too (a signal may reach some ranks only, or at different steps); a signal
        landing after it is agreed on at the next step."""
        s = self.state
        loss_sum = micro[0].loss.double()
        for m in micro[1:]:  # in order, in float64: the sum a rank's losses have always had
            loss_sum = loss_sum + m.loss.double()
        stop = guard.stop_requested()
        host = [sum(len(m.timesteps) for m in micro), sum(m.tokens for m in micro), sum(m.flops for m in micro),
                float(stop == signal.SIGINT), float(stop == signal.SIGTERM)]  # fmt: skip
        summed = torch.cat([loss_sum.reshape(1), torch.tensor(host, dtype=torch.float64, device=self.device)])
        loss_total, samples, tokens, flops, sigint, sigterm = all_reduce_sum(summed)
        sp = self.layout.sp_size  # a sequence group's ranks each counted its samples (and their FLOPs) whole
        samples, tokens, flops = samples / sp, tokens / sp, flops / sp
        if sigint or sigterm:
            s.stop_signal = "SIGINT" if sigint else "SIGTERM"
        loss = loss_total / (self.accumulation * self.world_size)
        skipped = not result.updated or not math.isfinite(loss)
        s.nonfinite_in_row = s.nonfinite_in_row + 1 if skipped else 0
        return StepOutcome(loss, int(samples), int(tokens), flops, skipped)

    def gather_window_samples(self, micro: list[MicroStats], skipped: bool) -> None:
        """Loss by timestep, gathered from every rank once per log window (its last step, the run's last
        or a stop), not every step: the steps' own samples wait on the device until then. A skipped
        step's samples stay out, as Metrics leaves them out."""
        s = self.state
        if not skipped:
            samples = torch.cat([m.timesteps for m in micro]), torch.cat([m.per_sample_loss for m in micro])
            self.pending.append(samples)
        window_end = s.step % self.cfg.logging.log_every == 0 or s.step >= self.total_steps
        if (window_end or s.stop_signal is not None) and self.pending:
            timesteps = all_gather_cat(torch.cat([t for t, _ in self.pending])).cpu()
            per_sample = all_gather_cat(torch.cat([p for _, p in self.pending])).cpu()
            self.pending.clear()
            self.metrics.add_samples(timesteps, per_sample)

    def apply_nonfinite_policy(self, loss: float, grad_norm: float) -> None:
        """Say a skipped update; stop (TrainingStopped, every rank alike) after max_nonfinite_steps in a row."""
        t, s = self.cfg.train, self.state
        # fp16: a finite loss with an overflowing gradient is the loss scaler at work (it halves its
        # scale and skips); from 2^16 it may take up to 16 such steps to reach a scale that fits.
        overflow = t.mixed_precision == "fp16" and math.isfinite(loss)
        what = "loss scale overflow" if overflow else f"non-finite loss {loss} / grad norm {grad_norm}"
        self.metrics.log_text(f"step {s.step}: {what}: update skipped")
        if s.nonfinite_in_row >= t.max_nonfinite_steps + (16 if overflow else 0):
            raise TrainingStopped(
                f"{s.nonfinite_in_row} steps in a row had a non-finite loss or gradient (max_nonfinite_steps="
                f"{t.max_nonfinite_steps}); lower the learning rate or check the data and resume from the last "
                "checkpoint"
            )

    def maybe_save(self, skipped: bool) -> None:
        """A scheduled checkpoint, or the one a stop asks for, only ever of a finite step."""
        s, every = self.state, self.cfg.checkpoint.checkpointing_steps
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
        if s.stop_signal is not None and not skipped and s.last_saved != s.step:
            # Stopping: this step's checkpoint (a skipped update has none). What bounds the time a stop
            # takes: the rest of the step (a signal during an eval or sampling waits for it too) and the
            # save. torchrun SIGKILLs its ranks --shutdown_timeout seconds (TORCH_ELASTIC_SHUTDOWN_TIMEOUT,
            # 30 by default; launch/*.sh raise it) after passing a signal on, and SLURM KillWait / GraceTime
            # seconds after its SIGTERM.
            self.save_checkpoint()

    def validate(self) -> None:
        """Collective: sample the validation prompts with the current weights (train/validation.py)."""
        s = self.state
        if self.last_validated == s.step:  # the epoch's end fell on a validation step
            return
        started = time.perf_counter()
        with self.eval_weights():
            self.validation.run(s.step)
        self.last_validated = s.step
        if self.compile_watch is not None:
            self.report_compiles("validation sampling", time.perf_counter() - started)

    def save_checkpoint(self) -> None:
        """Collective: checkpoint-{step}, only ever after a finite step (the callers see to it)."""
        s = self.state
        self.checkpointer.save(s.step)
        s.save_due, s.last_saved = False, s.step


def trained_range(start: int, end: int) -> str:
    """What a run trained, resumed or not: "trained 50 steps (51-100)"."""
    count = end - start
    if count <= 0:
        return "trained no step"
    if count == 1:
        return f"trained 1 step ({end})"
    return f"trained {count} steps ({start + 1}-{end})"


def main(argv: list[str] | None = None) -> None:
    write_whole_lines()
    guard.install_stop_handlers()  # SIGINT / SIGTERM: quiet during setup, a checkpoint once training
    install_test_hooks_from_env()  # tests' fault injection (KILL_ENV); nothing without the variable
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
