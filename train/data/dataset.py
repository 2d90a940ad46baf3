"""Samples as the sampler asks for them: one clip or image, decoded, resized to the step's bucket
size and frame count, with its (possibly dropped) caption.

Every random choice of a sample (start frame, caption dropout, the replacement of a bad file) comes
from a generator seeded by (seed, epoch, step, sample index), so a resumed run draws exactly what an
uninterrupted one would, whatever the number of DataLoader workers.

Bad files never stop a batch: a sample that cannot give its frames (missing, corrupt, too short,
too slow to decode) is replaced by another sample of the same bucket (up to `max_retries` distinct ones), and
reported in the batch's `skipped` list so the training process can log each path once, count them
and stop above a set fraction (`BadSampleTracker`). Workers are separate processes, so the report
travels with the data.
"""

import contextlib
import logging
import random
import signal
import threading
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from train.data.buckets import (
    bucket_table,
    decoded_mean_side,
    downsample_choices,
    downsampled_size,
    frames_for_token_budget,
    nearest_ratio,
    random_frame_crop,
    token_length_choices,
    token_length_sizes,
)
from train.data.metadata import Sample
from train.data.sampler import derive_seed
from train.data.transfer import TransferPool, empty_for_transfer
from train.data.video import MediaError, decode_frames, load_image, resize_cover_crop, to_frame_tensor

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SizeOptions:
    """How each step's size and frame count are drawn (VideoX-Fun's names)."""

    video_sample_size: int = 512
    image_sample_size: int = 512
    video_sample_n_frames: int = 49
    random_hw_adapt: bool = False
    training_with_video_token_length: bool = False
    token_sample_size: int = 512
    random_frame_crop: bool = False


def bucket_keys(samples: list[Sample]) -> list[tuple[str, float]]:
    """(kind, aspect ratio of the 512 table) per sample, from the metadata sizes alone: images and
    videos keep separate buckets. Samples without width/height are refused, all listed."""
    missing = [str(s.path) for s in samples if not s.width or not s.height]
    if missing:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise ValueError(
            f"{len(missing)} samples have no width/height ({shown}); build_dataloader probes them "
            "(train/data/probe.py) before bucketing"
        )
    return [(s.kind, nearest_ratio(s.height, s.width)) for s in samples]


def make_choose(
    options: SizeOptions, sizes: Sequence[tuple[int, int]] = ()
) -> Callable[[random.Random, Hashable, Sequence[int]], dict]:
    """The sampler's per-step choice {"size": S, "num_frames": F} for a bucket (kind, ratio) and the
    step's sample indices; `sizes` holds each sample's (height, width).

    VideoX-Fun's rule (its collate_fn), per global step here rather than per rank's batch, so every
    rank trains one shape:
    - images: image_sample_size, divided with random_hw_adapt by a ratio drawn from
      downsample_choices(image_sample_size, image_sample_size / video_sample_size); 1 frame.
    - videos, random_hw_adapt with training_with_video_token_length: a size drawn uniformly from
      token_length_sizes() below 1.25 x the smallest clip's mean side, frames from the token budget.
    - videos, random_hw_adapt alone: video_sample_size divided by a ratio drawn from
      downsample_choices(video_sample_size); video_sample_n_frames.
    - otherwise (training_with_video_token_length alone too): video_sample_size, video_sample_n_frames.
      The token length alone repeats small batches instead (token_length_repeats, in the loop).
    random_frame_crop then shortens the clip (pixel frames, see random_frame_crop).
    """
    o = options
    cap = max(o.image_sample_size, o.video_sample_size)

    def choose(rng: random.Random, key: Hashable, indices: Sequence[int] = ()) -> dict:
        if key[0] == "image":
            size = o.image_sample_size
            if o.random_hw_adapt:
                ratios, probs = downsample_choices(o.image_sample_size, o.image_sample_size / o.video_sample_size)
                size = downsampled_size(o.image_sample_size, rng.choices(ratios, probs)[0])
            return {"size": size, "num_frames": 1}
        size, n_frames = o.video_sample_size, o.video_sample_n_frames
        if o.random_hw_adapt and o.training_with_video_token_length:
            means = [decoded_mean_side(*sizes[i], cap) for i in indices] if sizes else [float(cap)]
            size = rng.choice(token_length_choices(token_length_sizes(o.video_sample_size, o.image_sample_size), means))
            n_frames = frames_for_token_budget(size, o.token_sample_size, n_frames)
        elif o.random_hw_adapt:
            ratios, probs = downsample_choices(o.video_sample_size)
            size = downsampled_size(o.video_sample_size, rng.choices(ratios, probs)[0])
        if o.random_frame_crop:
            n_frames = random_frame_crop(n_frames, rng)
        return {"size": size, "num_frames": n_frames}

    return choose


@contextlib.contextmanager
def _time_limit(seconds: float, path: str):
    """Raise MediaError when the body runs longer than `seconds` (a decoder stuck on a broken file).
    Uses SIGALRM, so it applies in a process's main thread (a DataLoader worker's, or the main
    process with num_workers=0) and is skipped elsewhere."""
    if seconds <= 0 or threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum, frame):
        raise MediaError(path, f"decoding took longer than {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class VideoDataset(Dataset):
    """Map-style dataset over (sample index, step extras) items from DistributedBucketBatchSampler.

    Returns {"pixels": [F, H, W, 3] uint8 as decoded (pixels_to_model turns a batch into the VAE's
    [B, 3, F, H, W] in [-1, 1] on the training device), "text": str, "index": int, "skipped":
    [(path, reason), ...]}; every item of one step has the same shape. `keys` overrides the buckets
    (kind, ratio) derived from the metadata, e.g. one square bucket per kind for a fixed-size run;
    `transfer` gives DataLoader workers reusable shared buffers for their batches."""

    def __init__(
        self,
        samples: list[Sample],
        *,
        keys: list[Hashable] | None = None,
        video_sample_stride: int = 1,
        caption_dropout: float = 0.1,
        seed: int = 0,
        max_retries: int = 3,
        decode_timeout: float = 60.0,
        transfer: TransferPool | None = None,
    ):
        if not 0.0 <= caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1], got {caption_dropout}")
        if video_sample_stride < 1 or max_retries < 0:
            raise ValueError(
                f"video_sample_stride must be >= 1 and max_retries >= 0, got {video_sample_stride}, {max_retries}"
            )
        self.samples = samples
        self.keys = bucket_keys(samples) if keys is None else keys
        self.stride = video_sample_stride
        self.caption_dropout = caption_dropout
        self.seed = seed
        self.max_retries = max_retries
        self.decode_timeout = decode_timeout
        self.transfer = transfer
        self.members: dict[Hashable, list[int]] = {}
        for index, key in enumerate(self.keys):
            self.members.setdefault(key, []).append(index)

    def __len__(self) -> int:
        return len(self.samples)

    def _shape(self, index: int, extras: dict) -> tuple[int, int, int, int]:
        """[F, H, W, 3] of the step's items in this sample's bucket (replacements share the bucket)."""
        kind, ratio = self.keys[index]
        height, width = bucket_table(extras["size"])[ratio]
        return (1 if kind == "image" else extras["num_frames"], height, width, 3)

    def __getitem__(self, item: tuple[int, dict]) -> dict:
        """One sample: {"pixels": [F, H, W, 3] uint8, "text", "index", "skipped"}."""
        pixels = torch.empty(self._shape(*item), dtype=torch.uint8)
        return {"pixels": pixels, **self._fill(item, pixels)}

    def __getitems__(self, items: list[tuple[int, dict]]) -> dict:
        """One step's batch, as the DataLoader asks for it with the sampler's list: every sample decoded
        straight into one [B, F, H, W, 3] buffer (inside a worker, shared memory reused through
        `transfer`), so nothing is stacked or copied on the way to the training process."""
        shape = (len(items), *self._shape(*items[0]))
        pixels, handle = self.transfer.empty(shape) if self.transfer else (empty_for_transfer(shape), None)
        try:
            filled = [self._fill(item, pixels[i]) for i, item in enumerate(items)]
        except BaseException:
            if handle is not None:
                handle.release()
            raise
        return {
            "pixels": pixels if handle is None else handle,
            "text": [f["text"] for f in filled],
            "index": torch.tensor([f["index"] for f in filled]),
            "skipped": [s for f in filled for s in f["skipped"]],
        }

    def _fill(self, item: tuple[int, dict], out: torch.Tensor) -> dict:
        """Decode the item (or a replacement) into `out`; its text, index and the files skipped."""
        index, extras = item
        rng = random.Random(derive_seed(self.seed, extras["epoch"], extras["step"], index))
        skipped = []
        # Replacements: distinct other members of the same bucket (same shape), in an order drawn
        # from this item's generator, so workers or not, a resumed run replaces alike.
        others = [m for m in self.members[self.keys[index]] if m != index]
        for candidate in [index, *rng.sample(others, min(len(others), self.max_retries))]:
            sample = self.samples[candidate]
            try:
                with _time_limit(self.decode_timeout, str(sample.path)):
                    self._load(sample, extras, rng, out)
            except MediaError as err:
                skipped.append((err.path, err.reason))
                continue
            text = "" if rng.random() < self.caption_dropout else sample.text
            return {"text": text, "index": candidate, "skipped": skipped}
        reasons = "; ".join(f"{path}: {reason}" for path, reason in skipped)
        raise RuntimeError(f"{len(skipped)} samples in a row failed in bucket {self.keys[index]}: {reasons}")

    def _load(self, sample: Sample, extras: dict, rng: random.Random, out: torch.Tensor) -> None:
        num_frames, height, width, _ = out.shape
        if sample.kind == "image":
            image = resize_cover_crop(to_frame_tensor(load_image(sample.path)), height, width, dtype=torch.uint8)
            out.copy_(image.permute(1, 2, 3, 0))  # [3, 1, H, W] -> [1, H, W, 3]
            return
        indices = self._frame_indices(sample, num_frames, rng)
        decode_frames(sample.path, indices, cover=(height, width), out=out.numpy())  # scaled while decoding

    def _frame_indices(self, sample: Sample, num_frames: int, rng: random.Random) -> list[int]:
        """num_frames frames, video_sample_stride apart where the clip is long enough, else closer
        together: every clip of a step must give the same count."""
        total = sample.num_frames
        if not total:
            raise MediaError(sample.path, "no frame count (neither in the metadata nor probed)")
        if total < num_frames:
            raise MediaError(sample.path, f"has {total} frames, fewer than the {num_frames} this step needs")
        stride = max(1, min(self.stride, (total - 1) // max(num_frames - 1, 1)))
        start = rng.randint(0, total - ((num_frames - 1) * stride + 1))
        return [start + i * stride for i in range(num_frames)]


def pixels_to_model(pixels: torch.Tensor) -> torch.Tensor:
    """A batch of uint8 frames [B, F, H, W, 3] -> the VAE's input [B, 3, F, H, W] float in [-1, 1].
    Done once the batch is on the training device: uint8 frames in decode layout are 4x less to pass
    between processes than floats, and need no reordering copy in the worker."""
    return pixels.permute(0, 4, 1, 2, 3).float().div_(127.5).sub_(1.0)


def collate(batch: dict | list[dict]) -> dict:
    """The DataLoader's collate_fn: a batch from VideoDataset.__getitems__ passes as it is; a list of
    items (from __getitem__) is stacked: pixels [B, F, H, W, 3] uint8, texts, indices, skipped files."""
    if isinstance(batch, dict):
        return batch
    return {
        "pixels": torch.stack([b["pixels"] for b in batch]),
        "text": [b["text"] for b in batch],
        "index": torch.tensor([b["index"] for b in batch]),
        "skipped": [s for b in batch for s in b["skipped"]],
    }


class BadSampleTracker:
    """Logs each bad file once, counts skips against samples served, and stops the run with a clear
    error when the bad fraction passes `max_bad_fraction` (after `min_samples` so one early failure
    does not end a run)."""

    def __init__(self, max_bad_fraction: float = 0.05, min_samples: int = 100):
        self.max_bad_fraction = max_bad_fraction
        self.min_samples = min_samples
        self.served = 0
        self.skips = 0
        self.refused = 0
        self.bad: dict[str, str] = {}

    def _note(self, path: str, reason: str) -> None:
        if path not in self.bad:
            self.bad[path] = reason
            log.warning("skipping %s: %s", path, reason)

    def record_refused(self, skipped: list[tuple[str, str]]) -> None:
        """Samples left out before training (metadata that cannot be right, unreadable captions)."""
        for path, reason in skipped:
            self.refused += 1
            self._note(path, reason)

    def update(self, batch: dict) -> None:
        self.served += len(batch["index"])
        for path, reason in batch["skipped"]:
            self.skips += 1
            self._note(path, reason)
        attempts = self.served + self.skips + self.refused
        failed = self.skips + self.refused
        if attempts >= self.min_samples and failed / attempts > self.max_bad_fraction:
            raise RuntimeError(
                f"{failed} of {attempts} sample loads failed ({len(self.bad)} distinct files), more than "
                f"max_bad_fraction={self.max_bad_fraction}; first ones: "
                + "; ".join(f"{p}: {r}" for p, r in list(self.bad.items())[:5])
            )

    def summary(self) -> str:
        return (
            f"{self.served} samples served; {self.skips} failed loads and {self.refused} samples refused up front, "
            f"{len(self.bad)} bad files in all"
        )
