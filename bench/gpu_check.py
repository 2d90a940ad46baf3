"""`make gpu-check`: every CUDA path of the project in one run of at most 8.5 minutes on one H100 or H200.

    python3 bench/gpu_check.py                     # on a GPU machine (make gpu-check does this)
    python3 bench/gpu_check.py --tiny              # the same sections on the CPU, tiny shapes (a dry run)
    python3 bench/gpu_check.py --sections train-ddp-bf16,sample-low-memory --out_dir /tmp/x

Each section runs as its own subprocess under its own time limit, so a hang or a crash costs that
section only. A section's limit is its share of the budget plus what the sections before it left
unused (less what stopping a timed-out one took beyond its limit, a few seconds), so the whole run
stays within the sum of the shares (510 s) whatever happens; the compiles at the end get the slack.
Sections:

    env                 torch, the device, the resolved "auto" attention kernel, the carried packages;
                        writes the synthetic demo dataset the training sections read
    pytest-gpu          `pytest -m gpu tests/**/test_gpu_*.py`: every attention backend (auto, cudnn,
                        flash, efficient, math, fa3 when importable) at the 1.3B 480p81 shapes, forward
                        and backward, self-attention and cross-attention with 512 and 257 keys, and
                        CLIP's head_dim of 80, against the math kernel in float32; validation sampling
                        on the device with its outcomes gathered over nccl; sequence parallel's
                        exchanges (wan/modules/ulysses.py) over a 1-rank nccl group
    train-*             train.main under torchrun, world size 1, the debug DiT, 2 steps: ddp bf16
                        (full checkpointing, validation sampling), ddp fp16 (loss scaler), zero2
                        (selective), zero3 (selective, eval loss at step 0, validation), fsdp
                        (selective + compile). DeepSpeed and FSDP make a 1-rank nccl group; ddp makes
                        none at one rank (nothing to all-reduce), as in the trainer. One GPU cannot
                        hold two nccl ranks (NCCL refuses a duplicate device), so 2-rank paths stay
                        the CPU suite's (gloo).
    sample-low-memory   tools/sample.py --low_memory on the ddp run's checkpoint
    bench-*             bench/gpu_step.py rows: 1.3B 480p81 full / selective / none with compile off
                        and on, one diffusers row, 14B width (4 blocks) 720p81 selective + compile
    bench-cache-*       bench/cache.py: the 1.3B at 480p81 trained online and from a precomputed cache
                        (release-size VAE and umT5-xxl, random weights): s/step, peak GiB, the
                        precompute's s/sample

The table (printed last, and written to OUT_DIR/gpu-check.md with the rows in gpu-check.json and every
section's output in gpu-check.log): section, status (ok, FAIL, skip, timeout), seconds, the limit it
ran under and its key numbers (s/step, MFU, peak GiB, attention errors, the error line of a FAIL).
Exit status 1 when a section failed or timed out.

--tiny runs the same sections on the CPU with gloo and tiny shapes (the toy widths of gpu_step.py, the
gpu tests on small tensors): a check of this script and of every command it runs, without a GPU.
There, compile in train.main is left off (inductor's C++ build takes minutes per shape on a CPU) and
the bench's compiled rows use the aot_eager backend; the attention kernels the CPU lacks are skipped
with the reason.
"""

import argparse
import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The whole run's budget on a GPU: 8.5 minutes (7.5 before the cache's section), leaving a session's 15
# minutes of device time its machine's start-up and the table.
GPU_BUDGET_S = 510.0
STATUSES = ("ok", "FAIL", "skip", "timeout")
MIN_LIMIT_S = 10.0  # a section's limit however little budget is left (a timed-out one's kill takes a few s)
# Set for the gpu tests: run on the CPU at tiny shapes instead of skipping (the --tiny dry run only).
CPU_TESTS_ENV = "WAN_GPU_TESTS_ON_CPU"
RESULT_PREFIX = "GPU_CHECK "  # a line a worker or a gpu test prints: GPU_CHECK {json}
DATA = "demo-data/metadata.json"  # the env section writes the demo dataset here, under the work folder


@dataclass
class Context:
    tiny: bool
    python: str
    work: Path  # scratch: the demo data, training outputs
    out_dir: Path

    @property
    def device(self) -> str:
        return "cpu" if self.tiny else "cuda"

    @property
    def data(self) -> Path:
        return self.work / DATA.split("/")[0]


@dataclass
class Section:
    name: str
    gpu_share_s: float  # its share of GPU_BUDGET_S
    command: Callable[[Context], list[str]]
    summarize: Callable[[str], str]  # the key numbers in its output
    needs: str = ""  # what it reads that an earlier section makes (a path under the work folder)
    output: str = ""  # the folder under the work folder it writes, emptied first (a reused --work_dir)
    tiny_note: str = ""  # what --tiny runs differently


@dataclass
class Result:
    section: str
    status: str
    seconds: float
    limit_s: float
    numbers: str


# ----------------------------------------------------------------------------------------------------
# Training runs


def train_command(name: str, *overrides: str) -> Callable[[Context], list[str]]:
    def command(ctx: Context) -> list[str]:
        base = [
            "--cfg", "configs/debug.toml", f"--train_data_dir={ctx.data}",
            f"--train_data_meta={ctx.data / 'metadata.json'}", f"--output_dir={ctx.work / name}",
            "--progress_bar=false", "--dataloader_num_workers=0", "--max_train_steps=2", "--checkpointing_steps=0",
            "--log_every=1", "--validation_prompts=[]", "--eval_holdout=0", "--resume_from_checkpoint=none",
        ]  # fmt: skip
        extra = [o for o in overrides if not (ctx.tiny and o == "--compile=true")]
        return [ctx.python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m", "train.main",
                *base, *extra]  # fmt: skip

    return command


def summarize_train(out: str) -> str:
    parts = []
    steps = re.findall(r"^step \d+/\d+ .*$", out, flags=re.MULTILINE)
    if steps:
        last = steps[-1]
        for pattern, fmt in ((r"([\d.]+) s/step", "{} s/step"), (r"MFU ([\d.]+%)", "MFU {}"),
                             (r"peak ([\d.]+) GiB", "peak {} GiB")):  # fmt: skip
            m = re.search(pattern, last)
            if m:
                parts.append(fmt.format(m.group(1)))
    m = re.search(r"smoothed loss: first ([\d.]+), last ([\d.]+)", out)
    if m:
        parts.append(f"loss {m.group(1)} -> {m.group(2)}")
    m = re.search(r"step \d+: eval loss ([\d.]+)", out)
    if m:
        parts.append(f"eval loss {m.group(1)}")
    m = re.search(r"validation at step \d+: (\d+ of \d+) videos", out)
    if m:
        parts.append(f"validation {m.group(1)} videos")
    compiles = re.findall(r"torch\.compile: .*?(\d+) so far", out)
    if compiles:
        parts.append(f"{compiles[-1]} compile(s)")
    m = re.search(r"^attention: (.*)$", out, flags=re.MULTILINE)
    if m:
        parts.append(f"attention {m.group(1)}")
    return "; ".join(parts)


# ----------------------------------------------------------------------------------------------------
# Workers: small in-process checks this file runs in a subprocess of its own (--worker NAME)


def worker_env(args: argparse.Namespace) -> int:
    """Versions, the device, the "auto" attention kernel; the demo dataset for the training sections."""
    import importlib.metadata

    import torch

    from tools.make_demo_data import make_demo_data
    from wan.modules.attention import device_label, resolve_attention_backend

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device is visible to torch (torch.cuda.is_available() is False)")
        return 1
    found, missing = [], []
    for package in ("deepspeed", "diffusers", "av", "ftfy"):
        try:
            __import__(package)
            found.append(f"{package} {importlib.metadata.version(package)}")
        except Exception as err:  # a broken install raises more than ImportError
            missing.append(f"{package} ({type(err).__name__}: {err})")
    name = f"{torch.cuda.get_device_name(device)} {device_label(device)}" if device.type == "cuda" else "CPU"
    auto = resolve_attention_backend("auto", device)
    print(f"device: {name}; torch {torch.__version__}; python {sys.version.split()[0]}")
    print(f"packages: {', '.join(found)}")
    make_demo_data(Path(args.data))
    numbers = f"{name}, torch {torch.__version__}, auto attention -> {auto}"
    if missing:
        print(f"error: not importable: {'; '.join(missing)} (make gpu-wheels; carry .whl)")
        numbers += f"; missing {', '.join(m.split()[0] for m in missing)}"
    print(RESULT_PREFIX + json.dumps({"numbers": numbers}))
    return 1 if missing else 0


def worker_sample(args: argparse.Namespace) -> int:
    """tools/sample.py --low_memory on a training checkpoint, with the device's peak memory."""
    import torch

    from tools.sample import main as sample_main

    device = torch.device(args.device)
    out = Path(args.sample_out)
    start = time.perf_counter()
    rc = sample_main([
        "--checkpoint", args.checkpoint, "--prompt", "a yellow square moves left", "--frames", "5", "--size", "64x64",
        "--steps", "2", "--low_memory", "--device", str(device), "--out", str(out),
    ])  # fmt: skip
    seconds = time.perf_counter() - start
    videos = sorted(out.glob("*.mp4"))
    if rc != 0 or not videos:
        print(f"error: tools.sample exited {rc} and wrote {len(videos)} videos")
        return 1
    numbers = f"{len(videos)} video in {seconds:.1f} s"
    if device.type == "cuda":
        numbers += f", device peak {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
    print(RESULT_PREFIX + json.dumps({"numbers": numbers}))
    return 0


WORKERS = {"env": worker_env, "sample": worker_sample}


def worker_command(name: str, **options: Callable[[Context], str]) -> Callable[[Context], list[str]]:
    def command(ctx: Context) -> list[str]:
        extra = [part for key, value in options.items() for part in (f"--{key}", value(ctx))]
        return [ctx.python, str(REPO / "bench" / "gpu_check.py"), "--worker", name, "--device", ctx.device, *extra]

    return command


def summarize_worker(out: str) -> str:
    results = [json.loads(line[len(RESULT_PREFIX) :]) for line in out.splitlines() if line.startswith(RESULT_PREFIX)]
    return results[-1]["numbers"] if results else ""


# ----------------------------------------------------------------------------------------------------
# The gpu tests and the step benchmark


def pytest_command(ctx: Context) -> list[str]:
    files = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").rglob("test_gpu_*.py"))
    return [ctx.python, "-m", "pytest", "-q", "-s", "-m", "gpu", "-p", "no:cacheprovider", *files]


def summarize_pytest(out: str) -> str:
    parts = []
    summary = re.findall(r"^=*\s*(.*\d+ (?:passed|failed|skipped|error).*?)\s*(?:in [\d.]+s.*)?=*$", out, re.MULTILINE)
    if summary:
        parts.append(summary[-1].strip(" ="))
    # pytest -s prints a test's lines right after its progress dot: the prefix may start mid-line.
    results = [json.loads(m.group(1)) for m in re.finditer(r"GPU_CHECK (\{.*\})\s*$", out, flags=re.MULTILINE)]
    errors = [r for r in results if "max_error" in r]
    if errors:
        worst = max(errors, key=lambda r: r["max_error"])
        parts.append(
            f"{len(errors)} attention cases, worst {worst['max_error']:.1e} ({worst['backend']} {worst['case']})"
        )
    backends = sorted({r["resolved"] for r in errors})
    if backends:
        parts.append("kernels " + "/".join(backends))
    return "; ".join(parts)


def pytest_status(out: str, rc: int) -> str:
    """pytest's outcome: skip when every gpu test skipped (no CUDA), else ok / FAIL by exit status."""
    if rc == 0 and re.search(r"\d+ passed", out) is None and re.search(r"\d+ skipped", out):
        return "skip"
    return "ok" if rc == 0 else "FAIL"


def bench_command(rows: str, warmup: int = 1, repeats: int = 2) -> Callable[[Context], list[str]]:
    def command(ctx: Context) -> list[str]:
        name = rows.replace(":", "-").replace(",", "_").replace("*", "all")
        cmd = [ctx.python, str(REPO / "bench" / "gpu_step.py"), "--device", ctx.device, "--rows", rows,
               "--warmup", str(warmup), "--repeats", str(repeats), "--json", str(ctx.work / f"bench-{name}.json")]  # fmt: skip
        if ctx.tiny:
            cmd += ["--compile_backend", "aot_eager"]
        return cmd

    return command


def summarize_bench(out: str) -> str:
    parts = []
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 11 or cells[0] in ("width", "---") or cells[0].startswith("-"):
            continue
        width, size, impl, mode, compiled, seconds, _, peak, _, _, mfu = cells
        what = f"{impl} {mode}{' +compile' if compiled == 'on' else ''}"
        if seconds == "OOM" or seconds.startswith("error"):
            parts.append(f"{what}: {seconds}")
            continue
        numbers = (
            [f"{seconds} s/step"] + ([f"MFU {mfu}"] if mfu != "-" else []) + ([f"{peak} GiB"] if peak != "-" else [])
        )
        parts.append(f"{what}: {', '.join(numbers)}")
    return "; ".join(parts)


def cache_command(ctx: Context) -> list[str]:
    """bench/cache.py: the 1.3B with the release-size VAE and umT5-xxl (random weights) on two 480 x 832 x 81
    clips, online and from the cache, 3 steps each after 1."""
    if ctx.tiny:
        return [ctx.python, str(REPO / "bench" / "cache.py"), "--setups", "debug", "--steps", "4", "--warmup", "1"]
    return [ctx.python, str(REPO / "bench" / "cache.py"), "--setups", "1.3B", "--size", "640", "--frames", "81",
            "--clips", "2", "--steps", "4", "--warmup", "1", "--precision", "bf16", "--workers", "0"]  # fmt: skip


def summarize_cache(out: str) -> str:
    rows = [line for line in out.splitlines() if re.match(r"\|\s*(debug|mid|1\.3B)\s*\|", line)]
    if not rows:
        return ""
    cells = [c.strip() for c in rows[-1].strip().strip("|").split("|")]
    _, online, cached, speedup, _, _, _, peak_online, peak_cached, _, precompute = cells
    return (
        f"online {online} s/step, cached {cached} s/step ({speedup}); peak {peak_online} -> {peak_cached} GiB; "
        f"precompute {precompute} s/sample"
    )


# ----------------------------------------------------------------------------------------------------
# The sections, in order; their GPU shares add up to GPU_BUDGET_S. The quick ones go first: what they
# leave unused goes to the compiles at the end.


def train_section(name: str, share_s: float, *overrides: str, tiny_note: str = "") -> Section:
    """train.main on the demo data, writing into work/<name> (a checkpoint at its last step)."""
    command = train_command(name, *overrides)
    return Section(name, share_s, command, summarize_train, needs=DATA, output=name, tiny_note=tiny_note)


def bench_section(name: str, share_s: float, rows: str, repeats: int = 1, tiny_note: str = "toy widths") -> Section:
    return Section(name, share_s, bench_command(rows, repeats=repeats), summarize_bench, tiny_note=tiny_note)


VALIDATION = ("--validation_prompts=a red ball rolls over green grass", "--validation_steps=2",
              "--validation_inference_steps=2")  # fmt: skip
SELECTIVE = "--gradient_checkpointing=selective"
COMPILED = "toy widths, aot_eager"
SECTIONS = [
    Section("env", 12, worker_command("env", data=lambda c: str(c.data)), summarize_worker, output="demo-data"),
    Section("pytest-gpu", 35, pytest_command, summarize_pytest, tiny_note="CPU tensors, tiny shapes"),
    train_section("train-ddp-bf16", 30, "--engine=ddp", "--gradient_checkpointing=full", *VALIDATION),
    train_section("train-ddp-fp16", 25, "--engine=ddp", "--mixed_precision=fp16", "--gradient_checkpointing=full"),
    train_section("train-zero2-bf16", 28, "--engine=zero2", SELECTIVE),
    # eval_holdout: the eval loss's no_grad forward at step 0 comes before the first selective backward.
    train_section(
        "train-zero3-bf16", 32, "--engine=zero3", SELECTIVE, "--eval_holdout=2", "--eval_steps=2", *VALIDATION
    ),  # fmt: skip
    train_section("train-fsdp-bf16-compile", 40, "--engine=fsdp", SELECTIVE, "--compile=true", tiny_note="compile off"),
    Section(
        "sample-low-memory",
        25,
        worker_command(
            "sample", checkpoint=lambda c: str(c.work / "train-ddp-bf16"), sample_out=lambda c: str(c.work / "samples")
        ),
        summarize_worker,
        needs="train-ddp-bf16/checkpoint-2",
        output="samples",
    ),  # fmt: skip
    # No checkpointing at 1.3B 480p81 needs ~119 GiB (OOM on an H100, fits an H200): reported as OOM.
    bench_section(
        "bench-1.3B-480p",
        38,
        "1.3B:480p:diffusers:full:off,1.3B:480p:ours:none:off,1.3B:480p:ours:full:off,1.3B:480p:ours:selective:off",
    ),  # fmt: skip
    bench_section(
        "bench-1.3B-480p-selective-compile", 55, "1.3B:480p:ours:selective:on", repeats=2, tiny_note=COMPILED
    ),
    bench_section("bench-14B-720p-selective-compile", 60, "14B:720p:ours:selective:on", tiny_note=COMPILED),
    bench_section("bench-1.3B-480p-full-compile", 40, "1.3B:480p:ours:full:on", tiny_note=COMPILED),
    bench_section("bench-1.3B-480p-none-compile", 30, "1.3B:480p:ours:none:on", tiny_note=COMPILED),
    # Training from a precomputed cache against online training (bench/cache.py).
    Section("bench-cache-1.3B-480p", 60, cache_command, summarize_cache, tiny_note="debug preset, demo data"),
]
assert sum(s.gpu_share_s for s in SECTIONS) <= GPU_BUDGET_S


# ----------------------------------------------------------------------------------------------------
# Running


def error_line(out: str) -> str:
    """The most telling error line of a failed section (the root cause, not torchrun's wrapper; the
    failed tests of pytest)."""
    failed = [line[len("FAILED ") :] for line in out.splitlines() if line.startswith("FAILED ")]
    if failed:
        return f"{len(failed)} failed, first {failed[0]}"[:300]
    found = ""
    for line in out.splitlines():
        line = re.sub(r"^\[rank\d+\]:\s*", "", line.strip())
        m = re.match(r"^(?:[\w.]+\.)?(\w*(?:Error|Exception|Interrupt)): (.+)$", line)
        if m and m.group(1) != "ChildFailedError":
            found = f"{m.group(1)}: {m.group(2)}"
        elif line.startswith("error: "):
            found = line
    return found[:300]


def run_section(section: Section, ctx: Context, limit_s: float, log) -> Result:
    """One section in a process group of its own, killed whole at the limit."""
    if section.needs and not (ctx.work / section.needs).exists():
        return Result(section.name, "skip", 0.0, limit_s, f"needs {section.needs}, which no earlier section made")
    if section.output:
        shutil.rmtree(ctx.work / section.output, ignore_errors=True)
    cmd = section.command(ctx)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    if ctx.tiny:
        env.update({CPU_TESTS_ENV: "1", "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "1"), "CUDA_VISIBLE_DEVICES": ""})
    log(f"\n===== {section.name} (limit {limit_s:.0f} s): {' '.join(cmd)}\n")
    start = time.monotonic()
    with tempfile.TemporaryFile("w+") as output:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=output, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)  # fmt: skip
        try:
            rc = proc.wait(timeout=limit_s)
            timed_out = False
            end_group(proc)  # a child the section left behind
        except subprocess.TimeoutExpired:
            stop_group(proc)
            rc, timed_out = proc.returncode, True
        seconds = time.monotonic() - start
        output.seek(0)
        out = output.read()
    log(out)
    numbers = section.summarize(out)
    if timed_out:
        status = "timeout"
    elif section.summarize is summarize_pytest:
        status = pytest_status(out, rc)
    else:
        status = "ok" if rc == 0 else "FAIL"
    if status in ("FAIL", "timeout"):
        why = error_line(out) if status == "FAIL" else f"stopped after {limit_s:.0f} s"
        numbers = "; ".join(filter(None, [numbers, why or f"exit status {rc}"]))
    if ctx.tiny and section.tiny_note:
        numbers = "; ".join(filter(None, [numbers, f"(tiny: {section.tiny_note})"]))
    return Result(section.name, status, seconds, limit_s, numbers)


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the section's process group (torchrun passes it on to its ranks), then SIGKILL to
    whatever of the group is left 5 s later (a rank stuck in a kernel, a compile worker)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)
    end_group(proc)


def end_group(proc: subprocess.Popen) -> None:
    """SIGKILL to what is left of a section's process group (its id outlives the leader while members
    remain): nothing of a section may hold the GPU while the next one runs."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def table(results: list[Result], header: str) -> str:
    lines = [header, "", "| section | status | seconds | limit s | key numbers |", "|---|---|---|---|---|"]
    for r in results:
        numbers = r.numbers.replace("|", "/")
        lines.append(f"| {r.section} | {r.status} | {r.seconds:.1f} | {r.limit_s:.0f} | {numbers} |")
    counts = {s: sum(r.status == s for r in results) for s in STATUSES}
    lines += [
        "",
        ", ".join(f"{n} {s}" for s, n in counts.items()) + f"; {sum(r.seconds for r in results):.0f} s in all",
    ]
    return "\n".join(lines) + "\n"


def run_check(args: argparse.Namespace) -> int:
    names = [s.name for s in SECTIONS]
    chosen = names if not args.sections else [n.strip() for n in args.sections.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in names]
    if unknown:
        raise SystemExit(f"error: unknown section(s) {', '.join(unknown)}; sections: {', '.join(names)}")
    if not args.tiny:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("error: no CUDA GPU here; --tiny runs the CPU dry run of the same sections")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    ctx = Context(tiny=args.tiny, python=args.python, work=work, out_dir=out_dir)
    log_path = out_dir / "gpu-check.log"
    results: list[Result] = []
    carried = 0.0  # budget the finished sections left unused (negative: a stopped one's kill overran it)
    scale = args.tiny_scale if args.tiny else 1.0
    with log_path.open("w") as log_file:

        def log(text: str) -> None:
            log_file.write(text)
            log_file.flush()

        for section in SECTIONS:
            if section.name not in chosen:
                continue
            share = section.gpu_share_s * scale
            result = run_section(section, ctx, max(MIN_LIMIT_S, share + carried), log)
            carried += share - result.seconds
            results.append(result)
            print(f"{result.section}: {result.status} in {result.seconds:.1f} s", flush=True)
    mode = "tiny CPU dry run (--tiny)" if args.tiny else "GPU"
    budget = sum(s.gpu_share_s * scale for s in SECTIONS if s.name in chosen)
    header = f"# gpu-check: {mode}, budget {budget:.0f} s"
    text = table(results, header)
    (out_dir / "gpu-check.md").write_text(text)
    (out_dir / "gpu-check.json").write_text(json.dumps([dataclasses.asdict(r) for r in results], indent=1) + "\n")
    print(text + f"\n(table: {out_dir / 'gpu-check.md'}; every section's output: {log_path})")
    if not args.keep and not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(r.status in ("ok", "skip") for r in results) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="the CPU dry run: gloo, tiny shapes")
    parser.add_argument("--sections", help=f"comma-separated subset of: {', '.join(s.name for s in SECTIONS)}")
    parser.add_argument("--out_dir", default="output/gpu-check", help="table, json and log (default output/gpu-check)")
    parser.add_argument("--work_dir", help="scratch folder kept afterwards (default: a temporary one, removed)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary scratch folder")
    parser.add_argument("--python", default=sys.executable, help="the interpreter the sections run")
    parser.add_argument("--tiny_scale", type=float, default=4.0,
                        help="--tiny: each section's limit is its GPU share times this (CPUs are slower)")  # fmt: skip
    # A worker: one in-process check, run by a section in its own subprocess.
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--sample_out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        sys.path.insert(0, str(REPO))
        return WORKERS[args.worker](args)
    return run_check(args)


if __name__ == "__main__":
    sys.exit(main())
