"""DeepSpeed's set-up on CPU (train/engines/deepspeed.py): no JIT-compiled shared-memory op (it was
rebuilt, ~80 s, whenever another checkout or environment had built it into the shared torch-extensions
folder), no repeated deprecation notices of the collectives it calls, and a single process (not under
torchrun) on a free port rather than on a fixed 29500 that a second such run would collide with."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist
from train_runs import data, free_port, torchrun

__all__ = ["data"]  # a fixture

REPO = Path(__file__).resolve().parents[2]

# One process as the engine starts DeepSpeed outside torchrun; prints what it ended up with.
SINGLE = """
import os, torch, torch.distributed as dist
from deepspeed.comm import comm
from train.engines.deepspeed import _init_distributed
_init_distributed(torch.device("cpu"))
print("world", dist.get_world_size(), "port", os.environ["MASTER_PORT"], "shm_op", comm.cdb.shm_comm_op)
"""


def run_single(env: dict, tmp_path: Path) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    environ.update({"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **env})
    return subprocess.run(
        [sys.executable, "-c", SINGLE], cwd=tmp_path, env=environ, capture_output=True, text=True, timeout=300
    )


def reported(proc: subprocess.CompletedProcess) -> dict[str, str]:
    """SINGLE's line (DeepSpeed prints its own lines too)."""
    assert proc.returncode == 0, proc.stderr[-3000:]
    words = next(line for line in proc.stdout.splitlines() if line.startswith("world ")).split(maxsplit=5)
    return dict(zip(words[::2], words[1::2], strict=True))


@pytest.mark.slow
def test_no_shared_memory_op_is_built_on_cpu(tmp_path):
    extensions = tmp_path / "torch_extensions"
    proc = run_single({"TORCH_EXTENSIONS_DIR": str(extensions), "MASTER_PORT": str(free_port())}, tmp_path)
    assert reported(proc)["shm_op"] == "None"
    assert "deepspeed_shm_comm" not in proc.stdout + proc.stderr
    assert not extensions.exists() or not any(extensions.iterdir())  # nothing compiled


@pytest.mark.slow
def test_a_single_process_takes_a_free_port_when_29500_is_taken_and_honours_master_port(tmp_path):
    try:  # what a first single-process run holds
        store = dist.TCPStore("127.0.0.1", 29500, 1, is_master=True, wait_for_workers=False)
    except (RuntimeError, OSError):
        store = None  # someone else holds the port: taken all the same
    try:
        proc = run_single({}, tmp_path)
    finally:
        del store
    got = reported(proc)
    assert got["world"] == "1" and got["port"] != "29500"
    port = str(free_port())
    assert reported(run_single({"MASTER_PORT": port}, tmp_path))["port"] == port


@pytest.mark.slow
def test_a_zero2_run_prints_no_collective_deprecation_notices(data, tmp_path):
    """torch marks all_gather_into_tensor / reduce_scatter_tensor deprecated; DeepSpeed calls them and
    each rank printed the notice 20-50 times a run."""
    run = torchrun(data, tmp_path, "--engine=zero2", "--max_train_steps=2", "--checkpointing_steps=100", nproc=2)
    out = run.stdout + run.stderr
    assert "step 2/2" in out  # it trained (and printed)
    assert "is deprecated" not in out
    assert "deepspeed_shm_comm" not in out
