"""random_hw_adapt and training_with_video_token_length, alone and together, against VideoX-Fun's rule.

`videox_fun_step` below restates, in VideoX-Fun's own terms and arithmetic (numpy draws, float sizes,
`int(x / 16) * 16` bucket sides), what its scripts/wan2.1/train.py collate_fn and loop do to one batch
of a bucket: the bucket height and width, the frame count and the number of copies trained. Our
sampler choice (`make_choose`) plus our bucket table must give the same outcomes with the same
probabilities: each scenario draws many steps from both and compares the frequencies.
"""

import math
import random
from collections import Counter

import numpy as np
import pytest
from train_runs import data

from train.data.buckets import (
    ASPECT_RATIOS_512,
    bucket_table,
    downsample_choices,
    nearest_ratio,
    token_length_repeats,
)
from train.data.dataset import SizeOptions, make_choose

__all__ = ["data"]  # a fixture

DRAWS = 6000


def videox_fun_step(o: SizeOptions, kind: str, clips: list[tuple[int, int]], rng: np.random.Generator):
    """(bucket height, bucket width, frames) of a batch of `clips` ((height, width) each, long enough for
    any frame count), as VideoX-Fun's collate_fn computes them (its enable_bucket path, batch 1)."""

    def downsample_ratio(sample_size, image_ratio=()):
        if sample_size >= 1536:
            numbers = [1, 1.25, 1.5, 2, 2.5, 3, *image_ratio]
        elif sample_size >= 1024:
            numbers = [1, 1.25, 1.5, 2, *image_ratio]
        elif sample_size >= 768:
            numbers = [1, 1.25, 1.5, *image_ratio]
        elif sample_size >= 512:
            numbers = [1, *image_ratio]
        else:
            numbers = [1]
        probs = [1.0] if len(numbers) == 1 else [0.75] + [0.25 / (len(numbers) - 1)] * (len(numbers) - 1)
        return rng.choice(numbers, p=np.array(probs))

    if o.image_sample_size > o.video_sample_size:
        sizes = list(range(o.video_sample_size, o.image_sample_size + 1, 128))
        if sizes[-1] != o.image_sample_size:
            sizes.append(o.image_sample_size)
    else:
        sizes = [o.image_sample_size]
    budget = o.video_sample_n_frames * o.token_sample_size * o.token_sample_size
    length_to_frames = {s: min(budget / s / s, o.video_sample_n_frames) // 4 * 4 + 1 for s in sizes}

    larger = max(o.image_sample_size, o.video_sample_size)

    def loaded(h, w):  # its resize_frame(frame, larger side): shrink the short side to `larger`
        if min(h, w) <= larger:
            return h, w
        return (larger, int(larger * w / h)) if h < w else (int(larger * h / w), larger)

    if kind == "image":
        ratio = (
            1
            if not o.random_hw_adapt
            else downsample_ratio(o.image_sample_size, [o.image_sample_size / o.video_sample_size])
        )
        base, length = o.image_sample_size, o.video_sample_n_frames + 4
    else:
        base = o.video_sample_size
        if o.random_hw_adapt and o.training_with_video_token_length:
            local_min = np.min([np.mean(loaded(h, w)) for h, w in clips])
            choices = [s for s in length_to_frames if s < local_min * 1.25] or list(length_to_frames)
            size = rng.choice(choices)
            length, ratio = length_to_frames[size], o.video_sample_size / size
        elif o.random_hw_adapt:
            ratio, length = downsample_ratio(o.video_sample_size), o.video_sample_n_frames + 4
        else:
            ratio, length = 1, o.video_sample_n_frames + 4
    h, w = clips[0]
    table = {key: [x / 512 * base / ratio for x in hw] for key, hw in ASPECT_RATIOS_512.items()}
    closest = table[min(table, key=lambda r: abs(float(r) - h / w))]
    bh, bw = (int(x / 16) * 16 for x in closest)
    frames = 1 if kind == "image" else int(min(length, o.video_sample_n_frames))  # clip long enough
    frames = (frames - 1) // 4 * 4 + 1
    return bh, bw, frames


def our_step(o: SizeOptions, kind: str, clips: list[tuple[int, int]], seed: int):
    choose = make_choose(o, clips)
    chosen = choose(random.Random(seed), (kind, nearest_ratio(*clips[0])), list(range(len(clips))))
    bh, bw = bucket_table(chosen["size"])[nearest_ratio(*clips[0])]
    return bh, bw, chosen["num_frames"]


def assert_same_distribution(o: SizeOptions, kind: str, clips: list[tuple[int, int]]) -> Counter:
    rng = np.random.default_rng(0)
    theirs = Counter(videox_fun_step(o, kind, clips, rng) for _ in range(DRAWS))
    ours = Counter(our_step(o, kind, clips, seed) for seed in range(DRAWS))
    assert set(ours) == set(theirs), (sorted(ours), sorted(theirs))
    for outcome in theirs:
        p_theirs, p_ours = theirs[outcome] / DRAWS, ours[outcome] / DRAWS
        # Two independent samples: 5 standard deviations of the difference (a wrong probability of 0.05
        # or more is caught; a right one fails about once in 10^6).
        sd = math.sqrt(2 * max(p_theirs, 1 / DRAWS) * (1 - p_theirs) / DRAWS)
        assert abs(p_ours - p_theirs) <= 5 * sd + 1e-9, (outcome, p_ours, p_theirs)
    return ours


VIDEO_1024 = dict(video_sample_size=1024, image_sample_size=1024, token_sample_size=1024, video_sample_n_frames=49)
HD, SD, TINY, TALL = (720, 1280), (480, 854), (240, 320), (1280, 720)


@pytest.mark.parametrize("clip", [HD, TALL])
def test_random_hw_adapt_alone(clip):
    """Videos: 1024 / {1, 1.25, 1.5, 2} at 0.75 / 0.083 each, all 49 frames; images also at the video
    size (image_ratio); the token length plays no part."""
    o = SizeOptions(**VIDEO_1024, random_hw_adapt=True)
    videos = assert_same_distribution(o, "video", [clip])
    assert len(videos) == 4 and {f for _, _, f in videos} == {49}
    full = bucket_table(1024)[nearest_ratio(*clip)]
    assert videos[(*full, 49)] / DRAWS == pytest.approx(0.75, abs=0.03)
    images = assert_same_distribution(o, "image", [clip])
    assert images[(*full, 1)] / DRAWS == pytest.approx(0.75 + 0.0625, abs=0.03)  # ratio 1, and image/video = 1
    o = SizeOptions(video_sample_size=512, image_sample_size=1024, video_sample_n_frames=49, random_hw_adapt=True)
    assert len(assert_same_distribution(o, "video", [clip])) == 1  # 512: no lower size
    assert len(assert_same_distribution(o, "image", [clip])) == 4  # 1024 / {1, 1.25, 1.5, 2} (2 twice)


def test_token_length_alone_keeps_sizes_and_repeats_small_batches():
    """Alone, the token length chooses nothing: sizes and frames stay fixed, and batches far under the
    budget train 2 or 4 times (VideoX-Fun's loop, tested against its inequalities)."""
    o = SizeOptions(video_sample_size=512, image_sample_size=1024, video_sample_n_frames=49,
                    training_with_video_token_length=True, token_sample_size=512)  # fmt: skip
    assert len(assert_same_distribution(o, "video", [HD])) == 1
    assert len(assert_same_distribution(o, "image", [HD])) == 1
    budget = 49 * 512 * 512
    for frames, h, w in [(49, 512, 512), (21, 256, 256), (9, 256, 256), (1, 512, 512), (1, 1024, 1024), (13, 128, 96)]:
        volume = frames * h * w
        expected = 4 if budget // 16 >= volume else 2 if budget // 4 >= volume else 1
        assert token_length_repeats(frames, h, w, 512, 49) == expected
    assert [token_length_repeats(f, 512, 512, 512, 49) for f in (49, 9, 1)] == [1, 2, 4]


@pytest.mark.parametrize("clip", [HD, SD, TINY, TALL])
def test_random_hw_adapt_with_token_length(clip):
    """Together: videos draw 512..1024 in steps of 128, below 1.25 x the clip's mean side (all sizes
    when none is), with frames from the token budget; images follow random_hw_adapt's ratios."""
    o = SizeOptions(video_sample_size=512, image_sample_size=1024, video_sample_n_frames=49, random_hw_adapt=True,
                    training_with_video_token_length=True, token_sample_size=512)  # fmt: skip
    videos = assert_same_distribution(o, "video", [clip])
    expected_sizes = {HD: 5, TALL: 5, SD: 3, TINY: 5}[clip]  # SD: mean side 667 -> below 834: 512, 640, 768
    assert len(videos) == expected_sizes
    for count in videos.values():  # uniform over the allowed sizes
        assert count / DRAWS == pytest.approx(1 / expected_sizes, abs=0.03)
    assert {f for _, _, f in videos} <= {49, 29, 21, 17, 13}
    assert_same_distribution(o, "image", [clip])


def test_the_smallest_clip_of_a_step_limits_the_size():
    o = SizeOptions(video_sample_size=512, image_sample_size=1024, video_sample_n_frames=49, random_hw_adapt=True,
                    training_with_video_token_length=True, token_sample_size=512)  # fmt: skip
    sizes = {make_choose(o, [HD, SD])(random.Random(s), ("video", 0.57), [0, 1])["size"] for s in range(300)}
    assert sizes == {512, 640, 768}
    sizes = {make_choose(o, [HD, SD])(random.Random(s), ("video", 0.57), [0])["size"] for s in range(300)}
    assert sizes == {512, 640, 768, 896, 1024}


def test_neither_option_is_fixed():
    o = SizeOptions(video_sample_size=640, image_sample_size=640, video_sample_n_frames=81)
    assert len(assert_same_distribution(o, "video", [HD])) == 1
    assert len(assert_same_distribution(o, "image", [TALL])) == 1


def test_videox_fun_documented_sizes_train_fixed():
    """VideoX-Fun's documented line (all sizes 640, 81 frames, both options): one size, 81 frames."""
    o = SizeOptions(video_sample_size=640, image_sample_size=640, token_sample_size=640, video_sample_n_frames=81,
                    random_hw_adapt=True, training_with_video_token_length=True)  # fmt: skip
    assert set(assert_same_distribution(o, "video", [HD])) == {(*bucket_table(640)[nearest_ratio(*HD)], 81)}


def test_downsample_choices_closed_form():
    assert downsample_choices(256, 2.0) == ([1.0], [1.0])
    assert downsample_choices(512) == ([1.0], [1.0])
    assert downsample_choices(512, 2.0) == ([1.0, 2.0], [0.75, 0.25])
    ratios, probs = downsample_choices(1536)
    assert ratios == [1, 1.25, 1.5, 2, 2.5, 3] and probs[0] == 0.75 and sum(probs) == pytest.approx(1)


def test_the_loop_trains_small_batches_repeated(data, tmp_path):
    """training_with_video_token_length alone: a micro-batch far below the budget trains as copies, each
    with its own noise and timestep (the copies count as samples of the step)."""
    from train_runs import base_args

    from train.config import load_config
    from train.main import Trainer

    def first_micro_step(*flags: str):
        trainer = Trainer(load_config([*base_args(data, tmp_path / str(len(flags))), "--max_train_steps=1", *flags]))
        batch = next(next(trainer.optimizer_steps()))
        _, _, f, h, w = batch["pixels"].shape  # [B, 3, F, H, W] on the device
        return trainer.micro_step(batch, 0), (f, h, w)

    stats, _ = first_micro_step("--train_batch_size=2")
    assert len(stats.timesteps) == 2
    stats, (f, h, w) = first_micro_step("--train_batch_size=2", "--training_with_video_token_length",
                                        "--token_sample_size=256")  # fmt: skip
    budget = 9 * 256 * 256  # video_sample_n_frames x token_sample_size^2
    expected = 4 if budget // 16 >= f * h * w else 2 if budget // 4 >= f * h * w else 1
    assert expected > 1 and len(stats.timesteps) == 2 * expected
    assert len(set(stats.timesteps.tolist())) == 2 * expected  # every copy has its own draw
