"""Data pipeline throughput and memory: the DataLoader (decode + resize + crop, 1 and 2 workers)
against the floor of PyAV decoding just the needed frames in one process.

    python bench/data.py                    # 720p h264 clips -> 480x832, 81-frame samples
    python bench/data.py --frames 33 --clips 3 --samples 6 --memory-samples 1000

Prints clips/s and frames/s, the ratio of time per sample per worker to the floor, and the resident
memory of the main process every quarter of --memory-samples (num_workers=0, small clips): it should
stay flat.
"""

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import rss_bytes  # noqa: E402
from train.data.dataset import SizeOptions, VideoDataset, bucket_keys, collate, make_choose  # noqa: E402
from train.data.metadata import Sample  # noqa: E402
from train.data.sampler import DistributedBucketBatchSampler  # noqa: E402
from train.data.synthetic import write_video  # noqa: E402
from train.data.video import decode_frames  # noqa: E402


def moving_frames(num_frames: int, width: int, height: int, seed: int):
    """A gradient with a moving square: cheap to make, not trivially compressible."""
    rng = np.random.default_rng(seed)
    base = np.zeros((height, width, 3), np.uint8)
    base[..., 0] = np.linspace(0, 255, width, dtype=np.uint8)[None]
    base[..., 1] = np.linspace(0, 255, height, dtype=np.uint8)[:, None]
    base[..., 2] = rng.integers(0, 255)
    for i in range(num_frames):
        frame = base.copy()
        x = (i * 7) % (width - 64)
        frame[height // 3 : height // 3 + 64, x : x + 64] = 255
        yield frame


def make_clips(folder: Path, count: int, num_frames: int, width: int, height: int) -> list[Sample]:
    samples = []
    for i in range(count):
        path = write_video(folder / f"clip{i}.mp4", moving_frames(num_frames, width, height, i), fps=16)
        samples.append(Sample(path, f"clip {i}", "video", width, height, num_frames, 16.0))
    return samples


def floor_seconds(samples: list[Sample], num_frames: int, count: int) -> float:
    """Seconds per sample of decoding just the needed frames (no resize), in this process."""
    rng = random.Random(0)
    times = []
    for i in range(count):
        sample = samples[i % len(samples)]
        start = rng.randint(0, sample.num_frames - num_frames)
        t0 = time.perf_counter()
        decode_frames(sample.path, list(range(start, start + num_frames)))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def dataset_seconds(samples: list[Sample], size: int, num_frames: int, count: int) -> float:
    """Seconds per sample of the dataset itself (decode, scale, crop) in this process: the pipeline
    without the DataLoader's process boundary."""
    dataset = VideoDataset(samples, caption_dropout=0.0)
    times = []
    for step in range(count):
        extras = {"epoch": 0, "step": step, "size": size, "num_frames": num_frames}
        t0 = time.perf_counter()
        dataset[(step % len(samples), extras)]
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def loader(samples: list[Sample], size: int, num_frames: int, workers: int, epoch: int = 0) -> DataLoader:
    options = SizeOptions(video_sample_size=size, image_sample_size=size, video_sample_n_frames=num_frames)
    sampler = DistributedBucketBatchSampler(bucket_keys(samples), batch_size=1, seed=0, choose=make_choose(options))
    sampler.set_epoch(epoch)
    dataset = VideoDataset(samples, caption_dropout=0.0)
    return DataLoader(
        dataset, batch_sampler=sampler, num_workers=workers, collate_fn=collate, prefetch_factor=2 if workers else None
    )


def pipeline_seconds(samples, size, num_frames, workers, count) -> tuple[float, tuple]:
    """Wall seconds per sample over `count` samples after the first (worker start-up excluded).
    The clip list is repeated so that one epoch holds the whole run: workers start once."""
    start, shape = None, None
    for served, batch in enumerate(loader(samples * (count // len(samples) + 2), size, num_frames, workers)):
        if served == 0:
            start = time.perf_counter()
        shape = tuple(batch["pixels"].shape)
        if served == count:
            break
    return (time.perf_counter() - start) / count, shape


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=3)
    parser.add_argument("--clip-frames", type=int, default=97, help="frames per generated source clip")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--frames", type=int, default=81, help="frames per sample (4k+1)")
    parser.add_argument("--size", type=int, default=640, help="video_sample_size: 640 gives 480x832 for 16:9")
    parser.add_argument("--samples", type=int, default=6, help="samples timed per configuration")
    parser.add_argument("--memory-samples", type=int, default=1000)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        samples = make_clips(Path(tmp), args.clips, args.clip_frames, args.width, args.height)
        print(
            f"wrote {args.clips} {args.width}x{args.height} clips of {args.clip_frames} frames in {time.perf_counter() - t0:.1f} s"
        )
        floor = floor_seconds(samples, args.frames, args.samples)
        rows = [("PyAV decode floor (1 process)", 1, floor, None)]
        rows.append(
            ("dataset item, same process", 1, dataset_seconds(samples, args.size, args.frames, args.samples), None)
        )
        for workers in (1, 2):
            per_sample, shape = pipeline_seconds(samples, args.size, args.frames, workers, args.samples)
            rows.append((f"DataLoader, {workers} worker(s)", workers, per_sample, shape))
        print(
            f"\n{args.frames}-frame samples from {args.width}x{args.height} clips, resized and cropped to size {args.size}"
        )
        print("| pipeline | clips/s | frames/s | s per sample per worker | / floor |")
        print("|---|---|---|---|---|")
        for name, workers, per_sample, shape in rows:
            per_worker = per_sample * workers
            print(
                f"| {name} | {1 / per_sample:.2f} | {args.frames / per_sample:.0f} | {per_worker:.3f} | "
                f"{per_worker / floor:.2f} |" + (f" output {list(shape)}" if shape else "")
            )

        small = make_clips(Path(tmp) / "small", 2, 33, 256, 144)
        checkpoints = {round(args.memory_samples * q / 4) for q in range(5)}
        readings = []
        for served, _ in enumerate(loader(small * (args.memory_samples // len(small) + 1), 256, 17, 0)):
            if served in checkpoints:
                readings.append((served, rss_bytes("VmRSS") / 2**20))
            if served == args.memory_samples:
                break
        print("\nresident memory of the loading process (MiB), 17-frame samples of 256x144 clips, num_workers=0:")
        print(" | ".join(f"{n}: {mib:.0f}" for n, mib in readings))


if __name__ == "__main__":
    main()
