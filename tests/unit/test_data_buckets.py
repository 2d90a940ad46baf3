"""Aspect buckets, token-budget frame counts and frame selection (pure functions, no files)."""

import random
from collections import Counter

import pytest

from train.data.buckets import (
    ASPECT_RATIOS_512,
    MIN_VIDEO_FRAMES,
    bucket_table,
    frame_indices,
    frames_for_token_budget,
    nearest_bucket,
    nearest_ratio,
    random_frame_crop,
    valid_frame_count,
)


def test_table_is_the_spec_table():
    assert len(ASPECT_RATIOS_512) == 40
    assert ASPECT_RATIOS_512[1.0] == [512, 512]
    assert ASPECT_RATIOS_512[0.57] == [384, 672] and ASPECT_RATIOS_512[1.75] == [672, 384]
    assert ASPECT_RATIOS_512[0.25] == [256, 1024] and ASPECT_RATIOS_512[4.0] == [1024, 256]
    for ratio, (h, w) in ASPECT_RATIOS_512.items():
        assert h % 32 == 0 and w % 32 == 0
        assert abs(h / w - ratio) < 0.04, ratio
        assert h * w <= 512 * 512 * 1.05


@pytest.mark.parametrize("size", [256, 320, 480, 512, 640, 720, 768, 960, 1024])
def test_bucket_table_scaled_and_floored_to_16(size):
    table = bucket_table(size)
    assert table.keys() == ASPECT_RATIOS_512.keys()
    for ratio, (h, w) in table.items():
        h512, w512 = ASPECT_RATIOS_512[ratio]
        assert h % 16 == 0 and w % 16 == 0
        assert h <= h512 * size / 512 < h + 16 and w <= w512 * size / 512 < w + 16
    if size % 16 == 0:
        assert table[1.0] == (size, size)


def test_bucket_table_examples():
    assert bucket_table(512)[0.57] == (384, 672)
    assert bucket_table(256)[0.57] == (192, 336)
    assert bucket_table(768)[0.57] == (576, 1008)
    assert bucket_table(720)[0.57] == (528, 944)  # 540 -> 528, 945 -> 944
    assert bucket_table(1024)[4.0] == (2048, 512)
    assert bucket_table(32)[1.0] == (32, 32) and bucket_table(32)[4.0] == (64, 16)
    with pytest.raises(ValueError, match="too small"):
        bucket_table(16)
    with pytest.raises(ValueError, match="positive"):
        bucket_table(0)


@pytest.mark.parametrize(
    "hw,size,bucket",
    [
        ((1080, 1920), 512, (384, 672)),  # 16:9 landscape -> 0.57
        ((1920, 1080), 512, (672, 384)),  # 9:16 portrait -> 1.75 (1.78 is nearer 1.75 than 2.0)
        ((720, 720), 768, (768, 768)),
        ((100, 400), 512, (256, 1024)),
        ((100, 1000), 512, (256, 1024)),  # more extreme than the table: the end bucket
        ((1000, 100), 256, (512, 128)),
        ((1080, 1920), 1024, (768, 1344)),
    ],
)
def test_nearest_bucket(hw, size, bucket):
    h, w = hw
    ratio = nearest_ratio(h, w)
    assert all(abs(ratio - h / w) <= abs(other - h / w) for other in ASPECT_RATIOS_512)
    assert nearest_bucket(h, w, size) == bucket_table(size)[ratio] == bucket


def test_nearest_bucket_4_3():
    # 0.75 is 0.03 from both 0.72 and 0.78: a tie goes to the smaller ratio, the same for every 4:3 size
    assert nearest_ratio(480, 640) == 0.72
    assert nearest_bucket(480, 640, 512) == (416, 576)
    assert nearest_bucket(480, 640, 512) == nearest_bucket(960, 1280, 512)
    assert nearest_bucket(576, 1024, 512) == (384, 672)


def test_valid_frame_count():
    assert [valid_frame_count(n) for n in range(1, 11)] == [1, 1, 1, 1, 5, 5, 5, 5, 9, 9]
    assert valid_frame_count(81) == 81 and valid_frame_count(80) == 77
    with pytest.raises(ValueError):
        valid_frame_count(0)


def test_token_budget_worked_numbers():
    # VideoX-Fun's code: min(budget / S^2, n) // 4 * 4 + 1 (its README rounds 1024 down to 9; the code gives 13)
    assert frames_for_token_budget(512, 512, 49) == 49
    assert frames_for_token_budget(768, 512, 49) == 21
    assert frames_for_token_budget(1024, 512, 49) == 13
    assert frames_for_token_budget(256, 512, 49) == 49  # smaller sizes never get more than n_frames
    assert frames_for_token_budget(640, 512, 49) == 29  # 31.36 // 4 * 4 + 1
    assert frames_for_token_budget(4096, 512, 49) == 1
    for size in range(128, 2049, 64):
        their = int(min(512 * 512 * 81 / size / size, 81) // 4 * 4 + 1)  # their float arithmetic
        assert frames_for_token_budget(size, 512, 81) == their, size


def test_frame_indices_properties():
    rng = random.Random(0)
    for _ in range(2000):
        length = rng.randint(5, 400)
        n_frames = rng.choice([1, 5, 16, 49, 81])
        stride = rng.randint(1, 5)
        try:
            idx = frame_indices(length, n_frames, stride, rng, min_frames=1)
        except ValueError:
            assert length // stride < 1
            continue
        n = min(n_frames, length // stride)
        assert len(idx) == valid_frame_count(n)
        assert all(b - a == stride for a, b in zip(idx, idx[1:], strict=False))
        assert 0 <= idx[0] and idx[-1] < length
        assert idx[0] <= length - ((len(idx) - 1) * stride + 1)


def test_frame_indices_start_covers_the_window():
    rng = random.Random(1)
    starts = Counter(frame_indices(100, 9, 3, rng)[0] for _ in range(4000))
    # 9 frames at stride 3 span 25 source frames: starts 0..75, all of them drawn
    assert set(starts) == set(range(76))
    assert max(starts.values()) < 3 * min(starts.values())


def test_frame_indices_examples():
    rng = random.Random(2)
    idx = frame_indices(300, 81, 3, rng)  # 81 frames over 241 source frames
    assert len(idx) == 81 and idx[-1] - idx[0] == 240
    idx = frame_indices(100, 81, 3, rng)  # 33 -> 33 frames
    assert len(idx) == 33
    idx = frame_indices(40, 81, 3, rng)  # 13 -> 13
    assert len(idx) == 13
    idx = frame_indices(38, 81, 3, rng)  # 12 -> 9
    assert len(idx) == 9 and idx[-1] - idx[0] == 24
    assert frame_indices(1, 1, 1, rng, min_frames=1) == [0]  # a still
    assert len(frame_indices(7, 81, 1, rng)) == MIN_VIDEO_FRAMES


def test_frame_indices_too_short():
    rng = random.Random(0)
    with pytest.raises(ValueError, match="too short"):
        frame_indices(14, 81, 3, rng)  # 4 frames -> 1, below the 5 a video needs
    with pytest.raises(ValueError, match="too short"):
        frame_indices(2, 81, 3, rng, min_frames=1)  # not one frame at stride 3
    with pytest.raises(ValueError):
        frame_indices(0, 81, 1, rng)
    with pytest.raises(ValueError):
        frame_indices(10, 81, 0, rng)


def test_random_frame_crop_distribution():
    rng = random.Random(0)
    draws = Counter(random_frame_crop(49, rng) for _ in range(10000))
    assert set(draws) <= set(range(5, 50, 4))
    assert all((n - 1) % 4 == 0 for n in draws)
    full, rest = draws[49], sum(v for k, v in draws.items() if k != 49)
    assert 0.88 < full / 10000 < 0.92  # the full length most often
    assert draws.most_common(1)[0][0] == 49
    shorter = [draws[k] for k in range(5, 49, 4)]
    assert all(count > 0 for count in shorter) and max(shorter) < 2 * min(shorter)  # uniform
    assert rest == sum(shorter)


def test_random_frame_crop_edges():
    rng = random.Random(0)
    assert {random_frame_crop(52, rng) for _ in range(200)} <= set(range(5, 50, 4))  # 52 -> at most 49
    assert {random_frame_crop(5, rng) for _ in range(50)} == {5}  # nothing shorter allowed
    assert {random_frame_crop(3, rng) for _ in range(50)} == {1}
    assert {random_frame_crop(9, rng, p_full=0.0, min_frames=1) for _ in range(200)} == {1, 5}
    assert {random_frame_crop(49, rng, p_full=1.0) for _ in range(50)} == {49}
    with pytest.raises(ValueError):
        random_frame_crop(49, rng, p_full=1.5)
