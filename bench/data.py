"""Data pipeline throughput and memory: the DataLoader (decode + resize + crop, 1 and 2 workers)
against the floor of PyAV decoding just the needed frames in one process.

    python bench/data.py                    # 720p h264 clips -> 480x832, 81-frame samples
    python bench/data.py --frames 33 --clips 3 --samples 6 --memory-samples 1000

Prints clips/s and frames/s, the wall and CPU time per sample per worker against the floor (decoding
the needed frames, converting none) and against decoding them to full-size RGB arrays (what a reader
that resizes afterwards does), and the resident memory of the main process every quarter of
--memory-samples (num_workers=0, small clips): it should stay flat. The DataLoader rows compare fresh
shared memory per batch with the reused buffers of train/data/transfer.py; the training process maps
every page of every batch, as a copy to the GPU would.
"""

import argparse
import gc
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import rss_bytes  # noqa: E402
from train.data.dataset import SizeOptions, VideoDataset, bucket_keys, collate, make_choose  # noqa: E402
from train.data.metadata import Sample  # noqa: E402
from train.data.sampler import DistributedBucketBatchSampler  # noqa: E402
from train.data.synthetic import write_video  # noqa: E402
from train.data.transfer import TransferPool  # noqa: E402
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


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (DataLoader workers, once joined)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def decode_only(path: Path, last: int) -> None:
    """Decode frames 0..last and convert none: the generated clips have one key frame, so this is what
    any reader must decode to reach the wanted frames."""
    with av.open(str(path)) as container:
        for index, _ in enumerate(container.decode(container.streams.video[0])):
            if index == last:
                return


def floor_seconds(samples: list[Sample], num_frames: int, count: int, to_rgb: bool) -> tuple[float, float]:
    """Wall and CPU seconds per sample of decoding just the needed frames in this process: the frames
    alone (the floor), or also converted to full-size RGB (decode_frames with no resize)."""
    rng = random.Random(0)
    times, cpu = [], []
    for i in range(count):
        sample = samples[i % len(samples)]
        start = rng.randint(0, sample.num_frames - num_frames)
        t0, c0 = time.perf_counter(), cpu_seconds()
        if to_rgb:
            decode_frames(sample.path, list(range(start, start + num_frames)))
        else:
            decode_only(sample.path, start + num_frames - 1)
        times.append(time.perf_counter() - t0)
        cpu.append(cpu_seconds() - c0)
    return statistics.median(times), statistics.median(cpu)


def dataset_seconds(samples: list[Sample], size: int, num_frames: int, count: int) -> tuple[float, float]:
    """Wall and CPU seconds per sample of the dataset itself (decode, scale, crop) in this process:
    the pipeline without the DataLoader's process boundary."""
    dataset = VideoDataset(samples, caption_dropout=0.0)
    times, cpu = [], []
    for step in range(count):
        extras = {"epoch": 0, "step": step, "size": size, "num_frames": num_frames}
        t0, c0 = time.perf_counter(), cpu_seconds()
        dataset.__getitems__([(step % len(samples), extras)])
        times.append(time.perf_counter() - t0)
        cpu.append(cpu_seconds() - c0)
    return statistics.median(times), statistics.median(cpu)


def loader(samples: list[Sample], size: int, num_frames: int, workers: int, pooled: bool = True) -> DataLoader:
    """The training loader's setup (build_dataloader's), on samples that need no metadata file."""
    options = SizeOptions(video_sample_size=size, image_sample_size=size, video_sample_n_frames=num_frames)
    sampler = DistributedBucketBatchSampler(bucket_keys(samples), batch_size=1, seed=0, choose=make_choose(options))
    transfer = TransferPool(workers, 2 + 2) if workers and pooled else None
    dataset = VideoDataset(samples, caption_dropout=0.0, transfer=transfer)
    return DataLoader(
        dataset, batch_sampler=sampler, num_workers=workers, collate_fn=collate, prefetch_factor=2 if workers else None
    )


def pipeline_seconds(samples, size, num_frames, workers, count, pooled=True) -> tuple[float, float, tuple]:
    """Wall seconds per sample over `count` samples after the first (worker start-up excluded), and
    CPU seconds per sample of all processes (start-up included). The clip list is repeated so that one
    epoch holds the whole run: workers start once."""
    start, shape = None, None
    c0 = cpu_seconds()
    batches = iter(loader(samples * (count // len(samples) + 2), size, num_frames, workers, pooled))
    for served, batch in enumerate(batches):
        if served == 0:
            start = time.perf_counter()
        shape = tuple(batch["pixels"].shape)
        batch["pixels"].view(-1)[::4096].sum()  # map every page in the training process (a copy to the GPU would)
        if served == count:
            break
    wall = (time.perf_counter() - start) / count
    del batch, batches  # joins the workers, so their CPU time is counted
    gc.collect()
    return wall, (cpu_seconds() - c0) / (count + 1), shape


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
        floor, floor_cpu = floor_seconds(samples, args.frames, args.samples, to_rgb=False)
        rows = [("floor: PyAV decode of the needed frames (1 process)", 1, floor, floor_cpu, None)]
        rgb = floor_seconds(samples, args.frames, args.samples, to_rgb=True)
        rows.append(("PyAV decode + full-size RGB (1 process)", 1, *rgb, None))
        rows.append(("dataset, same process", 1, *dataset_seconds(samples, args.size, args.frames, args.samples), None))
        for workers, pooled in ((1, False), (1, True), (2, True)):
            name = f"DataLoader, {workers} worker(s), " + ("reused buffers" if pooled else "fresh buffers")
            rows.append(
                (name, workers, *pipeline_seconds(samples, args.size, args.frames, workers, args.samples, pooled))
            )
        print(
            f"\n{args.frames}-frame samples from {args.width}x{args.height} clips, resized and cropped to size "
            f"{args.size}; {os.cpu_count()} CPU cores"
        )
        print(
            "| pipeline | clips/s | frames/s | wall s per sample per worker | / floor | / decode+RGB "
            "| CPU s per sample | / floor | / decode+RGB |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for name, workers, per_sample, cpu, shape in rows:
            per_worker = per_sample * workers
            print(
                f"| {name} | {1 / per_sample:.2f} | {args.frames / per_sample:.0f} | {per_worker:.3f} | "
                f"{per_worker / floor:.2f} | {per_worker / rgb[0]:.2f} | {cpu:.3f} | {cpu / floor_cpu:.2f} | "
                f"{cpu / rgb[1]:.2f} |" + (f" output {list(shape)}" if shape else "")
            )

        small = make_clips(Path(tmp) / "small", 2, 33, 256, 144)
        checkpoints = {round(args.memory_samples * q / 4) for q in range(5)}
        readings = []
        for served, _ in enumerate(loader(small * (args.memory_samples // len(small) + 1), 256, 17, workers=0)):
            if served in checkpoints:
                readings.append((served, rss_bytes("VmRSS") / 2**20))
            if served == args.memory_samples:
                break
        print("\nresident memory of the loading process (MiB), 17-frame samples of 256x144 clips, num_workers=0:")
        print(" | ".join(f"{n}: {mib:.0f}" for n, mib in readings))


if __name__ == "__main__":
    main()
