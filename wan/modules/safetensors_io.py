"""Sharded safetensors folders, as Hugging Face and the Wan releases lay them out.

Reading checks every file, key and shape before any tensor data is read, and lists every problem
at once; then tensors are read one at a time with plain file reads (no mmap) into fresh memory and
assigned into a module built on the meta device, so host memory never holds two copies of a model.
Writing shards by size and writes a matching `<weights_name>.index.json`.
"""

import json
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import save_file

from wan.modules.state_dict_io import Rename, assign_tensor, check_entries, identity, prepare_tensor

_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip


def parse_size(size: int | str) -> int:
    """'10GB' -> 10**9 * 10 bytes (GB = 1e9, GiB = 2**30, as Hugging Face counts); ints pass through."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", str(size))
    if not match or match.group(2).upper() not in _SIZE_UNITS:
        raise ValueError(f"cannot read a size from {size!r}; use bytes or e.g. '10GB', '500MiB'")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])


def index_name(weights_name: str) -> str:
    return weights_name + ".index.json"


def resolve_weight_files(folder: Path, weights_name: str) -> list[Path]:
    """The shard files of `folder`: from the index if there is one, else the single file."""
    index_path = folder / index_name(weights_name)
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{index_path}: not a safetensors index (needs a 'weight_map'): {err}") from None
        files = sorted(set(weight_map.values()))
        missing = [name for name in files if not (folder / name).is_file()]
        if missing:
            raise ValueError(f"{index_path} names shard files that are not in {folder}: {', '.join(missing)}")
        return [folder / name for name in files]
    single = folder / weights_name
    if single.is_file():
        return [single]
    found = sorted(p.name for p in folder.glob("*.safetensors"))
    raise ValueError(
        f"{folder}: neither {weights_name} nor {index_path.name} is there"
        + (f" (safetensors files present: {', '.join(found)})" if found else "")
    )


DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip


_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def read_header(path: Path) -> tuple[dict[str, dict], int]:
    """-> ({key: {dtype, shape, data_offsets}}, byte offset where tensor data starts)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n <= 0 or 8 + n > size:
            raise ValueError(f"{path}: not a safetensors file (header length {n}, file size {size})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: unreadable safetensors header: {err}") from None
    header.pop("__metadata__", None)
    for key, info in header.items():
        begin, end = info["data_offsets"]
        if info["dtype"] not in DTYPES:
            raise ValueError(f"{path}: key {key!r} has dtype {info['dtype']}, which this loader does not read")
        expected = math.prod(info["shape"]) * DTYPES[info["dtype"]].itemsize
        if end - begin != expected or 8 + n + end > size:
            raise ValueError(f"{path}: key {key!r} is truncated or corrupt (bytes {begin}..{end}, file size {size})")
    return header, 8 + n


def read_tensor(f, info: dict, data_start: int) -> torch.Tensor:
    """One tensor of an open safetensors file, given its header entry (see read_header)."""
    # Read straight into fresh (64-byte aligned) memory: no mmap keeps the file's pages resident
    # beside the copy, so a load peaks at one copy of the model.
    tensor = torch.empty(info["shape"], dtype=DTYPES[info["dtype"]])
    if tensor.numel():
        f.seek(data_start + info["data_offsets"][0])
        f.readinto(tensor.reshape(-1).view(torch.uint8).numpy())
    return tensor


def load_into_module(
    module: nn.Module,
    files: list[Path],
    rename: Rename = identity,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
) -> None:
    """Load the tensors of `files` into `module` (strict: every key once, every shape equal).

    rename maps a file key to the module's name, or None to skip the key. Floating tensors are
    cast to dtype unless it is None. The module may live on the meta device; see state_dict_io.
    """
    headers = {path: read_header(path) for path in files}
    entries = [(path.name, key, rename(key), info["shape"]) for path, (header, _) in headers.items() for key, info in header.items()]  # fmt: skip
    check_entries(module, entries, str(files[0].parent))
    for path, (header, data_start) in headers.items():
        with open(path, "rb") as f:
            for key, info in header.items():
                name = rename(key)
                if name is not None:
                    assign_tensor(module, name, prepare_tensor(read_tensor(f, info, data_start), dtype, device))


def save_sharded(
    state_dict: dict[str, torch.Tensor],
    folder: Path,
    weights_name: str,
    max_shard_size: int | str,
    dtype: torch.dtype | None = None,
) -> list[Path]:
    """Write state_dict as `weights_name`, or as numbered shards plus an index when it is larger than
    max_shard_size. Floating tensors are cast to dtype (unless None) one shard at a time. Files are
    written under temporary names and renamed, and weight files of an earlier save in `folder` are
    removed, so a folder never mixes two saves."""
    limit = parse_size(max_shard_size)

    def out_dtype(tensor: torch.Tensor) -> torch.dtype:
        return dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype

    def nbytes(tensor: torch.Tensor) -> int:
        return tensor.numel() * out_dtype(tensor).itemsize

    shards: list[list[str]] = [[]]
    size = 0
    for key, tensor in state_dict.items():
        if shards[-1] and size + nbytes(tensor) > limit:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes(tensor)

    folder.mkdir(parents=True, exist_ok=True)
    stem, ext = weights_name.rsplit(".", 1)
    if len(shards) == 1:
        names = [weights_name]
    else:
        names = [f"{stem}-{i + 1:05d}-of-{len(shards):05d}.{ext}" for i in range(len(shards))]
    for old in folder.glob(f"{stem}*.{ext}*"):
        old.unlink()
    paths = []
    for name, keys in zip(names, shards, strict=True):
        path = folder / name
        shard = {k: state_dict[k].detach().to(out_dtype(state_dict[k])).contiguous() for k in keys}
        save_file(shard, str(path) + ".tmp", metadata={"format": "pt"})
        del shard
        os.replace(str(path) + ".tmp", path)
        paths.append(path)
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(nbytes(t) for t in state_dict.values())},
            "weight_map": {key: name for name, keys in zip(names, shards, strict=True) for key in keys},
        }
        index_path = folder / index_name(weights_name)
        index_path.with_suffix(".tmp").write_text(json.dumps(index, indent=2))
        os.replace(index_path.with_suffix(".tmp"), index_path)
    return paths


@dataclass
class ShardItem:
    """One tensor of a streamed write: its name in the file and what it will be."""

    key: str  # the name in the output file
    name: str  # the official name
    shape: tuple[int, ...]
    dtype: torch.dtype  # output dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def plan_shards(items: list[ShardItem], limit: int, weights_name: str) -> list[tuple[str, list[ShardItem]]]:
    """(file name, items) per output file, split greedily by size in order as save_sharded does."""
    shards: list[list[ShardItem]] = [[]]
    size = 0
    for item in items:
        if shards[-1] and size + item.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += item.nbytes
    if len(shards) == 1:
        return [(weights_name, shards[0])]
    stem, ext = weights_name.rsplit(".", 1)
    return [(f"{stem}-{i + 1:05d}-of-{len(shards):05d}.{ext}", s) for i, s in enumerate(shards)]


def encode_header(
    entries: Iterable[tuple[str, torch.dtype, Sequence[int]]], metadata: Mapping[str, str] | None = None
) -> tuple[bytes, int]:
    """The encoded header (length prefix excluded) of a file holding `entries` (key, dtype, shape), in
    that order, and the size of the tensor data after it. Known up front, so a writer can state a
    file's size before writing it and stream the tensors one at a time."""
    metadata = metadata or {}
    bad = [key for key, value in metadata.items() if not isinstance(key, str) or not isinstance(value, str)]
    if bad:
        raise ValueError(f"safetensors metadata values must be strings; these are not: {', '.join(map(str, bad))}")
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for key, dtype, shape in entries:
        if dtype not in _DTYPE_NAMES:
            raise ValueError(f"tensor {key!r} has dtype {dtype}, which safetensors cannot store")
        nbytes = math.prod(shape) * dtype.itemsize
        header[key] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # tensor data starts 8-byte aligned, as safetensors writes it
    return encoded, offset


def write_safetensors_to(f: Any, encoded: bytes, tensors: Iterable[torch.Tensor]) -> None:
    """Write a safetensors file into the open binary file `f` (anything with write()): the length
    prefix, `encoded` (encode_header's, for these tensors in this order), then each tensor's bytes as
    `tensors` yields it. The library's save_file first copies every tensor into bytes, which would
    double host memory for a model; a generator here keeps one tensor in memory at a time."""
    f.write(len(encoded).to_bytes(8, "little"))
    f.write(encoded)
    for tensor in tensors:
        if tensor.numel():
            f.write(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())
        del tensor  # before the generator makes the next one


def write_safetensors_streaming(
    path: Path, items: list[ShardItem], produce: Callable[[ShardItem], torch.Tensor]
) -> None:
    """Write a safetensors file whose header comes from the plan, then each tensor as `produce` makes
    it (cast to its item's dtype), so only one tensor is in memory at a time. Temporary name, then
    rename: a reader never sees half a file."""
    encoded, _ = encode_header(((item.key, item.dtype, item.shape) for item in items), {"format": "pt"})

    def produced(item: ShardItem) -> torch.Tensor:
        tensor = produce(item)
        if tuple(tensor.shape) != item.shape:
            raise ValueError(f"{item.name}: read a tensor of shape {list(tensor.shape)}, expected {list(item.shape)}")
        return tensor.to(item.dtype)

    part = path.with_name(path.name + ".tmp")
    with open(part, "wb") as f:
        write_safetensors_to(f, encoded, (produced(item) for item in items))
        f.flush()
        os.fsync(f.fileno())
    os.replace(part, path)
