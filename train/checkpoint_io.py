"""Byte-level I/O of training checkpoints: durable writes, checksums, JSON, safetensors and DCP.

Every file our checkpoints hold goes through `write_durably`: written to a temporary name, fsynced,
renamed, the folder fsynced, so a reader sees either no file or the whole file; its size and crc32 are
taken from the bytes as they go out (`size_and_crc32` hands them to the COMPLETE marker instead of
reading the file back). A write that runs out of room says so, with the bytes it needed.

Our own files are safetensors (written by wan.modules.safetensors_io's writer, tensor by tensor) or
JSON (refused when JSON would not give the value back unchanged). DCP's index is a pickle, read by a
restricted unpickler that builds only DCP's metadata classes (`read_dcp_metadata`, `load_dcp`), never
a blanket unpickle. The checkpoint protocol itself (folders, the marker, save and load) is
train.checkpoint's; this module knows nothing of it, so an engine's load reads its files here without
going back through the protocol.
"""

import errno
import json
import os
import pickle
import shutil
import zlib
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from wan.modules.safetensors_io import encode_header, read_header, read_tensor, write_safetensors_to

# ----------------------------------------------------------------------------------------------------
# Durable file writes, checksummed as they are written

# Errors of a write that ran out of room: the disk, a quota, or a file size limit; as a save's error says it.
NO_ROOM = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota full", errno.EFBIG: "file size limit reached"}

# (size, crc32) of each file write_durably wrote, by absolute path, taken from the bytes as they went
# out: a save takes its files' marker entries from here (size_and_crc32) instead of reading them back.
# Files not here (DeepSpeed's, DCP's, the consolidated export) are read back once after they are written.
_WRITTEN: dict[str, tuple[int, int]] = {}


class _Crc32Writer:
    """A file's write() that keeps the running crc32 and size of what passes through it."""

    def __init__(self, f):
        self.f, self.crc, self.size = f, 0, 0

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self.crc = zlib.crc32(view, self.crc)
        self.size += view.nbytes
        return self.f.write(view)


def fsync_dir(path: Path) -> None:
    # A rename is durable only once the directory holding the new entry is fsynced.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def free_bytes(path: Path) -> int | None:
    """Free bytes of the filesystem `path` is (or would be) on; None when no folder of it exists."""
    for folder in (path, *path.parents):
        if folder.exists():
            return shutil.disk_usage(folder).free
    return None


def held_bytes(folder: Path) -> int:
    """The disk space the files under `folder` hold (allocated blocks, not sizes); files that vanish
    while it counts (another rank removing them) count as 0."""
    held = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                held += os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                pass
    return held


def write_durably(path: Path, write: Callable[[Any], None], nbytes: int | None = None) -> None:
    """Write through `write(file)` to a temporary name, fsync, rename to `path`, fsync the folder:
    a reader sees either no file or the whole file. `nbytes` (the file's size, when known) goes into
    the error of a full disk. A failed write removes its temporary file."""
    part = path.with_name(path.name + ".part")
    try:
        with open(part, "wb") as f:
            out = _Crc32Writer(f)
            write(out)
            f.flush()
            os.fsync(f.fileno())
        os.replace(part, path)
    except BaseException as err:
        part.unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno in NO_ROOM:
            # No free space stated here: measured now, it would miss the blocks of other ranks' files of
            # this save, still open; the failed save's error (train.checkpoint) states it with them counted.
            need = f"{nbytes} bytes" if nbytes is not None else "its bytes"
            raise OSError(err.errno, f"{path}: {os.strerror(err.errno)} writing {need}") from err
        raise
    _WRITTEN[os.path.abspath(path)] = (out.size, out.crc)
    fsync_dir(path.parent)


def crc32_file(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return crc


def size_and_crc32(path: Path) -> tuple[int, int]:
    """(size, crc32) of a file just written, for the COMPLETE marker. Ours were checksummed as their bytes
    went out (write_durably); DeepSpeed's, DCP's and the consolidated export's are written by code that
    gives us no hook on its bytes, so they are read back once here."""
    size = path.stat().st_size
    recorded = _WRITTEN.pop(os.path.abspath(path), None)
    crc = recorded[1] if recorded is not None and recorded[0] == size else crc32_file(path)
    return size, crc


def forget_written(folder: Path) -> None:
    """Drop what write_durably recorded for files under `folder` and nobody took (a failed save's)."""
    prefix = os.path.abspath(folder) + os.sep
    for key in [k for k in _WRITTEN if k.startswith(prefix)]:
        del _WRITTEN[key]


def no_room_cause(err: BaseException) -> OSError | None:
    """The error of a write that ran out of room (NO_ROOM) that `err` is, or was raised from or during."""
    seen: list[BaseException] = []
    cause: BaseException | None = err
    while cause is not None and cause not in seen:
        if isinstance(cause, OSError) and cause.errno in NO_ROOM:
            return cause
        seen.append(cause)
        cause = cause.__cause__ or cause.__context__
    return None


# ----------------------------------------------------------------------------------------------------
# Safetensors and JSON files


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of a safetensors file (plain reads into fresh memory) and its metadata."""
    header, data_start = read_header(path)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        metadata = json.loads(f.read(n)).get("__metadata__") or {}
        tensors = {key: read_tensor(f, info, data_start) for key, info in header.items()}
    return tensors, metadata


def write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    """Write a safetensors file durably (temporary name, fsync, rename), streaming tensor by tensor."""
    encoded, data_size = encode_header(((key, t.dtype, t.shape) for key, t in tensors.items()), metadata)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_durably(path, lambda f: write_safetensors_to(f, encoded, tensors.values()), 8 + len(encoded) + data_size)


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file; ValueError naming it when it is missing or damaged."""
    if not path.is_file():
        raise ValueError(f"{path}: missing from the checkpoint")
    return _read_safetensors(path)


def write_json(path: Path, value: Any) -> None:
    """Write a JSON value durably; refuses values JSON would not give back unchanged."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json_bytes(value, path.name, path.stem)
    write_durably(path, lambda f: f.write(data), len(data))


def read_json(path: Path) -> Any:
    if not path.is_file():
        raise ValueError(f"{path}: missing from the checkpoint")
    return _read_json(path)


def fsync_tree(folder: Path) -> None:
    """fsync every file and folder under `folder` (for files written by a library, e.g. DeepSpeed or
    DCP, that does not fsync them itself)."""
    for path in sorted(folder.rglob("*"), reverse=True):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        elif path.is_dir():
            fsync_dir(path)
    fsync_dir(folder)


def check_json(value: Any, where: str) -> None:
    """Refuse anything JSON would not give back as it was (dict keys that are not strings come back
    as strings) or cannot write at all, naming the entry. Tuples come back as lists, which is fine."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            check_json(item, f"{where}[{i}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"{where} has the key {key!r} ({type(key).__name__}); JSON keys must be strings")
            check_json(item, f"{where}[{key!r}]")
    else:
        raise ValueError(f"{where} is a {type(value).__name__}, not a JSON value (dict, list, str, number, bool, None)")


def json_bytes(value: Any, file_name: str, what: str) -> bytes:
    try:
        check_json(value, what)
    except ValueError as err:
        raise ValueError(f"cannot write {file_name}: {err}") from None
    return (json.dumps(value, indent=1) + "\n").encode()


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON: {err}") from None


# ----------------------------------------------------------------------------------------------------
# Pickles in checkpoints, read without running code
#
# DCP's index (`dcp/.metadata`) is a plain pickle, and torch's FileSystemReader.read_metadata unpickles
# it blindly, as DefaultLoadPlanner does every non-tensor value of a DCP save (the optimizer's
# param_groups): a crafted checkpoint, its COMPLETE marker updated to match, would run code on every
# rank that resumes it. Every reader of a DCP folder (resume, verify, merge, sample) goes through
# read_dcp_metadata and load_dcp.

DCP_METADATA_FILE = ".metadata"  # DCP's name for the index rank 0 writes last

_UNPICKLE_ERRORS = (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError, IndexError, KeyError)


class RestrictedUnpickler(pickle.Unpickler):
    """Builds only what `allowed` maps (module, name) to; everything else is refused, naming it."""

    def __init__(self, file, path: Path, allowed: Callable[[str, str], Any], storage: Callable | None = None):
        super().__init__(file)
        self.path, self.allowed, self.storage = path, allowed, storage

    def find_class(self, module: str, name: str) -> Any:
        found = self.allowed(module, name)
        if found is None:
            raise pickle.UnpicklingError(
                f"{self.path}: refusing to unpickle {module}.{name} (not a class this file is expected to hold)"
            )
        return found

    def persistent_load(self, pid: Any) -> Any:
        if self.storage is None:
            raise pickle.UnpicklingError(f"{self.path}: unexpected persistent id {pid!r}")
        return self.storage(pid)


_DCP_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "MetadataIndex", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "StorageMeta", "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath", "Path"},
}  # fmt: skip


def _dcp_allowed(module: str, name: str) -> Any:
    """DCP's .metadata: its own dataclasses, sizes, dtypes and paths; nothing else."""
    if name in _DCP_CLASSES.get(module, ()):
        import importlib

        return getattr(importlib.import_module(module), name)
    if module == "torch" and name == "Size":
        return torch.Size
    if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
        return getattr(torch, name)
    if (module, name) == ("torch.serialization", "_get_layout"):
        return torch.serialization._get_layout  # a lookup of torch's layouts by name
    if (module, name) == ("collections", "OrderedDict"):
        return OrderedDict
    if module == "builtins" and name in ("set", "frozenset"):
        return {"set": set, "frozenset": frozenset}[name]
    return None


def read_dcp_metadata(folder: Path) -> Any:
    """The index (a torch.distributed.checkpoint Metadata) of DCP save `folder`, unpickled by a
    restricted unpickler that builds only DCP's own metadata classes, sizes, dtypes and paths.
    ValueError naming the file when it is missing, damaged or holds anything else (nothing in it runs)."""
    from torch.distributed.checkpoint.metadata import Metadata

    path = Path(folder) / DCP_METADATA_FILE
    if not path.is_file():
        raise ValueError(f"{path}: missing from the checkpoint (DCP's index, written last by rank 0)")
    with open(path, "rb") as f:
        try:
            metadata = RestrictedUnpickler(f, path, _dcp_allowed).load()
        except _UNPICKLE_ERRORS as err:
            raise ValueError(f"{path}: cannot read: {str(err).removeprefix(f'{path}: ')}") from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.state_dict_metadata, dict):
        raise ValueError(f"{path}: not a DCP index (holds a {type(metadata).__name__})")
    if not isinstance(metadata.storage_data, dict):
        raise ValueError(f"{path}: not a DCP index (no storage_data table)")
    return metadata


def load_dcp(state: dict, folder: Path, metadata: Any = None, *, no_dist: bool = False) -> None:
    """dcp.load of `state` from DCP save `folder`, with `metadata` (read_dcp_metadata's, read when None)
    as its index, and its non-tensor values read by torch.load(weights_only=True): nothing in the
    folder is unpickled blindly. A value that is not plain data is refused with a ValueError naming
    its file, on every rank alike."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._traverse import set_element
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.metadata import StorageMeta

    folder = Path(folder)
    if metadata is None:
        metadata = read_dcp_metadata(folder)

    class Reader(dcp.FileSystemReader):
        # The index read safely, above; never DCP's fallback to a per-rank `__{rank}.metadata`.
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            if kwargs.get("rank") is not None:
                raise ValueError(f"{folder}: per-rank DCP indexes are not read")
            if getattr(metadata, "storage_meta", None) is None:  # as FileSystemReader.read_metadata does
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    class Planner(dcp.DefaultLoadPlanner):
        def load_bytes(self, read_item: Any, value: Any) -> None:
            file = folder / metadata.storage_data[read_item.storage_index].relative_path
            try:
                obj = torch.load(value, map_location="cpu", weights_only=True)
            except (*_UNPICKLE_ERRORS, RuntimeError) as err:
                raise ValueError(f"{file}: cannot read {read_item.dest_index.fqn}: {err}") from None
            # DefaultLoadPlanner.load_bytes, but with weights_only=True (torch's is False).
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    try:
        dcp.load(state, storage_reader=Reader(os.fspath(folder)), planner=Planner(), no_dist=no_dist)
    except CheckpointException as err:
        # Collective loads report each rank's error wrapped; ours (a refused value) comes out plain.
        refused = [exc for exc, _ in err.failures.values() if isinstance(exc, ValueError)]
        if refused:
            raise ValueError(str(refused[0])) from None
        raise
