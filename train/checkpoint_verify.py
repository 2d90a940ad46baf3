"""The read side of `checkpoint-N/` folders: the COMPLETE marker parsed and checked field by field,
every listed file's size and crc32 verified (each rank reading its share), the newest checkpoint that
verifies found, and the resume point picked (`resolve_resume_point`). Writing is train.checkpoint's.

`python -m train.checkpoint verify DIR` (verify_main) checks checkpoints by hand.
"""

import json
import logging
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist

from train.checkpoint_io import DCP_METADATA_FILE, crc32_file, read_dcp_metadata
from train.distributed import all_gather_objects

log = logging.getLogger(__name__)

MARKER_FILE = "COMPLETE"
CHECKPOINT_RE = re.compile(r"checkpoint-(\d+)")
LEFTOVER_RE = re.compile(r"checkpoint-(\d+)\.(tmp|old)")


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / f"checkpoint-{step}"


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
    match = CHECKPOINT_RE.fullmatch(Path(path).name)
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


def file_problem(folder: Path, name: str, listed: Listed, checksum: bool) -> str | None:
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
    return [p for name in names if (p := file_problem(path, name, listed[name], checksums))], parsed


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
    for problems in all_gather_objects(mine):
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


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every `checkpoint-N` folder, newest first, complete or not."""
    if not output_dir.is_dir():
        return []
    found = [
        (int(m.group(1)), p) for p in output_dir.iterdir() if (m := CHECKPOINT_RE.fullmatch(p.name)) and p.is_dir()
    ]
    return sorted(found, reverse=True)


def _log0(level: int, message: str) -> None:
    if _dist_rank_world()[0] == 0:
        log.log(level, message)


def _newest_verified(output_dir: Path) -> tuple[ResumePoint | None, list[tuple[Path, list[str]]]]:
    """(the newest checkpoint that verifies or None, [(skipped checkpoint, its problems)]). Collective
    when a process group exists: rank 0's listing of output_dir is the one every rank walks."""
    candidates = all_gather_objects([path for _, path in list_checkpoints(output_dir)])[0]
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


def read_marker(path: Path) -> dict:
    """The COMPLETE marker of a complete checkpoint (ValueError saying why the folder is not one)."""
    problem = checkpoint_problem(path)
    if problem is not None:
        raise ValueError(f"{path} is not a complete checkpoint: {problem}")
    return parse_marker(path)[0]


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
    single = (folder / MARKER_FILE).exists() or CHECKPOINT_RE.fullmatch(folder.name) is not None
    checkpoints = [folder] if single else [path for _, path in reversed(list_checkpoints(folder))]
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
            if LEFTOVER_RE.fullmatch(path.name) and path.is_dir():
                print(f"{path}: not a checkpoint (left by an interrupted save; the next run start removes it)")
    if damaged:
        print(f"{damaged} of {len(checkpoints)} checkpoint(s) damaged", file=sys.stderr)
    return 1 if damaged else 0
