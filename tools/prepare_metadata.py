"""Probe every listed file once, ahead of training: sizes, frame counts, frame rates, and the files that
cannot be read, so buckets need no file opened and a data-loader worker never meets a broken file.

    python -m tools.prepare_metadata IN_META OUT_META [--data-dir D --workers N]

IN_META is anything load_metadata reads (.json, .jsonl, .csv or a folder of media + .txt captions);
OUT_META (.json, .jsonl or .csv) gets every readable sample with width, height and, for videos,
num_frames and fps filled in from the file (the file wins over what IN_META claimed). Unreadable files
are left out, printed, and listed as "path<TAB>reason" lines in OUT_META + ".bad.txt" (written, empty,
even when all files read, so a stale list never survives).

Frame counts come from the container (mp4's sample table); where it has none (mkv, webm, some avi)
packets are counted by demuxing, which reads the file but decodes nothing. One frame is decoded per
file, to catch files whose container is fine but whose codec data is not.
"""

import argparse
import dataclasses
import multiprocessing
import multiprocessing.context
import os
import sys
import tempfile
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import av

if __package__ in (None, ""):  # run as a script: python tools/prepare_metadata.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train.data.metadata import Sample, load_metadata, save_metadata  # noqa: E402

# Demuxers that read one still picture; their "frame rate" is a placeholder (25).
STILL_FORMATS = ("image2", "png_pipe", "jpeg_pipe", "webp_pipe", "bmp_pipe", "jpegls_pipe", "jpegxl_pipe")
CHUNK = 32  # files per worker task: few enough to spread, enough to amortise the task overhead


def probe(path: str | Path) -> dict:
    """{"width", "height", "num_frames", "fps", "still"} of an image or video file, read with PyAV.

    Images give num_frames 1 and fps None. Raises (any exception: OSError, av.FFmpegError, ValueError)
    when the file cannot be read; prepare_metadata turns that into a line of the bad-file list.
    """
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
        if next(container.decode(stream), None) is None:
            raise ValueError("no frame decodes")
    if not num_frames:  # the container does not say: count the stream's packets, decoding none
        with av.open(str(path), metadata_errors="ignore") as container:
            num_frames = sum(1 for packet in container.demux(container.streams.video[0]) if packet.size)
        if not num_frames:
            raise ValueError("no frames")
    return {"width": width, "height": height, "num_frames": num_frames, "fps": fps, "still": still}


def _probe_chunk(paths: Sequence[str], marks: str | None = None) -> list[tuple[str, dict | None, str | None]]:
    """(path, probe or None, reason or None) for each path; never raises for one bad file.

    marks: a folder where the worker keeps the path it is probing in a file named by its pid, so that
    when it dies the parent knows which file it died on."""
    mark = Path(marks) / str(os.getpid()) if marks else None
    results = []
    for path in paths:
        if mark is not None:
            mark.write_text(path, encoding="utf-8")
        try:
            results.append((path, probe(path), None))
        except Exception as err:  # any failure to read is a bad file, whatever raised it
            reason = f"{type(err).__name__}: {err}".replace("\n", " ").replace("\t", " ")
            results.append((path, None, reason))
    return results


def _pool_context() -> multiprocessing.context.BaseContext:
    """fork where there is one (Linux): workers start at once and callers need no `if __name__ ==
    "__main__"` guard, which spawn requires of every script that calls prepare_metadata. The workers
    only run PyAV, so fork's hazard (locks held by the parent's other threads) does not reach them."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


Results = dict[str, tuple[dict | None, str | None]]


def _run_pool(chunks: list[list[str]], workers: int, results: Results, total: int, marks: str) -> bool:
    """Probe chunks in a process pool into results; False when a worker died (the pool is then broken
    and every chunk not finished by then is left out of results)."""
    intact = True
    with ProcessPoolExecutor(max_workers=min(workers, len(chunks)), mp_context=_pool_context()) as pool:
        futures = [pool.submit(_probe_chunk, chunk, marks) for chunk in chunks]
        for done, future in enumerate(as_completed(futures), start=1):
            try:
                results.update((path, (info, reason)) for path, info, reason in future.result())
            except BrokenProcessPool:
                intact = False
            if done % 100 == 0:
                print(f"probed {len(results)}/{total} files", file=sys.stderr)
    return intact


def _probe_alone(path: str) -> tuple[dict | None, str | None]:
    """Probe one file in a process of its own: the parent survives a crash inside FFmpeg."""
    with ProcessPoolExecutor(max_workers=1, mp_context=_pool_context()) as pool:
        try:
            ((_, info, reason),) = pool.submit(_probe_chunk, [path]).result()
        except BrokenProcessPool:
            return None, "the probing process died on this file (a crash inside FFmpeg?)"
    return info, reason


def probe_all(paths: Iterable[str | Path], workers: int = 1) -> Results:
    """probe() over paths (each probed once), in `workers` processes; path -> (probe, None) or (None, reason).

    With workers > 1 a file that crashes FFmpeg costs one file, not the run: a dying worker breaks the
    whole pool, so the files the workers were on are probed again one process each (the one that dies
    again is bad), and a fresh pool takes the files not probed yet.
    """
    unique = list(dict.fromkeys(str(path) for path in paths))
    chunks = [unique[i : i + CHUNK] for i in range(0, len(unique), CHUNK)]
    results: Results = {}
    if workers <= 1 or len(chunks) <= 1:
        for chunk in chunks:
            results.update((path, (info, reason)) for path, info, reason in _probe_chunk(chunk))
        return results
    while chunks:
        with tempfile.TemporaryDirectory(prefix="probe-marks-") as marks:
            if _run_pool(chunks, workers, results, len(unique), marks):
                break
            suspects = {mark.read_text(encoding="utf-8") for mark in Path(marks).iterdir()} - results.keys()
        if not suspects:  # died outside probe(): nothing to blame, so give up on what is left
            suspects = {path for chunk in chunks for path in chunk} - results.keys()
            results.update((path, (None, "the probing process died")) for path in suspects)
            break
        results.update((path, _probe_alone(path)) for path in sorted(suspects))
        chunks = [left for chunk in chunks if (left := [path for path in chunk if path not in results])]
    return results


def enrich(sample: Sample, info: dict) -> tuple[Sample | None, str | None]:
    """The sample with the probed sizes, or (None, reason) when the file does not fit its type."""
    if sample.kind == "image":
        if info["num_frames"] > 1 and not info["still"]:
            return None, f"listed as type 'image' but the file is a video of {info['num_frames']} frames"
        return dataclasses.replace(sample, width=info["width"], height=info["height"], num_frames=None, fps=None), None
    if info["still"]:
        return None, "listed as type 'video' but the file is a still image"
    return dataclasses.replace(
        sample, width=info["width"], height=info["height"], num_frames=info["num_frames"], fps=info["fps"]
    ), None


def prepare_metadata(
    in_meta: str | Path | None,
    out_meta: str | Path,
    data_dir: str | Path | None = None,
    workers: int = 1,
    verbose: bool = True,
) -> tuple[list[Sample], list[tuple[Path, str]]]:
    """Probe every sample of in_meta, write the readable ones with their sizes to out_meta and the
    unreadable ones to out_meta + ".bad.txt". Returns (samples written, [(path, reason)] left out),
    both in in_meta's order (a duplicated bad file is listed once)."""
    samples = load_metadata(in_meta, data_dir)
    results = probe_all((sample.path for sample in samples), workers)
    good: list[Sample] = []
    bad: dict[Path, str] = {}
    for sample in samples:
        info, reason = results[str(sample.path)]
        if info is not None:
            enriched, reason = enrich(sample, info)
            if enriched is not None:
                good.append(enriched)
        if reason is not None:
            bad.setdefault(sample.path, reason)
    out_meta = Path(out_meta)
    save_metadata(good, out_meta, data_dir)
    bad_list = list(bad.items())
    bad_file = out_meta.with_name(out_meta.name + ".bad.txt")
    bad_file.write_text("".join(f"{path}\t{reason}\n" for path, reason in bad_list), encoding="utf-8")
    if verbose:
        for path, reason in bad_list:
            print(f"unreadable: {path}: {reason}", file=sys.stderr)
        print(f"wrote {len(good)} of {len(samples)} samples to {out_meta}; {len(bad_list)} bad file(s) in {bad_file}")
    return good, bad_list


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("in_meta", help=".json, .jsonl, .csv, or a folder of media files with .txt captions")
    parser.add_argument("out_meta", help=".json, .jsonl or .csv to write")
    parser.add_argument("--data-dir", default=None, help="folder that relative file paths start from")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    args = parser.parse_args(argv)
    prepare_metadata(args.in_meta, args.out_meta, args.data_dir, args.workers)


if __name__ == "__main__":
    main()
