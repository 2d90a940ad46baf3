"""Filling in the sizes a metadata file leaves out (width, height; for videos num_frames and fps), read
from the files' headers, so a VideoX-Fun metadata.json of {file_path, text, type} trains as it is.

Only headers are read: PIL for images (the EXIF orientation included, as load_image turns them
upright), PyAV's container header for videos (mp4 keeps the frame count in its sample table; where a
container has none, mkv and webm, packets are counted by demuxing, which reads the file but decodes
nothing). A file that cannot be read is (path, reason), and training leaves it out up front.

Under torch.distributed rank r of W probes the files i with i % W == r, each rank in a small process
pool, and every rank gets every result through all_gather_object. With a cache folder (the run's
output_dir) rank 0 keeps the results in `metadata_cache/<fingerprint>.json`, the fingerprint hashing
the metadata file's path and bytes, the data folder and the probe version, so a restarted run opens no
file again. A media file replaced under the same name and unchanged metadata is not noticed: that is
the price of not opening a million files on every start.
"""

import dataclasses
import hashlib
import json
import multiprocessing
import multiprocessing.context
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import av
import torch.distributed as dist

from train.data.metadata import IMAGE_EXTENSIONS, Sample

try:
    from PIL import Image
except ImportError:  # PyAV reads image headers too
    Image = None

# Bump when what a probe returns changes, so old caches are not used.
PROBE_VERSION = 1
# Demuxers that read one still picture; their "frame rate" is a placeholder (25).
STILL_FORMATS = ("image2", "png_pipe", "jpeg_pipe", "webp_pipe", "bmp_pipe", "jpegls_pipe", "jpegxl_pipe")
CHUNK = 32  # files per worker task: few enough to spread, enough to amortise the task overhead
EXIF_ORIENTATION = 0x0112
FIELDS = ("width", "height", "num_frames", "fps", "still")

Info = dict  # {"width", "height", "num_frames", "fps", "still"}
Results = dict[str, tuple[Info | None, str | None]]


def _probe_image(path: str | Path, decode_check: bool) -> Info:
    with Image.open(path) as image:
        width, height = image.size
        if decode_check:
            image.load()
        orientation = image.getexif().get(EXIF_ORIENTATION, 1)
    if orientation in (5, 6, 7, 8):  # a quarter turn: load_image returns it transposed
        width, height = height, width
    return {"width": width, "height": height, "num_frames": 1, "fps": None, "still": True}


def probe_file(path: str | Path, decode_check: bool = False) -> Info:
    """{"width", "height", "num_frames", "fps", "still"} of an image or video file, from its header.

    Images give num_frames 1 and fps None. decode_check also decodes one frame (tools/prepare_metadata.py
    does, to catch files whose header is fine and whose codec data is not). Raises (OSError,
    av.FFmpegError, ValueError, ...) when the file cannot be read."""
    if Image is not None and Path(path).suffix.lower() in IMAGE_EXTENSIONS:
        return _probe_image(path, decode_check)
    with av.open(str(path), metadata_errors="ignore") as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        stream = container.streams.video[0]
        width, height = stream.codec_context.width, stream.codec_context.height
        if not width or not height:
            raise ValueError("the video stream has no frame size")
        still = any(name in STILL_FORMATS for name in container.format.name.split(","))
        if still:
            num_frames, fps = 1, None
        else:
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            fps = float(rate) if rate else None
            num_frames = stream.frames
        if decode_check and next(container.decode(stream), None) is None:
            raise ValueError("no frame decodes")
    if not num_frames:  # the container does not say: count the stream's packets, decoding none
        with av.open(str(path), metadata_errors="ignore") as container:
            num_frames = sum(1 for packet in container.demux(container.streams.video[0]) if packet.size)
        if not num_frames:
            raise ValueError("no frames")
    return {"width": width, "height": height, "num_frames": num_frames, "fps": fps, "still": still}


def _probe_chunk(
    paths: Sequence[str], marks: str | None = None, probe_fn: Callable[[str], Info] = probe_file
) -> list[tuple[str, Info | None, str | None]]:
    """(path, info or None, reason or None) for each path; never raises for one bad file.

    marks: a folder where the worker keeps the path it is probing in a file named by its pid, so that
    when it dies the parent knows which file it died on."""
    mark = Path(marks) / str(os.getpid()) if marks else None
    results = []
    for path in paths:
        if mark is not None:
            mark.write_text(path, encoding="utf-8")
        try:
            results.append((path, probe_fn(path), None))
        except Exception as err:  # any failure to read is a bad file, whatever raised it
            # OSError and PyAV's errors repeat the path after their message: it is listed beside it anyway
            message = getattr(err, "strerror", None) or str(err)
            reason = f"{type(err).__name__}: {message}".replace("\n", " ").replace("\t", " ")
            results.append((path, None, reason))
    return results


def _pool_context() -> multiprocessing.context.BaseContext:
    """fork where there is one (Linux): workers start at once and callers need no `if __name__ ==
    "__main__"` guard, which spawn requires of every script. The workers only run PyAV and PIL, so
    fork's hazards (locks held by the parent's other threads, a CUDA context) do not reach them."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


def _run_pool(chunks: list[list[str]], workers: int, results: Results, marks: str, probe_fn, progress) -> bool:
    """Probe chunks in a process pool into results; False when a worker died (the pool is then broken
    and every chunk not finished by then is left out of results)."""
    intact = True
    total = sum(len(chunk) for chunk in chunks) + len(results)
    with ProcessPoolExecutor(max_workers=min(workers, len(chunks)), mp_context=_pool_context()) as pool:
        futures = [pool.submit(_probe_chunk, chunk, marks, probe_fn) for chunk in chunks]
        for done, future in enumerate(as_completed(futures), start=1):
            try:
                results.update((path, (info, reason)) for path, info, reason in future.result())
            except BrokenProcessPool:
                intact = False
            if progress and done % 100 == 0:
                print(f"probed {len(results)}/{total} files", file=sys.stderr, flush=True)
    return intact


def _probe_alone(path: str, probe_fn) -> tuple[Info | None, str | None]:
    """Probe one file in a process of its own: the parent survives a crash inside FFmpeg."""
    with ProcessPoolExecutor(max_workers=1, mp_context=_pool_context()) as pool:
        try:
            ((_, info, reason),) = pool.submit(_probe_chunk, [path], None, probe_fn).result()
        except BrokenProcessPool:
            return None, "the probing process died on this file (a crash inside FFmpeg?)"
    return info, reason


def probe_all(
    paths: Iterable[str | Path],
    workers: int = 1,
    probe_fn: Callable[[str], Info] = probe_file,
    chunk: int = CHUNK,
    progress: bool = False,
) -> Results:
    """probe_fn over paths (each probed once), in `workers` processes; path -> (info, None) or (None, reason).
    probe_fn must be a module-level function (it travels to the workers by name).

    With workers > 1 a file that crashes FFmpeg costs one file, not the run: a dying worker breaks the
    whole pool, so the files the workers were on are probed again one process each (the one that dies
    again is bad), and a fresh pool takes the files not probed yet.
    """
    unique = list(dict.fromkeys(str(path) for path in paths))
    chunks = [unique[i : i + chunk] for i in range(0, len(unique), chunk)]
    results: Results = {}
    if workers <= 1 or len(chunks) <= 1:
        for part in chunks:
            results.update((path, (info, reason)) for path, info, reason in _probe_chunk(part, None, probe_fn))
        return results
    while chunks:
        with tempfile.TemporaryDirectory(prefix="probe-marks-") as marks:
            if _run_pool(chunks, workers, results, marks, probe_fn, progress):
                break
            suspects = {mark.read_text(encoding="utf-8") for mark in Path(marks).iterdir()} - results.keys()
        if not suspects:  # died outside probe_fn: nothing to blame, so give up on what is left
            suspects = {path for part in chunks for path in part} - results.keys()
            results.update((path, (None, "the probing process died")) for path in suspects)
            break
        results.update((path, _probe_alone(path, probe_fn)) for path in sorted(suspects))
        chunks = [left for part in chunks if (left := [path for path in part if path not in results])]
    return results


def enrich(sample: Sample, info: Info) -> tuple[Sample | None, str | None]:
    """The sample with the probed sizes (the file wins over the metadata), or (None, reason) when the
    file does not fit its type."""
    if sample.kind == "image":
        if info["num_frames"] > 1 and not info["still"]:
            return None, f"listed as type 'image' but the file is a video of {info['num_frames']} frames"
        return dataclasses.replace(sample, width=info["width"], height=info["height"], num_frames=None, fps=None), None
    if info["still"]:
        return None, "listed as type 'video' but the file is a still image"
    return dataclasses.replace(
        sample, width=info["width"], height=info["height"], num_frames=info["num_frames"], fps=info["fps"]
    ), None


def needs_probe(sample: Sample) -> bool:
    """Buckets need width and height; a video's frame draw needs its frame count."""
    return not sample.width or not sample.height or (sample.kind == "video" and not sample.num_frames)


def default_workers() -> int:
    """Probing processes per rank: the node's cores shared among its ranks, a few at most (probing is
    mostly waiting on the filesystem, and the ranks of a node probe at the same time)."""
    per_rank = (os.cpu_count() or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(4, per_rank))


def fingerprint(meta: str | Path | None, data_dir: str | Path | None, samples: Sequence[Sample]) -> str:
    """What the probe results depend on: the metadata file (resolved path and bytes), the folder relative
    paths start from, and the probe version. A folder dataset has no file: its listed paths stand in."""
    digest = hashlib.sha256(f"probe v{PROBE_VERSION}\n".encode())
    source = Path(os.path.expanduser(meta or data_dir or "")).resolve()
    digest.update(f"{source}\n{Path(os.path.expanduser(data_dir)).resolve() if data_dir else ''}\n".encode())
    if source.is_file():
        with source.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    else:
        for sample in samples:
            digest.update(f"{sample.path}\n".encode())
    return digest.hexdigest()[:32]


def _valid_entry(value: object) -> tuple[Info | None, str | None] | None:
    """A cached result, or None when it is not one this version writes."""
    if not isinstance(value, dict):
        return None
    if set(value) == {"bad"}:
        return (None, value["bad"]) if isinstance(value["bad"], str) else None
    if set(value) != set(FIELDS):
        return None
    whole = all(isinstance(value[k], int) and not isinstance(value[k], bool) and value[k] > 0 for k in FIELDS[:3])
    fps_ok = value["fps"] is None or (isinstance(value["fps"], int | float) and value["fps"] > 0)
    return (value, None) if whole and fps_ok and isinstance(value["still"], bool) else None


def read_cache(path: Path, key: str) -> tuple[Results, str | None]:
    """(results, None) from a cache file written for `key`; ({}, None) when there is none; ({}, why)
    when it exists but cannot be trusted (never used in part)."""
    if not path.exists():
        return {}, None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return {}, f"unreadable ({type(err).__name__}: {err})"
    if not isinstance(data, dict) or data.get("version") != PROBE_VERSION or data.get("fingerprint") != key:
        return {}, f"not a probe cache of version {PROBE_VERSION} for this metadata"
    entries = data.get("results")
    if not isinstance(entries, dict):
        return {}, "no 'results' object"
    results: Results = {}
    for file, value in entries.items():
        entry = _valid_entry(value)
        if entry is None:
            return {}, f"bad entry for {file}: {value!r}"
        results[file] = entry
    return results, None


def write_cache(path: Path, key: str, results: Results, meta: str | Path | None) -> None:
    """Write atomically (a reader sees the old file or the new one, never half of one)."""
    entries = {file: info if info is not None else {"bad": reason} for file, (info, reason) in results.items()}
    data = {"version": PROBE_VERSION, "fingerprint": key, "metadata": str(meta), "results": entries}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _gather(obj: object) -> list:
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, obj)
    return every


def cached_sizes(
    samples: list[Sample], meta: str | Path | None, data_dir: str | Path | None, cache_dir: str | Path | None
) -> list[Sample]:
    """The samples with the sizes fill_sizes cached in `cache_dir` filled in, opening no media file (for
    a plan before training): samples the cache does not hold stay as they are, those it holds as
    unreadable or of the wrong type are left out. No cache, or one written for other metadata: as given."""
    if not cache_dir or not any(needs_probe(s) for s in samples):
        return samples
    key = fingerprint(meta, data_dir, samples)
    results, _ = read_cache(Path(cache_dir) / "metadata_cache" / f"{key}.json", key)
    out = []
    for sample in samples:
        if needs_probe(sample) and str(sample.path) in results:
            info, _ = results[str(sample.path)]
            sample = enrich(sample, info)[0] if info is not None else None
        if sample is not None:
            out.append(sample)
    return out


def fill_sizes(
    samples: list[Sample],
    meta: str | Path | None,
    data_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    skipped: list[tuple[str, str]] | None = None,
    rank: int = 0,
    workers: int | None = None,
) -> list[Sample]:
    """The samples with missing sizes read from their files (samples that have them pass unchanged, in
    order); unreadable files, and files that do not fit their type, are left out and appended to
    `skipped` as (path, reason), one per entry. Under torch.distributed every rank must call it (it
    gathers); `rank` (used without torch.distributed) says which process prints and writes the cache."""
    missing = [s for s in samples if needs_probe(s)]
    if not missing:
        return samples
    distributed = _distributed()
    main = (dist.get_rank() if distributed else rank) == 0
    paths = list(dict.fromkeys(str(s.path) for s in missing))
    cache = None
    results: Results = {}
    problem = None
    if cache_dir is not None and str(cache_dir) != "":
        key = fingerprint(meta, data_dir, samples)
        cache = Path(cache_dir) / "metadata_cache" / f"{key}.json"
        results, problem = read_cache(cache, key)
        if problem and main:
            print(f"ignoring the probe cache {cache}: {problem}; probing again", flush=True)
    todo = [p for p in paths if p not in results]
    if distributed:  # the files any rank lacks (all read the same cache, unless a filesystem lags)
        todo = list(dict.fromkeys(p for part in _gather(todo) for p in part))
    if todo:
        start = time.perf_counter()
        share = todo[dist.get_rank() :: dist.get_world_size()] if distributed else todo
        mine = probe_all(share, workers or default_workers(), progress=main)
        for part in _gather(mine) if distributed else [mine]:
            results.update(part)
        seconds = time.perf_counter() - start
        unreadable = sum(results[p][0] is None for p in todo)
        if main:
            where = ""
            if cache is not None:
                try:
                    write_cache(cache, key, results, meta)
                    where = f"; cached in {cache}"
                except OSError as err:  # a cache that cannot be written costs the next start a probe, no more
                    where = f"; NOT cached ({cache}: {err})"
            print(f"probed {len(todo)} files in {seconds:.1f} s ({unreadable} unreadable){where}", flush=True)
    elif main:
        print(f"sizes of {len(missing)} entries from cache {cache}", flush=True)

    out = []
    for sample in samples:
        if not needs_probe(sample):
            out.append(sample)
            continue
        info, reason = results[str(sample.path)]
        enriched = None
        if info is not None:
            enriched, reason = enrich(sample, info)
        if enriched is not None:
            out.append(enriched)
        elif skipped is not None:
            skipped.append((str(sample.path), reason))
    return out
