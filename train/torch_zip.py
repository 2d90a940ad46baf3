"""Reading torch.save'd zip files (DeepSpeed's .pt checkpoints) and other trusted-format pickles
without a blanket unpickle: a restricted unpickler builds only torch sizes, dtypes and devices, plain
containers, lazy tensor references (byte ranges read on demand) and inert stand-ins for DeepSpeed's
own classes, and refuses anything else by name. No code from the file runs, DeepSpeed need not be
installed, and nothing is read before it is used.
"""

import math
import pickle
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from train.checkpoint_io import RestrictedUnpickler  # one restricted unpickler, DCP's index uses it too


class Stub:
    """An inert stand-in for a DeepSpeed class found in a pickle (ZeroStageEnum, LossScaler,
    fragment_address, ...): it only records the arguments and state it is given."""

    def __new__(cls, *args: Any, **kwargs: Any) -> "Stub":
        obj = object.__new__(cls)
        obj.__dict__["args"] = args
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, dict):
            self.__dict__.update(state)
        elif isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):  # (state, slots)
            self.__dict__.update(state[0] or {})
            self.__dict__.update(state[1])
        else:
            self.__dict__["state"] = state

    def __repr__(self) -> str:
        return f"{type(self).__qualname__}{self.args or ''}"


_STUBS: dict[tuple[str, str], type] = {}


def _stub_class(module: str, name: str) -> type:
    key = (module, name)
    if key not in _STUBS:
        _STUBS[key] = type(name, (Stub,), {"__module__": module, "__qualname__": name})
    return _STUBS[key]


def _reconstructor(cls: type, base: type, state: Any) -> Stub:
    # copyreg._reconstructor, as protocol-0/1 pickles of plain objects call it; only stubs may be built.
    if not (isinstance(cls, type) and issubclass(cls, Stub)):
        raise pickle.UnpicklingError(f"refusing to reconstruct {cls!r}")
    return cls.__new__(cls)


_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool, "UntypedStorage": torch.uint8,
}  # fmt: skip


@dataclass(frozen=True)
class _StorageType:
    dtype: torch.dtype


@dataclass
class LazyStorage:
    """A storage inside a torch zip file: where its bytes are, not the bytes."""

    path: Path
    data_offset: int  # byte offset of the storage in the file
    dtype: torch.dtype
    numel: int


@dataclass
class LazyTensor:
    """A tensor of a torch zip file, read on demand (wholly or a flat range) with plain file reads."""

    storage: LazyStorage
    offset: int  # in elements of the storage
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def dtype(self) -> torch.dtype:
        return self.storage.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def _contiguous(self) -> bool:
        expected = 1
        for size, stride in zip(reversed(self.shape), reversed(self.stride), strict=True):
            if size != 1 and stride != expected:
                return False
            expected *= size
        return True

    def read_into(self, dst: torch.Tensor, start: int = 0) -> None:
        """Fill the flat tensor dst (this dtype) with elements [start, start + dst.numel()) of this
        (contiguous) tensor."""
        if not self._contiguous():
            raise ValueError(f"{self.storage.path}: a partition tensor is not contiguous (stride {self.stride})")
        if start < 0 or start + dst.numel() > self.numel or dst.dtype != self.dtype:
            raise ValueError(f"{self.storage.path}: read of {dst.numel()} elements at {start} outside {self.numel}")
        _read_storage(self.storage, self.offset + start, dst)

    def read(self) -> torch.Tensor:
        """The whole tensor, in fresh memory."""
        if self._contiguous():
            out = torch.empty(self.shape, dtype=self.dtype)
            _read_storage(self.storage, self.offset, out.reshape(-1))
            return out
        span = 1 + sum((n - 1) * s for n, s in zip(self.shape, self.stride, strict=True)) if self.numel else 0
        flat = torch.empty(span, dtype=self.dtype)
        _read_storage(self.storage, self.offset, flat)
        return flat.as_strided(self.shape, self.stride).clone()


def _read_storage(storage: LazyStorage, element: int, dst: torch.Tensor) -> None:
    count = dst.numel()
    if element + count > storage.numel:
        raise ValueError(f"{storage.path}: a tensor reaches past the end of its storage (file truncated?)")
    if count == 0:
        return
    with open(storage.path, "rb") as f:
        f.seek(storage.data_offset + element * storage.dtype.itemsize)
        view = dst.view(torch.uint8).numpy() if dst.dtype != torch.uint8 else dst.numpy()
        if f.readinto(view) != count * storage.dtype.itemsize:
            raise ValueError(f"{storage.path}: file ends inside a tensor (truncated?)")


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    return LazyTensor(storage, int(storage_offset), tuple(size), tuple(stride))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *state):
    return data


class _TensorType:
    """Stands for torch.Tensor / nn.Parameter as the `new_type` of _rebuild_from_type_v2."""


def _rebuild_from_type_v2(func, new_type, args, state):
    # torch pickles a tensor carrying Python attributes (DeepSpeed's ds_id on ZeRO-3 partitions) as
    # func(*args) re-typed to new_type with `state` set on it; the attributes are not needed.
    if func not in (_rebuild_tensor_v2, _rebuild_parameter) or new_type is not _TensorType:
        raise pickle.UnpicklingError(f"unexpected tensor rebuild {func!r} -> {new_type!r}")
    return func(*args)


def _torch_allowed(module: str, name: str) -> Any:
    """What a DeepSpeed checkpoint may contain: tensors (as lazy references), sizes, dtypes, plain
    containers, and DeepSpeed's own classes as inert stubs."""
    if module == "deepspeed" or module.startswith("deepspeed."):
        return _stub_class(module, name)
    if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
        return _rebuild_tensor_v2
    if module == "torch._utils" and name in ("_rebuild_parameter", "_rebuild_parameter_with_state"):
        return _rebuild_parameter
    if module == "torch" and name in _STORAGE_DTYPES:
        return _StorageType(_STORAGE_DTYPES[name])
    if (module, name) == ("torch._tensor", "_rebuild_from_type_v2"):
        return _rebuild_from_type_v2
    if (module, name) in (("torch", "Tensor"), ("torch.nn.parameter", "Parameter")):
        return _TensorType
    if module == "torch" and name == "Size":
        return torch.Size
    if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
        return getattr(torch, name)
    if module == "torch" and name == "device":
        return torch.device
    if (module, name) == ("collections", "OrderedDict"):
        return OrderedDict
    if module == "builtins" and name in ("set", "frozenset"):
        return {"set": set, "frozenset": frozenset}[name]
    if (module, name) == ("copyreg", "_reconstructor"):
        return _reconstructor
    if (module, name) == ("builtins", "object"):
        return object
    return None


def load_torch_zip(path: Path) -> Any:
    """The object a torch.save'd zip file holds, tensors replaced by LazyTensor references."""
    if not path.is_file():
        raise ValueError(f"{path}: missing")
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise ValueError(f"{path}: not a torch zip file (truncated, or saved in torch's legacy format)") from None
    with archive:
        names = archive.namelist()
        pkl = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pkl) != 1:
            raise ValueError(f"{path}: not a torch checkpoint (no single data.pkl inside)")
        prefix = pkl[0][: -len("data.pkl")]
        if prefix + "byteorder" in names and archive.read(prefix + "byteorder").strip() != b"little":
            raise ValueError(f"{path}: big-endian tensors are not supported")
        with open(path, "rb") as raw:

            def storage(pid: Any) -> LazyStorage:
                if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
                    raise pickle.UnpicklingError(f"{path}: unexpected persistent id {pid!r}")
                _, storage_type, key, _location, numel = pid
                if not isinstance(storage_type, _StorageType):
                    raise pickle.UnpicklingError(f"{path}: unexpected storage type {storage_type!r}")
                try:
                    info = archive.getinfo(f"{prefix}data/{key}")
                except KeyError:
                    raise ValueError(f"{path}: storage {key} is missing from the archive") from None
                if info.compress_type != zipfile.ZIP_STORED:
                    raise ValueError(f"{path}: storage {key} is compressed; torch never writes that")
                if info.file_size != numel * storage_type.dtype.itemsize:
                    raise ValueError(f"{path}: storage {key} has {info.file_size} bytes, expected {numel} elements")
                raw.seek(info.header_offset)
                header = raw.read(30)
                if header[:4] != b"PK\x03\x04":
                    raise ValueError(f"{path}: damaged zip entry for storage {key}")
                start = info.header_offset + 30 + int.from_bytes(header[26:28], "little")
                start += int.from_bytes(header[28:30], "little")
                return LazyStorage(path, start, storage_type.dtype, numel)

            try:
                with archive.open(pkl[0]) as f:
                    return RestrictedUnpickler(f, path, _torch_allowed, storage).load()
            except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError) as err:
                raise ValueError(f"{path}: cannot read: {err}") from None
