"""Clips shorter than the frames a step asks for: the step trains its shortest clip's frame count, as
VideoX-Fun's collate_fn does, instead of the run dying on the first short clip; the planner lists the
frames the clips allow.

`videox_fun_frames` restates, in VideoX-Fun's own terms (scripts/wan2.1/train.py collate_fn and
videox_fun/data/dataset_image_video.py ImageVideoDataset.get_batch), the frame count of a batch of
clips; our sampler's per-step frame count must equal it for every step of many random datasets.
"""

import json
import random
from pathlib import Path

import pytest
from torch.utils.data import DataLoader
from train_runs import REPO, base_args, losses

from train.config import load_config
from train.data.dataset import BadSampleTracker, SizeOptions, VideoDataset, bucket_keys, collate, make_choose
from train.data.loader import DataConfig, build_dataloader
from train.data.metadata import Sample, load_metadata
from train.data.probe import fill_sizes
from train.data.sampler import DistributedBucketBatchSampler
from train.data.synthetic import read_index, write_index_video

SIDE = 64  # the debug config's video_sample_size: square clips are neither resized nor cropped


def videox_fun_frames(lengths: list[int], o: SizeOptions, size: int | float) -> int:
    """The frame count of VideoX-Fun's batch of clips of `lengths` source frames (its enable_bucket
    path), with `size` the video size its step drew (used by the token-length rule only)."""
    # ImageVideoDataset.get_batch (video_length_drop_start 0, video_length_drop_end 1): each clip hands
    # over min(video_sample_n_frames, len * (end - start) // stride) frames, `stride` apart.
    handed = []
    for length in lengths:
        n = min(o.video_sample_n_frames, int(length * (1.0 - 0.0) // o.video_sample_stride))
        assert n > 0  # VideoX-Fun raises "No Frames in video." and loads another sample
        handed.append(n)
    # collate_fn: the batch's starting length, then the minimum over its examples, 4n+1 each time.
    interval = 4  # vae.config.temporal_compression_ratio
    if o.random_hw_adapt and o.training_with_video_token_length:
        token_length = o.video_sample_n_frames * o.token_sample_size * o.token_sample_size
        batch_video_length = min(token_length / size / size, o.video_sample_n_frames) // interval * interval + 1
    else:
        batch_video_length = o.video_sample_n_frames + interval
    for n in handed:
        batch_video_length = int(min(batch_video_length, n))
        batch_video_length = (batch_video_length - 1) // interval * interval + 1
        if batch_video_length <= 0:
            batch_video_length = 1
    return batch_video_length


def test_step_frames_match_videox_fun_over_random_batches():
    rng = random.Random(0)
    compared = short = 0
    for trial in range(300):
        n_frames = rng.choice([5, 9, 17, 49, 81])
        stride = rng.choice([1, 1, 2, 3, 4])
        adapt, token = rng.random() < 0.5, rng.random() < 0.5
        o = SizeOptions(video_sample_size=512, image_sample_size=rng.choice([512, 1024]), token_sample_size=512,
                        video_sample_n_frames=n_frames, video_sample_stride=stride, random_hw_adapt=adapt,
                        training_with_video_token_length=token)  # fmt: skip
        count = rng.randint(3, 40)
        lengths = [rng.randint(stride, 130) for _ in range(count)]
        sides = [rng.choice([(720, 1280), (480, 854), (512, 512), (1280, 720)]) for _ in range(count)]
        batch, world, accumulation = rng.randint(1, 3), rng.randint(1, 3), rng.randint(1, 2)
        sampler = DistributedBucketBatchSampler(
            [("video", 1.0)] * count, batch, world_size=world, accumulation_steps=accumulation, seed=trial,
            choose=make_choose(o, sides, lengths),
        )  # fmt: skip
        for step, (_, indices) in enumerate(sampler.global_batches()):
            extras = sampler.extras(step)
            expected = videox_fun_frames([lengths[i] for i in indices], o, extras["size"])
            assert extras["num_frames"] == expected, (trial, step, [lengths[i] for i in indices], o, extras)
            compared += 1
            short += expected < n_frames
    assert compared > 500 and short > 200  # many steps, many of them shortened by a clip


def write_clips(root: Path, lengths: list[int], broken: int = 0, with_frames: bool = True) -> Path:
    """Square index clips (frame i shows i) of `lengths` frames, `broken` unreadable ones listed at 41
    frames, and metadata.json; returns the metadata path."""
    root.mkdir(parents=True, exist_ok=True)
    entries = []
    for i, length in enumerate(lengths):
        write_index_video(root / f"clip{i}.mp4", length, SIDE, SIDE)
        entries.append({"file_path": f"clip{i}.mp4", "text": f"clip {i}", "type": "video", "width": SIDE,
                        "height": SIDE, **({"num_frames": length} if with_frames else {})})  # fmt: skip
    for i in range(broken):
        (root / f"broken{i}.mp4").write_bytes(b"not a video")
        entries.append({"file_path": f"broken{i}.mp4", "text": "broken", "type": "video", "width": SIDE,
                        "height": SIDE, "num_frames": 41})  # fmt: skip
    meta = root / "metadata.json"
    meta.write_text(json.dumps(entries))
    return meta


LENGTHS = [9, 13, 21, 41, 29, 17]  # all shorter than the 49 frames asked for


@pytest.mark.parametrize("stride", [1, 2])
def test_short_clips_shorten_their_step_at_the_stride(tmp_path, stride):
    """Through build_dataloader and the decoder: each step has its shortest clip's count, and every clip
    gives its frames `stride` apart (read back from the frame codes)."""
    meta = write_clips(tmp_path / "data", LENGTHS)
    config = DataConfig(train_data_meta=str(meta), video_sample_size=SIDE, image_sample_size=SIDE,
                        video_sample_n_frames=49, video_sample_stride=stride, dataloader_num_workers=0,
                        caption_dropout=0.0)  # fmt: skip
    loader, sampler, tracker = build_dataloader(config, batch_size=2, seed=5)
    samples = loader.dataset.samples
    o = SizeOptions(
        video_sample_size=SIDE, image_sample_size=SIDE, video_sample_n_frames=49, video_sample_stride=stride
    )
    seen = set()
    for epoch in range(2):
        sampler.set_epoch(epoch)
        for batch in loader:
            tracker.update(batch)
            pixels = batch["pixels"]
            lengths = [samples[i].num_frames for i in batch["index"].tolist()]
            assert pixels.shape[1] == videox_fun_frames(lengths, o, SIDE), lengths
            seen.add(pixels.shape[1])
            for b in range(pixels.shape[0]):
                got = [read_index(pixels[b, t].numpy()) for t in range(pixels.shape[1])]
                assert got == list(range(got[0], got[0] + stride * len(got), stride)), got
                assert got[-1] < lengths[b]
    assert not tracker.bad and tracker.skips == 0
    assert len(seen) >= 2  # several frame counts, not one fixed length


def test_a_run_on_clips_shorter_than_the_frames_trains(tmp_path):
    """VideoX-Fun's flags on clips of 9-41 frames with video_sample_n_frames 49: it trains (it died at
    step 1 with 'has 41 frames, fewer than the 49 this step needs')."""
    from train.main import Trainer

    meta = write_clips(tmp_path / "data", LENGTHS)
    out = tmp_path / "out"
    args = [*base_args(tmp_path / "data", out), f"--train_data_meta={meta}", "--video_sample_n_frames=49",
            "--video_sample_stride=1", "--train_batch_size=2", "--max_train_steps=3", "--checkpointing_steps=50",
            "--log_every=1"]  # fmt: skip
    trainer = Trainer(load_config(args))
    trainer.train()
    assert sorted(losses(out)) == [1, 2, 3]
    assert not trainer.tracker.bad


def test_a_replacement_too_short_for_the_step_is_not_a_bad_file(tmp_path):
    """A broken file's replacements from its bucket pass over clips known to be too short for the step:
    they are good files, and a short clip listed as bad would count against max_bad_fraction."""
    meta = write_clips(tmp_path / "data", [9, 41], broken=1)
    entries = json.loads(meta.read_text())
    samples = [Sample(meta.parent / e["file_path"], e["text"], "video", SIDE, SIDE, e["num_frames"]) for e in entries]
    lengths = [s.num_frames for s in samples]  # 9, 41 and the broken one's listed 41: all 4k+1

    def choose(rng, key, indices):  # each step at its clip's length, as make_choose sets it
        return {"size": SIDE, "num_frames": min(lengths[i] for i in indices)}

    sampler = DistributedBucketBatchSampler(bucket_keys(samples), 1, seed=1, choose=choose)
    dataset = VideoDataset(samples, caption_dropout=0.0, seed=1, max_retries=2)
    tracker = BadSampleTracker(max_bad_fraction=1.0)
    for epoch in range(6):
        sampler.set_epoch(epoch)
        for batch in DataLoader(dataset, batch_sampler=sampler, collate_fn=collate):
            tracker.update(batch)
            assert batch["pixels"].shape[1] == (9 if batch["index"].item() == 0 else 41)
    assert sorted(Path(p).name for p in tracker.bad) == ["broken0.mp4"]


def test_videos_shorter_than_the_stride_are_refused_up_front(tmp_path):
    meta = write_clips(tmp_path / "data", [3, 9, 13])
    config = DataConfig(train_data_meta=str(meta), video_sample_size=SIDE, image_sample_size=SIDE,
                        video_sample_n_frames=9, video_sample_stride=4, dataloader_num_workers=0)  # fmt: skip
    loader, _, tracker = build_dataloader(config, batch_size=1)
    assert [s.num_frames for s in loader.dataset.samples] == [9, 13]
    assert tracker.refused == 1
    ((path, reason),) = tracker.bad.items()
    assert path.endswith("clip0.mp4") and "fewer than video_sample_stride 4" in reason


def plan_video_frames(*flags: str) -> tuple[set[int], str]:
    from train.plan import plan, report

    cfg = load_config(["--cfg", str(REPO / "configs" / "debug.toml"), "--eval_holdout=0", *flags])
    rows, info = plan(cfg, gpus=1, gpu_memory=80 * 10**9)
    return {r.bucket.frames for r in rows if r.bucket.kind == "video"}, report(cfg, rows, info)


@pytest.mark.parametrize("stride", [1, 2])
def test_the_plan_lists_the_frames_the_clips_allow(tmp_path, stride):
    """81 frames asked for on clips of at most 41: the planner lists what the sampler will train, the
    longest clip's count at the stride as 4k+1, from the metadata or else from a run's probe cache."""
    longest = max(LENGTHS)
    expected = (min(81, longest // stride) - 1) // 4 * 4 + 1  # 41, or 20 -> 17
    meta = write_clips(tmp_path / "data", LENGTHS)
    flags = [f"--train_data_meta={meta}", f"--train_data_dir={meta.parent}", "--video_sample_n_frames=81",
             f"--video_sample_stride={stride}", f"--output_dir={tmp_path / 'out'}"]  # fmt: skip
    frames, text = plan_video_frames(*flags)
    assert frames == {expected}
    assert f"| video | 64 | {expected} |" in text and f"at most {expected}: the longest of 6 videos has 41" in text

    # Metadata without frame counts: unknown until a run's start probes them into output_dir's cache.
    bare = write_clips(tmp_path / "bare", LENGTHS, with_frames=False)
    flags[:2] = [f"--train_data_meta={bare}", f"--train_data_dir={bare.parent}"]
    frames, text = plan_video_frames(*flags)
    assert frames == {81} and "6 of 6 videos have no frame count yet" in text
    probed = fill_sizes(load_metadata(bare, bare.parent), bare, bare.parent, cache_dir=tmp_path / "out")
    assert sorted(s.num_frames for s in probed) == sorted(LENGTHS)
    frames, _ = plan_video_frames(*flags)
    assert frames == {expected}
