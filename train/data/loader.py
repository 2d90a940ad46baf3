"""The data section of a run and the DataLoader it builds: metadata -> samples -> buckets ->
DistributedBucketBatchSampler -> VideoDataset -> DataLoader (workers, pinned memory, prefetch).

Field names are VideoX-Fun's, so a user's old flags carry over.
"""

import functools
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import DataLoader

from train.data.buckets import batch_frame_count, clip_frame_count
from train.data.cached import CachedDataset
from train.data.dataset import BadSampleTracker, SizeOptions, VideoDataset, bucket_keys, collate, make_choose
from train.data.metadata import Sample, load_metadata
from train.data.probe import cached_sizes, fill_sizes
from train.data.sampler import DistributedBucketBatchSampler, derive_seed
from train.data.transfer import TransferPool
from train.guard import tie_worker_to_parent

log = logging.getLogger(__name__)

# Sizes outside these bounds are metadata errors (or files no GPU can train on), not samples.
MIN_SIDE, MAX_SIDE = 16, 16384
MAX_FRAMES = 100_000


@dataclass
class DataConfig:
    train_data_dir: str = ""
    """Folder prefixed to every relative file_path; with no train_data_meta, a folder of media + .txt captions."""
    train_data_meta: str = ""
    """Metadata: .json (VideoX-Fun list), .jsonl or .csv with file_path, text, optional type, width, height,
    num_frames, fps (missing sizes are read from the files before training and cached in output_dir)."""
    video_sample_n_frames: int = 49
    """Frames per video sample (4k+1; fewer when a step's shortest clip has fewer at video_sample_stride,
    as in VideoX-Fun, or when the token-length rule or random_frame_crop asks)."""
    video_sample_stride: int = 1
    """Source frames between sampled frames: a clip gives at most its frames // stride, and a step trains
    its shortest clip's count (4k+1); videos shorter than the stride are left out."""
    video_sample_size: int = 512
    """Training size of videos: the bucket table is scaled by size/512."""
    image_sample_size: int = 512
    """Training size of images; with random_hw_adapt or the token-length rule, the largest size drawn."""
    token_sample_size: int = 512
    """training_with_video_token_length: the budget is token_sample_size^2 x video_sample_n_frames."""
    bucket_side_multiple: int = 16
    """Bucket sides (and the sample sizes) are multiples of this many pixels: 16 for the Wan2.1 VAE (8x)
    and DiT patch (2x); 32 for Wan2.2 TI2V-5B, whose VAE downsamples 16x (such a run with 16 is refused)."""
    enable_bucket: bool = True
    """Group samples by aspect ratio; off: every sample is centre-cropped to a square."""
    random_hw_adapt: bool = False
    """Train each step at a lower size now and then, as VideoX-Fun: videos at video_sample_size / r and
    images at image_sample_size / r, r drawn from 1 (75%) and ratios that grow with the size; with
    training_with_video_token_length, videos instead draw video_sample_size..image_sample_size (steps
    of 128, not above 1.25x the clips' own size) with frames from the token budget."""
    training_with_video_token_length: bool = False
    """Token budget token_sample_size^2 x video_sample_n_frames: with random_hw_adapt it sets size and
    frames; alone (as in VideoX-Fun) it trains batches far below the budget 2x or 4x repeated."""
    random_frame_crop: bool = False
    """Sometimes train on a shorter 4k+1 frame count (the full count most often)."""
    video_repeat: int = 1
    """Times each video is listed per epoch (images once); 0 means 1, as in VideoX-Fun."""
    max_train_samples: int = 0
    """Train on the first N entries of the metadata only (for debugging); 0: all."""
    caption_dropout: float = 0.1
    """Probability that a caption is replaced by "" (for classifier-free guidance)."""
    dataloader_num_workers: int = 2
    """DataLoader worker processes per rank (0: load in the training process)."""
    prefetch_factor: int = 2
    """Batches each worker prepares ahead."""
    max_bad_fraction: float = 0.05
    """Stop the run when more than this fraction of sample loads fail, summed over all ranks (after 100 loads)."""
    max_retries: int = 3
    """Replacements tried from a failed file's bucket, then from same-shape buckets, before any sample of its
    kind is tried (see train/data/dataset.py)."""
    decode_timeout: float = 60.0
    """Seconds one sample may take to decode before it counts as bad (0: no limit)."""
    latent_cache_dir: str = ""
    """Train from a cache written by `python -m tools.precompute` (latents and text embeddings): no VAE,
    umT5 or CLIP is loaded to train; a cache that does not fit these options is refused. (Not VideoX-Fun's
    --cache_dir, its Hugging Face download folder, which means nothing here.)"""

    def problems(self) -> list[str]:
        """Every invalid value, for a config check before any work starts."""
        out = []
        for name in ("video_sample_n_frames", "video_sample_stride", "video_sample_size", "image_sample_size",
                     "token_sample_size", "prefetch_factor"):  # fmt: skip
            if getattr(self, name) < 1:
                out.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if (self.video_sample_n_frames - 1) % 4:
            out.append(f"video_sample_n_frames must be 4k+1 (the VAE's frame count), got {self.video_sample_n_frames}")
        if self.bucket_side_multiple not in (16, 32):
            out.append(
                f"bucket_side_multiple must be 16 (Wan2.1 VAE) or 32 (Wan2.2 VAE), got {self.bucket_side_multiple}"
            )
        m = self.bucket_side_multiple if self.bucket_side_multiple in (16, 32) else 16
        for name in ("video_sample_size", "image_sample_size", "token_sample_size"):
            if getattr(self, name) % m:
                out.append(f"{name} must be a multiple of {m} (bucket_side_multiple), got {getattr(self, name)}")
        if self.video_repeat < 0 or self.max_train_samples < 0:
            out.append("video_repeat and max_train_samples must be >= 0")
        if not 0 <= self.caption_dropout <= 1:
            out.append(f"caption_dropout must be in [0, 1], got {self.caption_dropout}")
        if not 0 <= self.max_bad_fraction <= 1:
            out.append(f"max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}")
        if self.dataloader_num_workers < 0 or self.max_retries < 0 or self.decode_timeout < 0:
            out.append("dataloader_num_workers, max_retries and decode_timeout must be >= 0")
        if not self.train_data_meta and not self.train_data_dir:
            out.append("give train_data_meta or train_data_dir")
        return out


def plausible(sample: Sample) -> str | None:
    """Why a sample's metadata cannot be right (a reason), or None."""
    for name in ("width", "height"):
        value = getattr(sample, name)
        if value is not None and not MIN_SIDE <= value <= MAX_SIDE:
            return f"{name} {value} is outside {MIN_SIDE}..{MAX_SIDE}"
    if sample.num_frames is not None and sample.num_frames > MAX_FRAMES:
        return f"num_frames {sample.num_frames} is more than {MAX_FRAMES}"
    return None


def hold_out(samples: list[Sample], count: int, seed: int) -> tuple[list[Sample], list[Sample]]:
    """(training samples, held-out samples): `count` distinct files drawn by a generator seeded with
    `seed` alone, so every rank, every rerun and every resume of the same data and seed holds out the
    same ones. Both lists keep the listed order. A file listed more than once is held out with all its
    entries (the first one is evaluated), so no copy of it trains."""
    paths = list(dict.fromkeys(s.path for s in samples))
    if count >= len(paths):
        raise ValueError(
            f"eval_holdout = {count} would hold out all {len(paths)} usable files and leave nothing to train on; "
            "hold out fewer, or give a separate validation_data_meta"
        )
    chosen = set(random.Random(derive_seed("eval_holdout", seed)).sample(paths, count))
    held, seen = [], set()
    for s in samples:
        if s.path in chosen and s.path not in seen:
            seen.add(s.path)
            held.append(s)
    return [s for s in samples if s.path not in chosen], held


def too_short(sample: Sample, stride: int) -> str | None:
    """Why a video gives no frame at video_sample_stride (VideoX-Fun's loader skips it too), or None."""
    if sample.kind == "video" and sample.num_frames and sample.num_frames < stride:
        return f"has {sample.num_frames} frames, fewer than video_sample_stride {stride}: not one frame to train"
    return None


def drop_implausible(samples: list[Sample], skipped: list[tuple[str, str]], stride: int = 1) -> list[Sample]:
    """The samples `plausible` accepts that give a frame at `stride`; the others go to `skipped` as
    (path, reason)."""
    kept = []
    for sample in samples:
        reason = plausible(sample) or too_short(sample, stride)
        if reason:
            skipped.append((str(sample.path), reason))
        else:
            kept.append(sample)
    return kept


def build_dataloader(
    config: DataConfig,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    pin_memory: bool = False,
    accumulation_steps: int = 1,
    cache_dir: Path | None = None,
    holdout: int = 0,
    holdout_seed: int = 0,
    held_out: list[Sample] | None = None,
    cache=None,
) -> tuple[DataLoader, DistributedBucketBatchSampler, BadSampleTracker]:
    """The run's DataLoader (accumulation_steps micro-batches of batch_size per optimizer step), its
    sampler (set_epoch / state_dict for resume) and the tracker that counts bad samples; samples
    refused up front (absurd sizes, unreadable captions, unreadable files) are already counted and
    listed in the tracker (`refused`, `bad`).

    Sizes the metadata leaves out are read from the files' headers (train/data/probe.py: spread over
    the ranks, so under torch.distributed every rank must call this) and kept in
    `cache_dir/metadata_cache/` when cache_dir is given (the run's output_dir), so a restart reads none.

    holdout > 0 keeps that many usable samples out of training (the eval loss's held-out set, see
    `hold_out`; drawn with holdout_seed after max_train_samples and the refusals) and appends them to
    `held_out`: they are not in the dataset at all, so neither the sampler nor a bad file's
    replacement can ever serve them.

    `cache` (a train.data.cache.CacheReader, checked against the run by the caller) serves latents and
    text embeddings instead of pixels (train/data/cached.py): the same sampler, draws and bad-sample
    accounting, no media file opened."""
    skipped: list[tuple[str, str]] = []
    kept = load_samples(config, skipped, cache_dir, rank, cache)
    if holdout:
        kept, held = hold_out(kept, holdout, holdout_seed)
        if held_out is not None:
            held_out.extend(held)

    keys = training_keys(kept, config)
    options = SizeOptions.of(config)
    choose = make_choose(options, [(s.height, s.width) for s in kept], [s.num_frames for s in kept])
    sampler = DistributedBucketBatchSampler(
        keys, batch_size, rank=rank, world_size=world_size, seed=seed,
        repeats=[max(config.video_repeat, 1) if s.kind == "video" else 1 for s in kept], choose=choose,
        accumulation_steps=accumulation_steps,
    )  # fmt: skip
    workers = config.dataloader_num_workers
    # Slots per worker: its prefetched batches, one being pinned, one in the training step.
    transfer = TransferPool(workers, config.prefetch_factor + 2) if workers and cache is None else None
    dataset_type = VideoDataset if cache is None else functools.partial(CachedDataset, cache=cache)
    dataset = dataset_type(
        kept, keys=keys, video_sample_stride=config.video_sample_stride, caption_dropout=config.caption_dropout,
        seed=seed, max_retries=config.max_retries, decode_timeout=config.decode_timeout, transfer=transfer,
    )  # fmt: skip
    loader = DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collate, num_workers=workers, pin_memory=pin_memory,
        prefetch_factor=config.prefetch_factor if workers else None, persistent_workers=workers > 0,
        worker_init_fn=functools.partial(tie_worker_to_parent, os.getpid()),  # no worker outlives its rank
    )  # fmt: skip
    tracker = BadSampleTracker(max_bad_fraction=config.max_bad_fraction)
    tracker.record_refused(skipped)
    return loader, sampler, tracker


def load_samples(
    config: DataConfig, skipped: list[tuple[str, str]], cache_dir: Path | None = None, rank: int = 0, cache=None
) -> list[Sample]:
    """The usable samples of the metadata, in its order: the first max_train_samples, sizes filled in
    (from the files' headers, spread over the ranks: a collective under torch.distributed; from
    `cache`, a train.data.cache.CacheReader, when training from one: its files need not be here), absurd
    ones refused into `skipped`. What training and tools/precompute both list."""
    problems = config.problems()
    if problems:
        raise ValueError("invalid data config:\n  " + "\n  ".join(problems))
    samples = load_metadata(config.train_data_meta or None, config.train_data_dir or None, skipped)
    if config.max_train_samples:
        samples = samples[: config.max_train_samples]
    if cache is not None:
        samples = cache.fill_sizes(samples, skipped)  # every listed sample there (else a ValueError naming them)
    samples = fill_sizes(
        samples, config.train_data_meta or None, config.train_data_dir or None, cache_dir, skipped, rank=rank
    )
    kept = drop_implausible(samples, skipped, config.video_sample_stride)
    if not kept:
        raise ValueError(f"no usable samples in {config.train_data_meta or config.train_data_dir}")
    return kept


def training_keys(samples: list[Sample], config: DataConfig) -> list[tuple[str, float]]:
    """Each sample's bucket (kind, aspect ratio); without enable_bucket one square bucket per kind."""
    keys = bucket_keys(samples)
    if not config.enable_bucket:
        keys = [(kind, 1.0) for kind, _ in keys]  # one square bucket per kind: a centre crop
    return keys


def longest_step_frames(config: DataConfig, cache_dir: str | Path | None = None) -> tuple[int | None, str]:
    """(the most pixel frames a video step can train on these clips, what it comes from), before training
    and without opening a media file, for train.plan; (None, why) when that is not known.

    A step trains the least of the drawn count and its clips' own (make_choose), so the longest clip
    bounds every step: min(video_sample_n_frames, frames // video_sample_stride) over the videos, as
    4k+1. Frame counts come from the metadata, else from the probe cache a run keeps in `cache_dir`
    (its output_dir); one video whose count neither holds leaves the bound unknown (nothing is probed
    here: a million headers would take the planner minutes)."""
    skipped: list[tuple[str, str]] = []
    try:
        samples = load_metadata(config.train_data_meta or None, config.train_data_dir or None, skipped)
    except (OSError, ValueError) as err:
        return None, f"the metadata cannot be read ({type(err).__name__}: {str(err).splitlines()[0]})"
    if config.max_train_samples:
        samples = samples[: config.max_train_samples]
    samples = cached_sizes(samples, config.train_data_meta or None, config.train_data_dir or None, cache_dir)
    videos = [s for s in drop_implausible(samples, skipped, config.video_sample_stride) if s.kind == "video"]
    if not videos:
        return None, "no videos listed"
    unknown = sum(not s.num_frames for s in videos)
    if unknown:
        return None, f"{unknown} of {len(videos)} videos have no frame count yet (a run probes and caches them)"
    longest = max(s.num_frames for s in videos)
    frames = batch_frame_count(
        config.video_sample_n_frames,
        [max(clip_frame_count(s.num_frames, config.video_sample_n_frames, config.video_sample_stride) for s in videos)],
    )
    return frames, (
        f"the longest of {len(videos)} videos has {longest} frames, {frames} at video_sample_stride "
        f"{config.video_sample_stride} (4k+1)"
    )
