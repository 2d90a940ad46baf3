"""Synthetic media for tests and demos: videos whose frames carry their own index, small files written
with PyAV only (no Pillow or OpenCV, which the trainer does not depend on).

The index code is a 4x3 grid of big black/white cells (12 bits, indices 0..4095) covering the whole
frame, grey only: grey pixels have no chroma, so the code survives yuv420p subsampling, BT.601/709
matrix mismatches between encoder and decoder, lossy compression, and resizing to any size (cells are
read at their centres, relative to the frame's own size). A centre crop of up to 20% of the width and
33% of the height still reads right (enough for resize-to-cover-then-crop into the nearest aspect
bucket); larger crops, or off-centre ones, do not: read such frames before cropping.
"""

from collections.abc import Iterable
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from wan.media import fixed_quality, write_mp4

INDEX_COLS, INDEX_ROWS = 4, 3
INDEX_BITS = INDEX_COLS * INDEX_ROWS
DARK, LIGHT = 40, 215  # well inside the limited range 16..235, 88 levels from the 128 threshold


def write_video(path: str | Path, frames: Iterable[np.ndarray], fps: float = 16, qp: int = 20) -> Path:
    """Encode RGB uint8 frames (H, W, 3; H and W even, as yuv420p needs) as a video, deterministically:
    wan/media.py `write_mp4`, the project's one video encoder."""
    return write_mp4(path, frames, fps=fps, qp=qp)


def write_image(path: str | Path, image: np.ndarray) -> Path:
    """Write an RGB uint8 image (H, W, 3) as .png (lossless) or .jpg/.jpeg (quality ~ 95) with PyAV."""
    path = Path(path)
    suffix = path.suffix.lower()
    image = np.ascontiguousarray(image, dtype=np.uint8)
    if suffix == ".png":
        codec, pix_fmt = "png", "rgb24"
    elif suffix in (".jpg", ".jpeg"):
        codec, pix_fmt = "mjpeg", "yuvj444p"
    else:
        raise ValueError(f"{path}: can write .png, .jpg or .jpeg, not {suffix!r}")
    context = av.CodecContext.create(codec, "w")
    context.width, context.height, context.pix_fmt = image.shape[1], image.shape[0], pix_fmt
    context.time_base = Fraction(1, 1)
    if codec == "mjpeg":
        fixed_quality(context, 2)
    frame = av.VideoFrame.from_ndarray(image, format="rgb24").reformat(format=pix_fmt)
    frame.pts = 0
    data = b"".join(bytes(p) for p in context.encode(frame)) + b"".join(bytes(p) for p in context.encode(None))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def index_frame(index: int, width: int, height: int) -> np.ndarray:
    """The RGB frame (height, width, 3) that encodes `index` in a grid of black/white cells,
    bit 0 top-left, row by row."""
    if not 0 <= index < 2**INDEX_BITS:
        raise ValueError(f"index {index} outside 0..{2**INDEX_BITS - 1}")
    bits = (index >> np.arange(INDEX_BITS)) & 1
    grid = np.where(bits.reshape(INDEX_ROWS, INDEX_COLS) == 1, LIGHT, DARK).astype(np.uint8)
    rows = np.arange(height) * INDEX_ROWS // height
    cols = np.arange(width) * INDEX_COLS // width
    return np.repeat(grid[rows][:, cols][:, :, None], 3, axis=2)


def write_index_video(path: str | Path, num_frames: int, width: int, height: int, fps: float = 16) -> Path:
    """An .mp4 whose frame i shows the code of i (read back with read_index). width and height must be
    even and at least 16 so every cell spans several 4x4 coding blocks' worth of pixels."""
    if width < 16 or height < 16:
        raise ValueError(f"index video {width}x{height} is too small; use at least 16x16")
    if not 1 <= num_frames <= 2**INDEX_BITS:
        raise ValueError(f"num_frames {num_frames} outside 1..{2**INDEX_BITS}")
    return write_video(path, (index_frame(i, width, height) for i in range(num_frames)), fps=fps)


def read_index(frame: np.ndarray, value_range: tuple[float, float] = (0, 255)) -> int:
    """The index shown by a frame of write_index_video, decoded or resized (not cropped).

    frame: (H, W), (H, W, C) or (C, H, W) with C in 1, 3, 4 (numpy or anything np.asarray takes, e.g. a
    CPU tensor); values in value_range, e.g. (-1, 1) for frames normalised for the VAE.
    """
    array = np.asarray(frame, dtype=np.float64)
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[2] not in (1, 3, 4):
        array = array.transpose(1, 2, 0)
    if array.ndim == 3:
        array = array[..., :3].mean(axis=2)
    if array.ndim != 2:
        raise ValueError(f"read_index expects one frame (H, W[, C]) or (C, H, W), got shape {array.shape}")
    low, high = value_range
    array = (array - low) / (high - low) * 255.0
    height, width = array.shape
    index = 0
    for bit in range(INDEX_BITS):
        row, col = divmod(bit, INDEX_COLS)
        # mean over the middle half of the cell: robust to ringing at the cell edges
        y0, y1 = (4 * row + 1) * height // (4 * INDEX_ROWS), (4 * row + 3) * height // (4 * INDEX_ROWS)
        x0, x1 = (4 * col + 1) * width // (4 * INDEX_COLS), (4 * col + 3) * width // (4 * INDEX_COLS)
        cell = array[y0 : max(y1, y0 + 1), x0 : max(x1, x0 + 1)]
        if cell.mean() > (DARK + LIGHT) / 2:
            index |= 1 << bit
    return index
