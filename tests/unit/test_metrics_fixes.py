"""Metrics fixes of issue 17, item 10: the peak memory is each step's own, the step timer synchronises the
GPU only on the steps whose sections are logged, and the two token throughputs say whose they are.

No GPU here: where CUDA would answer, torch.cuda's functions are replaced by a stand-in that keeps a
high-water mark as CUDA's caching allocator does, or that counts synchronisations. What is tested is
the trainer's policy (when it reads, resets and synchronises), not CUDA."""

import contextlib
import io
import re

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from train_runs import base_args, data

from train.config import load_config
from train.main import Trainer
from train.metrics import GIB, Metrics, StepStats, StepTimer

__all__ = ["data"]  # a fixture

CUDA = torch.device("cuda", 0)


def read_scalars(output_dir) -> dict[str, dict[int, float]]:
    acc = EventAccumulator(str(output_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def stats(**overrides) -> StepStats:
    args = dict(loss=1.0, lr=1e-4, grad_norm=0.5, samples=8, tokens=8000, step_time=2.0, data_wait=0.25)
    args.update(overrides)
    return StepStats(**args)


def printed_steps(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"^step (\d+)/", text, flags=re.M)]


class CudaHighWaterMark:
    """torch.cuda's peak bookkeeping: max_memory_allocated is the largest allocation level since the
    last reset_peak_memory_stats, which restarts it from the current level."""

    def __init__(self) -> None:
        self.current = 0
        self.peak = 0

    def use(self, nbytes: int) -> None:  # a transient: allocated, then freed
        self.peak = max(self.peak, self.current + nbytes)

    def max_memory_allocated(self, device=None) -> int:
        assert torch.device(device) == CUDA
        return self.peak

    def reset_peak_memory_stats(self, device=None) -> None:
        assert torch.device(device) == CUDA
        self.peak = self.current


def test_peak_memory_is_each_steps_own_and_the_console_shows_the_largest_since_its_last_line(tmp_path, monkeypatch):
    gpu = CudaHighWaterMark()
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", gpu.max_memory_allocated)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", gpu.reset_peak_memory_stats)
    stream = io.StringIO()
    m = Metrics(tmp_path, rank=0, total_steps=4, log_every=2, progress_bar=False, stream=stream, device=CUDA)
    gpu.current = 2 * GIB  # what stays allocated (weights, optimizer state)
    transients = [8, 3, 1, 5]  # GiB above it at each step
    for step, extra in enumerate(transients, start=1):
        gpu.use(extra * GIB)
        m.log_step(step, stats())
    m.close()
    peaks = read_scalars(tmp_path)["train/peak_memory_gib"]
    assert [peaks[s] for s in (1, 2, 3, 4)] == [2 + extra for extra in transients]
    # Lines at steps 1, 2 (log_every) and 4 (the last): each the largest step peak since the line before.
    lines = stream.getvalue().splitlines()
    assert printed_steps(stream.getvalue()) == [1, 2, 4]
    assert [re.search(r"peak ([\d.]+) GiB", line).group(1) for line in lines] == ["10.0", "5.0", "7.0"]


def test_step_timer_synchronises_the_gpu_only_when_asked(monkeypatch):
    synced = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    timer = StepTimer(CUDA)
    for name in ("data_wait", "encode", "forward", "backward", "optimizer"):
        with timer.section(name):
            pass
    assert synced == []  # an ordinary step: the CPU queues ahead of the GPU
    timer.synchronize = True  # a step whose sections are logged
    with timer.section("forward"):
        pass
    assert synced == [CUDA, CUDA]  # at the start and at the end
    assert set(timer.reset()) == {"data_wait", "encode", "forward", "backward", "optimizer"}
    synced.clear()
    cpu = StepTimer(torch.device("cpu"))
    cpu.synchronize = True
    with cpu.section("forward"):
        pass
    assert synced == []  # nothing to wait for on the CPU


def test_section_times_are_logged_on_the_steps_with_a_console_line(tmp_path):
    stream = io.StringIO()
    m = Metrics(tmp_path / "a", rank=0, total_steps=7, log_every=3, progress_bar=False, stream=stream)
    for step in range(1, 8):
        m.log_step(step, stats(sections={"forward": 0.5, "backward": 1.0}))
    m.close()
    scalars = read_scalars(tmp_path / "a")
    lines = printed_steps(stream.getvalue())
    assert lines == [1, 3, 6, 7]
    assert sorted(scalars["time/forward_s"]) == lines == sorted(scalars["time/backward_s"])
    assert sorted(scalars["train/data_wait_s"]) == list(range(1, 8))  # the step's totals: every step
    # The trainer asks before each step which ones log their sections (and synchronises for those).
    m = Metrics(tmp_path / "b", rank=0, total_steps=7, log_every=3, progress_bar=True, stream=io.StringIO())
    asked = []
    for step in range(1, 8):
        asked.append(m.times_sections(step))
        m.log_step(step, stats())
    m.close()
    assert [step for step, yes in enumerate(asked, start=1) if yes] == lines


def test_token_throughputs_name_their_scope(tmp_path):
    m = Metrics(tmp_path, rank=0, total_steps=2, stream=io.StringIO(), progress_bar=False)
    m.log_step(1, stats(tokens=8000, step_time=2.0, flops=4e12, ranks=4))
    m.close()
    scalars = read_scalars(tmp_path)
    assert scalars["train/tokens_per_s_global"] == {1: pytest.approx(8000 / 2.0)}
    assert scalars["perf/tokens_per_s_per_gpu"] == {1: pytest.approx(8000 / 2.0 / 4)}
    assert not {"train/tokens_per_s", "perf/tokens_per_s"} & set(scalars)


class RecordingTimer(StepTimer):
    """The trainer's StepTimer as on a GPU, noting the synchronisations made in each step's forward."""

    def __init__(self, trainer: Trainer, synced: list) -> None:
        super().__init__(CUDA)
        self.trainer, self.synced = trainer, synced
        self.forward_syncs: dict[int, int] = {}

    @contextlib.contextmanager
    def section(self, name: str):
        before = len(self.synced)
        with super().section(name):
            yield
        if name == "forward":
            self.forward_syncs[self.trainer.state.step + 1] = len(self.synced) - before


def test_trainer_times_sections_on_the_logged_steps_with_low_vram(data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    cfg = load_config([*base_args(data, out), "--max_train_steps=4", "--log_every=3", "--checkpointing_steps=0",
                       "--gradient_checkpointing=none", "--low_vram=true"])  # fmt: skip
    trainer = Trainer(cfg)
    synced = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    trainer.timer = RecordingTimer(trainer, synced)
    trainer.train()
    scalars = read_scalars(out)
    assert trainer.timer.forward_syncs == {1: 2, 2: 0, 3: 2, 4: 2}  # first step, log_every, last
    assert sorted(scalars["time/forward_s"]) == [1, 3, 4]
    assert sorted(scalars["train/tokens_per_s_global"]) == [1, 2, 3, 4]
