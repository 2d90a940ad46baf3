"""Reading and writing the list of training samples, in the formats VideoX-Fun users already have.

Formats, chosen by the metadata path:
- `.json`: a list of objects (VideoX-Fun's format);
- `.jsonl`: one object per line (blank lines allowed);
- `.csv`: a header row, then one sample per row;
- a folder: every image or video under it (recursively, in sorted order) with its caption in a
  same-name `.txt` file beside it (`clip.mp4` + `clip.txt`); a missing `.txt` means the empty caption.

Fields: `file_path` (required), `text` (required in files; the caption), `type` ("video" or "image"),
optional `width`, `height` (pixels, so buckets need no file opened), `num_frames`, `fps` (written by
tools/prepare_metadata.py). Other fields are ignored, as VideoX-Fun ignores them.

A missing `type`: VideoX-Fun reads it as "image", which makes a `.mp4` listed without a type fail at
decode time, deep inside a data-loader worker. We read it as "video" when the file has a video extension
(.mp4 .mov .mkv .webm .avi) and "image" otherwise, so every file VideoX-Fun loads correctly is read the
same way here, and the ones it would crash on work.

Relative `file_path`s resolve against `data_dir`; without one, against the metadata file's folder (not
the working directory, so a dataset folder can be moved or used from anywhere). Media files are never
opened or even checked for existence here: listing millions of samples must stay cheap; sizes the
metadata lacks are probed afterwards (train/data/probe.py, cached), which also finds unreadable files.

Every problem in a file is collected and raised in one ValueError, each with the file name, the entry
(`entry [i]` for .json, `line n` for .jsonl and .csv) and the field, so one run shows all fixes needed.
"""

import csv
import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".webm", ".avi")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
KINDS = ("video", "image")
# The order fields are written in; `file_path`, `text`, `type` first as in VideoX-Fun's files.
FIELDS = ("file_path", "text", "type", "width", "height", "num_frames", "fps")


@dataclass(frozen=True)
class Sample:
    """One training sample. `path` is absolute and resolved; the optional sizes come from the metadata
    (or a probe) and are None when unknown."""

    path: Path
    text: str
    kind: str  # "video" or "image"
    width: int | None = None
    height: int | None = None
    num_frames: int | None = None
    fps: float | None = None


def kind_from_extension(path: str | Path) -> str:
    """ "video" for a video extension, else "image" (VideoX-Fun's default for a missing type)."""
    return "video" if Path(path).suffix.lower() in VIDEO_EXTENSIONS else "image"


def is_media_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() in VIDEO_EXTENSIONS + IMAGE_EXTENSIONS


def _empty(value: object) -> bool:
    """JSON null and an empty CSV cell both mean "not given"."""
    return value is None or (isinstance(value, str) and value.strip() == "")


def _number(value: object) -> float | None:
    """A JSON number or a CSV string ("512", "512.0") as a finite float; None when it is not one."""
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            return None
    elif isinstance(value, int | float) and not isinstance(value, bool):
        number = float(value)
    else:
        return None
    return number if math.isfinite(number) else None


def _positive_int(value: object, problems: list[str], where: str, name: str) -> int | None:
    """An integer >= 1 from a JSON number or a CSV string ("512", "512.0"); None when not given."""
    if _empty(value):
        return None
    number = _number(value)
    if number is None or number != int(number) or number < 1:
        problems.append(f"{where}: field {name!r} must be a positive whole number, got {value!r}")
        return None
    return int(number)


def _positive_float(value: object, problems: list[str], where: str, name: str) -> float | None:
    if _empty(value):
        return None
    number = _number(value)
    if number is None or number <= 0:
        problems.append(f"{where}: field {name!r} must be a positive number, got {value!r}")
        return None
    return number


def parse_entry(entry: object, base: Path, problems: list[str], where: str) -> Sample | None:
    """One metadata object as a Sample; problems are appended (prefixed with `where`), None returned
    when the entry cannot make a sample."""
    if not isinstance(entry, Mapping):
        problems.append(f"{where}: expected an object with 'file_path' and 'text', got {type(entry).__name__}")
        return None
    before = len(problems)
    file_path = entry.get("file_path")
    if _empty(file_path):
        problems.append(f"{where}: field 'file_path' is missing or empty")
    elif not isinstance(file_path, str):
        problems.append(f"{where}: field 'file_path' must be a string, got {file_path!r}")
    text = entry.get("text")
    if "text" not in entry:
        problems.append(f"{where}: field 'text' is missing (use \"\" for no caption)")
    elif text is None:
        text = ""
    elif not isinstance(text, str):
        problems.append(f"{where}: field 'text' must be a string, got {text!r}")
    kind = entry.get("type")
    if _empty(kind):
        kind = kind_from_extension(file_path) if isinstance(file_path, str) else "image"
    elif kind not in KINDS:
        problems.append(f"{where}: field 'type' must be 'video' or 'image', got {kind!r}")
    width = _positive_int(entry.get("width"), problems, where, "width")
    height = _positive_int(entry.get("height"), problems, where, "height")
    num_frames = _positive_int(entry.get("num_frames"), problems, where, "num_frames")
    fps = _positive_float(entry.get("fps"), problems, where, "fps")
    if len(problems) > before:
        return None
    path = Path(os.path.expanduser(file_path))
    if not path.is_absolute():
        path = base / path
    return Sample(path.resolve(), text, kind, width, height, num_frames, fps)


def _read_json(meta: Path, base: Path, problems: list[str]) -> list[Sample]:
    try:
        entries = json.loads(meta.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{meta}: not valid JSON ({err})") from None
    if not isinstance(entries, list):
        raise ValueError(f"{meta}: expected a JSON list of objects, got {type(entries).__name__}")
    samples = [parse_entry(entry, base, problems, f"{meta}: entry [{i}]") for i, entry in enumerate(entries)]
    return [s for s in samples if s is not None]


def _read_jsonl(meta: Path, base: Path, problems: list[str]) -> list[Sample]:
    samples = []
    for number, line in enumerate(meta.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{meta}: line {number}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as err:
            problems.append(f"{where}: not valid JSON ({err.msg} at column {err.colno})")
            continue
        samples.append(parse_entry(entry, base, problems, where))
    return [s for s in samples if s is not None]


def _read_csv(meta: Path, base: Path, problems: list[str]) -> list[Sample]:
    samples = []
    with meta.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames
        if not header:
            raise ValueError(f"{meta}: empty CSV file, expected a header row with file_path,text,type,...")
        if "file_path" not in header:
            raise ValueError(f"{meta}: the header row {header} has no 'file_path' column")
        for row in reader:
            # the row's first line: reader.line_num is its last, after any blank lines skipped before it
            first = reader.line_num - sum(value.count("\n") for value in row.values() if isinstance(value, str))
            where = f"{meta}: line {first}"
            if None in row:
                problems.append(f"{where}: {len(header) + len(row[None])} cells, the header has {len(header)}")
                continue
            if any(value is None for value in row.values()):
                cells = sum(value is not None for value in row.values())
                problems.append(f"{where}: {cells} cells, the header has {len(header)}")
                continue
            samples.append(parse_entry(row, base, problems, where))
    return [s for s in samples if s is not None]


def _read_folder(root: Path, skipped: list[tuple[str, str]] | None) -> list[Sample]:
    """Every media file under root (hidden files and folders skipped) with its same-name .txt caption.
    A caption that is not UTF-8 skips its sample (reported in `skipped`), not the whole folder."""
    samples = []
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if any(part.startswith(".") for part in relative.parts) or not is_media_file(path) or not path.is_file():
            continue
        caption = path.with_suffix(".txt")
        try:
            text = caption.read_text(encoding="utf-8-sig").strip() if caption.is_file() else ""
        except UnicodeDecodeError as err:
            if skipped is None:
                raise ValueError(f"{caption}: caption is not UTF-8 ({err})") from None
            skipped.append((str(path), f"caption {caption.name} is not UTF-8 ({err.reason} at byte {err.start})"))
            continue
        samples.append(Sample(path.resolve(), text, kind_from_extension(path)))
    return samples


def load_metadata(
    meta: str | Path | None, data_dir: str | Path | None = None, skipped: list[tuple[str, str]] | None = None
) -> list[Sample]:
    """The samples listed by `meta` (a .json, .jsonl or .csv file, or a folder of media + .txt captions;
    None reads data_dir as such a folder), in file order, duplicates kept.

    Relative file paths resolve against data_dir, or the metadata file's folder when data_dir is None.
    Raises ValueError listing every malformed entry, and when nothing is listed. Per-sample problems
    that do not make the file unreadable (a folder caption that is not UTF-8) append (path, reason)
    to `skipped` when it is given, and raise when it is not.
    """
    if meta is None or str(meta) == "":
        if data_dir is None or str(data_dir) == "":
            raise ValueError("no training data: give train_data_meta (a .json/.jsonl/.csv file) or train_data_dir")
        meta = data_dir
    meta = Path(os.path.expanduser(meta))
    if meta.is_dir():
        samples = _read_folder(meta, skipped)
        if not samples:
            raise ValueError(f"{meta}: no media files ({', '.join(VIDEO_EXTENSIONS + IMAGE_EXTENSIONS)}) found")
        return samples
    if not meta.is_file():
        raise ValueError(f"metadata file {meta} does not exist")
    base = Path(os.path.expanduser(data_dir)) if data_dir is not None and str(data_dir) != "" else meta.parent
    readers = {".json": _read_json, ".jsonl": _read_jsonl, ".csv": _read_csv}
    reader = readers.get(meta.suffix.lower())
    if reader is None:
        raise ValueError(f"{meta}: unknown metadata format {meta.suffix!r}; use .json, .jsonl, .csv or a folder")
    problems: list[str] = []
    samples = reader(meta, base, problems)
    if problems:
        shown = problems[:200] + ([f"... and {len(problems) - 200} more"] if len(problems) > 200 else [])
        raise ValueError(f"{meta}: {len(problems)} problem(s):\n  " + "\n  ".join(shown))
    if not samples:
        raise ValueError(f"{meta}: lists no samples")
    return samples


def sample_to_dict(sample: Sample, base: Path | None) -> dict:
    """The metadata object for a sample; file_path relative to base (a resolved folder) when the file lies
    under it. Unknown (None) fields are left out."""
    path = sample.path
    if base is not None:
        try:
            path = sample.path.relative_to(base)
        except ValueError:
            pass
    entry = {"file_path": path.as_posix(), "text": sample.text, "type": sample.kind}
    for name in ("width", "height", "num_frames", "fps"):
        value = getattr(sample, name)
        if value is not None:
            entry[name] = value
    return entry


def save_metadata(samples: Iterable[Sample], path: str | Path, data_dir: str | Path | None = None) -> Path:
    """Write samples as .json, .jsonl or .csv (by path's extension), paths relative to data_dir (or to
    path's folder when None) where the file lies under it, so load_metadata(path, data_dir) reads them back."""
    path = Path(path)
    base = (
        Path(os.path.expanduser(data_dir)) if data_dir is not None and str(data_dir) != "" else path.parent
    ).resolve()
    entries = [sample_to_dict(sample, base) for sample in samples]
    suffix = path.suffix.lower()
    if suffix not in (".json", ".jsonl", ".csv"):
        raise ValueError(f"{path}: cannot write metadata as {suffix!r}; use .json, .jsonl or .csv")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if suffix == ".json":
        tmp.write_text(json.dumps(entries, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    elif suffix == ".jsonl":
        tmp.write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries), encoding="utf-8")
    else:
        with tmp.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=FIELDS)
            writer.writeheader()
            writer.writerows(entries)
    tmp.replace(path)  # a reader never sees half a file
    return path
