"""bench/gpu_check.py (`make gpu-check`) and the row selection / attention kernel of bench/gpu_step.py,
checked without a GPU: the time limits, the error line of a failed section, and the --tiny dry run of
every section on the CPU."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

import gpu_check  # noqa: E402
import gpu_step  # noqa: E402

import wan.modules.attention as attn  # noqa: E402


@pytest.mark.slow
def test_a_hung_section_is_stopped_at_its_limit_with_its_children(tmp_path):
    """A section that hangs (here: a child process that sleeps) is killed whole at its limit and
    reported as a timeout; nothing it started outlives it."""
    pid_file = tmp_path / "child.pid"
    child = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(300)"
    parent = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {child!r}]); time.sleep(300)"
    section = gpu_check.Section("hang", 1, lambda ctx: [sys.executable, "-c", parent], gpu_check.summarize_worker)
    ctx = gpu_check.Context(tiny=True, python=sys.executable, work=tmp_path, out_dir=tmp_path)
    log = []
    start = time.monotonic()
    result = gpu_check.run_section(section, ctx, 3.0, log.append)
    assert result.status == "timeout" and "stopped after 3 s" in result.numbers
    assert time.monotonic() - start < 30
    child_pid = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and Path(f"/proc/{child_pid}").exists():
        if Path(f"/proc/{child_pid}/stat").read_text().split(")")[-1].split()[0] == "Z":
            break  # a zombie waiting for init to reap it: no longer running
        time.sleep(0.1)
    alive = (
        Path(f"/proc/{child_pid}").exists()
        and Path(f"/proc/{child_pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    )
    assert not alive, "the hung section's child process survived its timeout"


@pytest.mark.slow
def test_a_failed_section_names_the_root_cause_not_the_launcher(tmp_path):
    """A crashing rank under torchrun: the table shows the rank's exception, not ChildFailedError."""
    script = (
        "import sys\n"
        "print('[rank0]: RuntimeError: aten.empty.memory_format encountered during backward but not found in storage.')\n"
        "print('torch.distributed.elastic.multiprocessing.errors.ChildFailedError: ')\n"
        "sys.exit(1)\n"
    )
    section = gpu_check.Section("crash", 30, lambda ctx: [sys.executable, "-c", script], gpu_check.summarize_train)
    ctx = gpu_check.Context(tiny=True, python=sys.executable, work=tmp_path, out_dir=tmp_path)
    result = gpu_check.run_section(section, ctx, 60.0, lambda text: None)
    assert result.status == "FAIL"
    assert (
        result.numbers == "RuntimeError: aten.empty.memory_format encountered during backward but not found in storage."
    )


def test_a_section_whose_input_is_missing_is_skipped_with_the_reason(tmp_path):
    section = gpu_check.SECTIONS[[s.name for s in gpu_check.SECTIONS].index("sample-low-memory")]
    ctx = gpu_check.Context(tiny=True, python=sys.executable, work=tmp_path, out_dir=tmp_path)
    result = gpu_check.run_section(section, ctx, 60.0, lambda text: None)
    assert result.status == "skip" and "train-ddp-bf16/checkpoint-2" in result.numbers


def test_the_sections_fit_the_gpu_budget_and_cover_the_issue():
    names = [s.name for s in gpu_check.SECTIONS]
    assert sum(s.gpu_share_s for s in gpu_check.SECTIONS) <= 8.5 * 60
    for engine in ("ddp-bf16", "ddp-fp16", "zero2-bf16", "zero3-bf16", "fsdp-bf16"):
        assert any(n.startswith(f"train-{engine}") for n in names), engine
    assert {"env", "pytest-gpu", "sample-low-memory", "bench-cache-1.3B-480p"} <= set(names)
    rows = " ".join(
        " ".join(s.command(gpu_check.Context(False, "python3", Path("/w"), Path("/o")))) for s in gpu_check.SECTIONS
    )
    for key in ("1.3B:480p:ours:none:off", "1.3B:480p:ours:full:off", "1.3B:480p:ours:selective:off",
                "1.3B:480p:ours:none:on", "1.3B:480p:ours:full:on", "1.3B:480p:ours:selective:on",
                "14B:720p:ours:selective:on", "1.3B:480p:diffusers:full:off"):  # fmt: skip
        assert key in rows, key


def test_gpu_step_runs_only_the_chosen_rows_with_the_trainers_attention_kernel(tmp_path, capsys):
    saved = attn._choice
    try:
        out = tmp_path / "rows.json"
        gpu_step.main(["--rows", "14B:*:ours:selective:off", "--attention_backend", "math", "--warmup", "0",
                       "--repeats", "1", "--json", str(out)])  # fmt: skip
        assert attn.attention_backend() == "math"  # the kernel every attention call of the rows ran
    finally:
        attn._choice = saved
    rows = json.loads(out.read_text())
    assert [r["key"] for r in rows] == ["14B:480p:ours:selective:off", "14B:720p:ours:selective:off"]
    assert all(r["status"] == "ok" and r["s_per_step"] > 0 for r in rows)
    printed = capsys.readouterr().out
    assert "attention: math (cpu; attention_backend = 'math')" in printed
    assert printed.count("| toy-14B |") == 2 and "| toy-1.3B |" not in printed


def test_gpu_step_refuses_a_bad_row_and_a_kernel_the_device_lacks(capsys):
    with pytest.raises(SystemExit):
        gpu_step.main(["--rows", "1.3B:480p:ours:partial"])
    assert "checkpointing must be one of none, full, selective, selective+matmuls or *, got 'partial'" in (
        capsys.readouterr().err
    )
    saved = attn._choice
    try:
        with pytest.raises(SystemExit):
            gpu_step.main(["--attention_backend", "cudnn", "--quick"])
    finally:
        attn._choice = saved
    assert "cuDNN attention runs on CUDA GPUs only" in capsys.readouterr().err


@pytest.mark.slow  # ~100 s on 2 cores (~4 min when they are busy): 14 processes (torchrun, DeepSpeed, the benches)
@pytest.mark.heavy
def test_tiny_dry_run_runs_every_section_without_a_failure(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "bench/gpu_check.py", "--tiny", "--out_dir", str(tmp_path)], cwd=REPO, env=env,
        capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    results = {r["section"]: r for r in json.loads((tmp_path / "gpu-check.json").read_text())}
    assert list(results) == [s.name for s in gpu_check.SECTIONS]
    bad = {n: r for n, r in results.items() if r["status"] not in ("ok", "skip")}
    assert not bad, f"{bad}\n{(tmp_path / 'gpu-check.log').read_text()[-6000:]}"
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # Nothing skipped on the CPU: every section has a CPU analogue.
    assert all(r["status"] == "ok" for r in results.values()), results
    table = (tmp_path / "gpu-check.md").read_text()
    assert table in proc.stdout
    for name in results:
        assert f"| {name} | ok |" in table
    numbers = {n: r["numbers"] for n, r in results.items()}
    for name in ("train-ddp-bf16", "train-ddp-fp16", "train-zero2-bf16", "train-zero3-bf16", "train-fsdp-bf16-compile"):
        assert "s/step" in numbers[name] and "peak" in numbers[name] and "loss" in numbers[name], numbers[name]
    assert "validation 1 of 1 videos" in numbers["train-ddp-bf16"] and "eval loss" in numbers["train-zero3-bf16"]
    assert "passed" in numbers["pytest-gpu"] and "attention cases, worst" in numbers["pytest-gpu"]
    assert "1 video in" in numbers["sample-low-memory"]
    for name in (n for n in results if n.startswith("bench-")):
        assert "s/step" in numbers[name], numbers[name]
    assert "cached" in numbers["bench-cache-1.3B-480p"] and "precompute" in numbers["bench-cache-1.3B-480p"]
