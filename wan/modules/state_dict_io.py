"""Strict loading of weights into a module, from any file format, with every problem listed.

A module may live on the meta device: tensors are assigned (parameters replaced), not copied into,
so a model built on meta is materialised by its own weights with one copy in memory.
"""

import json
import pickle
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import torch.nn as nn

Rename = Callable[[str], str | None]


def identity(key: str) -> str:
    return key


def check_entries(module: nn.Module, entries: list[tuple[str, str, str | None, list[int]]], where: str) -> None:
    """Refuse unless every module tensor appears exactly once with its shape.

    entries: (file name, key in the file, name in the module or None to skip, shape in the file).
    Raises ValueError naming every unexpected, duplicate, mis-shaped and missing key at once.
    """
    expected = module.state_dict(keep_vars=True)
    seen: dict[str, str] = {}
    problems: list[str] = []
    for file_name, key, name, shape in entries:
        if name is None:
            continue
        shape = list(shape)
        if name in seen:
            problems.append(f"{file_name}: key {key!r} ({name}) also appears in {seen[name]}")
        elif name not in expected:
            problems.append(f"{file_name}: unexpected key {key!r}" + (f" (read as {name!r})" if name != key else ""))
        elif list(expected[name].shape) != shape:
            problems.append(
                f"{file_name}: key {key!r} has shape {shape} in the file, the model expects {list(expected[name].shape)}"
            )
        seen[name] = file_name
    missing = [name for name in expected if name not in seen]
    if missing:
        files = ", ".join(sorted({entry[0] for entry in entries})) or where
        shown = ", ".join(missing[:20]) + (f" and {len(missing) - 20} more" if len(missing) > 20 else "")
        problems.append(f"missing from {files}: {shown}")
    if problems:
        raise ValueError(f"cannot load {where}:\n  " + "\n  ".join(problems))


def assign_tensor(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Put `tensor` in place of the parameter or buffer `name`, keeping requires_grad."""
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name)
    if leaf in owner._parameters:
        old = owner._parameters[leaf]
        owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=old.requires_grad)
    else:
        owner._buffers[leaf] = tensor


def prepare_tensor(tensor: torch.Tensor, dtype: torch.dtype | None, device: torch.device | str) -> torch.Tensor:
    """Cast floating tensors to dtype (None keeps them) and move to device, in fresh aligned memory:
    tensors read from files can sit at 16-byte offsets, where CPU kernels take other code paths
    (other roundings, slower loads)."""
    if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
        tensor = tensor.to(dtype)
    elif tensor.device.type == "cpu" and tensor.data_ptr() % 64:
        tensor = tensor.clone()
    return tensor.to(device)


def read_json_object(path: Path) -> dict:
    """A config.json as a dict; ValueError naming the file when it is not valid JSON or not an object."""
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON: {err}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return cfg


def load_pth(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a torch.save'd state dict safely (weights_only=True), memory-mapped so that nothing is
    read before it is used. Refuses files that are missing, truncated, not torch files, or pickles
    of anything but a flat {name: tensor} dict."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, OSError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{path}: not a readable torch state dict ({first_line})") from None
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise ValueError(f"{path}: holds a {type(state).__name__}, not a state dict of tensors")
    bad = [str(k) for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{path}: not a state dict of tensors; entries that are not tensors: {', '.join(bad[:10])}")
    return dict(state)


def load_state_dict_into(
    module: nn.Module,
    state: Mapping[str, torch.Tensor],
    source: str | Path,
    rename: Rename = identity,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
) -> None:
    """Strictly load an in-memory (or memory-mapped) state dict read from `source`."""
    name = Path(source).name
    check_entries(module, [(name, k, rename(k), list(v.shape)) for k, v in state.items()], str(source))
    for key, tensor in state.items():
        target = rename(key)
        if target is not None:
            assign_tensor(module, target, prepare_tensor(tensor, dtype, device))
