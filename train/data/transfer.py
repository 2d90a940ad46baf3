"""Reused shared-memory buffers for batches that cross from DataLoader workers to the training process.

Why: one 81-frame 480x832 batch is 97 MB of uint8. Fresh shared memory for every batch costs the
worker ~24k page faults and the kernel's zeroing of every page, measured at 0.03 to 0.08 s per batch
on a 2-core CPU: a third of the decoding time (bench/data.py). Each worker instead keeps a few buffers
and writes the next batch into one the training process no longer reads.

The handshake: one flag per slot in shared memory, created before the workers start. A worker takes
a free slot (flag 0), marks it busy, decodes into it and sends it. In the training process the
received tensor gets a `weakref.finalize` that clears the flag once no tensor views the buffer any
more (the batch replaced by the next one, or pinned/copied to the device and dropped). So a buffer is
never overwritten while the training process can still read it; when every slot of a worker is busy
(the loop holds batches longer), the worker falls back to fresh memory: slower, never blocked, never
wrong.
"""

import math
import weakref

import torch
from torch.utils.data import get_worker_info


def _new_shared(num_bytes: int) -> torch.UntypedStorage:
    return torch.UntypedStorage._new_shared(num_bytes)  # what default_collate allocates in a worker


def _view(storage: torch.UntypedStorage, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8).set_(storage, 0, shape)


def empty_for_transfer(shape: tuple[int, ...]) -> torch.Tensor:
    """An uninitialised uint8 tensor: plain memory in the training process; fresh shared memory inside a
    DataLoader worker, so data written into it reaches the training process without a copy."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=torch.uint8)
    return _view(_new_shared(math.prod(shape)), shape)


def _release(busy: torch.Tensor, slot: int) -> None:
    busy[slot] = 0


def _receive(pixels: torch.Tensor, busy: torch.Tensor, slot: int) -> torch.Tensor:
    """Unpickled in the training process: the buffer, its slot freed when the last view is dropped."""
    weakref.finalize(pixels, _release, busy, slot)
    return pixels


class PooledPixels:
    """A pooled uint8 buffer on its way out of a worker; it arrives as a plain tensor."""

    def __init__(self, pixels: torch.Tensor, busy: torch.Tensor, slot: int):
        self.pixels, self.busy, self.slot = pixels, busy, slot

    def release(self) -> None:
        """Give the slot back unsent (the batch failed)."""
        _release(self.busy, self.slot)

    def __reduce__(self):
        return _receive, (self.pixels, self.busy, self.slot)


class TransferPool:
    """`slots_per_worker` reusable uint8 buffers per DataLoader worker (create it in the training process,
    before the workers start; it travels to them with the dataset). Enough slots cover what is in flight:
    `prefetch_factor` batches queued, one being pinned, one in the training step."""

    def __init__(self, num_workers: int, slots_per_worker: int):
        if num_workers < 1 or slots_per_worker < 1:
            raise ValueError(f"a transfer pool needs workers and slots, got {num_workers}, {slots_per_worker}")
        self.slots_per_worker = slots_per_worker
        self.busy = torch.zeros(num_workers * slots_per_worker, dtype=torch.int32).share_memory_()
        self._storages: dict[int, torch.UntypedStorage] = {}  # this worker's own buffers, made lazily

    def __getstate__(self) -> dict:
        return {"slots_per_worker": self.slots_per_worker, "busy": self.busy, "_storages": {}}

    def empty(self, shape: tuple[int, ...]) -> tuple[torch.Tensor, PooledPixels | None]:
        """An uninitialised uint8 buffer of `shape` and, inside a worker, the handle to send instead of it
        (None: plain memory, send the tensor itself)."""
        info = get_worker_info()
        if info is None:  # the training process itself loads: no transfer to save
            return empty_for_transfer(shape), None
        first = info.id * self.slots_per_worker
        free = [slot for slot in range(first, first + self.slots_per_worker) if self.busy[slot] == 0]
        if not free:  # the training process still holds every slot: fresh memory, never a wait
            return empty_for_transfer(shape), None
        num_bytes = math.prod(shape)
        # A free buffer that is large enough; else grow one (its old memory is free: nothing views it).
        fits = [slot for slot in free if slot in self._storages and self._storages[slot].nbytes() >= num_bytes]
        slot = fits[0] if fits else free[0]
        if not fits:
            self._storages[slot] = _new_shared(num_bytes)
        self.busy[slot] = 1
        pixels = _view(self._storages[slot], shape)
        return pixels, PooledPixels(pixels, self.busy, slot)
