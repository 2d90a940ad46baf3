"""The run's processes: the rank layout built once from torchrun's environment and the config, the few
collectives the loop uses, and how a rank says a setup error and leaves.

`ParallelLayout` is in the spirit of torchtitan's ParallelDims: every part that needs to know where it
runs (the sampler, the engines, the planner, validation, the eval loss) reads it instead of asking
torch.distributed.
Two dimensions, data x sequence: rank r is sequence rank r % sp of data-parallel rank r // sp, so the
sp ranks of a sequence group (one sample, 1/sp of its tokens each: wan/modules/ulysses.py) are
neighbours, on one node whenever sp divides the GPUs of a node.
"""

from __future__ import annotations

import dataclasses
import datetime
import io
import os
import signal
import sys
import time
import typing
from dataclasses import dataclass

import torch
import torch.distributed as dist

# How long a rank other than local rank 0 waits before it says a setup error itself (see fail_setup).
SETUP_ERROR_WAIT_S = 10.0


@dataclass(frozen=True)
class ParallelLayout:
    """Where this process sits in the run."""

    world_size: int
    rank: int
    local_rank: int
    device: torch.device
    dp_size: int
    """Data-parallel ranks: each draws its own share of the global batch (world_size / sp_size)."""
    dp_rank: int
    host_group: dist.ProcessGroup | None = None
    """A gloo group for counts the host holds (bad samples, stop flags): reducing them takes no GPU
    synchronisation. None: the default group (single process, or gloo already)."""
    sp_size: int = 1
    """Ranks of a sequence group: they train the same samples, each on 1/sp_size of the tokens."""
    sp_rank: int = 0
    sp_group: dist.ProcessGroup | None = None
    """This rank's sequence group (None when sp_size is 1)."""
    sp_host_group: dist.ProcessGroup | None = None
    """The same ranks over gloo, for what the host sends (tensor shapes): no GPU synchronisation."""

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @staticmethod
    def single(device: torch.device) -> ParallelLayout:
        """One process on `device` (tests, tools)."""
        return ParallelLayout(world_size=1, rank=0, local_rank=0, device=device, dp_size=1, dp_rank=0)

    @staticmethod
    def planned(num_gpus: int, sp: int = 1) -> ParallelLayout:
        """Rank 0 of a run planned on `num_gpus` GPUs in sequence groups of `sp`, before any process
        exists (train.plan)."""
        return ParallelLayout(num_gpus, 0, 0, torch.device("cuda"), dp_size=num_gpus // sp, dp_rank=0, sp_size=sp)

    @staticmethod
    def of_process_group(device: torch.device) -> ParallelLayout:
        """The layout of a default process group set up elsewhere (tests' and benchmarks' own workers):
        data parallel over every rank, as init_distributed builds it; one process without a group."""
        if not dist.is_initialized():
            return ParallelLayout.single(device)
        rank, world_size = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        return ParallelLayout(world_size, rank, local_rank, device, dp_size=world_size, dp_rank=rank)


def init_distributed(backend: str, device: torch.device) -> ParallelLayout:
    """torchrun's environment -> the layout; a plain `python -m train.main` is one rank. `backend` is
    [parallel] backend: "auto" is nccl with GPUs, gloo without; `device` this rank's (train.config
    run_device)."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
    host_group = None
    if world_size > 1:
        backend = ("nccl" if cuda else "gloo") if backend == "auto" else backend
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
        if backend != "gloo":
            host_group = dist.new_group(backend="gloo", timeout=datetime.timedelta(minutes=30))
    return ParallelLayout(
        world_size=world_size, rank=rank, local_rank=local_rank, device=device, dp_size=world_size, dp_rank=rank,
        host_group=host_group,
    )  # fmt: skip


def apply_sequence_parallel(layout: ParallelLayout, sp: int) -> ParallelLayout:
    """The layout with sequence groups of `sp` consecutive ranks (collective: every rank makes every
    group, as torch.distributed.new_group requires). sp must divide the world size (check_run)."""
    if sp == 1:
        return layout
    assert layout.world_size % sp == 0, (layout.world_size, sp)
    mine = host = None
    for first in range(0, layout.world_size, sp):
        ranks = list(range(first, first + sp))
        group = dist.new_group(ranks)
        host_group = dist.new_group(ranks, backend="gloo") if layout.host_group is not None else group
        if first <= layout.rank < first + sp:
            mine, host = group, host_group
    return dataclasses.replace(
        layout, dp_size=layout.world_size // sp, dp_rank=layout.rank // sp, sp_size=sp, sp_rank=layout.rank % sp,
        sp_group=mine, sp_host_group=host,
    )  # fmt: skip


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> list[float]:
    """Sum `t` over the ranks and read it on the host: the one synchronisation it costs."""
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    if not dist.is_initialized():
        return t
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return torch.cat(out)


def all_gather_objects(value: typing.Any) -> list[typing.Any]:
    """Every rank's `value` (picklable), in rank order; [value] without a process group."""
    if not dist.is_initialized():
        return [value]
    out: list[typing.Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def write_whole_lines() -> None:
    """Each line of stdout and stderr in one write. Under PYTHONUNBUFFERED (or -u) `print` writes the
    text and its newline separately, so two ranks sharing torchrun's pipe interleave mid-line; a line
    of up to PIPE_BUF (4 KiB) bytes written at once stays whole."""
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(line_buffering=True, write_through=False)


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
