"""Aspect-ratio buckets, training sizes and frame selection: pure functions, no I/O.

Everything a sampler needs to decide a sample's shape before any file is opened: the bucket of a
(height, width) at a training size, how many frames a size may have under a token budget, which
source frames a clip contributes, and the random draws behind `random_hw_adapt`,
`training_with_video_token_length` and `random_frame_crop`. Randomness comes from a caller-owned
`random.Random`, so a data loader worker can seed it per rank, epoch and sample and replay it.

Frame counts fed to the Wan VAE must be 4k+1: its encoder keeps the first frame alone and compresses
each following group of 4 frames into one latent frame, so 1 pixel frame is the smallest input that
makes one latent frame.
"""

import random

# The 512-base table of VideoX-Fun, h/w -> [h, w]. Every entry has about 512*512 pixels.
ASPECT_RATIOS_512: dict[float, list[int]] = {
    0.25: [256, 1024],
    0.26: [256, 992],
    0.27: [256, 960],
    0.28: [256, 928],
    0.32: [288, 896],
    0.33: [288, 864],
    0.35: [288, 832],
    0.4: [320, 800],
    0.42: [320, 768],
    0.48: [352, 736],
    0.5: [352, 704],
    0.52: [352, 672],
    0.57: [384, 672],
    0.6: [384, 640],
    0.68: [416, 608],
    0.72: [416, 576],
    0.78: [448, 576],
    0.82: [448, 544],
    0.88: [480, 544],
    0.94: [480, 512],
    1.0: [512, 512],
    1.07: [512, 480],
    1.13: [544, 480],
    1.21: [544, 448],
    1.29: [576, 448],
    1.38: [576, 416],
    1.46: [608, 416],
    1.67: [640, 384],
    1.75: [672, 384],
    2.0: [704, 352],
    2.09: [736, 352],
    2.4: [768, 320],
    2.5: [800, 320],
    2.89: [832, 288],
    3.0: [864, 288],
    3.11: [896, 288],
    3.62: [928, 256],
    3.75: [960, 256],
    3.88: [992, 256],
    4.0: [1024, 256],
}

# Sides are multiples of 16: the VAE downsamples by 8 and the DiT patchifies the latent by 2.
SIDE_MULTIPLE = 16

# Video clips shorter than this many frames after selection are refused: 5 frames are two latent
# frames (the lone first frame plus one group of 4), the least that carries any motion. A shorter
# "video" is a still image in disguise, almost always a broken or mis-probed file.
MIN_VIDEO_FRAMES = 5


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def bucket_table(size: int) -> dict[float, tuple[int, int]]:
    """The 512-base table scaled to training size `size`, each side floored to a multiple of 16.

    Flooring (not rounding) keeps every bucket at or under size*size pixels, so a larger bucket never
    costs more memory than the square one the size was chosen for.
    """
    _check_positive("size", size)
    table: dict[float, tuple[int, int]] = {}
    for ratio, (h, w) in ASPECT_RATIOS_512.items():
        bh = h * size // (512 * SIDE_MULTIPLE) * SIDE_MULTIPLE
        bw = w * size // (512 * SIDE_MULTIPLE) * SIDE_MULTIPLE
        if bh < SIDE_MULTIPLE or bw < SIDE_MULTIPLE:
            raise ValueError(
                f"size {size} is too small for the aspect buckets: ratio {ratio} would be {bh}x{bw} "
                f"(sides must be at least {SIDE_MULTIPLE}; use a size of 32 or more)"
            )
        table[ratio] = (bh, bw)
    return table


def nearest_ratio(height: int, width: int) -> float:
    """The table ratio (h/w) closest to height/width; ties go to the smaller ratio.

    The key a sampler groups samples by: one bucket per ratio, whatever the training size.
    """
    _check_positive("height", height)
    _check_positive("width", width)
    aspect = height / width
    return min(ASPECT_RATIOS_512, key=lambda ratio: abs(ratio - aspect))


def nearest_bucket(height: int, width: int, size: int) -> tuple[int, int]:
    """(h, w) of the bucket for a height x width sample at training size `size`."""
    return bucket_table(size)[nearest_ratio(height, width)]


def valid_frame_count(n: int) -> int:
    """The largest 4k+1 <= n (n >= 1): the longest prefix of n frames the VAE accepts."""
    _check_positive("n", n)
    return (n - 1) // 4 * 4 + 1


def frames_for_token_budget(size: int, budget_size: int, n_frames: int) -> int:
    """Frames a video of side `size` may have under `training_with_video_token_length`.

    The budget is the video of budget_size^2 x n_frames (token_sample_size, video_sample_n_frames),
    measured in pixel volume: frames(S) = min(floor(budget_size^2 * n_frames / S^2), n_frames), then
    rounded down to 4k+1. Pixel volume is the DiT token count up to the VAE's lone first latent frame
    ((S/16)^2 tokens per 4 frames), and it is the measure that reproduces the spec's worked numbers:
    budget 512x512x49 gives 512 -> 49, 768 -> floor(21.8) = 21, 1024 -> floor(12.25) -> 9. Counting
    exact latent tokens instead ((S/16)^2 * (1 + (F-1)/4) <= 13,312) would give 768 -> 17.
    At least 1 frame is returned: a size too large for even one frame still trains as a still.
    """
    _check_positive("size", size)
    _check_positive("budget_size", budget_size)
    _check_positive("n_frames", n_frames)
    frames = min(budget_size * budget_size * n_frames // (size * size), n_frames)
    return valid_frame_count(max(frames, 1))


def frame_indices(
    num_source_frames: int,
    n_frames: int,
    stride: int,
    rng: random.Random,
    min_frames: int = MIN_VIDEO_FRAMES,
) -> list[int]:
    """Source frame indices for one clip: the VideoX-Fun rule, reduced to 4k+1 frames.

    n = min(n_frames, num_source_frames // stride) frames, cut down to 4k+1 first, then taken every
    `stride` frames over a window of (n-1)*stride+1 source frames whose start is uniform over every
    position that fits. Reducing before placing the window lets it start anywhere the shorter clip
    fits, instead of dropping the tail of a window placed for the longer one.

    min_frames: the fewest frames accepted (default MIN_VIDEO_FRAMES for videos; pass 1 for a still or
    a single-frame draw). Raises ValueError when the clip is too short for it, naming the counts, so a
    caller can skip or report the sample rather than train on a truncated one.
    """
    _check_positive("num_source_frames", num_source_frames)
    _check_positive("n_frames", n_frames)
    _check_positive("stride", stride)
    _check_positive("min_frames", min_frames)
    n = min(n_frames, num_source_frames // stride)
    if n >= 1:
        n = valid_frame_count(n)
    if n < min_frames:
        raise ValueError(
            f"clip of {num_source_frames} frames is too short: stride {stride} gives {n} frame(s) "
            f"(4k+1), fewer than the {min_frames} required"
        )
    span = (n - 1) * stride + 1
    start = rng.randint(0, num_source_frames - span)
    return [start + i * stride for i in range(n)]


def random_frame_crop(n: int, rng: random.Random, p_full: float = 0.9, min_frames: int = MIN_VIDEO_FRAMES) -> int:
    """A random 4k+1 length <= n, in pixel frames, for `random_frame_crop`.

    Distribution: the full length valid_frame_count(n) with probability p_full (default 0.9, as in
    VideoX-Fun), otherwise uniform over the shorter 4k+1 lengths from min_frames up. When nothing
    shorter is allowed the full length is returned. The caller keeps the first `length` frames, so the
    first frame (the i2v condition) survives and the clip stays one contiguous stretch of motion.
    Counted in pixel frames, never latent frames (the public code mixes the two).
    """
    _check_positive("n", n)
    _check_positive("min_frames", min_frames)
    if not 0.0 <= p_full <= 1.0:
        raise ValueError(f"p_full must be a probability in [0, 1], got {p_full!r}")
    full = valid_frame_count(n)
    shorter = [length for length in range(1, full, 4) if length >= min_frames]
    if not shorter or rng.random() < p_full:
        return full
    return rng.choice(shorter)


def hw_adapt_range(video_sample_size: int, image_sample_size: int) -> tuple[int, int]:
    """(min, max) training size under `random_hw_adapt`: min(video_sample_size, 512) up to image_sample_size.

    The same range serves images and videos, so both see every resolution of the run.
    """
    _check_positive("video_sample_size", video_sample_size)
    _check_positive("image_sample_size", image_sample_size)
    low = min(video_sample_size, 512)
    if low > image_sample_size:
        raise ValueError(
            f"random_hw_adapt: image_sample_size {image_sample_size} is below the minimum size {low} "
            f"(min(video_sample_size={video_sample_size}, 512))"
        )
    return low, image_sample_size


def sample_hw_size(rng: random.Random, min_size: int, max_size: int, step: int = SIDE_MULTIPLE) -> int:
    """A training size drawn uniformly from min_size, min_size+step, ... <= max_size.

    random_hw_adapt draws per batch in steps of 16 (bucket sides stay multiples of 16);
    training_with_video_token_length draws from video_sample_size to image_sample_size in steps of 128.
    max_size is drawn only when it lies on the grid.
    """
    _check_positive("min_size", min_size)
    _check_positive("max_size", max_size)
    _check_positive("step", step)
    if min_size > max_size:
        raise ValueError(f"min_size {min_size} is larger than max_size {max_size}")
    return min_size + step * rng.randint(0, (max_size - min_size) // step)
