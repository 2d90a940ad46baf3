"""Aspect-ratio buckets, training sizes and frame selection: pure functions, no I/O.

Everything a sampler needs to decide a sample's shape before any file is opened: the bucket of a
(height, width) at a training size, how many frames a size may have under a token budget, which
source frames a clip contributes, and the random draws behind `random_hw_adapt`,
`training_with_video_token_length` and `random_frame_crop`, as VideoX-Fun's code draws them. Randomness comes from a caller-owned
`random.Random`, so a data loader worker can seed it per rank, epoch and sample and replay it.

Frame counts fed to the Wan VAE must be 4k+1: its encoder keeps the first frame alone and compresses
each following group of 4 frames into one latent frame, so 1 pixel frame is the smallest input that
makes one latent frame.
"""

import random
from collections.abc import Iterable

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

# Sides are multiples of 16: the VAE downsamples by 8 and the DiT patchifies the latent by 2 (Wan2.2's
# VAE of TI2V-5B downsamples by 16: its runs take 32, [data] bucket_side_multiple).
SIDE_MULTIPLE = 16

# Video clips shorter than this many frames after selection are refused: 5 frames are two latent
# frames (the lone first frame plus one group of 4), the least that carries any motion. A shorter
# "video" is a still image in disguise, almost always a broken or mis-probed file.
MIN_VIDEO_FRAMES = 5


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def bucket_table(size: int | float, multiple: int = SIDE_MULTIPLE) -> dict[float, tuple[int, int]]:
    """The 512-base table scaled to training size `size`, each side floored to a multiple of `multiple`
    (16; 32 for the Wan2.2 VAE).

    Flooring (not rounding) keeps every bucket at or under size*size pixels, so a larger bucket never
    costs more memory than the square one the size was chosen for. `size` may be fractional
    (random_hw_adapt's 1024 / 1.5); a side that is a whole multiple of 16 in exact arithmetic stays one
    despite float rounding.
    """
    if isinstance(size, bool) or not isinstance(size, int | float) or not size > 0:
        raise ValueError(f"size must be a positive number, got {size!r}")
    table: dict[float, tuple[int, int]] = {}
    for ratio, (h, w) in ASPECT_RATIOS_512.items():
        bh = int(h * size / (512 * multiple) + 1e-9) * multiple
        bw = int(w * size / (512 * multiple) + 1e-9) * multiple
        if bh < multiple or bw < multiple:
            raise ValueError(
                f"size {size} is too small for the aspect buckets: ratio {ratio} would be {bh}x{bw} "
                f"(sides must be at least {multiple}; use a size of {2 * multiple} or more)"
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


def nearest_bucket(height: int, width: int, size: int, multiple: int = SIDE_MULTIPLE) -> tuple[int, int]:
    """(h, w) of the bucket for a height x width sample at training size `size`."""
    return bucket_table(size, multiple)[nearest_ratio(height, width)]


def valid_frame_count(n: int) -> int:
    """The largest 4k+1 <= n (n >= 1): the longest prefix of n frames the VAE accepts."""
    _check_positive("n", n)
    return (n - 1) // 4 * 4 + 1


def clip_frame_count(num_frames: int, n_frames: int, stride: int) -> int:
    """Frames a clip of `num_frames` source frames gives at `stride`, at most `n_frames`: VideoX-Fun's
    loader takes min(video_sample_n_frames, len // stride) frames, `stride` apart. 0 when the clip is
    shorter than the stride (VideoX-Fun then skips it)."""
    _check_positive("num_frames", num_frames)
    _check_positive("n_frames", n_frames)
    _check_positive("stride", stride)
    return min(n_frames, num_frames // stride)


def batch_frame_count(target: int, available: Iterable[int]) -> int:
    """The pixel frames a step trains: the least of `target` (the step's drawn count) and every clip's
    available frames (clip_frame_count), cut down to 4k+1, at least 1.

    VideoX-Fun's collate_fn takes this minimum over its batch, so a clip shorter than the requested
    frames shortens the whole batch instead of failing it."""
    _check_positive("target", target)
    least = min([target, *available])
    return valid_frame_count(least) if least >= 1 else 1


def frames_for_token_budget(size: int, budget_size: int, n_frames: int) -> int:
    """Frames a video of side `size` may have under `training_with_video_token_length`.

    The budget is the video of budget_size^2 x n_frames (token_sample_size, video_sample_n_frames),
    measured in pixel volume, and the count is VideoX-Fun's code's: x = min(budget / S^2, n_frames),
    frames = floor(x / 4) * 4 + 1 (exact integer arithmetic here). Budget 512x512x49 gives 512 -> 49,
    768 -> 21 (x = 21.8), 1024 -> 13 (x = 12.25: one frame over the budget, as VideoX-Fun trains it;
    its README says 9). n_frames is 4k+1, so the result never exceeds it; at least 1 frame.
    """
    _check_positive("size", size)
    _check_positive("budget_size", budget_size)
    _check_positive("n_frames", n_frames)
    groups = min(budget_size * budget_size * n_frames // (4 * size * size), n_frames // 4)
    return groups * 4 + 1


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


def downsample_choices(base_size: int, image_ratio: float | None = None) -> tuple[list[float], list[float]]:
    """`random_hw_adapt`'s draw, as VideoX-Fun's get_random_downsample_ratio: (ratios, probabilities);
    a step trains at base_size / ratio.

    The ratios grow with the base size: from 1536 up 1, 1.25, 1.5, 2, 2.5, 3; from 1024 1, 1.25, 1.5,
    2; from 768 1, 1.25, 1.5; from 512 1; below 512 only 1. `image_ratio` (for images:
    image_sample_size / video_sample_size, so images also train at the video size) is one more choice
    from 512 up. Ratio 1 has probability 0.75 and the others share 0.25 equally.
    """
    _check_positive("base_size", base_size)
    if base_size >= 1536:
        ratios = [1, 1.25, 1.5, 2, 2.5, 3]
    elif base_size >= 1024:
        ratios = [1, 1.25, 1.5, 2]
    elif base_size >= 768:
        ratios = [1, 1.25, 1.5]
    else:
        ratios = [1]
    if image_ratio is not None and base_size >= 512:
        ratios.append(image_ratio)
    if len(ratios) == 1:
        return [1.0], [1.0]
    return [float(r) for r in ratios], [0.75] + [0.25 / (len(ratios) - 1)] * (len(ratios) - 1)


def downsampled_size(base_size: int, ratio: float) -> int | float:
    """base_size / ratio: an int when whole, so logs and bucket sizes read as the sizes they are."""
    size = base_size / ratio
    return int(size) if size == int(size) else size


def token_length_sizes(video_sample_size: int, image_sample_size: int) -> list[int]:
    """The sizes `training_with_video_token_length` (with `random_hw_adapt`) draws from, as VideoX-Fun:
    video_sample_size up to image_sample_size in steps of 128, image_sample_size always included; only
    image_sample_size when it is not above video_sample_size."""
    _check_positive("video_sample_size", video_sample_size)
    _check_positive("image_sample_size", image_sample_size)
    if image_sample_size <= video_sample_size:
        return [image_sample_size]
    sizes = list(range(video_sample_size, image_sample_size + 1, 128))
    if sizes[-1] != image_sample_size:
        sizes.append(image_sample_size)
    return sizes


def decoded_mean_side(height: int, width: int, cap: int) -> float:
    """The mean of a clip's sides as VideoX-Fun's loader hands it over: frames whose short side exceeds
    `cap` (the larger of image_sample_size and video_sample_size) are shrunk to a short side of `cap`."""
    short, long = min(height, width), max(height, width)
    if short > cap:
        short, long = cap, int(cap * long / short)
    return (short + long) / 2


def token_length_choices(sizes: list[int], mean_sides: list[float]) -> list[int]:
    """The sizes a step of clips may train at: those below 1.25 x the smallest clip's mean side (never
    far above the clips' own resolution), or every size when none is."""
    smallest = min(mean_sides)
    return [s for s in sizes if s < smallest * 1.25] or list(sizes)


def token_length_repeats(num_frames: int, height: int, width: int, budget_size: int, n_frames: int) -> int:
    """Copies of a batch `training_with_video_token_length` trains at once (VideoX-Fun: "increase the
    batch size when the latent sequence is small"): 4 when the step's pixel volume (frames x height x
    width) is at most 1/16 of the budget (budget_size^2 x n_frames), 2 when at most 1/4, else 1."""
    budget = n_frames * budget_size * budget_size
    volume = num_frames * height * width
    if budget // 16 >= volume:
        return 4
    if budget // 4 >= volume:
        return 2
    return 1
