"""Samples as the sampler asks for them: one clip or image, decoded, resized to the step's bucket
size and frame count, with its (possibly dropped) caption.

Every random choice of a sample (start frame, caption dropout, the replacement of a bad file) comes
from a generator seeded by (seed, epoch, step, sample index), so a resumed run draws exactly what an
uninterrupted one would, whatever the number of DataLoader workers.

Bad files never stop a batch: a sample that cannot give its frames (missing, corrupt, too short,
too slow to decode) is replaced, in this order, by
1. up to `max_retries` distinct other samples of its bucket (drawn among all of them; those known to
   be shorter than the step's frame count are passed over, never counted as bad);
2. up to `max_retries` samples of the other buckets of its kind that have the same shape at this step
   (at small sizes several aspect ratios round to one height x width);
3. the first sample of its kind that loads, over all of them in a random order, resized and cropped
   to the step's height x width (so a bucket whose files are all broken still fills its steps).
Every order is drawn from the item's (seed, epoch, step, sample index), so a resumed run, or one with
another number of workers, replaces alike, and every slot keeps the step's shape. Only a slot that no
sample of its kind can fill is left zero and reported in the batch's `errors`: the training process
stops then, on every rank at once, rather than a DataLoader worker raising on one rank.

Failed loads travel with the batch (`skipped`: workers are separate processes) to the training
process, where `BadSampleTracker` logs each path once and counts them; in training the counts are
summed over the ranks at every micro-step, so every rank stops at the same step when the global bad
fraction passes `max_bad_fraction`, and rank 0 lists every rank's bad files.
"""

import contextlib
import logging
import math
import random
import signal
import threading
from collections import Counter
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Dataset

from train.data.buckets import (
    SIDE_MULTIPLE,
    batch_frame_count,
    bucket_table,
    clip_frame_count,
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
    video_sample_stride: int = 1
    random_hw_adapt: bool = False
    training_with_video_token_length: bool = False
    token_sample_size: int = 512
    random_frame_crop: bool = False
    bucket_side_multiple: int = 16

    @classmethod
    def of(cls, section: Any) -> "SizeOptions":
        """The options a [data] section (train.data.loader.DataConfig) holds under the same names."""
        return cls(**{f.name: getattr(section, f.name) for f in fields(cls)})


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
    options: SizeOptions, sizes: Sequence[tuple[int, int]] = (), frames: Sequence[int | None] = ()
) -> Callable[[random.Random, Hashable, Sequence[int]], dict]:
    """The sampler's per-step choice {"size": S, "num_frames": F} for a bucket (kind, ratio) and the
    step's sample indices; `sizes` holds each sample's (height, width), `frames` each video's frame
    count from the metadata or the probe (None: unknown).

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
    The step's shortest clip then caps the frames, as VideoX-Fun's collate_fn does: each clip gives
    min(video_sample_n_frames, frames // video_sample_stride) (clip_frame_count) and the step trains the
    least of those and the drawn count, as 4k+1 (batch_frame_count), so a short clip shortens its step
    instead of failing it. Here the minimum is over the global step's clips (VideoX-Fun: one rank's
    batch), so every rank still trains one shape; it is known when the sampler plans the step, from the
    metadata, and draws nothing. random_frame_crop then shortens the clip (pixel frames, see
    random_frame_crop).
    """
    o = options
    cap = max(o.image_sample_size, o.video_sample_size)
    # Per sample once, not per step: a step then looks up its clips (None: length unknown, no cap).
    available = [None if not f else clip_frame_count(f, o.video_sample_n_frames, o.video_sample_stride) for f in frames]

    def choose(rng: random.Random, key: Hashable, indices: Sequence[int] = ()) -> dict:
        if key[0] == "image":
            size = o.image_sample_size
            if o.random_hw_adapt:
                ratios, probs = downsample_choices(o.image_sample_size, o.image_sample_size / o.video_sample_size)
                size = downsampled_size(o.image_sample_size, rng.choices(ratios, probs)[0])
            return {"size": size, "num_frames": 1, "multiple": o.bucket_side_multiple}
        size, n_frames = o.video_sample_size, o.video_sample_n_frames
        if o.random_hw_adapt and o.training_with_video_token_length:
            means = [decoded_mean_side(*sizes[i], cap) for i in indices] if sizes else [float(cap)]
            size = rng.choice(token_length_choices(token_length_sizes(o.video_sample_size, o.image_sample_size), means))
            n_frames = frames_for_token_budget(size, o.token_sample_size, n_frames)
        elif o.random_hw_adapt:
            ratios, probs = downsample_choices(o.video_sample_size)
            size = downsampled_size(o.video_sample_size, rng.choices(ratios, probs)[0])
        if available:
            n_frames = batch_frame_count(n_frames, [available[i] for i in indices if available[i] is not None])
        if o.random_frame_crop:
            n_frames = random_frame_crop(n_frames, rng)
        return {"size": size, "num_frames": n_frames, "multiple": o.bucket_side_multiple}

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
    [(path, reason), ...]} (batches also carry "errors", the slots nothing could fill: index -1, zero
    pixels); every item of one step has the same shape. `keys` overrides the buckets
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
        self.by_kind: dict[str, list[int]] = {}
        for index, key in enumerate(self.keys):
            self.members.setdefault(key, []).append(index)
            self.by_kind.setdefault(key[0], []).append(index)

    def __len__(self) -> int:
        return len(self.samples)

    def _shape(self, index: int, extras: dict) -> tuple[int, int, int, int]:
        """[F, H, W, 3] of the step's items in this sample's bucket (replacements share the bucket)."""
        kind, ratio = self.keys[index]
        height, width = bucket_table(extras["size"], extras.get("multiple", SIDE_MULTIPLE))[ratio]
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
            "errors": [f["error"] for f in filled if "error" in f],
        }

    def _fill(self, item: tuple[int, dict], out: torch.Tensor) -> dict:
        """Decode the item (or a replacement) into `out`; its text, index and the files skipped. A slot
        no sample of its kind can fill is zeroed, with index -1 and an "error" for the training process
        (raising here would stop this rank alone, from a worker)."""
        index, extras = item
        rng = random.Random(derive_seed(self.seed, extras["epoch"], extras["step"], index))
        skipped = []
        # Drawn before any load, as always, so the frames and captions of good samples stay as they were.
        others = [m for m in self.members[self.keys[index]] if m != index]
        first = [index, *rng.sample(others, min(len(others), self.max_retries))]
        for candidate in self._candidates(first, extras, out.shape):
            sample = self.samples[candidate]
            try:
                with _time_limit(self.decode_timeout, str(sample.path)):
                    self._load(sample, extras, rng, out)
            except MediaError as err:
                skipped.append((err.path, err.reason))
                continue
            text = "" if rng.random() < self.caption_dropout else sample.text
            return {"text": text, "index": candidate, "skipped": skipped}
        out.zero_()
        kind = self.keys[index][0]
        shown = "; ".join(f"{path}: {reason}" for path, reason in skipped[:3])
        error = (
            f"no {kind} sample loads at {'x'.join(map(str, out.shape[:3]))} (frames x height x width; epoch "
            f"{extras['epoch']}, data step {extras['step']}): all {len(skipped)} tried failed, e.g. {shown}"
        )
        return {"text": "", "index": -1, "skipped": skipped, "error": error}

    def _candidates(self, first: list[int], extras: dict, shape: Sequence[int]) -> Iterator[int]:
        """The item then its replacements, in the order of the module docstring. Stages 2 and 3 draw
        from their own generator (the item's one also draws start frames, as many as loads were tried)."""
        index = first[0]
        kind, ratio = self.keys[index]
        frames, height, width = shape[:3]

        def long_enough(i: int) -> bool:
            return self._can_fill(i, extras, shape)

        # The item itself always: the step's frame count was chosen for it.
        yield index
        yield from (i for i in first[1:] if long_enough(i))
        tried = set(first)
        rng = random.Random(derive_seed("replace", self.seed, extras["epoch"], extras["step"], index))
        table = bucket_table(extras["size"], extras.get("multiple", SIDE_MULTIPLE))

        def fits(i: int) -> bool:
            return i not in tried and long_enough(i)

        peers = [
            i
            for key, members in self.members.items()
            if key[0] == kind and key[1] != ratio and table[key[1]] == (height, width)
            for i in members
            if fits(i)
        ]
        for i in rng.sample(peers, min(len(peers), self.max_retries)):
            tried.add(i)
            yield i
        # Every sample of the kind once, in an order drawn without listing the (maybe millions of) indices:
        # start + k x stride modulo n, with a stride coprime to n, visits each exactly once.
        pool = self.by_kind[kind]
        n = len(pool)
        start, stride = rng.randrange(n), 1
        if n > 2:
            stride = rng.randrange(1, n)
            while math.gcd(stride, n) != 1:
                stride = rng.randrange(1, n)
        for k in range(n):
            i = pool[(start + k * stride) % n]
            if fits(i):
                tried.add(i)
                yield i

    def _can_fill(self, index: int, extras: dict, shape: Sequence[int]) -> bool:
        """Whether sample `index` is worth trying for a slot of [F, H, W, 3] `shape`: a clip known too
        short for the step is not a bad file, it is passed over."""
        return self.keys[index][0] == "image" or (self.samples[index].num_frames or 0) >= shape[0]

    def _load(self, sample: Sample, extras: dict, rng: random.Random, out: torch.Tensor) -> None:
        num_frames, height, width, _ = out.shape
        if sample.kind == "image":
            image = resize_cover_crop(to_frame_tensor(load_image(sample.path)), height, width, dtype=torch.uint8)
            out.copy_(image.permute(1, 2, 3, 0))  # [3, 1, H, W] -> [1, H, W, 3]
            return
        indices = self._frame_indices(sample, num_frames, rng)
        decode_frames(sample.path, indices, cover=(height, width), out=out.numpy())  # scaled while decoding

    def _frame_indices(self, sample: Sample, num_frames: int, rng: random.Random) -> list[int]:
        """num_frames frames, video_sample_stride apart. The step's count fits every clip of the step at
        the stride (make_choose); a replacement too short for it takes its frames closer together, as
        every clip of a step must give the same count."""
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
        "errors": [b["error"] for b in batch if "error" in b],
    }


class BadDataError(RuntimeError):
    """The run stops for its data; in training every rank raises it with the same message."""


class BadSampleTracker:
    """Logs each bad file once, counts failed loads against loads, and stops the run with BadDataError
    when the bad fraction passes `max_bad_fraction` (once `min_samples` loads were made, so one early
    failure does not end a run) or when a batch slot could not be filled at all.

    In training, `update(batch, device)` sums the counts over the ranks (an all-reduce, so every rank
    must call it at the same micro-step): every rank then holds the global totals in `served` and
    `skips` and takes the same decision at the same step, and a stop gathers every rank's bad files
    for one listing by rank 0 before every rank raises the same error. Without a device, or outside
    torch.distributed, this process decides alone. `refused` counts samples left out before training;
    every rank reads the same metadata, so it is counted once, not summed.
    """

    def __init__(self, max_bad_fraction: float = 0.05, min_samples: int = 100):
        self.max_bad_fraction = max_bad_fraction
        self.min_samples = min_samples
        self.served = 0
        self.skips = 0
        self.refused = 0
        self.bad: dict[str, str] = {}  # this rank's bad files and their first reason
        self.failures: Counter[str] = Counter()  # this rank's failed loads per file
        self.errors: list[str] = []  # this rank's batch slots that nothing could fill

    def _note(self, path: str, reason: str) -> None:
        if path not in self.bad:
            self.bad[path] = reason
            log.warning("skipping %s: %s", path, reason)

    def record_refused(self, skipped: list[tuple[str, str]]) -> None:
        """Samples left out before training (metadata that cannot be right, unreadable captions)."""
        for path, reason in skipped:
            self.refused += 1
            self._note(path, reason)

    def update(self, batch: dict, device: torch.device | None = None, step: int | None = None, group=None) -> None:
        """Count a batch from VideoDataset; raise BadDataError when the run must stop. With `device`
        under torch.distributed this is a collective (see the class docstring) over `group` (the
        default group when None; a gloo group sums on the host, with no GPU synchronisation); `step`
        names the training step in the error."""
        served = int((batch["index"] >= 0).sum())
        for path, reason in batch["skipped"]:
            self.failures[path] += 1
            self._note(path, reason)
        errors = list(batch.get("errors", ()))
        self.errors.extend(errors)
        counts = [served, len(batch["skipped"]), len(errors)]
        distributed = device is not None and dist.is_initialized()
        if distributed:
            on = torch.device("cpu") if group is not None else device
            summed = torch.tensor(counts, dtype=torch.float64, device=on)
            dist.all_reduce(summed, group=group)
            counts = [round(c) for c in summed.tolist()]
        self.served += counts[0]
        self.skips += counts[1]
        failed, attempts = self.skips + self.refused, self.served + self.skips + self.refused
        where = f"at step {step}: " if step is not None else ""
        if counts[2]:
            reason = f"{where}{counts[2]} batch slot(s) could not be filled by any sample"
        elif attempts >= self.min_samples and failed / attempts > self.max_bad_fraction:
            reason = (
                f"{where}{failed} of {attempts} sample loads failed ({failed / attempts:.3f}, more than "
                f"max_bad_fraction={self.max_bad_fraction})"
            )
        else:
            return
        ranks = self.gather() if distributed else [self.mine()]
        listing = self.listing(ranks)
        if not distributed or dist.get_rank() == 0:
            log.error("stopping for bad data %s\n%s", reason, listing)
        bad = sorted({p for r in ranks for p in r["bad"]})
        slots = [e for r in ranks for e in r["errors"]]
        detail = f"; {slots[0]}" if slots else f"; first ones: {', '.join(bad[:5])}" if bad else ""
        raise BadDataError(
            f"bad data {reason}, over {len(ranks)} rank(s) with {len(bad)} distinct bad files{detail}. Every "
            f"bad file of every rank is listed above (rank 0's log); fix or drop them, raise max_bad_fraction, "
            f"or resume from the last checkpoint"
        )

    def mine(self) -> dict:
        """This rank's part of the listing (picklable)."""
        return {"bad": dict(self.bad), "failures": dict(self.failures), "errors": list(self.errors)}

    def gather(self) -> list[dict]:
        """Every rank's `mine()`, in rank order (a collective under torch.distributed)."""
        if not dist.is_initialized():
            return [self.mine()]
        every: list = [None] * dist.get_world_size()
        dist.all_gather_object(every, self.mine())
        return every

    def listing(self, ranks: list[dict]) -> str:
        """Totals, then one line per bad file of any rank: reason, failed loads and the ranks that met it."""
        bad: dict[str, str] = {}
        counts: Counter[str] = Counter()
        seen: dict[str, list[int]] = {}
        for rank, part in enumerate(ranks):
            for path, reason in part["bad"].items():
                bad.setdefault(path, reason)
                counts[path] += part["failures"].get(path, 0)
                seen.setdefault(path, []).append(rank)
        lines = [
            f"{self.served} samples served on {len(ranks)} rank(s); {self.skips} failed loads and {self.refused} "
            f"samples refused up front; {len(bad)} bad files in all"
        ]
        for path in sorted(bad):
            n = counts[path]
            what = f"{n} failed load{'s' if n != 1 else ''}" if n else "refused up front"
            lines.append(f"  {path}: {bad[path]} ({what}; rank {', '.join(map(str, seen[path]))})")
        lines += [f"  rank {rank}: {e}" for rank, part in enumerate(ranks) for e in part["errors"]]
        return "\n".join(lines)

    def summary(self) -> str:
        return (
            f"{self.served} samples served; {self.skips} failed loads and {self.refused} samples refused up front, "
            f"{len(self.bad)} bad files in all"
        )
