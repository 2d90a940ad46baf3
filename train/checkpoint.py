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

This file is the protocol only (reading and verifying: train.checkpoint_verify; the RNG part:
train.rng); each part is registered once (`Checkpointer.register`). A save goes into
`checkpoint-N.tmp/`, every file fsynced, and the folder is renamed to `checkpoint-N` only after rank 0
has written COMPLETE (after a barrier), so a crash at any point leaves the previous checkpoint as the
newest complete one. A folder counts as a checkpoint only when COMPLETE lists files that all exist with
their sizes; a resume also checks every file's crc32 first (`resolve_resume_point`; `python -m
train.checkpoint verify DIR` by hand), and `latest` falls back past a damaged checkpoint to the newest
that verifies. A save that fails (a full disk) removes its partial files before raising, and a run's
start removes what crashed saves left (`remove_interrupted_saves`).
No state is gathered to one rank. The files' bytes are train.checkpoint_io's: our own are safetensors
or JSON, written durably and checksummed as written; DeepSpeed's and DCP's are pickles, read back with
torch.load(weights_only=True) (DeepSpeed: three of its data classes allowed) or, DCP's index, a
restricted unpickler (`read_dcp_metadata`, `load_dcp`), never a blanket unpickle: a crafted pickle
fails verification and every load. All ranks must see the same output_dir (a shared filesystem).
"""

import json
import logging
import os
import re
import shutil
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from train.checkpoint_io import (
    NO_ROOM,
    forget_written,
    free_bytes,
    fsync_dir,
    held_bytes,
    json_bytes,
    no_room_cause,
    read_json,
    size_and_crc32,
    write_durably,
)
from train.checkpoint_verify import (
    LEFTOVER_RE,
    MARKER_FILE,
    Listed,
    ResumePoint,
    checkpoint_dir,
    checkpoint_problem,
    file_problem,
    list_checkpoints,
    parse_marker,
    read_marker,
    verify_main,
)
from train.distributed import all_gather_objects, barrier

log = logging.getLogger(__name__)

CONFIG_FILE = "config.toml"
KILL_ENV = "WAN_TRAIN_KILL_DURING_SAVE"

# Called as hook(step, phase) during every save; phase "written": this rank's files of the step are
# written, the marker is not. Empty in production; tests install one to crash a save (below).
SAVE_HOOKS: list[Callable[[int, str], None]] = []


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
        m = LEFTOVER_RE.fullmatch(path.name)
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
        barrier()
        return final

    def _save(self, step: int, tmp: Path, final: Path) -> None:
        if self.rank == 0:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                log.warning("removing %s, left by an interrupted save", tmp)
                shutil.rmtree(tmp)
            tmp.mkdir()
            fsync_dir(self.output_dir)
        barrier()

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
        every = all_gather_objects(mine)
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
        previous = next((p for _, p in list_checkpoints(self.output_dir) if checkpoint_problem(p) is None), None)
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
            if (problem := file_problem(tmp, name, Listed(entry["size"], None), checksum=False))
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


def _prune(output_dir: Path, step: int, total_limit: int) -> None:
    """Rank 0: keep the newest `total_limit` complete checkpoints (0: all) and the one just written;
    delete older complete ones and `.tmp`/`.old` leftovers of other steps. Incomplete `checkpoint-N`
    folders (not written by this module) are not ours to judge and stay."""
    complete = [(s, p) for s, p in list_checkpoints(output_dir) if checkpoint_problem(p) is None]
    for s, path in complete[total_limit:] if total_limit else []:
        if s != step:
            log.info("deleting %s (checkpoints_total_limit=%d)", path, total_limit)
            shutil.rmtree(path)
    for path in remove_interrupted_saves(output_dir, keep_step=step):
        log.info("deleted %s, left by an interrupted save", path)


if __name__ == "__main__":
    sys.exit(verify_main())
