"""Training checkpoints that never lose a run: `output_dir/checkpoint-N/`, N = the optimizer step.

    COMPLETE                JSON marker: step, world size, engine, every rank's files with their sizes and
                            crc32 checksums; written last
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
COMPLETE lists files that all exist with their sizes; a resume also checks every file's crc32 first
(`resolve_resume`; `python -m train.checkpoint verify DIR` by hand), and `latest` falls back past a
damaged checkpoint to the newest that verifies. A save that fails (a full disk) removes its partial
files before raising, and a run's start removes what crashed saves left (`remove_interrupted_saves`).
No state is gathered to one rank. The files' bytes are train.checkpoint_io's: our own are safetensors
or JSON, written durably and checksummed as written; DeepSpeed's and DCP's are pickles, read back with
torch.load(weights_only=True) (DeepSpeed: three of its data classes allowed) or, DCP's index, a
restricted unpickler (`read_dcp_metadata`, `load_dcp`), never a blanket unpickle: a crafted pickle
fails verification and every load. All ranks must see the same output_dir (a shared filesystem).
"""

import json
import logging
import os
import random
import re
import shutil
import signal
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist

from train.checkpoint_io import (
    DCP_METADATA_FILE,
    NO_ROOM,
    crc32_file,
    forget_written,
    free_bytes,
    fsync_dir,
    held_bytes,
    json_bytes,
    no_room_cause,
    read_dcp_metadata,
    read_json,
    size_and_crc32,
    write_durably,
)

log = logging.getLogger(__name__)

CONFIG_FILE = "config.toml"
MARKER_FILE = "COMPLETE"
KILL_ENV = "WAN_TRAIN_KILL_DURING_SAVE"

# Called as hook(step, phase) during every save; phase "written": this rank's files of the step are
# written, the marker is not. Empty in production; tests install one to crash a save (below).
SAVE_HOOKS: list[Callable[[int, str], None]] = []

_CHECKPOINT_RE = re.compile(r"checkpoint-(\d+)")
_LEFTOVER_RE = re.compile(r"checkpoint-(\d+)\.(tmp|old)")


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / f"checkpoint-{step}"


def install_test_hooks_from_env() -> None:
    """Test-only fault injection, read once at process start: WAN_TRAIN_KILL_DURING_SAVE=N SIGKILLs this
    process once its files of step N are written and before the marker, to prove a crash mid-save loses
    nothing. Without the variable nothing is installed."""
    kill_step = os.environ.get(KILL_ENV)
    if kill_step is None:
        return

    def kill(step: int, phase: str) -> None:
        if phase == "written" and str(step) == kill_step:
            os.kill(os.getpid(), signal.SIGKILL)

    SAVE_HOOKS.append(kill)


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
# Completeness and verification
#
# COMPLETE lists every file of the checkpoint, each rank's included, as {"size": bytes, "crc32": 8 hex
# digits}. Markers written before checksums list a bare size: they are accepted with sizes checked only
# (and a line saying so), since refusing them would strand every run started before the change.

_CRC32_RE = re.compile(r"[0-9a-f]{8}")


@dataclass(frozen=True)
class Listed:
    """One file of a checkpoint as its marker lists it; crc32 is None in markers older than checksums."""

    size: int
    crc32: int | None


def _is_count(value: Any, least: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def parse_marker(path: str | Path) -> tuple[dict, dict[str, Listed]]:
    """(marker, listed files) of checkpoint folder `path`, every field checked; ValueError naming the
    marker file and the field otherwise. Sizes and contents are not checked here."""
    file = Path(path) / MARKER_FILE
    if not file.is_file():
        raise ValueError(f"{path}: the folder has no {MARKER_FILE} marker (the save did not finish, or it was removed)")
    try:
        marker = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{file}: malformed marker: not valid JSON: {err}") from None
    if not isinstance(marker, dict):
        raise ValueError(f"{file}: malformed marker: a {type(marker).__name__}, not a JSON object")
    for key, check, what in (
        ("step", _is_count, "an int >= 0"),
        ("world_size", lambda v: _is_count(v, 1), "an int >= 1"),
        ("files", lambda v: isinstance(v, dict) and v, "an object listing the files"),
    ):
        if key not in marker:
            raise ValueError(f"{file}: malformed marker: no {key!r} field")
        if not check(marker[key]):
            raise ValueError(f"{file}: malformed marker: {key!r} is {marker[key]!r}, not {what}")
    if "engine" in marker and not isinstance(marker["engine"], str):
        raise ValueError(f"{file}: malformed marker: 'engine' is {marker['engine']!r}, not a string")
    match = _CHECKPOINT_RE.fullmatch(Path(path).name)
    if match and int(match.group(1)) != marker["step"]:
        raise ValueError(f"{file}: malformed marker: 'step' is {marker['step']}, the folder is {Path(path).name}")
    listed: dict[str, Listed] = {}
    for name, entry in marker["files"].items():
        field = f"files[{name!r}]"
        if not name or ".." in Path(name).parts or Path(name).is_absolute() or name == MARKER_FILE:
            raise ValueError(f"{file}: malformed marker: {field} is not a file inside the checkpoint")
        if _is_count(entry):  # written before checksums
            listed[name] = Listed(entry, None)
            continue
        if not isinstance(entry, dict):
            raise ValueError(f"{file}: malformed marker: {field} is {entry!r}, not {{'size': ..., 'crc32': ...}}")
        if not _is_count(entry.get("size")):
            raise ValueError(f"{file}: malformed marker: {field}['size'] is {entry.get('size')!r}, not an int >= 0")
        crc = entry.get("crc32")
        if not isinstance(crc, str) or not _CRC32_RE.fullmatch(crc):
            raise ValueError(f"{file}: malformed marker: {field}['crc32'] is {crc!r}, not 8 lowercase hex digits")
        listed[name] = Listed(entry["size"], int(crc, 16))
    return marker, listed


def _file_problem(folder: Path, name: str, listed: Listed, checksum: bool) -> str | None:
    file = folder / name
    if not file.is_file():
        return f"{name} is missing"
    size = file.stat().st_size
    if size < listed.size:
        return f"{name} is truncated ({size} bytes, {MARKER_FILE} says {listed.size})"
    if size > listed.size:
        return f"{name} has {size} bytes, {MARKER_FILE} says {listed.size}"
    if checksum and listed.crc32 is not None:
        crc = crc32_file(file)
        if crc != listed.crc32:
            return f"{name} has a checksum mismatch (crc32 {crc:08x}, {MARKER_FILE} says {listed.crc32:08x})"
    if checksum and file.name == DCP_METADATA_FILE:
        # A checksum proves only that COMPLETE was written for these bytes: a crafted index, marker
        # updated to match, must fail verification rather than reach a resume.
        try:
            read_dcp_metadata(file.parent)
        except ValueError as err:
            return f"{name}: {str(err).removeprefix(f'{file}: ')}"
    return None


def _share(listed: Mapping[str, Listed], rank: int, world_size: int) -> list[str]:
    """The files rank `rank` checks: every file once over all ranks, biggest first to the least loaded
    rank, so each reads about 1/world_size of the bytes. Every rank computes the same split."""
    load = [0] * world_size
    mine = []
    for name in sorted(listed, key=lambda n: (-listed[n].size, n)):
        r = load.index(min(load))
        load[r] += listed[name].size + 1
        if r == rank:
            mine.append(name)
    return mine


@dataclass(frozen=True)
class ResumePoint:
    """A checkpoint that verified, with its COMPLETE marker as parsed then (resolve_resume_point's): the
    run's checks and Checkpointer.load take the marker from here, so a resume parses it once."""

    path: Path
    marker: dict
    files: Mapping[str, Listed]


def _check(
    path: str | Path, checksums: bool, rank: int, world_size: int
) -> tuple[list[str], tuple[dict, dict[str, Listed]] | None]:
    """checkpoint_problems's findings, and the marker as parsed on the way (None when it did not parse)."""
    path = Path(path)
    if not path.is_dir():
        return [f"{path}: not a folder"], None
    try:
        parsed = parse_marker(path)
    except ValueError as err:
        return [str(err)], None
    listed = parsed[1]
    names = _share(listed, rank, world_size) if world_size > 1 else sorted(listed)
    return [p for name in names if (p := _file_problem(path, name, listed[name], checksums))], parsed


def checkpoint_problems(path: str | Path, *, checksums: bool = True, rank: int = 0, world_size: int = 1) -> list[str]:
    """What is wrong with checkpoint folder `path` ([] when nothing is): a malformed or missing marker,
    or listed files missing, of another size, or (checksums) with other contents. With world_size > 1
    only this rank's share of the files is read (see verify_checkpoint)."""
    return _check(path, checksums, rank, world_size)[0]


def checkpoint_problem(path: str | Path) -> str | None:
    """Why `path` is not a complete checkpoint, or None when it is: a valid marker whose listed files all
    exist with the listed sizes (contents are not read: see verify_checkpoint)."""
    problems = checkpoint_problems(path, checksums=False)
    return "; ".join(problems) if problems else None


def _dist_rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _verify(path: str | Path) -> tuple[list[str], ResumePoint | None]:
    """(verify_checkpoint's problems, the checkpoint with its parsed marker when there are none)."""
    rank, world_size = _dist_rank_world()
    mine, parsed = _check(path, True, rank, world_size)
    found: list[str] = []
    for problems in _gather_objects(mine):
        found += [p for p in problems if p not in found]  # a bad marker is reported by every rank
    if found or parsed is None:
        return found, None
    return found, ResumePoint(Path(path), *parsed)


def verify_checkpoint(path: str | Path) -> list[str]:
    """Every problem of checkpoint folder `path`, sizes and checksums checked ([] when it verifies).

    Collective when a process group exists: each rank reads its share of the files (see _share: on a
    shared filesystem the reads spread over the nodes instead of one rank reading every rank's shards),
    and every rank gets the union of all ranks' findings, so all take the same decision."""
    return _verify(path)[0]


def has_checksums(path: str | Path) -> bool:
    """Whether the marker of checkpoint `path` (already verified) lists a checksum for every file."""
    return all(entry.crc32 is not None for entry in parse_marker(path)[1].values())


def _checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every `checkpoint-N` folder, newest first, complete or not."""
    if not output_dir.is_dir():
        return []
    found = [
        (int(m.group(1)), p) for p in output_dir.iterdir() if (m := _CHECKPOINT_RE.fullmatch(p.name)) and p.is_dir()
    ]
    return sorted(found, reverse=True)


def _log0(level: int, message: str) -> None:
    if _dist_rank_world()[0] == 0:
        log.log(level, message)


def _newest_verified(output_dir: Path) -> tuple[ResumePoint | None, list[tuple[Path, list[str]]]]:
    """(the newest checkpoint that verifies or None, [(skipped checkpoint, its problems)]). Collective
    when a process group exists: rank 0's listing of output_dir is the one every rank walks."""
    candidates = _gather_objects([path for _, path in _checkpoints(output_dir)])[0]
    skipped = []
    for path in candidates:
        problems, point = _verify(path)
        if point is not None:
            return point, skipped
        _log0(logging.WARNING, f"skipping {path}: " + "; ".join(problems))
        skipped.append((path, problems))
    return None, skipped


def find_latest(output_dir: str | Path) -> Path | None:
    """The newest `checkpoint-N` that verifies (sizes and checksums), or None; logs one line per newer
    folder skipped, naming what is wrong. `.tmp`/`.old` folders and anything else are ignored.
    Collective when a process group exists."""
    latest = _newest_verified(Path(output_dir))[0]
    return latest.path if latest is not None else None


def _old_marker_note(point: ResumePoint) -> ResumePoint:
    if any(entry.crc32 is None for entry in point.files.values()):
        _log0(logging.WARNING, f"{point.path}: its {MARKER_FILE} predates checksums: file sizes checked, contents not")
    return point


def resolve_resume(output_dir: str | Path, resume_from_checkpoint: str) -> Path | None:
    """The folder of resolve_resume_point's checkpoint, or None."""
    point = resolve_resume_point(output_dir, resume_from_checkpoint)
    return point.path if point is not None else None


def resolve_resume_point(output_dir: str | Path, resume_from_checkpoint: str) -> ResumePoint | None:
    """The checkpoint to resume from, verified (every listed file's size and checksum), with its marker:
    "" or "none" -> None (a fresh start); "latest" -> the newest checkpoint in output_dir that verifies,
    None when there is no checkpoint-N at all, ValueError when there are some and none verifies;
    otherwise a checkpoint folder, as given or relative to output_dir, which must verify.
    Collective when a process group exists (every rank returns the same, or raises alike)."""
    if resume_from_checkpoint in ("", "none"):
        return None
    output_dir = Path(output_dir)
    if resume_from_checkpoint == "latest":
        latest, skipped = _newest_verified(output_dir)
        if latest is not None:
            return _old_marker_note(latest)
        if skipped:
            listing = "".join(f"\n  {path}: " + "; ".join(problems) for path, problems in skipped)
            raise ValueError(
                f"resume_from_checkpoint = 'latest': no checkpoint in {output_dir} verifies:{listing}\n"
                "resume from one of them by path after repairing it, or pass --resume_from_checkpoint=none to "
                "start fresh (a fresh run overwrites checkpoints of the steps it saves)"
            )
        _log0(logging.INFO, f"resume_from_checkpoint = 'latest': no checkpoint in {output_dir}, starting fresh")
        return None
    path = Path(resume_from_checkpoint)
    if not path.exists() and not path.is_absolute() and (output_dir / path).exists():
        path = output_dir / path
    if not path.exists():
        raise ValueError(f"resume_from_checkpoint: {path} does not exist (nor under output_dir {output_dir})")
    problems, point = _verify(path)
    if point is None:
        raise ValueError(f"resume_from_checkpoint: {path} does not verify: " + "; ".join(problems))
    return _old_marker_note(point)


def remove_interrupted_saves(output_dir: str | Path, keep_step: int | None = None) -> list[Path]:
    """Delete the `checkpoint-N.tmp` / `checkpoint-N.old` folders that crashed or failed saves left (they
    may hold most of a checkpoint's bytes and keep a disk full), except `keep_step`'s; returns them.
    One is kept when it holds a COMPLETE marker and `checkpoint-N` is not complete: a crash between
    the renames of a re-save can leave it the only copy of step N (logged; rename it by hand after
    `python -m train.checkpoint verify`). Complete `checkpoint-N` folders are never touched.
    Call on one rank, before anything is written."""
    removed = []
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return removed
    for path in sorted(output_dir.iterdir()):
        m = _LEFTOVER_RE.fullmatch(path.name)
        if not m or int(m.group(1)) == keep_step or not path.is_dir():
            continue
        final = output_dir / f"checkpoint-{m.group(1)}"
        if (path / MARKER_FILE).is_file() and checkpoint_problem(final) is not None:
            log.warning("keeping %s: it holds a %s marker and %s is not complete", path, MARKER_FILE, final)
            continue
        shutil.rmtree(path)
        removed.append(path)
    return removed


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
    a barrier rank 0 writes COMPLETE listing every rank's files with their sizes and checksums (each
    rank reports its own), then renames the folder. A crash at any point leaves the previous checkpoint
    as the newest complete one; a failed save removes its partial files.

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
        """Write `checkpoint-{step}` atomically, then (rank 0) prune to `total_limit`. Returns the folder.
        A save that fails (a full disk, any exception) removes its partial files before raising."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        final = checkpoint_dir(self.output_dir, step)
        tmp = final.with_name(final.name + ".tmp")
        try:
            self._save(step, tmp, final)
        except BaseException as err:
            failed = self._failed(tmp, final, err)
            if failed is err:
                raise
            raise failed from err
        finally:
            forget_written(tmp)  # the marker's own entry, and any a failed save left
        if self.rank == 0:
            _prune(self.output_dir, step, self.total_limit)
        _barrier()
        return final

    def _save(self, step: int, tmp: Path, final: Path) -> None:
        if self.rank == 0:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                log.warning("removing %s, left by an interrupted save", tmp)
                shutil.rmtree(tmp)
            tmp.mkdir()
            fsync_dir(self.output_dir)
        _barrier()

        # JSON values are checked before anything is written, so a bad value fails fast.
        jsons: dict[str, bytes] = {}
        for name, part in self.parts.items():
            if part.files or (self.rank != 0 and not part.per_rank):
                continue
            file = f"{name}/rank_{self.rank}.json" if part.per_rank else f"{name}.json"
            jsons[file] = json_bytes(part.state.state_dict(), file, name)
        if self.rank == 0 and self.config_text is not None:
            jsons[CONFIG_FILE] = self.config_text.encode()
        written: list[str] = []
        for part in self.parts.values():
            if part.files:
                written += part.state.save(tmp)
        for file, data in jsons.items():
            # No parents=True: a save another rank gave up on has removed tmp, and must not come back.
            (tmp / file).parent.mkdir(exist_ok=True)
            write_durably(tmp / file, lambda f, data=data: f.write(data), len(data))
            written.append(file)
        for hook in SAVE_HOOKS:
            hook(step, "written")
        # Sizes and checksums as each rank wrote them: rank 0's view of another node's files may lag on a
        # network filesystem, and then a mismatch must be an error, not a silently different marker.
        mine = {file: self._entry(tmp / file) for file in written}
        every = _gather_objects(mine)
        if self.rank == 0:
            files: dict[str, dict] = {}
            for r, entries in enumerate(every):
                doubled = sorted(set(files) & set(entries))
                assert not doubled, f"rank {r} claims files another rank wrote: {doubled}"
                files.update(entries)
            self._finish(step, tmp, final, files)

    @staticmethod
    def _entry(path: Path) -> dict:
        """The marker's entry of a file this rank wrote (each rank reads back its own files that were not
        checksummed as written, before the marker: see size_and_crc32)."""
        size, crc = size_and_crc32(path)
        return {"size": size, "crc32": f"{crc:08x}"}

    def _failed(self, tmp: Path, final: Path, err: BaseException) -> BaseException:
        """Remove this failed save's partial files, and say what failed, where, and for a full disk how
        many bytes a checkpoint needs against those free. No collective here: other ranks may be inside
        the engine's own collective save, which would not match; they fail or are stopped by torchrun,
        and the next start removes what they wrote (remove_interrupted_saves)."""
        # Free space measured after the removal is short by every file another rank still holds open (a
        # removed file keeps its blocks until closed), and no barrier can wait for those ranks. The free
        # space plus what the save's files hold, taken before removing them, is what the disk has once
        # every rank has let go: another rank's writes only move bytes from one term to the other.
        free = free_bytes(self.output_dir)
        free = free + held_bytes(tmp) if free is not None else None
        # The whole tmp folder goes, also other ranks' files in it: without this rank's files the save can
        # never be completed, and the .part/.tmp files of writers that died with the error are inside it.
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(err, Exception):
            return err  # KeyboardInterrupt, SystemExit: cleaned up, passed on as they are
        no_room = no_room_cause(err)
        previous = next((p for _, p in _checkpoints(self.output_dir) if checkpoint_problem(p) is None), None)
        need = sum(e.size for e in parse_marker(previous)[1].values()) if previous is not None else None
        if no_room is not None or (need is not None and free is not None and free < need):
            room = f"{free} bytes are free in {self.output_dir} once every rank has closed the removed files" + (
                f"; the newest checkpoint ({previous.name}) holds {need} bytes" if need is not None else ""
            )
            message = f"saving {final} failed and its partial files were removed: {err}; {room}"
            if no_room is not None:
                return OSError(no_room.errno, f"{NO_ROOM[no_room.errno]}: {message}")
            err.add_note(room)
        err.add_note(f"while saving {final}; its partial files ({tmp}) were removed")
        return err

    def _finish(self, step: int, tmp: Path, final: Path, files: dict[str, dict]) -> None:
        """Rank 0: check every rank's files (their sizes: reading them all again would double the save's
        reads), write COMPLETE, then put the folder in place."""
        problems = [
            problem
            for name, entry in files.items()
            if (problem := _file_problem(tmp, name, Listed(entry["size"], None), checksum=False))
        ]
        if problems:
            raise RuntimeError(
                f"{tmp}: files of other ranks are not as written after the barrier: {'; '.join(problems)}; "
                "is output_dir on a filesystem that every rank shares?"
            )
        marker = {"step": step, "world_size": self.world_size, **self.marker_info, "files": files}
        write_durably(tmp / MARKER_FILE, lambda f: f.write((json.dumps(marker, indent=1) + "\n").encode()))
        if final.exists():
            # Re-saving a step (after a resume): the old copy stays whole until the new one is in place.
            old = final.with_name(final.name + ".old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
            os.replace(tmp, final)
            fsync_dir(self.output_dir)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        fsync_dir(self.output_dir)
        log.info("saved %s", final)

    # --- loading ----------------------------------------------------------------------------------

    def load(self, checkpoint: ResumePoint | str | Path) -> dict:
        """Restore every registered part from a complete checkpoint; returns its marker (a ResumePoint's
        as parsed when it verified, a folder's parsed here). Per-rank JSON parts of a checkpoint written
        by another world size are skipped (logged): they must hold only state that can be recomputed
        (the RNG; every draw of a step derives from the global position)."""
        if isinstance(checkpoint, ResumePoint):
            path, marker = checkpoint.path, checkpoint.marker
        else:
            path = Path(checkpoint)
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
                part.state.load_state_dict(read_json(path / file))
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
    return parse_marker(path)[0]


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
    for path in remove_interrupted_saves(output_dir, keep_step=step):
        log.info("deleted %s, left by an interrupted save", path)


# ----------------------------------------------------------------------------------------------------
# By hand: python -m train.checkpoint verify DIR


def verify_main(argv: list[str] | None = None) -> int:
    """`python -m train.checkpoint verify DIR`: DIR is one checkpoint folder (it holds COMPLETE or is
    named checkpoint-N) or an output_dir, whose every checkpoint-N is checked. Prints OK or each
    problem per checkpoint; returns 1 when any is damaged, 2 when there is nothing to check."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m train.checkpoint", description=verify_main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("verify", help="check sizes and checksums of every file").add_argument("dir", type=Path)
    args = parser.parse_args(argv)
    folder: Path = args.dir
    if not folder.is_dir():
        print(f"{folder}: not a folder", file=sys.stderr)
        return 2
    single = (folder / MARKER_FILE).exists() or _CHECKPOINT_RE.fullmatch(folder.name) is not None
    checkpoints = [folder] if single else [path for _, path in reversed(_checkpoints(folder))]
    if not checkpoints:
        print(f"{folder}: no checkpoint-N folders in it", file=sys.stderr)
        return 2
    damaged = 0
    for path in checkpoints:
        problems = checkpoint_problems(path)
        if problems:
            damaged += 1
            print(f"{path}: DAMAGED" + "".join(f"\n  {problem}" for problem in problems))
        else:
            note = "" if has_checksums(path) else f" (sizes only: its {MARKER_FILE} predates checksums)"
            print(f"{path}: OK{note}")
    if not single:
        for path in sorted(folder.iterdir()):
            if _LEFTOVER_RE.fullmatch(path.name) and path.is_dir():
                print(f"{path}: not a checkpoint (left by an interrupted save; the next run start removes it)")
    if damaged:
        print(f"{damaged} of {len(checkpoints)} checkpoint(s) damaged", file=sys.stderr)
    return 1 if damaged else 0


if __name__ == "__main__":
    sys.exit(verify_main())
