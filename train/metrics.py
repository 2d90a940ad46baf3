"""Training metrics: TensorBoard scalars, console lines and a progress bar, all from rank 0.

The training loop builds one object per rank with `build_metrics`; only rank 0 gets a real `Metrics`,
the others a `NullMetrics` with the same methods, so the loop calls them without `if rank == 0`.

Steps are 1-based counts of finished optimizer steps: the first step of a fresh run is logged as 1,
the first step of a run resumed from a checkpoint taken after step N (`start_step=N`) as N + 1.

What goes to TensorBoard (folder `output_dir/tensorboard`), at every step unless said otherwise:
  train/loss, train/loss_smoothed   the step's global loss and its bias-corrected EMA
  train/lr, train/grad_norm
  train/samples_per_s               samples per second over all ranks
  train/tokens_per_s_global         video tokens (latent patches) per second over all ranks
  train/step_time_s, train/data_wait_s
  train/peak_memory_gib             on a GPU: CUDA max allocated since the previous step was logged (the
                                    peak is reset after each step's scalars; the console line shows the
                                    largest since its previous line); on a CPU: the process's peak RSS
                                    since it started (VmHWM, which is not reset)
  train/skipped_nonfinite           how many steps this run skipped for a non-finite loss or gradient
  perf/tflops                       achieved model TFLOP/s per GPU: the step's model FLOPs (forward x 3
                                    from its real shapes, recompute excluded: train/flops.py) / ranks
                                    / step time
  perf/mfu                          perf/tflops / the accelerator's dense bf16 peak (only when known:
                                    [logging] peak_tflops, or the GPU's name; never on a CPU)
  perf/tokens_per_s_per_gpu         train/tokens_per_s_global / ranks
  time/{name}_s                     the step's timed sections (see `StepTimer`), only on the steps that
                                    print a console line (`Metrics.times_sections`): timing them on a GPU
                                    synchronises it at each section edge, which the other steps skip
  loss_by_timestep/bin_{k:02d}      mean loss of the samples whose timestep fell in bin k, per window
                                    of `log_every` steps (see `Metrics.log_step`)
Written by the trainer through add_scalar / add_image / add_text, not every step:
  config (text)                     the resolved config, once at the start of a run
  validation/{i:03d} (image)        contact sheet of validation prompt i (train/validation.py)
  validation/{i:03d}_prompt (text)  its prompt and seed
  validation/seconds                wall time of a validation pass

TensorBoard is a side channel: when its writer fails (a full disk, its folder removed) the run says so
in one console line and writes no more events; training, the console lines and checkpoints go on.
"""

import contextlib
import math
import shutil
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter

from train.flow import timestep_bin

# Timesteps live in [0, NUM_TRAIN_TIMESTEPS) (Wan's flow matching scales sigma in [0, 1] by 1000).
NUM_TRAIN_TIMESTEPS = 1000
# The ETA averages this many recent step times: long enough to smooth noise, short enough to follow
# a change of pace (another bucket size, a slower stretch of data).
ETA_WINDOW = 20
BAR_WIDTH = 20

GIB = 2**30

# TensorBoard's writer thread re-raises a write error after storing it for the next add_scalar, and
# threading's default hook prints that as "Exception in thread ...". Each Metrics registers its writer's
# threads here with a list that collects their errors instead: the Metrics reports them in one line.
_WRITER_THREADS: "weakref.WeakKeyDictionary[threading.Thread, list[BaseException]]" = weakref.WeakKeyDictionary()
_previous_excepthook = threading.excepthook
_in_previous_hook = threading.local()


def _writer_thread_excepthook(args: threading.ExceptHookArgs) -> None:
    errors = _WRITER_THREADS.get(args.thread) if args.thread is not None else None
    if errors is not None:
        errors.append(args.exc_value)
        return
    if getattr(_in_previous_hook, "active", False):  # a hook installed over ours chained back to it
        threading.__excepthook__(args)
        return
    _in_previous_hook.active = True
    try:
        _previous_excepthook(args)
    finally:
        _in_previous_hook.active = False


def _start_summary_writer(log_dir: Path, purge_step: int, errors: list[BaseException]) -> SummaryWriter:
    """A SummaryWriter whose background threads report their errors into `errors`, not to stderr."""
    global _previous_excepthook
    if threading.excepthook is not _writer_thread_excepthook:  # once per process, chained to the hook before
        _previous_excepthook, threading.excepthook = threading.excepthook, _writer_thread_excepthook
    before = set(threading.enumerate())
    # purge_step=T hides every event with step >= T from earlier files of this folder; the first
    # step this run writes is start_step + 1. flush_secs below the default 120 s so a crash loses
    # less than a minute of points.
    writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step, flush_secs=30)
    for thread in set(threading.enumerate()) - before:
        if type(thread).__module__.startswith("tensorboard"):
            _WRITER_THREADS[thread] = errors
    return writer


def _memory_device(device: torch.device | str | None) -> torch.device | None:
    """The device whose memory is measured: `device`, or the current CUDA device once this process has
    initialised CUDA; None: the process's RSS."""
    if device is None and torch.cuda.is_available() and torch.cuda.is_initialized():
        device = torch.device("cuda", torch.cuda.current_device())
    return torch.device(device) if device is not None else None


def peak_memory_bytes(device: torch.device | str | None = None) -> int:
    """Peak memory of this process: CUDA max allocated on a CUDA device, else the peak resident set size.

    With no device: the current CUDA device once this process has initialised CUDA, else the RSS.

    The CUDA number is the caching allocator's high-water mark since the start of the process or the
    last `reset_peak_memory` (Metrics resets it after each step); it leaves out the allocator's cached
    but free blocks and other processes. The CPU number is VmHWM from /proc/self/status, which covers
    this process only, not its DataLoader workers, since the process started. 0 where neither can be read.
    """
    device = _memory_device(device)
    if device is not None and device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # the kernel reports kB
    except OSError:
        pass
    try:  # no procfs (macOS): getrusage reports bytes there, kB on Linux
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)
    except (ImportError, OSError):
        return 0


def reset_peak_memory(device: torch.device | str | None = None) -> None:
    """Start the CUDA high-water mark of peak_memory_bytes (same device rule) afresh from what is
    allocated now. Nothing on the CPU: the peak RSS cannot be reset."""
    device = _memory_device(device)
    if device is not None and device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


@dataclass
class StepStats:
    """One optimizer step, as the loop hands it to `Metrics.log_step`. Values are global: the loop
    all-reduced loss, samples and tokens over ranks."""

    loss: float
    lr: float
    grad_norm: float
    samples: int
    tokens: int
    step_time: float
    """Wall time of the whole step, data wait included."""
    data_wait: float = 0.0
    timesteps: torch.Tensor | Sequence[float] | None = None
    """The step's timesteps in [0, 1000), with `per_sample_loss` in the same order."""
    per_sample_loss: torch.Tensor | Sequence[float] | None = None
    sections: dict[str, float] | None = None
    """Seconds of the step's timed sections (see StepTimer)."""
    skipped: bool = False
    """The update was skipped for a non-finite loss or gradient."""
    flops: float = 0.0
    """Model FLOPs of the step over all ranks (forward x 3 from the real shapes, recompute excluded;
    train/flops.py); 0: no perf/ scalars."""
    ranks: int = 1
    """Ranks the step ran on: perf/ values are per GPU."""


class StepTimer:
    """Wall time of named sections of one training step, accumulated per name until `reset`.

    On a CUDA device a section measures the GPU work it queued only if the device is synchronised when
    the section starts and ends; that stops the CPU from queueing ahead of the GPU, so it is done only
    while `synchronize` is set: the trainer sets it for the steps whose sections are logged
    (`Metrics.times_sections`). Unset, a section on the GPU measures the time to queue its work (the
    step's total stays exact: the loss is read back every micro-step). On the CPU nothing is queued.
    """

    def __init__(self, device: torch.device | str | None = None) -> None:
        device = torch.device(device) if device is not None else None
        self._cuda = device if device is not None and device.type == "cuda" else None
        self.synchronize = False
        self._seconds: dict[str, float] = {}

    def _sync(self) -> None:
        if self.synchronize and self._cuda is not None:
            torch.cuda.synchronize(self._cuda)

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[None]:
        """Time the block under `name`; a name timed twice in a step (gradient accumulation) adds up."""
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self._seconds[name] = self._seconds.get(name, 0.0) + time.perf_counter() - start

    def reset(self) -> dict[str, float]:
        """The step's {name: seconds}, then start over for the next step."""
        seconds, self._seconds = self._seconds, {}
        return seconds


def _as_float_array(values: torch.Tensor | Sequence[float]) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().to("cpu", torch.float64).reshape(-1).numpy()
    return np.asarray(values, dtype=np.float64).reshape(-1)


def _format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}"


def _is_tty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class Metrics:
    """Rank 0's metrics: TensorBoard scalars, the progress bar or plain progress lines, console messages.

    `progress_bar=True` on a terminal redraws one line in place (with `\\r`) every step. Otherwise (a
    log file, a pipe, or `progress_bar=False`) a plain line is printed at the first step, every
    `log_every` steps and at the last step.

    `start_step` is the last step a resumed run's checkpoint holds: the bar and the TensorBoard step
    axis go on from there, and the writer's `purge_step=start_step + 1` makes TensorBoard hide the
    points that a crashed run wrote after its checkpoint, so a resumed run leaves no duplicates. A fresh
    run (start_step=0) purges from step 1, which hides a previous run's points left in the same folder.
    The EMA and the skipped-step counter start over on resume; bias correction makes a fresh EMA exact.
    """

    def __init__(
        self,
        output_dir: str | Path,
        *,
        rank: int = 0,
        total_steps: int,
        start_step: int = 0,
        log_every: int = 1,
        progress_bar: bool = True,
        loss_smoothing: float = 0.9,
        timestep_bins: int = 10,
        stream: TextIO | None = None,
        device: torch.device | str | None = None,
        log_dir: str = "tensorboard",
        peak_tflops: float | None = None,
    ) -> None:
        if rank != 0:
            raise ValueError(f"Metrics writes files and is for rank 0 only (got rank {rank}); use build_metrics")
        if total_steps < 1 or start_step < 0 or log_every < 1 or timestep_bins < 1:
            raise ValueError(
                f"need total_steps >= 1, start_step >= 0, log_every >= 1, timestep_bins >= 1; got "
                f"{total_steps}, {start_step}, {log_every}, {timestep_bins}"
            )
        if not 0.0 <= loss_smoothing < 1.0:
            raise ValueError(f"loss_smoothing is an EMA decay in [0, 1), got {loss_smoothing}")
        self.total_steps = total_steps
        self.peak_tflops = peak_tflops  # dense bf16 TFLOP/s of one GPU; None: no MFU
        self.start_step = start_step
        self.log_every = log_every
        self.loss_smoothing = loss_smoothing
        self.timestep_bins = timestep_bins
        # Looked up at construction, not at import, so a redirected sys.stdout (pytest's capsys) is honoured.
        self.stream = stream if stream is not None else sys.stdout
        # None: the current CUDA device once CUDA is in use, else the process RSS (see peak_memory_bytes).
        self.device = torch.device(device) if device is not None else None
        self.log_dir = Path(output_dir) / log_dir  # an absolute log_dir is used as is
        self._live_bar = progress_bar and _is_tty(self.stream)
        self._bar_line = ""  # the bar as last drawn, to redraw it under a log_text message
        self._writer_errors: list[BaseException] = []  # of the writer's thread (see _start_summary_writer)
        self.writer: SummaryWriter | None = None  # None once it failed: no more events
        try:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self.writer = _start_summary_writer(self.log_dir, start_step + 1, self._writer_errors)
        except Exception as err:  # a write of the first event: the same failure as any later one
            self._tensorboard_failed(err)

        self._ema = 0.0
        self._ema_count = 0
        self._first_smoothed: float | None = None
        self._last_smoothed: float | None = None
        self.skipped_nonfinite = 0
        self._step_times: deque[float] = deque(maxlen=ETA_WINDOW)
        self._steps_logged = 0
        self._last_step = start_step
        self._bin_sums = np.zeros(timestep_bins, dtype=np.float64)
        self._bin_counts = np.zeros(timestep_bins, dtype=np.int64)
        self._line_peak_gib = 0.0  # the largest step peak since the last progress line
        self._closed = False

    def log_step(self, step: int, stats: "StepStats") -> None:
        """Record one optimizer step. Values are global: the caller all-reduced loss, samples and tokens.

        step_time is the wall time of the whole step, data wait included: it gives the throughputs and
        the ETA. A step skipped for a non-finite loss or gradient (`skipped`, or a loss that is not
        finite) counts in train/skipped_nonfinite and stays out of train/loss, train/grad_norm, the EMA
        and the timestep bins; its timings and throughput are still written, since the time was spent.

        Loss by timestep: pass the step's timesteps in [0, 1000) with the per-sample losses (gathered
        from all ranks for the whole batch, or rank 0's own). Sums and counts per bin accumulate over a
        window of `log_every` steps, written at the window's last step (step % log_every == 0, or at
        close): with a few samples per step most bins see no sample in a given step, and a per-step
        write would leave them gappy and noisy. A bin with no sample in a window is not written.
        """
        if self._closed:
            raise RuntimeError("log_step after close")
        loss, lr, grad_norm, samples, tokens = stats.loss, stats.lr, stats.grad_norm, stats.samples, stats.tokens
        step_time, data_wait, skipped = stats.step_time, stats.data_wait, stats.skipped
        timesteps, per_sample_loss, sections = stats.timesteps, stats.per_sample_loss, stats.sections
        # float() also takes the 0-dim tensors an engine may hand back (a grad norm from clip_grad_norm_).
        loss, lr, grad_norm = float(loss), float(lr), float(grad_norm)
        skipped = skipped or not math.isfinite(loss)
        write = self._add_scalar
        prints_line = self._prints_line(step)

        if skipped:
            self.skipped_nonfinite += 1
        else:
            write("train/loss", loss, step)
            write("train/loss_smoothed", self._update_ema(loss), step)
            write("train/grad_norm", grad_norm, step)
            if timesteps is not None and per_sample_loss is not None:
                self._add_to_bins(timesteps, per_sample_loss)
        write("train/skipped_nonfinite", self.skipped_nonfinite, step)
        write("train/lr", lr, step)
        write("train/step_time_s", step_time, step)
        write("train/data_wait_s", data_wait, step)
        if step_time > 0:
            write("train/samples_per_s", samples / step_time, step)
            write("train/tokens_per_s_global", tokens / step_time, step)
        perf = self._perf(stats)
        for name, value in perf.items():
            write(f"perf/{name}", value, step)
        peak_gib = peak_memory_bytes(self.device) / GIB
        write("train/peak_memory_gib", peak_gib, step)
        reset_peak_memory(self.device)  # the next value is the next step's own peak
        self._line_peak_gib = max(self._line_peak_gib, peak_gib)
        if prints_line:  # times_sections(step), asked before the step ran
            for name, seconds in (sections or {}).items():
                write(f"time/{name}_s", seconds, step)

        # The first step of a run (or of a resume) carries compilation, allocator and loader warm-up.
        if self._steps_logged > 0:
            self._step_times.append(step_time)
        self._steps_logged += 1
        self._last_step = step

        window_end = step % self.log_every == 0
        if window_end:
            self._write_bins(step)

        line_peak = self._line_peak_gib
        if self._live_bar:
            self._bar_line = self._progress_line(
                step, loss, lr, grad_norm, samples, step_time, line_peak, bar=True, perf=perf
            )
            self._draw(self._bar_line)
            self._line_peak_gib = 0.0
        elif prints_line:
            line = self._progress_line(step, loss, lr, grad_norm, samples, step_time, line_peak, bar=False, perf=perf)
            self.stream.write(line + "\n")
            self.stream.flush()
            self._line_peak_gib = 0.0

    def _prints_line(self, step: int) -> bool:
        """A plain progress line: at the first step this object logs (a run's or a resume's), every
        log_every steps and at the last; asked before the step is logged."""
        return step % self.log_every == 0 or self._steps_logged == 0 or step >= self.total_steps

    def add_samples(self, timesteps: torch.Tensor, per_sample_loss: torch.Tensor) -> None:
        """Loss by timestep of samples the caller gathered itself (steps not skipped), counted in the
        current window like a step's own timesteps; the window is written at its last log_step."""
        self._add_to_bins(timesteps, per_sample_loss)

    def times_sections(self, step: int) -> bool:
        """Whether `step` logs its timed sections (time/*): the steps with a plain progress line, whether
        or not the bar replaces them. The trainer synchronises the GPU at each section edge of these
        steps only (see StepTimer)."""
        return self._prints_line(step)

    def _perf(self, stats: "StepStats") -> dict[str, float]:
        """Per-GPU throughput of the step: tflops (achieved model TFLOP/s), mfu (of peak_tflops, when
        known) and tokens_per_s_per_gpu; empty without FLOPs or time."""
        if not stats.flops or stats.step_time <= 0:
            return {}
        ranks = max(stats.ranks, 1)
        tflops = stats.flops / ranks / stats.step_time / 1e12
        out = {"tflops": tflops, "tokens_per_s_per_gpu": stats.tokens / ranks / stats.step_time}
        if self.peak_tflops:
            out["mfu"] = tflops / self.peak_tflops
        return out

    def _update_ema(self, loss: float) -> float:
        # Bias-corrected like Adam's moments: the raw EMA starts at 0 and would read low for the first
        # ~1/(1-beta) steps; dividing by 1 - beta^n makes the first smoothed value the first loss.
        beta = self.loss_smoothing
        self._ema = beta * self._ema + (1.0 - beta) * loss
        self._ema_count += 1
        smoothed = self._ema / (1.0 - beta**self._ema_count)
        if self._first_smoothed is None:
            self._first_smoothed = smoothed
        self._last_smoothed = smoothed
        return smoothed

    def _add_to_bins(self, timesteps: torch.Tensor | Sequence[float], losses: torch.Tensor | Sequence[float]) -> None:
        t = _as_float_array(timesteps)
        per_sample = _as_float_array(losses)
        if t.shape != per_sample.shape:
            raise ValueError(f"{t.size} timesteps but {per_sample.size} per-sample losses")
        keep = np.isfinite(t) & np.isfinite(per_sample)
        # The trainer's own binning, so bins mean the same everywhere; t = 1000 (sigma exactly 1) is
        # clamped into the last bin rather than opening an extra one.
        bins = timestep_bin(torch.from_numpy(t[keep]), self.timestep_bins, NUM_TRAIN_TIMESTEPS).numpy()
        np.add.at(self._bin_sums, bins, per_sample[keep])
        np.add.at(self._bin_counts, bins, 1)

    def _write_bins(self, step: int) -> None:
        for k in np.flatnonzero(self._bin_counts):
            self._add_scalar(f"loss_by_timestep/bin_{k:02d}", self._bin_sums[k] / self._bin_counts[k], step)
        self._bin_sums[:] = 0.0
        self._bin_counts[:] = 0

    def _add_scalar(self, tag: str, value: float, step: int) -> None:
        if self.writer is None:
            return
        try:
            self.writer.add_scalar(tag, value, step)
        except Exception as err:  # an OSError, or the writer thread's error re-raised as it was
            self._tensorboard_failed(err)

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        """One TensorBoard scalar outside the per-step set (validation/seconds, an eval loss)."""
        self._add_scalar(tag, float(value), step)

    def add_image(self, tag: str, image: np.ndarray, step: int) -> None:
        """An RGB uint8 image [H, W, 3] (a validation contact sheet) in TensorBoard's images tab."""
        if self.writer is None:
            return
        try:
            self.writer.add_image(tag, np.ascontiguousarray(image), step, dataformats="HWC")
        except Exception as err:  # as _add_scalar: the side channel fails quietly
            self._tensorboard_failed(err)

    def add_text(self, tag: str, text: str, step: int) -> None:
        """A text summary (markdown) in TensorBoard's text tab: a validation prompt, the run's config."""
        if self.writer is None:
            return
        try:
            self.writer.add_text(tag, text, step)
        except Exception as err:
            self._tensorboard_failed(err)

    def _tensorboard_failed(self, err: BaseException) -> None:
        """One console line, then no more events: a broken side channel must not stop the run."""
        writer, self.writer = self.writer, None
        self.log_text(
            f"TensorBoard: writing to {self.log_dir} failed ({type(err).__name__}: {err}); no more events are "
            "written this run, training goes on"
        )
        if writer is not None:  # stop its thread; the final flush fails again, quietly
            for file_writer in list((writer.all_writers or {}).values()):
                with contextlib.suppress(Exception):
                    file_writer.close()

    def _eta_seconds(self, step: int) -> float | None:
        if not self._step_times:
            return None
        return sum(self._step_times) / len(self._step_times) * max(self.total_steps - step, 0)

    def _progress_line(
        self,
        step: int,
        loss: float,
        lr: float,
        grad_norm: float,
        samples: int,
        step_time: float,
        peak_gib: float,
        *,
        bar: bool,
        perf: dict[str, float] | None = None,
    ) -> str:
        fraction = min(step / self.total_steps, 1.0)
        head = f"step {step}/{self.total_steps} {100 * fraction:3.0f}%"
        if bar:
            filled = int(fraction * BAR_WIDTH)
            head += " [" + "#" * filled + "." * (BAR_WIDTH - filled) + "]"
        eta = self._eta_seconds(step)
        # Most telling first: a narrow terminal cuts the bar's line from the right.
        parts = [head, "ETA " + (_format_duration(eta) if eta is not None else "?"), f"loss {loss:.4f}"]
        if self._last_smoothed is not None:
            parts.append(f"ema {self._last_smoothed:.4f}")
        if self.skipped_nonfinite:
            parts.append(f"skipped {self.skipped_nonfinite}")
        parts += [f"lr {lr:.2e}", f"grad {grad_norm:.3g}"]
        if step_time > 0:
            parts.append(f"{step_time:.2f} s/step {samples / step_time:.1f} samples/s")
        if perf:
            tflops = f"{perf['tflops']:.3g} TFLOP/s/GPU"
            parts.append(tflops + (f" MFU {100 * perf['mfu']:.1f}%" if "mfu" in perf else ""))
        parts.append(f"peak {peak_gib:.1f} GiB")
        return " | ".join(parts)

    def _draw(self, line: str) -> None:
        # A line longer than the terminal wraps, and \r would then redraw only its last row.
        width = shutil.get_terminal_size(fallback=(120, 24)).columns - 1
        self.stream.write("\r" + line[:width] + "\x1b[K")  # \x1b[K clears what a longer line left
        self.stream.flush()

    def log_text(self, message: str) -> None:
        """Print a console line; on a terminal the bar is cleared first and redrawn under the message."""
        if self._live_bar and self._bar_line:
            self.stream.write("\r\x1b[K" + message + "\n")
            self._draw(self._bar_line)
        else:
            self.stream.write(message + "\n")
            self.stream.flush()

    def first_and_last_smoothed(self) -> tuple[float | None, float | None]:
        """The first and latest smoothed loss of this run (None before a finite step was logged)."""
        return self._first_smoothed, self._last_smoothed

    def close(self) -> None:
        """Write a partial timestep window, flush and close the writer, end the bar's line. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._bin_counts.any():
            self._write_bins(self._last_step)
        if self.writer is not None:
            try:
                self.writer.close()
            except Exception as err:
                self._tensorboard_failed(err)
        if self.writer is not None and self._writer_errors:  # the thread failed on the last events
            self._tensorboard_failed(self._writer_errors[0])
        self.writer = None
        if self._live_bar and self._bar_line:
            self.stream.write("\n")
            self.stream.flush()


class NullMetrics:
    """What ranks other than 0 get: the methods of `Metrics`, doing nothing and writing nothing."""

    skipped_nonfinite = 0

    def log_step(self, step: int, stats: StepStats) -> None:
        pass

    def add_samples(self, timesteps: torch.Tensor, per_sample_loss: torch.Tensor) -> None:
        pass

    def times_sections(self, step: int) -> bool:
        return False  # nothing is logged here, so nothing is worth a GPU synchronisation

    def log_text(self, message: str) -> None:
        pass

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        pass

    def add_image(self, tag: str, image: np.ndarray, step: int) -> None:
        pass

    def add_text(self, tag: str, text: str, step: int) -> None:
        pass

    def first_and_last_smoothed(self) -> tuple[float | None, float | None]:
        return None, None

    def close(self) -> None:
        pass


def build_metrics(logging, output_dir: str | Path, *, rank: int, **options) -> Metrics | NullMetrics:
    """`Metrics` from the [logging] section (train.config.LoggingConfig) on rank 0, `NullMetrics`
    elsewhere; call it on every rank. `options` are the run's own (total_steps, start_step, ...)."""
    if rank != 0:
        return NullMetrics()
    section = {
        "log_every": logging.log_every, "progress_bar": logging.progress_bar, "loss_smoothing": logging.loss_smoothing,
        "timestep_bins": logging.timestep_bins, "log_dir": logging.logging_dir,
    }  # fmt: skip
    return Metrics(output_dir, **{**section, **options})
