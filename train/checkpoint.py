"""Training checkpoints that never lose a run: `output_dir/checkpoint-N/`, N = the optimizer step.

    COMPLETE                JSON marker: step, world size, engine, every rank's files and their sizes; last
    config.toml             the resolved config (rank 0)
    trainer_state.json      step, epoch, counters (rank 0)
    sampler.json            data sampler position (rank 0; equal on every rank)
    rng/rank_{r}.json       python, numpy, torch CPU and CUDA RNG states of rank r (every rank)
    scheduler.json          lr schedule (the engine, rank 0)
    the engine's own files  ddp: model.safetensors (trainable weights, official names) and
                            optimizer.safetensors (state keyed by parameter name), rank 0;
                            zero2/zero3: deepspeed/ (DeepSpeed's per-rank files); fsdp: dcp/ (DCP shards)

The checkpointer keeps the protocol only; each part is registered once (`Checkpointer.register`).
A save goes into `checkpoint-N.tmp/`, every file fsynced, and the folder is renamed to
`checkpoint-N` only after rank 0 has written COMPLETE (after a barrier), so a crash at any point
leaves the previous checkpoint as the newest complete one. A folder counts as a checkpoint only when
COMPLETE lists files that all exist with their sizes. No state is gathered to one rank. Our own files
are safetensors or JSON; DeepSpeed's and DCP's are pickles, read back with torch.load(weights_only=True)
(DeepSpeed: three of its data classes allowed) or DCP's own reader, never a blanket unpickle. All
ranks must see the same output_dir (a shared filesystem).
"""

import json
import logging
import os
import random
import re
import shutil
import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist

from wan.modules.safetensors_io import _DTYPES, read_header, read_tensor

log = logging.getLogger(__name__)

CONFIG_FILE = "config.toml"
MARKER_FILE = "COMPLETE"
KILL_ENV = "WAN_TRAIN_KILL_DURING_SAVE"

_CHECKPOINT_RE = re.compile(r"checkpoint-(\d+)")
_LEFTOVER_RE = re.compile(r"checkpoint-(\d+)\.(tmp|old)")
_SAFETENSORS_DTYPES = {dtype: name for name, dtype in _DTYPES.items()}


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / f"checkpoint-{step}"


# ----------------------------------------------------------------------------------------------------
# Durable file writes


def _fsync_dir(path: Path) -> None:
    # A rename is durable only once the directory holding the new entry is fsynced.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(path: Path, write: Callable[[Any], None]) -> None:
    """Write through `write(file)` to a temporary name, fsync, rename to `path`, fsync the folder:
    a reader sees either no file or the whole file."""
    part = path.with_name(path.name + ".part")
    with open(part, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(part, path)
    _fsync_dir(path.parent)


def _write_safetensors(f, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    """Stream tensors into an open file in the safetensors format, one tensor at a time: the library's
    save_file first copies every tensor into bytes, which would double host memory for a checkpoint."""
    bad = [key for key, value in metadata.items() if not isinstance(key, str) or not isinstance(value, str)]
    if bad:
        raise ValueError(f"safetensors metadata values must be strings; these are not: {', '.join(map(str, bad))}")
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for key, tensor in tensors.items():
        if tensor.dtype not in _SAFETENSORS_DTYPES:
            raise ValueError(f"tensor {key!r} has dtype {tensor.dtype}, which safetensors cannot store")
        nbytes = tensor.numel() * tensor.element_size()
        header[key] = {
            "dtype": _SAFETENSORS_DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    f.write(len(encoded).to_bytes(8, "little"))
    f.write(encoded)
    for tensor in tensors.values():
        if tensor.numel():
            data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
            f.write(data.numpy())


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
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_durably(path, lambda f: _write_safetensors(f, tensors, metadata))


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file; ValueError naming it when it is missing or damaged."""
    if not path.is_file():
        raise ValueError(f"{path}: missing from the checkpoint")
    return _read_safetensors(path)


def write_json(path: Path, value: Any) -> None:
    """Write a JSON value durably; refuses values JSON would not give back unchanged."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = _json_bytes(value, path.name, path.stem)
    _write_durably(path, lambda f: f.write(data))


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
            _fsync_dir(path)
    _fsync_dir(folder)


def _check_json(value: Any, where: str) -> None:
    """Refuse anything JSON would not give back as it was (dict keys that are not strings come back
    as strings) or cannot write at all, naming the entry. Tuples come back as lists, which is fine."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_json(item, f"{where}[{i}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"{where} has the key {key!r} ({type(key).__name__}); JSON keys must be strings")
            _check_json(item, f"{where}[{key!r}]")
    else:
        raise ValueError(f"{where} is a {type(value).__name__}, not a JSON value (dict, list, str, number, bool, None)")


def _json_bytes(value: Any, file_name: str, what: str) -> bytes:
    try:
        _check_json(value, what)
    except ValueError as err:
        raise ValueError(f"cannot write {file_name}: {err}") from None
    return (json.dumps(value, indent=1) + "\n").encode()


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON: {err}") from None


# ----------------------------------------------------------------------------------------------------
# Optimizer state keyed by parameter name


def _named_params(optimizer: torch.optim.Optimizer, names_by_param: Mapping[torch.Tensor, str]) -> list[list[str]]:
    """The parameter names of each param group, in the optimizer's order (the order its state_dict()
    numbers them in)."""
    groups: list[list[str]] = []
    seen: set[str] = set()
    for g, group in enumerate(optimizer.param_groups):
        names = []
        for p in group["params"]:
            if p not in names_by_param:
                raise ValueError(
                    f"param group {g} holds a parameter of shape {list(p.shape)} that names_by_param does not name"
                )
            name = names_by_param[p]
            if name in seen:
                raise ValueError(f"names_by_param gives the name {name!r} to two parameters of the optimizer")
            seen.add(name)
            names.append(name)
        groups.append(names)
    return groups


def optimizer_state_to_named(
    optimizer: torch.optim.Optimizer, names_by_param: Mapping[torch.Tensor, str]
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The optimizer state as (tensors, safetensors metadata), keyed by parameter name, not index.

    Tensors are "{param_name}.{state_key}" (AdamW: step, exp_avg, exp_avg_sq), as held (not copied).
    The metadata holds JSON strings: "param_groups" (hyperparameters, `params` as lists of names) and
    "state" ({name: {"tensors": [state keys], "values": {key: non-tensor value}}}), so that names
    with dots parse unambiguously and parameters without state yet are explicit.
    """
    groups = _named_params(optimizer, names_by_param)
    state_dict = optimizer.state_dict()
    names = [name for group in groups for name in group]  # state_dict() numbers params in this order
    tensors: dict[str, torch.Tensor] = {}
    state_index: dict[str, dict[str, Any]] = {}
    for index, param_state in state_dict["state"].items():
        name = names[index]
        entry: dict[str, Any] = {"tensors": [], "values": {}}
        for key, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{name}.{key}"] = value
                entry["tensors"].append(key)
            else:
                _check_json(value, f"optimizer state of {name!r}: {key!r}")
                entry["values"][key] = value
        state_index[name] = entry
    param_groups = []
    for g, (group, group_names) in enumerate(zip(state_dict["param_groups"], groups, strict=True)):
        group = {k: v for k, v in group.items() if k != "params"}
        _check_json(group, f"optimizer param group {g}")
        param_groups.append({**group, "params": group_names})
    meta = {"format": "pt", "param_groups": json.dumps(param_groups), "state": json.dumps(state_index)}
    return tensors, meta


def load_named_optimizer_state(
    optimizer: torch.optim.Optimizer,
    names_by_param: Mapping[torch.Tensor, str],
    tensors: Mapping[str, torch.Tensor],
    meta: Mapping[str, str],
    source: str | Path = "optimizer state",
) -> None:
    """Load a state written by optimizer_state_to_named into `optimizer`, whose param groups must hold
    the same names (in any order within a group); shapes must agree. Refuses with every problem
    listed, naming `source` (the file)."""
    try:
        saved_groups = json.loads(meta["param_groups"])
        saved_state = json.loads(meta["state"])
    except (KeyError, json.JSONDecodeError) as err:
        raise ValueError(f"{source}: no optimizer state metadata (param_groups, state): {err}") from None
    groups = _named_params(optimizer, names_by_param)
    problems: list[str] = []
    if len(saved_groups) != len(groups):
        problems.append(f"it has {len(saved_groups)} param groups, the optimizer has {len(groups)}")
    for g, (saved, current) in enumerate(zip(saved_groups, groups, strict=False)):  # counts checked above
        missing = sorted(set(current) - set(saved["params"]))
        unexpected = sorted(set(saved["params"]) - set(current))
        if missing:
            problems.append(f"param group {g} lacks {_shorten(missing)}")
        if unexpected:
            problems.append(f"param group {g} has parameters the optimizer does not: {_shorten(unexpected)}")

    all_names = [name for group in groups for name in group]  # state_dict() numbers params in this order
    params = dict(zip(all_names, [p for group in optimizer.param_groups for p in group["params"]], strict=True))
    listed = {f"{name}.{key}" for name, entry in saved_state.items() for key in entry["tensors"]}
    if set(tensors) != listed:
        problems.append(f"tensors and metadata disagree: {_shorten(sorted(set(tensors) ^ listed))}")
    in_groups = {name for saved in saved_groups for name in saved["params"]}
    stray = sorted(set(saved_state) - in_groups)
    if stray:
        problems.append(f"it has state for parameters in no param group: {_shorten(stray)}")
    for name, entry in saved_state.items():
        if name not in params:
            continue  # reported above
        for key in entry["tensors"]:
            tensor = tensors.get(f"{name}.{key}")
            # Scalars (step) aside, the state of Adam-like optimizers has the parameter's shape.
            if tensor is not None and tensor.dim() > 0 and tensor.shape != params[name].shape:
                problems.append(
                    f"{name}.{key} has shape {list(tensor.shape)}, the parameter {list(params[name].shape)}"
                )
    if problems:
        raise ValueError(f"cannot load the optimizer state of {source}:\n  " + "\n  ".join(problems))

    # Rebuild the index-based state dict for the current parameter order; load_state_dict casts and
    # moves state tensors to each parameter's dtype and device (keeping `step` as it is).
    index = {name: i for i, name in enumerate(all_names)}
    state = {
        index[name]: {**entry["values"], **{key: tensors[f"{name}.{key}"] for key in entry["tensors"]}}
        for name, entry in saved_state.items()
    }
    param_groups = []
    for saved, current_group, names in zip(saved_groups, optimizer.param_groups, groups, strict=True):
        group = {k: v for k, v in saved.items() if k != "params"}
        for key, value in group.items():  # JSON gave lists where the optimizer keeps tuples (betas)
            if isinstance(current_group.get(key), tuple) and isinstance(value, list):
                group[key] = tuple(value)
        param_groups.append({**group, "params": [index[name] for name in names]})
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})


def _shorten(names: list[str], limit: int = 20) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


# ----------------------------------------------------------------------------------------------------
# RNG state


def capture_rng_state() -> dict:
    """This process's python, numpy, torch CPU and (when available) CUDA RNG states, as JSON types."""
    version, mt_state, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state = {
        "python": {"version": version, "state": list(mt_state), "gauss_next": gauss_next},
        "numpy": {
            "name": name,
            "keys": keys.tolist(),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: dict) -> None:
    """Set every RNG captured by capture_rng_state. Call it last on resume, after the model,
    optimizer and data loader are restored, since building those may draw random numbers."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    npy = state["numpy"]
    np.random.set_state(
        (npy["name"], np.array(npy["keys"], dtype=np.uint32), npy["pos"], npy["has_gauss"], npy["cached_gaussian"])
    )
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available():
        count = torch.cuda.device_count()
        if count != len(cuda):
            log.warning(
                "the checkpoint holds CUDA RNG states of %d devices, this process sees %d: restoring the first %d, "
                "the run will not continue bitwise",
                len(cuda),
                count,
                min(count, len(cuda)),
            )
        for device, s in enumerate(cuda[:count]):
            torch.cuda.set_rng_state(torch.tensor(s, dtype=torch.uint8), device)
    elif cuda:
        log.warning("the checkpoint holds CUDA RNG states but CUDA is not available: they are ignored")


# ----------------------------------------------------------------------------------------------------
# Completeness


def checkpoint_problem(path: str | Path) -> str | None:
    """Why `path` is not a complete checkpoint, or None when it is: COMPLETE must be a valid marker
    whose listed files all exist with the listed sizes."""
    path = Path(path)
    if not path.is_dir():
        return "it is not a folder"
    marker = path / MARKER_FILE
    if not marker.is_file():
        return f"it has no {MARKER_FILE} marker (the save did not finish)"
    try:
        info = json.loads(marker.read_text())
        files = info["files"]
        step = info["step"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        return f"its {MARKER_FILE} marker is unreadable: {err!r}"
    if not isinstance(files, dict) or not isinstance(step, int):
        return f"its {MARKER_FILE} marker is malformed"
    match = _CHECKPOINT_RE.fullmatch(path.name)
    if match and int(match.group(1)) != step:
        return f"its {MARKER_FILE} marker is for step {step}"
    for name, size in files.items():
        file = path / name
        if ".." in Path(name).parts or Path(name).is_absolute():
            return f"its {MARKER_FILE} marker lists a path outside it: {name!r}"
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, {MARKER_FILE} says {size}"
    return None


def _checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every `checkpoint-N` folder, newest first, complete or not."""
    if not output_dir.is_dir():
        return []
    found = [
        (int(m.group(1)), p) for p in output_dir.iterdir() if (m := _CHECKPOINT_RE.fullmatch(p.name)) and p.is_dir()
    ]
    return sorted(found, reverse=True)


def find_latest(output_dir: str | Path) -> Path | None:
    """The complete `checkpoint-N` with the highest N, or None. Incomplete folders (an interrupted
    save or copy), `.tmp`/`.old` folders and anything else are ignored."""
    for _, path in _checkpoints(Path(output_dir)):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        log.warning("ignoring %s: %s", path, problem)
    return None


def resolve_resume(output_dir: str | Path, resume_from_checkpoint: str) -> Path | None:
    """The checkpoint to resume from: "" -> None; "latest" -> the newest complete one in output_dir
    (None: a fresh start); otherwise a checkpoint folder, as given or relative to output_dir, which
    must be complete."""
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint == "latest":
        latest = find_latest(output_dir)
        if latest is None:
            log.info("resume_from_checkpoint = 'latest': no complete checkpoint in %s, starting fresh", output_dir)
        return latest
    path = Path(resume_from_checkpoint)
    if not path.exists() and not path.is_absolute() and (Path(output_dir) / path).exists():
        path = Path(output_dir) / path
    if not path.exists():
        raise ValueError(f"resume_from_checkpoint: {path} does not exist (nor under output_dir {output_dir})")
    problem = checkpoint_problem(path)
    if problem is not None:
        raise ValueError(f"resume_from_checkpoint: {path} is not a complete checkpoint: {problem}")
    return path


# ----------------------------------------------------------------------------------------------------
# The checkpointer


class Stateful(Protocol):
    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


class FileState(Protocol):
    """A part that writes its own files (an engine): `save` is collective and returns the names, relative
    to the folder, of the files this rank wrote; `load` reads them back."""

    def save(self, folder: Path) -> list[str]: ...

    def load(self, folder: Path) -> None: ...


def _gather_objects(value: Any) -> list[Any]:
    if dist.is_available() and dist.is_initialized():
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, value)
        return out
    return [value]


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


@dataclass
class _Part:
    state: Stateful | FileState
    per_rank: bool
    files: bool


class Checkpointer:
    """Saves and loads `output_dir/checkpoint-N/` with every part registered once.

    Parts: JSON parts (`register(name, obj)`: obj.state_dict() -> JSON value, written by rank 0 as
    `name.json`; per_rank=True: every rank writes `name/rank_{r}.json`) and file parts
    (`register_files(name, obj)`: the engine, which writes its own files, on every rank). Nothing is
    gathered to one rank: each rank writes its own files into `checkpoint-N.tmp/`, each fsynced; after
    a barrier rank 0 writes COMPLETE listing every rank's files with their sizes, then renames the
    folder. A crash at any point leaves the previous checkpoint as the newest complete one.

    Collective: every rank calls save() and load() with the same arguments. `config_text` (the
    resolved config) is written as config.toml with each checkpoint.
    """

    def __init__(
        self,
        output_dir: str | Path,
        *,
        rank: int = 0,
        world_size: int = 1,
        total_limit: int = 0,
        config_text: str | None = None,
        marker_info: dict | None = None,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        if total_limit < 0:
            raise ValueError(f"checkpoints_total_limit must be >= 0 (0 keeps every checkpoint), got {total_limit}")
        self.output_dir = Path(output_dir)
        self.rank, self.world_size, self.total_limit = rank, world_size, total_limit
        self.config_text = config_text
        self.marker_info = dict(marker_info or {})  # e.g. the engine's name, checked on load
        self.parts: dict[str, _Part] = {}

    def register(self, name: str, state: Stateful, *, per_rank: bool = False) -> None:
        self._add(name, _Part(state, per_rank, files=False))

    def register_files(self, name: str, state: FileState) -> None:
        self._add(name, _Part(state, per_rank=True, files=True))

    def _add(self, name: str, part: _Part) -> None:
        if name in self.parts or not re.fullmatch(r"[A-Za-z0-9_]+", name):
            raise ValueError(f"checkpoint part {name!r}: registered twice or not a plain name")
        self.parts[name] = part

    # --- saving -----------------------------------------------------------------------------------

    def save(self, step: int) -> Path:
        """Write `checkpoint-{step}` atomically, then (rank 0) prune to `total_limit`. Returns the folder."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        final = checkpoint_dir(self.output_dir, step)
        tmp = final.with_name(final.name + ".tmp")
        if self.rank == 0:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                log.warning("removing %s, left by an interrupted save", tmp)
                shutil.rmtree(tmp)
            tmp.mkdir()
            _fsync_dir(self.output_dir)
        _barrier()

        # JSON values are checked before anything is written, so a bad value fails fast.
        jsons: dict[str, bytes] = {}
        for name, part in self.parts.items():
            if part.files or (self.rank != 0 and not part.per_rank):
                continue
            file = f"{name}/rank_{self.rank}.json" if part.per_rank else f"{name}.json"
            jsons[file] = _json_bytes(part.state.state_dict(), file, name)
        if self.rank == 0 and self.config_text is not None:
            jsons[CONFIG_FILE] = self.config_text.encode()
        written: list[str] = []
        for part in self.parts.values():
            if part.files:
                written += part.state.save(tmp)
        for file, data in jsons.items():
            (tmp / file).parent.mkdir(parents=True, exist_ok=True)
            _write_durably(tmp / file, lambda f, data=data: f.write(data))
            written.append(file)
        # Test-only fault injection: WAN_TRAIN_KILL_DURING_SAVE=N SIGKILLs every rank once its files of
        # step N are written and before the marker, to prove a crash mid-save loses nothing.
        if os.environ.get(KILL_ENV) == str(step):
            os.kill(os.getpid(), signal.SIGKILL)
        # Sizes as each rank wrote them: rank 0's view of another node's files may lag on a network
        # filesystem, and then a mismatch must be an error, not a silently different marker.
        mine = {file: (tmp / file).stat().st_size for file in written}
        every = _gather_objects(mine)
        if self.rank == 0:
            files: dict[str, int] = {}
            for r, sizes in enumerate(every):
                doubled = sorted(set(files) & set(sizes))
                assert not doubled, f"rank {r} claims files another rank wrote: {doubled}"
                files.update(sizes)
            self._finish(step, tmp, final, files)
            _prune(self.output_dir, step, self.total_limit)
        _barrier()
        return final

    def _finish(self, step: int, tmp: Path, final: Path, files: dict[str, int]) -> None:
        """Rank 0: check every rank's files, write COMPLETE, then put the folder in place."""
        problems = [
            f"{name} ({'missing' if not (tmp / name).is_file() else f'{(tmp / name).stat().st_size} bytes, written as {size}'})"
            for name, size in files.items()
            if not (tmp / name).is_file() or (tmp / name).stat().st_size != size
        ]
        if problems:
            raise RuntimeError(
                f"{tmp}: files of other ranks are not as written after the barrier: {', '.join(problems)}; "
                "is output_dir on a filesystem that every rank shares?"
            )
        marker = {"step": step, "world_size": self.world_size, **self.marker_info, "files": files}
        _write_durably(tmp / MARKER_FILE, lambda f: f.write((json.dumps(marker, indent=1) + "\n").encode()))
        if final.exists():
            # Re-saving a step (after a resume): the old copy stays whole until the new one is in place.
            old = final.with_name(final.name + ".old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
            os.replace(tmp, final)
            _fsync_dir(self.output_dir)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        _fsync_dir(self.output_dir)
        log.info("saved %s", final)

    # --- loading ----------------------------------------------------------------------------------

    def load(self, path: str | Path) -> dict:
        """Restore every registered part from a complete checkpoint; returns its marker. Per-rank JSON
        parts of a checkpoint written by another world size are skipped (logged): they must hold only
        state that can be recomputed (the RNG; every draw of a step derives from the global position)."""
        path = Path(path)
        marker = read_marker(path)
        for key, value in self.marker_info.items():
            if marker.get(key) != value:
                raise ValueError(
                    f"{path} was written with {key} = {marker.get(key)!r}, this run has {value!r}"
                    + (f"; {MERGE_ADVICE}" if key == "engine" else "")
                )
        same_world = marker["world_size"] == self.world_size
        for name, part in self.parts.items():
            if part.files:
                part.state.load(path)
            elif part.per_rank and not same_world:
                if self.rank == 0:
                    log.info("%s: written by %d ranks, not restoring per-rank %s", path, marker["world_size"], name)
            else:
                file = f"{name}/rank_{self.rank}.json" if part.per_rank else f"{name}.json"
                if file not in marker["files"]:
                    raise ValueError(f"{path}: the checkpoint has no {file} (its COMPLETE marker does not list it)")
                part.state.load_state_dict(_read_json(path / file))
        return marker


MERGE_ADVICE = (
    "to move between engines, merge it with `python tools/zero_to_bf16.py CHECKPOINT OUT` and start the new run "
    "from the merged folder ([model] transformer_path = OUT)"
)


def read_marker(path: Path) -> dict:
    """The COMPLETE marker of a complete checkpoint (ValueError saying why the folder is not one)."""
    problem = checkpoint_problem(path)
    if problem is not None:
        raise ValueError(f"{path} is not a complete checkpoint: {problem}")
    marker = json.loads((path / MARKER_FILE).read_text())
    if not isinstance(marker.get("world_size"), int) or marker["world_size"] < 1:
        raise ValueError(f"{path / MARKER_FILE}: no valid world_size")
    return marker


class RNGState:
    """This process's RNG states as a per-rank checkpoint part (restored last: register it last)."""

    def state_dict(self) -> dict:
        return capture_rng_state()

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or not {"python", "numpy", "torch"} <= state.keys():
            raise ValueError("not an RNG state (needs python, numpy and torch)")
        restore_rng_state(state)


def _prune(output_dir: Path, step: int, total_limit: int) -> None:
    """Rank 0: keep the newest `total_limit` complete checkpoints (0: all) and the one just written;
    delete older complete ones and `.tmp`/`.old` leftovers of other steps. Incomplete `checkpoint-N`
    folders (not written by this module) are not ours to judge and stay."""
    complete = [(s, p) for s, p in _checkpoints(output_dir) if checkpoint_problem(p) is None]
    for s, path in complete[total_limit:] if total_limit else []:
        if s != step:
            log.info("deleting %s (checkpoints_total_limit=%d)", path, total_limit)
            shutil.rmtree(path)
    for path in output_dir.iterdir():
        m = _LEFTOVER_RE.fullmatch(path.name)
        if m and int(m.group(1)) != step and path.is_dir():
            log.info("deleting %s, left by an interrupted save", path)
            shutil.rmtree(path)
