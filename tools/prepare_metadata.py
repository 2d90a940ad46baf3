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
file, to catch files whose container is fine but whose codec data is not (training, which probes
the sizes a metadata file lacks by itself, reads headers only: train/data/probe.py).

Relative file_paths start from --data-dir, or else from IN_META's own folder (never the working
directory), exactly as training reads them with train_data_dir. Exits with 1 when no sample could be
written (most often: the metadata sits outside the data folder and --data-dir is missing).
"""

import argparse
import os
import sys
from collections.abc import Iterable
from pathlib import Path

if __package__ in (None, ""):  # run as a script: python tools/prepare_metadata.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train.data.metadata import Sample, load_metadata, save_metadata  # noqa: E402
from train.data.probe import CHUNK, STILL_FORMATS, Results, enrich, probe_file  # noqa: E402, F401
from train.data.probe import probe_all as _probe_all  # noqa: E402


def probe(path: str | Path) -> dict:
    """{"width", "height", "num_frames", "fps", "still"} of an image or video file, one frame decoded
    (train/data/probe.py's probe_file with decode_check). Raises when the file cannot be read."""
    return probe_file(path, decode_check=True)


def _probe_here(path: str) -> dict:
    # Looked up at call time, in the (forked) worker too, so a test can stand in for probe().
    return probe(path)


def probe_all(paths: Iterable[str | Path], workers: int = 1) -> Results:
    """probe() over paths in `workers` processes (train/data/probe.py's probe_all): path -> (info, None)
    or (None, reason); a file that crashes FFmpeg costs that file, not the run."""
    return _probe_all(paths, workers, probe_fn=_probe_here, chunk=CHUNK, progress=True)


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
    try:
        good, bad = prepare_metadata(args.in_meta, args.out_meta, args.data_dir, args.workers)
    except ValueError as err:  # the metadata itself is wrong: its message lists every problem
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    if not good:
        # Most often every path is wrong at once: relative paths resolved against the wrong folder.
        in_meta = Path(args.in_meta)
        base = Path(args.data_dir) if args.data_dir else (in_meta if in_meta.is_dir() else in_meta.parent)
        origin = "--data-dir" if args.data_dir else "the metadata file's folder"
        path, reason = bad[0]
        print(
            f"error: none of the {len(bad)} listed files could be read, so {args.out_meta} lists no sample "
            f"(the first: {path}: {reason}). Relative file_paths start from {base.resolve()} "
            f"({origin}); if the media "
            "lie elsewhere, pass --data-dir with the folder they start from",
            file=sys.stderr,
        )
        raise SystemExit(1)


if __name__ == "__main__":
    main()
