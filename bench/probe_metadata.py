"""Filling in the sizes of a metadata file without them (train/data/probe.py): probing the files' headers
cold (no cache) against reading the run's cache, one rank.

    python bench/probe_metadata.py                      # 1,000 entries, each its own file
    python bench/probe_metadata.py --entries 100000 --files 1000   # files listed many times over

Writes --files small files (half 64x48 h264 mp4 clips of 9..17 frames, half PNG/JPEG images) with PyAV
and PIL and a VideoX-Fun metadata.json of {file_path, text, type} listing --entries entries over them
(entry i names file i % files), then times fill_sizes cold with 1 probing process and with the
default count, and cached. "Cold" means no probe cache; the files themselves were just written, so they
sit in the OS page cache (a real first run on a network filesystem is slower).
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train.data.metadata import load_metadata  # noqa: E402
from train.data.probe import default_workers, fill_sizes  # noqa: E402


def write_files(folder: Path, count: int) -> list[dict]:
    """count files, alternately a clip and an image; their metadata entries (no sizes)."""
    entries = []
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    for i in range(count):
        if i % 2 == 0:
            name = f"clip {i:05d}.mp4"
            with av.open(str(folder / name), "w") as container:
                stream = container.add_stream(codec, rate=16)
                stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
                for f in range(9 + 4 * (i % 3)):
                    image = np.full((48, 64, 3), (i + 16 * f) % 256, np.uint8)
                    container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
                container.mux(stream.encode())
            entries.append({"file_path": name, "text": f"clip {i}", "type": "video"})
        else:
            name = f"image {i:05d}.{'png' if i % 4 == 1 else 'jpg'}"
            Image.new("RGB", (64 + 16 * (i % 3), 48), (i % 256, 80, 160)).save(folder / name)
            entries.append({"file_path": name, "text": f"image {i}"})
    return entries


def timed(meta: Path, cache: Path | None, workers: int) -> float:
    samples = load_metadata(meta)
    start = time.perf_counter()
    filled = fill_sizes(samples, meta, cache_dir=cache, workers=workers)
    seconds = time.perf_counter() - start
    assert len(filled) == len(samples) and all(s.width and s.height for s in filled)
    return seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=1000)
    parser.add_argument("--files", type=int, default=0, help="distinct files (0: one per entry)")
    args = parser.parse_args(argv)
    files = args.files or args.entries
    with tempfile.TemporaryDirectory(prefix="probe-bench-") as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        start = time.perf_counter()
        made = write_files(data, files)
        print(f"wrote {files} files in {time.perf_counter() - start:.1f} s", file=sys.stderr)
        meta = data / "metadata.json"
        meta.write_text(json.dumps([made[i % files] for i in range(args.entries)]), encoding="utf-8")
        rows = []
        for workers in dict.fromkeys((1, default_workers())):
            cache = Path(tmp) / f"out-{workers}"
            cold = timed(meta, cache, workers)
            cached = timed(meta, cache, workers)
            rows.append((workers, cold, cached))
    print(f"\n{os.cpu_count()} CPUs; {args.entries} entries over {files} distinct files; 1 rank\n")
    print("| entries | files | probe processes | cold s | cached s | cold / cached |")
    print("|---|---|---|---|---|---|")
    for workers, cold, cached in rows:
        print(f"| {args.entries} | {files} | {workers} | {cold:.2f} | {cached:.3f} | {cold / cached:.0f}x |")


if __name__ == "__main__":
    main()
