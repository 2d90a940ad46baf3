"""Training checkpoints that never lose a run: `output_dir/checkpoint-N/`, N = the optimizer step.

    model.safetensors       trainable weights, official key names (rank 0)
    optimizer.safetensors   optimizer state keyed by parameter name, param groups as JSON metadata (rank 0)
    scheduler.json          lr scheduler state_dict() (rank 0)
    sampler.json            data sampler position (rank 0; equal on every rank)
    trainer_state.json      step, epoch and whatever the caller adds (rank 0)
    config.toml             the resolved config (rank 0)
    rng/rank_{r}.json       python, numpy, torch CPU and CUDA RNG states of rank r (every rank)
    COMPLETE                JSON marker: step, world size, every file and its size; written last

Everything is safetensors or JSON: nothing here pickles or unpickles. A save goes into
`checkpoint-N.tmp/`, every file under a temporary name that is fsynced and renamed, and the folder is
renamed to `checkpoint-N` only after COMPLETE is durable. A folder counts as a checkpoint only when
COMPLETE lists files that all exist with their sizes, so a crash at any point leaves the previous
checkpoint as the newest complete one. All ranks must see the same output_dir (a shared filesystem).
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
from typing import Any

import numpy as np
import torch

from wan.modules.safetensors_io import _DTYPES, read_header, read_tensor

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
SCHEDULER_FILE = "scheduler.json"
SAMPLER_FILE = "sampler.json"
TRAINER_STATE_FILE = "trainer_state.json"
CONFIG_FILE = "config.toml"
MARKER_FILE = "COMPLETE"
KILL_ENV = "WAN_TRAIN_KILL_DURING_SAVE"

_CHECKPOINT_RE = re.compile(r"checkpoint-(\d+)")
_LEFTOVER_RE = re.compile(r"checkpoint-(\d+)\.(tmp|old)")
_SAFETENSORS_DTYPES = {dtype: name for name, dtype in _DTYPES.items()}


def rng_file(rank: int) -> str:
    return f"rng/rank_{rank}.json"


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
# Saving


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    *,
    rank: int,
    world_size: int,
    barrier: Callable[[], Any],
    model_tensors: Mapping[str, torch.Tensor] | None = None,
    optimizer_tensors: Mapping[str, torch.Tensor] | None = None,
    optimizer_meta: Mapping[str, str] | None = None,
    scheduler_state: dict | None = None,
    sampler_state: dict | None = None,
    trainer_state: dict | None = None,
    config_text: str | None = None,
    rng_state: dict,
    total_limit: int = 0,
) -> Path:
    """Save `checkpoint-{step}` atomically; every rank calls it (collective: it calls `barrier` three
    times). The shared parts are written by rank 0 from its arguments (other ranks may pass None);
    each rank writes its own rng_state. Rank 0 then prunes to the newest `total_limit` complete
    checkpoints (0 keeps all). Returns the checkpoint folder."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
    if total_limit < 0:
        raise ValueError(f"checkpoints_total_limit must be >= 0 (0 keeps every checkpoint), got {total_limit}")
    if (optimizer_tensors is None) != (optimizer_meta is None):
        raise ValueError("pass optimizer_tensors and optimizer_meta together (from optimizer_state_to_named)")
    output_dir = Path(output_dir)
    final = checkpoint_dir(output_dir, step)
    tmp = final.with_name(final.name + ".tmp")

    # Test-only fault injection: WAN_TRAIN_KILL_DURING_SAVE=N makes a save of step N SIGKILL its own
    # process right after its first file lands in the tmp folder, to prove a crash mid-save loses nothing.
    kill = os.environ.get(KILL_ENV) == str(step)
    written: list[str] = []

    def write(name: str, writer: Callable[[Any], None]) -> None:
        _write_durably(tmp / name, writer)
        written.append(name)
        if kill and len(written) == 1:
            os.kill(os.getpid(), signal.SIGKILL)

    if rank == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            log.warning("removing %s, left by an interrupted save", tmp)
            shutil.rmtree(tmp)
        (tmp / "rng").mkdir(parents=True)
        _fsync_dir(output_dir)
    barrier()

    if rank == 0:
        # Check every JSON part before writing anything, so a bad value fails fast.
        state = {"step": step, **(trainer_state or {})}
        if state["step"] != step:
            raise ValueError(f"trainer_state has step={state['step']!r} but the checkpoint is for step {step}")
        jsons = {TRAINER_STATE_FILE: _json_bytes(state, TRAINER_STATE_FILE, "trainer_state")}
        if scheduler_state is not None:
            jsons[SCHEDULER_FILE] = _json_bytes(scheduler_state, SCHEDULER_FILE, "scheduler_state")
        if sampler_state is not None:
            jsons[SAMPLER_FILE] = _json_bytes(sampler_state, SAMPLER_FILE, "sampler_state")
        if model_tensors is not None:
            write(MODEL_FILE, lambda f: _write_safetensors(f, model_tensors, {"format": "pt"}))
        if optimizer_tensors is not None:
            write(OPTIMIZER_FILE, lambda f: _write_safetensors(f, optimizer_tensors, optimizer_meta))
        for name, data in jsons.items():
            write(name, lambda f, data=data: f.write(data))
        if config_text is not None:
            write(CONFIG_FILE, lambda f: f.write(config_text.encode()))
    rng_data = _json_bytes(rng_state, rng_file(rank), "rng_state")
    write(rng_file(rank), lambda f: f.write(rng_data))
    barrier()

    if rank == 0:
        _finish(output_dir, step, tmp, final, world_size, written)
        _prune(output_dir, step, total_limit)
    barrier()
    return final


def _finish(output_dir: Path, step: int, tmp: Path, final: Path, world_size: int, written: list[str]) -> None:
    """Rank 0: write COMPLETE, then put the folder in place as `checkpoint-{step}`."""
    # The file list comes from what must be there, not from listing the folder: on a network filesystem
    # a cached listing may lag behind other nodes' renames, and a missing file must be an error.
    names = [name for name in written if not name.startswith("rng/")] + [rng_file(r) for r in range(world_size)]
    missing = [name for name in names if not (tmp / name).is_file()]
    if missing:
        raise RuntimeError(
            f"{tmp}: files of other ranks are missing after the barrier: {', '.join(missing)}; "
            "is output_dir on a filesystem that every rank shares, and does every rank call save_checkpoint?"
        )
    files = {name: (tmp / name).stat().st_size for name in names}
    marker = {"step": step, "world_size": world_size, "files": files}
    _write_durably(tmp / MARKER_FILE, lambda f: f.write((json.dumps(marker, indent=1) + "\n").encode()))
    if final.exists():
        # Re-saving a step (after a resume): the old copy stays whole until the new one is in place.
        old = final.with_name(final.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(output_dir)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    _fsync_dir(output_dir)
    log.info("saved %s", final)


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


# ----------------------------------------------------------------------------------------------------
# Loading


@dataclass
class Checkpoint:
    """What load_checkpoint read; parts that were not saved are None."""

    path: Path
    step: int
    world_size: int
    model_tensors: dict[str, torch.Tensor] | None
    optimizer_tensors: dict[str, torch.Tensor] | None
    optimizer_meta: dict[str, str] | None
    scheduler_state: dict | None
    sampler_state: dict | None
    trainer_state: dict
    config_text: str | None
    rng_state: dict

    @property
    def optimizer_file(self) -> Path:
        return self.path / OPTIMIZER_FILE


def load_checkpoint(path: str | Path, rank: int) -> Checkpoint:
    """Read a complete checkpoint folder, with this rank's RNG state."""
    path = Path(path)
    problem = checkpoint_problem(path)
    if problem is not None:
        raise ValueError(f"{path} is not a complete checkpoint: {problem}")
    marker = json.loads((path / MARKER_FILE).read_text())
    world_size = marker.get("world_size", 0)
    if rng_file(rank) not in marker["files"]:
        raise ValueError(
            f"{path} holds no {rng_file(rank)}: it was saved by {world_size} ranks, and this is rank {rank}; "
            "the world size changed, so the run cannot continue exactly from it"
        )

    def optional_json(name: str) -> Any:
        return _read_json(path / name) if name in marker["files"] else None

    model_tensors = _read_safetensors(path / MODEL_FILE)[0] if MODEL_FILE in marker["files"] else None
    optimizer_tensors = optimizer_meta = None
    if OPTIMIZER_FILE in marker["files"]:
        optimizer_tensors, optimizer_meta = _read_safetensors(path / OPTIMIZER_FILE)
    rng_state = _read_json(path / rng_file(rank))
    if not isinstance(rng_state, dict) or not {"python", "numpy", "torch"} <= rng_state.keys():
        raise ValueError(f"{path / rng_file(rank)}: not an RNG state (needs python, numpy and torch)")
    return Checkpoint(
        path=path,
        step=marker["step"],
        world_size=world_size,
        model_tensors=model_tensors,
        optimizer_tensors=optimizer_tensors,
        optimizer_meta=optimizer_meta,
        scheduler_state=optional_json(SCHEDULER_FILE),
        sampler_state=optional_json(SAMPLER_FILE),
        trainer_state=optional_json(TRAINER_STATE_FILE) or {"step": marker["step"]},
        config_text=(path / CONFIG_FILE).read_text() if CONFIG_FILE in marker["files"] else None,
        rng_state=rng_state,
    )
