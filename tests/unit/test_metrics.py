"""train.metrics: TensorBoard scalars read back from the event files, console and bar output, StepTimer, resume."""

import io
import math
import time

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from train.config import LoggingConfig
from train.metrics import Metrics, NullMetrics, StepStats, StepTimer, build_metrics, peak_memory_bytes


def read_scalars(output_dir) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} as TensorBoard shows them (stale points of a crashed run purged)."""
    acc = EventAccumulator(str(output_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def step_args(**overrides) -> dict:
    args = dict(loss=1.0, lr=1e-4, grad_norm=0.5, samples=8, tokens=8000, step_time=2.0, data_wait=0.25)
    args.update(overrides)
    return args


def log(metrics, step: int, **stats) -> None:
    metrics.log_step(step, StepStats(**stats))


class TTYStringIO(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_step_scalars_and_smoothed_loss(tmp_path):
    m = Metrics(tmp_path, rank=0, total_steps=10, loss_smoothing=0.9, stream=io.StringIO())
    losses = [2.0, 1.0, 0.5]
    for step, loss in enumerate(losses, start=1):
        log(m, step, **step_args(loss=loss, lr=1e-4 * step), sections={"forward": 0.5, "backward": 1.0})
    first, last = m.first_and_last_smoothed()
    m.close()
    s = read_scalars(tmp_path)

    assert s["train/loss"] == [(1, 2.0), (2, 1.0), (3, 0.5)]
    assert [step for step, _ in s["train/lr"]] == [1, 2, 3]
    assert [v for _, v in s["train/lr"]] == pytest.approx([1e-4, 2e-4, 3e-4], rel=1e-6)
    assert s["train/grad_norm"] == [(1, 0.5), (2, 0.5), (3, 0.5)]
    assert [v for _, v in s["train/samples_per_s"]] == pytest.approx([4.0] * 3)
    assert [v for _, v in s["train/tokens_per_s_global"]] == pytest.approx([4000.0] * 3)
    assert [v for _, v in s["train/step_time_s"]] == pytest.approx([2.0] * 3)
    assert [v for _, v in s["train/data_wait_s"]] == pytest.approx([0.25] * 3)
    assert [v for _, v in s["time/forward_s"]] == pytest.approx([0.5] * 3)
    assert [v for _, v in s["time/backward_s"]] == pytest.approx([1.0] * 3)
    assert all(v > 0 for _, v in s["train/peak_memory_gib"])
    assert s["train/skipped_nonfinite"] == [(1, 0.0), (2, 0.0), (3, 0.0)]

    # Bias-corrected EMA, beta 0.9: sum_i beta^(n-i) (1-beta) loss_i / (1 - beta^n).
    b = 0.9
    expected = [
        2.0,
        (b * 0.1 * 2.0 + 0.1 * 1.0) / (1 - b**2),
        (b**2 * 0.1 * 2.0 + b * 0.1 * 1.0 + 0.1 * 0.5) / (1 - b**3),
    ]
    assert [step for step, _ in s["train/loss_smoothed"]] == [1, 2, 3]
    assert [v for _, v in s["train/loss_smoothed"]] == pytest.approx(expected, rel=1e-6)
    assert first == pytest.approx(2.0) and last == pytest.approx(expected[2])


def test_loss_by_timestep_accumulates_over_the_window(tmp_path):
    m = Metrics(tmp_path, rank=0, total_steps=10, log_every=2, timestep_bins=10, stream=io.StringIO())
    log(m, 1, **step_args(), timesteps=[50.0, 150.0, 950.0], per_sample_loss=[1.0, 2.0, 3.0])
    # Tensors as the trainer has them; 999.9 and exactly 1000 (sigma 1) both land in the last bin.
    log(
        m,
        2,
        **step_args(),
        timesteps=torch.tensor([60.0, 999.9, 1000.0]),
        per_sample_loss=torch.tensor([3.0, 5.0, 7.0]),
    )
    log(m, 3, **step_args(), timesteps=[420.0, 100.0], per_sample_loss=[4.0, 6.0])  # 100: bin 1's edge
    m.close()  # writes the partial window (step 3 alone) at step 3
    s = read_scalars(tmp_path)

    bins = {tag: points for tag, points in s.items() if tag.startswith("loss_by_timestep/")}
    assert set(bins) == {"loss_by_timestep/bin_00", "loss_by_timestep/bin_01", "loss_by_timestep/bin_04",
                         "loss_by_timestep/bin_09"}  # fmt: skip
    assert bins["loss_by_timestep/bin_00"] == [(2, pytest.approx(2.0))]  # (1 + 3) / 2 across steps 1 and 2
    assert bins["loss_by_timestep/bin_01"] == [(2, pytest.approx(2.0)), (3, pytest.approx(6.0))]
    assert bins["loss_by_timestep/bin_09"] == [(2, pytest.approx(5.0))]  # (3 + 5 + 7) / 3
    assert bins["loss_by_timestep/bin_04"] == [(3, pytest.approx(4.0))]


def test_skipped_step_counts_and_stays_out_of_the_loss(tmp_path):
    m = Metrics(tmp_path, rank=0, total_steps=10, loss_smoothing=0.9, stream=io.StringIO())
    log(m, 1, **step_args(loss=2.0), timesteps=[100.0], per_sample_loss=[2.0])
    log(m, 2, **step_args(loss=float("nan"), grad_norm=float("inf")), skipped=True, timesteps=[100.0],
               per_sample_loss=[float("nan")])  # fmt: skip
    log(m, 3, **step_args(loss=1.0), timesteps=[100.0], per_sample_loss=[1.0])
    log(m, 4, **step_args(loss=float("inf")))  # a non-finite loss is skipped even when not flagged
    _, last = m.first_and_last_smoothed()
    m.close()
    s = read_scalars(tmp_path)

    assert s["train/loss"] == [(1, 2.0), (3, 1.0)]
    assert [step for step, _ in s["train/grad_norm"]] == [1, 3]
    assert s["train/skipped_nonfinite"] == [(1, 0.0), (2, 1.0), (3, 1.0), (4, 2.0)]
    assert [step for step, _ in s["train/lr"]] == [1, 2, 3, 4]  # the step still happened and took time
    expected = (0.9 * 0.1 * 2.0 + 0.1 * 1.0) / (1 - 0.9**2)  # the EMA of steps 1 and 3 only
    assert s["train/loss_smoothed"] == [(1, pytest.approx(2.0)), (3, pytest.approx(expected))]
    assert last == pytest.approx(expected)
    assert s["loss_by_timestep/bin_01"] == [(1, 2.0), (3, 1.0)]


def test_narrow_terminal_keeps_the_line_on_one_row(tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "40")
    stream = TTYStringIO()
    m = Metrics(tmp_path, rank=0, total_steps=4, stream=stream)
    log(m, 1, **step_args())
    m.close()
    (drawn,) = stream.getvalue().strip("\n").split("\r")[1:]
    assert len(drawn.removesuffix("\x1b[K")) == 39


def test_other_ranks_write_nothing(tmp_path, capsys):
    stream = io.StringIO()
    out = tmp_path / "out"
    m = build_metrics(LoggingConfig(), out, rank=1, total_steps=5, stream=stream)
    assert isinstance(m, NullMetrics)
    log(m, 1, **step_args(), timesteps=[1.0], per_sample_loss=[1.0], sections={"forward": 1.0})
    m.log_text("hello")
    assert m.first_and_last_smoothed() == (None, None)
    m.close()
    assert not out.exists()
    assert stream.getvalue() == ""
    assert capsys.readouterr() == ("", "")

    assert isinstance(build_metrics(LoggingConfig(), out, rank=0, total_steps=5, stream=stream), Metrics)
    with pytest.raises(ValueError, match="rank 0"):
        Metrics(tmp_path, rank=1, total_steps=5)


def test_plain_lines_when_not_a_tty(tmp_path):
    stream = io.StringIO()
    m = Metrics(tmp_path, rank=0, total_steps=5, log_every=2, stream=stream)
    log(m, 1, **step_args(loss=0.5, step_time=10.0))  # warm-up step: left out of the ETA
    for step in range(2, 6):
        log(m, step, **step_args(loss=0.25, step_time=1.0))
        if step == 3:
            m.log_text("checkpoint saved")
    m.close()
    lines = stream.getvalue().splitlines()

    assert "\r" not in stream.getvalue()
    # The first step, every log_every steps, the last step; log_text between them.
    assert [line.split()[1] for line in lines if line.startswith("step ")] == ["1/5", "2/5", "4/5", "5/5"]
    assert lines[2] == "checkpoint saved"
    assert "loss 0.5000" in lines[0] and "ETA ?" in lines[0]  # no ETA before a non-warm-up step time
    assert "loss 0.2500" in lines[3] and "ETA 0:00:01" in lines[3]  # mean 1 s/step x 1 step left
    assert lines[4].startswith("step 5/5 100% | ETA 0:00:00 | loss 0.2500 | ema ")


def test_bar_redrawn_in_place_on_a_tty(tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")  # the bar's line is cut to the terminal's width
    stream = TTYStringIO()
    m = Metrics(tmp_path, rank=0, total_steps=4, log_every=2, stream=stream)
    log(m, 1, **step_args())
    log(m, 2, **step_args())
    m.log_text("eval done")
    log(m, 3, **step_args())
    before_close = stream.getvalue()
    m.close()
    out = stream.getvalue()

    assert before_close.count("\r") >= 3
    assert before_close.count("\n") == 1  # only the message's; the bar stays on its line
    assert "\r\x1b[Keval done\n" in out  # the bar line is cleared before the message
    assert "step 2/4" in out.split("eval done\n")[1]  # and redrawn under it
    assert "step 3/4  75% [###############.....] | ETA 0:00:02 | loss 1.0000" in out
    assert out.endswith("\n")

    # progress_bar=False on a terminal prints plain lines instead.
    stream = TTYStringIO()
    m = Metrics(tmp_path / "plain", rank=0, total_steps=2, progress_bar=False, stream=stream)
    log(m, 1, **step_args())
    m.close()
    assert "\r" not in stream.getvalue() and stream.getvalue().startswith("step 1/2")


def test_step_timer_sections_accumulate():
    timer = StepTimer(torch.device("cpu"))
    with timer.section("forward"):
        time.sleep(0.01)
    with timer.section("forward"):
        time.sleep(0.01)
    with timer.section("optimizer"):
        time.sleep(0.01)
    seconds = timer.reset()
    assert set(seconds) == {"forward", "optimizer"}
    assert 0.018 <= seconds["forward"] < 0.5
    assert 0.009 <= seconds["optimizer"] < 0.5
    assert timer.reset() == {}


def test_peak_memory_cpu_is_the_process_peak_rss():
    peak = peak_memory_bytes(torch.device("cpu"))
    assert 10 * 2**20 < peak < 2**40  # a Python process with torch loaded holds well over 10 MiB


def test_resume_purges_points_past_start_step(tmp_path):
    m = Metrics(tmp_path, rank=0, total_steps=5, stream=io.StringIO())
    for step in range(1, 6):
        log(m, step, **step_args(loss=float(step)))
    m.close()
    # TensorBoard reads a folder's event files in name order, and the name starts with the creation
    # second; a real resume is a later process, so make the second file's name sort after the first.
    start = math.floor(time.time())
    while math.floor(time.time()) == start:
        time.sleep(0.02)

    # The run crashed after step 5 and resumes from its checkpoint of step 3.
    m = Metrics(tmp_path, rank=0, total_steps=5, start_step=3, stream=io.StringIO())
    for step in (4, 5):
        log(m, step, **step_args(loss=10.0 * step))
    m.close()
    s = read_scalars(tmp_path)

    assert s["train/loss"] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0)]
    assert [step for step, _ in s["train/lr"]] == [1, 2, 3, 4, 5]
