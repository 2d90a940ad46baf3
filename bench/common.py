"""What the benchmarks share: the peak memory of one call, and worker processes.

Each measurement runs in its own process so that peak memory is its own. For memory runs glibc
returns freed blocks to the OS at once, so the resident set follows live tensors; timing runs
without that setting, which slows allocation.
"""

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch

MEMORY_ENV = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")


def rss_bytes(field: str) -> int:
    """A size field of /proc/self/status (VmRSS, VmHWM, ...) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_peak(fn: Callable[[], object], device: torch.device) -> tuple[int, object]:
    """(peak bytes above the level before the call, fn's result). CUDA: max_memory_allocated;
    CPU: the peak resident set (VmHWM, reset through /proc/self/clear_refs)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        result = fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base, result
    Path("/proc/self/clear_refs").write_text("5")
    base = rss_bytes("VmRSS")
    result = fn()
    return rss_bytes("VmHWM") - base, result


def run_worker(script: str, args: list[str], memory: bool) -> dict:
    """Run `script args` in a fresh process; it prints one JSON line last, which is returned."""
    out = subprocess.run(
        [sys.executable, script, *args], env=MEMORY_ENV if memory else os.environ, capture_output=True, text=True
    )
    if out.returncode:
        sys.exit(f"worker {Path(script).name} {' '.join(args)} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])
