"""Sampler + dataset + DataLoader together on real media: one shape per step, frames where the
rules put them (read back from clips whose frames encode their own index), bad files skipped,
reported and counted, the same batches with or without workers; a bucket whose files are all
broken is filled from same-shape buckets, then from any sample of its kind, alike on resume; a slot
nothing can fill is reported, not raised."""

import gc
import os
import random
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from train.data.buckets import bucket_table
from train.data.dataset import (
    BadDataError,
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
from train.data.video import MediaError, load_image, resize_cover_crop, to_frame_tensor


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


def test_tracker_stops_above_the_bad_fraction_and_lists_each_file_with_its_count():
    tracker = BadSampleTracker(max_bad_fraction=0.2, min_samples=10)
    good = {"index": torch.arange(8), "skipped": []}
    tracker.update(good)
    with pytest.raises(BadDataError, match=r"3 of 11 sample loads failed .* max_bad_fraction=0.2"):
        tracker.update({"index": torch.arange(0), "skipped": [("x.mp4", "corrupt")] * 2 + [("y.mp4", "empty")]})
    listing = tracker.listing(tracker.gather()).splitlines()
    assert listing[1:] == ["  x.mp4: corrupt (2 failed loads; rank 0)", "  y.mp4: empty (1 failed load; rank 0)"]


def test_tracker_stops_on_a_slot_nothing_could_fill():
    tracker = BadSampleTracker(max_bad_fraction=1.0)
    batch = {"index": torch.tensor([3, -1]), "skipped": [("a.png", "broken")], "errors": ["no image sample loads"]}
    with pytest.raises(BadDataError, match=r"at step 7: 1 batch slot\(s\) could not be filled.*no image sample"):
        tracker.update(batch, step=7)
    assert tracker.served == 1 and tracker.skips == 1


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


# Images by aspect ratio (height / width) at size 64: 0.48 and 0.5 share 32 x 80, 0.25 alone gives 32 x 128.
assert bucket_table(64)[0.48] == bucket_table(64)[0.5] == (32, 80) and bucket_table(64)[0.25] == (32, 128)


@pytest.fixture(scope="module")
def broken_buckets(tmp_path_factory):
    """Good images (square, and 0.48) and two buckets whose every file is broken: 0.5 (it has a
    same-shape neighbour, 0.48) and 0.25 (it has none)."""
    root = tmp_path_factory.mktemp("broken_buckets")
    out = []
    for i, (name, w, h) in enumerate(
        [("sq0", 64, 64), ("sq1", 64, 64), ("sq2", 64, 64), ("p0", 250, 120), ("p1", 250, 120)]
    ):
        write_image(root / f"{name}.png", np.full((h, w, 3), 20 * (i + 1), np.uint8))
        out.append(Sample(root / f"{name}.png", name, "image", w, h))
    for name, w, h in [("wide0", 256, 128), ("wide1", 256, 128), ("wide2", 256, 128)]:
        (root / f"{name}.png").write_bytes(b"not an image")
        out.append(Sample(root / f"{name}.png", name, "image", w, h))
    for name, w, h in [("long0", 256, 64), ("long1", 256, 64), ("long2", 256, 64)]:
        (root / f"{name}.png").write_bytes(b"")
        out.append(Sample(root / f"{name}.png", name, "image", w, h))
    return out


def step_item(index: int, step: int, size: int = 64, num_frames: int = 1) -> tuple[int, dict]:
    return index, {"epoch": 0, "step": step, "size": size, "num_frames": num_frames}


def test_a_broken_bucket_takes_same_shape_buckets_then_any_sample_of_its_kind(broken_buckets):
    samples = broken_buckets
    dataset = VideoDataset(samples, caption_dropout=0.0, seed=5)
    index = {s.path.stem: i for i, s in enumerate(samples)}
    served_for = {"wide0": set(), "long0": set()}
    for step in range(40):
        for name, shape in (("wide0", (1, 32, 80, 3)), ("long0", (1, 32, 128, 3))):
            got = dataset[step_item(index[name], step)]
            assert got["pixels"].shape == shape and "error" not in got
            replacement = samples[got["index"]]
            served_for[name].add(replacement.path.stem)
            # Its whole bucket was tried first, each file once: the item and its 2 (all broken) bucket mates;
            # then, for long0, maybe broken images of the other bucket, each once.
            tried = [Path(p).stem for p, _ in got["skipped"]]
            assert sorted(tried[:3]) == [f"{name[:-1]}{i}" for i in range(3)]
            assert len(set(tried)) == len(tried) and {t[:-1] for t in tried[3:]} <= {"wide"}
            # Resized and cropped to the step's bucket, as any sample of another aspect ratio would be.
            want = resize_cover_crop(to_frame_tensor(load_image(replacement.path)), *shape[1:3], dtype=torch.uint8)
            assert torch.equal(got["pixels"], want.permute(1, 2, 3, 0))
    assert served_for["wide0"] == {"p0", "p1"}  # the same-shape bucket, drawn among its members
    assert served_for["long0"] == {"sq0", "sq1", "sq2", "p0", "p1"}  # any image, drawn over all of them


def test_a_slot_no_sample_can_fill_is_reported_not_raised(broken_buckets):
    samples = [s for s in broken_buckets if s.path.stem[:-1] in ("wide", "long")]
    dataset = VideoDataset(samples, caption_dropout=0.0, seed=5)
    batch = dataset.__getitems__([step_item(0, 3), step_item(1, 3)])
    assert batch["index"].tolist() == [-1, -1] and not batch["pixels"].any()
    assert len(batch["errors"]) == 2 and "no image sample loads at 1x32x80" in batch["errors"][0]
    for first in (0, 1):  # every image tried once per slot
        tried = sorted(p for p, _ in batch["skipped"][first * 6 : (first + 1) * 6])
        assert tried == sorted(str(s.path) for s in samples)
    with pytest.raises(BadDataError, match="2 batch slot"):
        BadSampleTracker(max_bad_fraction=1.0).update(collate(batch))


def test_clips_too_short_for_the_step_are_not_tried_as_replacements(tmp_path):
    samples = []
    for name, frames, w, h in [("short", 5, 64, 32), ("long", 20, 64, 32)]:
        write_index_video(tmp_path / f"{name}.mp4", frames, w, h)
        samples.append(Sample(tmp_path / f"{name}.mp4", name, "video", w, h, frames, 16.0))
    for name in ("bad0", "bad1"):
        (tmp_path / f"{name}.mp4").write_bytes(b"garbage")
        samples.append(Sample(tmp_path / f"{name}.mp4", name, "video", 64, 64, 40, 16.0))
    dataset = VideoDataset(samples, caption_dropout=0.0, seed=1)
    for step in range(6):
        got = dataset[step_item(2, step, num_frames=9)]
        assert got["index"] == 1 and got["pixels"].shape == (9, 64, 64, 3)
        assert sorted(Path(p).name for p, _ in got["skipped"]) == ["bad0.mp4", "bad1.mp4"]  # never short.mp4


def broken_bucket_loader(samples, num_workers=0, state=None):
    keys = bucket_keys(samples)
    options = SizeOptions(video_sample_size=64, image_sample_size=64)
    sampler = DistributedBucketBatchSampler(keys, batch_size=3, seed=11, repeats=6, choose=make_choose(options))
    if state is not None:
        sampler.load_state_dict(state)
    dataset = VideoDataset(samples, caption_dropout=0.5, seed=11)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate), sampler


def test_replacements_are_the_same_with_workers_and_on_resume(broken_buckets):
    plain, sampler = broken_bucket_loader(broken_buckets)
    first = list(plain)
    broken_steps = [b for b in first if b["skipped"]]
    assert len(first) == 22 and len(broken_steps) >= 8  # both broken buckets came up, several times
    assert all(not b["errors"] and (b["index"] >= 0).all() for b in first)
    bad = {Path(p).stem for b in first for p, _ in b["skipped"]}
    assert bad == {"wide0", "wide1", "wide2", "long0", "long1", "long2"}

    def same(a, b):
        assert torch.equal(a["pixels"], b["pixels"]) and torch.equal(a["index"], b["index"])
        assert a["text"] == b["text"] and a["skipped"] == b["skipped"]

    workers, _ = broken_bucket_loader(broken_buckets, num_workers=2)
    for a, b in zip(first, workers, strict=True):
        same(a, b)
    state = sampler.state_dict(consumed=9)
    resumed, _ = broken_bucket_loader(broken_buckets, state=state)
    for a, b in zip(first[9:], resumed, strict=True):
        same(a, b)
