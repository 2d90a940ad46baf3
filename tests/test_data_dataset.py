"""Sampler + dataset + DataLoader together on real media: one shape per step, frames where the
rules put them (read back from clips whose frames encode their own index), bad files skipped,
reported and counted, the same batches with or without workers."""

import gc
import os
import random
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from train.data.dataset import (
    BadSampleTracker,
    SizeOptions,
    VideoDataset,
    _time_limit,
    bucket_keys,
    collate,
    make_choose,
    pixels_to_model,
)
from train.data.metadata import Sample
from train.data.sampler import DistributedBucketBatchSampler
from train.data.synthetic import read_index, write_image, write_index_video
from train.data.transfer import TransferPool
from train.data.video import MediaError


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    out = []
    for name, frames, w, h in [("a", 40, 64, 64), ("b", 30, 64, 64), ("c", 25, 64, 64), ("wide", 20, 128, 64)]:
        write_index_video(root / f"{name}.mp4", frames, w, h)
        out.append(Sample(root / f"{name}.mp4", f"clip {name}", "video", w, h, frames, 16.0))
    (root / "bad.mp4").write_bytes(b"this is not a video")
    out.append(Sample(root / "bad.mp4", "broken", "video", 64, 64, 40, 16.0))
    write_image(root / "img.png", np.full((48, 96, 3), 200, np.uint8))
    out.append(Sample(root / "img.png", "an image", "image", 96, 48))
    return out


def loader(samples, num_workers=0, epoch=0, stride=2):
    keys = bucket_keys(samples)
    options = SizeOptions(video_sample_size=64, image_sample_size=64, video_sample_n_frames=9)
    sampler = DistributedBucketBatchSampler(keys, batch_size=2, seed=3, remainder="drop", choose=make_choose(options))
    sampler.set_epoch(epoch)
    dataset = VideoDataset(samples, video_sample_stride=stride, caption_dropout=0.0, seed=3)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate)


def test_steps_have_one_shape_and_frames_follow_the_stride(samples):
    tracker = BadSampleTracker(max_bad_fraction=1.0)
    seen_square = 0
    for batch in loader(samples):
        tracker.update(batch)
        pixels = batch["pixels"]
        assert pixels.dtype == torch.uint8
        as_model = pixels_to_model(pixels)
        assert as_model.min() >= -1 and as_model.max() <= 1
        assert pixels.shape[:2] == (2, 9) and pixels.shape[-1] == 3
        for b, index in enumerate(batch["index"].tolist()):
            sample = samples[index]
            assert sample.path.name != "bad.mp4"  # replaced, never served
            if sample.width == sample.height:  # no crop: the frame codes read back exactly
                assert as_model.shape[3:] == (64, 64)
                got = [read_index(as_model[b, :, t], (-1, 1)) for t in range(9)]
                stride = min(2, (sample.num_frames - 1) // 8)
                assert got == list(range(got[0], got[0] + 9 * stride, stride)) and got[-1] < sample.num_frames
                seen_square += 1
    assert seen_square >= 2
    assert tracker.skips >= 1 and any(p.endswith("bad.mp4") for p in tracker.bad)


def test_workers_give_the_same_batches(samples):
    plain = list(loader(samples, num_workers=0, epoch=1))
    workers = list(loader(samples, num_workers=2, epoch=1))
    assert len(plain) == len(workers) > 0
    for a, b in zip(plain, workers, strict=True):
        assert torch.equal(a["pixels"], b["pixels"]) and torch.equal(a["index"], b["index"])
        assert a["text"] == b["text"] and a["skipped"] == b["skipped"]


def test_token_length_rule_in_the_step_choice():
    """With random_hw_adapt the token length sets size and frames (1024 x 1024 clips allow every size)."""
    options = SizeOptions(
        video_sample_size=512, image_sample_size=1024, video_sample_n_frames=49, random_hw_adapt=True,
        training_with_video_token_length=True, token_sample_size=512,
    )  # fmt: skip
    choose = make_choose(options, [(1024, 1024)])
    seen = {}
    for step in range(200):
        extras = choose(random.Random(step), ("video", 1.0), [0])
        seen[extras["size"]] = extras["num_frames"]
    assert set(seen) == {512, 640, 768, 896, 1024}
    assert seen[512] == 49 and seen[768] == 21 and seen[1024] == 13
    assert choose(random.Random(0), ("image", 1.0), [0])["num_frames"] == 1


def test_samples_without_sizes_are_listed():
    with pytest.raises(ValueError, match=r"2 samples have no width/height.*probes them"):
        bucket_keys([Sample(Path("a.mp4"), "x", "video"), Sample(Path("b.png"), "y", "image", 10)])


def test_tracker_stops_above_the_bad_fraction():
    tracker = BadSampleTracker(max_bad_fraction=0.2, min_samples=10)
    good = {"index": torch.arange(8), "skipped": []}
    tracker.update(good)
    with pytest.raises(RuntimeError, match=r"3 of 11 sample loads failed .* max_bad_fraction=0.2"):
        tracker.update({"index": torch.arange(0), "skipped": [("x.mp4", "corrupt")] * 3})


def test_decode_time_limit():
    start = time.monotonic()
    with pytest.raises(MediaError, match="longer than 0.2 s"), _time_limit(0.2, "slow.mp4"):
        time.sleep(5)
    assert time.monotonic() - start < 2


def pooled_loader(samples, slots, epoch=2):
    keys = bucket_keys(samples)
    options = SizeOptions(video_sample_size=64, image_sample_size=64, video_sample_n_frames=9)
    sampler = DistributedBucketBatchSampler(
        keys * 4, batch_size=2, seed=3, remainder="drop", choose=make_choose(options)
    )  # every sample 4 times: enough batches to cycle the slots
    sampler.set_epoch(epoch)
    pool = TransferPool(num_workers=1, slots_per_worker=slots)
    dataset = VideoDataset(samples * 4, video_sample_stride=2, caption_dropout=0.0, seed=3, transfer=pool)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=1, collate_fn=collate), pool


def shm_inode(pixels: torch.Tensor) -> int:
    """Which shared-memory file a received batch lives in."""
    fd, _ = pixels.untyped_storage()._share_fd_cpu_()
    return os.fstat(fd).st_ino


def test_pooled_buffers_are_reused_once_the_loop_drops_them(samples):
    squares = [s for s in samples if s.kind == "video" and s.width == s.height]  # one batch size throughout
    expected = list(loader(squares * 4, num_workers=0, epoch=2))  # the same sampler order, plain memory
    dl, pool = pooled_loader(squares, slots=3)
    inodes = set()
    for step, batch in enumerate(dl):
        assert torch.equal(batch["pixels"], expected[step]["pixels"]), step
        assert batch["index"].tolist() == expected[step]["index"].tolist()
        inodes.add(shm_inode(batch["pixels"]))
        del batch  # the last view: the slot goes back to the worker
    assert step + 1 == len(expected) >= 8
    assert len(inodes) <= 3  # reused, not one fresh buffer per batch
    gc.collect()
    assert pool.busy.sum() == 0


def test_pooled_buffers_held_by_the_loop_are_never_overwritten(samples):
    expected = list(loader(samples * 4, num_workers=0, epoch=2))
    dl, pool = pooled_loader(samples, slots=2)
    held = list(dl)  # every batch kept: the worker must fall back to fresh memory, not reuse
    assert len(held) == len(expected)
    for got, want in zip(held, expected, strict=True):
        assert torch.equal(got["pixels"], want["pixels"])
    assert len({shm_inode(b["pixels"]) for b in held}) == len(held)
    del held, got
    gc.collect()
    assert pool.busy.sum() == 0
