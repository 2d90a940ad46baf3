"""Writing what a sampler made: videos as .mp4, contact sheets as .png.

    frames = video_to_frames(video)            # [3, F, H, W] in [-1, 1] -> uint8 [F, H, W, 3]
    write_mp4("out/000-a-cat.mp4", frames)     # h264 (mpeg4 without x264), 16 fps
    write_png("out/000-a-cat.png", contact_sheet(frames))
    save_sample(video, "out/000-a-cat")        # both at once

The one video encoder of the project (train/data/synthetic.py writes the demo data with it too): PyAV
only, deterministic (one encoder thread, our own RGB -> YUV conversion, a constant quantiser, no rate
control), so the same frames always give the same bytes. PNGs (and shrunk sheets) use Pillow,
imported only there.
"""

import math
import re
from collections.abc import Iterable
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch

DEFAULT_FPS = 16  # Wan2.1 generates 16 frames per second


def _has_encoder(name: str) -> bool:
    try:
        av.Codec(name, "w")
    except Exception:
        return False
    return True


# h264 where this PyAV build has x264 (the wheels do); mpeg4 part 2 is in every FFmpeg build.
VIDEO_CODEC = "libx264" if _has_encoder("libx264") else "mpeg4"


def _rate(fps: float) -> Fraction:
    return Fraction(fps).limit_denominator(1001)


def rgb_to_yuv420p(rgb: np.ndarray) -> np.ndarray:
    """BT.601 limited-range yuv420p, (H * 3 / 2, W) as PyAV's from_ndarray takes it, converted here:
    swscale's converter reads uninitialised row padding for some widths, so the same frames did not
    always give the same bytes."""
    r, g, b = (rgb[..., c].astype(np.float64) for c in range(3))
    y = 16 + (65.481 * r + 128.553 * g + 24.966 * b) / 255
    u = 128 + (-37.797 * r - 74.203 * g + 112.0 * b) / 255
    v = 128 + (112.0 * r - 93.786 * g - 18.214 * b) / 255
    height, width = y.shape

    def half(plane: np.ndarray) -> np.ndarray:  # the mean of each 2x2 block
        return plane.reshape(height // 2, 2, width // 2, 2).mean(axis=(1, 3)).ravel()

    planes = np.concatenate([y.ravel(), half(u), half(v)]).reshape(height * 3 // 2, width)
    return np.clip(np.rint(planes), 0, 255).astype(np.uint8)


def fixed_quality(context: av.CodecContext, q: int) -> None:
    """A constant quantiser, ffmpeg's `-q:v q` (1 best .. 31 worst) for mpeg4 and mjpeg."""
    context.qscale = True  # the QSCALE flag
    context.global_quality = q * 118  # FF_QP2LAMBDA


def write_mp4(path: str | Path, frames: Iterable[np.ndarray], fps: float = DEFAULT_FPS, qp: int = 20) -> Path:
    """Encode RGB uint8 frames (each [H, W, 3], H and W even as yuv420p needs; an [F, H, W, 3] array
    is an iterable of them) as a video at `fps`, in h264 at constant quantiser qp (lower is better;
    mpeg4 at -q:v 3 where x264 is missing). The container follows the extension (.mp4, .mkv, ...).
    Deterministic: the same frames give the same bytes. Returns `path`; parent folders are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = None
        count = 0
        for frame in frames:
            frame = np.ascontiguousarray(frame, dtype=np.uint8)
            if stream is None:
                height, width = frame.shape[:2]
                if frame.ndim != 3 or frame.shape[2] != 3 or height % 2 or width % 2:
                    raise ValueError(f"{path}: frames must be (H, W, 3) with even H and W, got {frame.shape}")
                stream = container.add_stream(VIDEO_CODEC, rate=_rate(fps))
                stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
                stream.codec_context.thread_count = 1
                if VIDEO_CODEC == "libx264":
                    # constant qp, not crf: this x264 gave different bytes run to run in crf mode
                    stream.options = {"qp": str(qp), "preset": "veryfast"}
                else:
                    fixed_quality(stream.codec_context, 3)
            elif frame.shape != (height, width, 3):
                raise ValueError(f"{path}: frame {count} is {frame.shape}, the first was {(height, width, 3)}")
            video_frame = av.VideoFrame.from_ndarray(rgb_to_yuv420p(frame), format="yuv420p")
            video_frame.pts, video_frame.time_base = count, Fraction(1) / _rate(fps)
            count += 1
            for packet in stream.encode(video_frame):
                container.mux(packet)
        if stream is None:
            raise ValueError(f"{path}: no frames to write")
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def video_to_frames(video: torch.Tensor | np.ndarray) -> np.ndarray:
    """A video [3, F, H, W] with values in [-1, 1] (the VAE's decode, one sample of a batch; a CPU or
    GPU tensor, any float dtype, or a numpy array) -> RGB frames uint8 [F, H, W, 3]: (x + 1) * 127.5,
    rounded, values outside [-1, 1] clipped."""
    if isinstance(video, np.ndarray):
        video = torch.from_numpy(video)
    if video.ndim != 4 or video.shape[0] != 3:
        raise ValueError(f"expected a video [3, F, H, W], got shape {list(video.shape)}")
    frames = ((video.detach().float().cpu() + 1) * 127.5).round_().clamp_(0, 255).to(torch.uint8)
    return frames.permute(1, 2, 3, 0).contiguous().numpy()


def sheet_indices(num_frames: int, max_frames: int = 16) -> list[int]:
    """The frames a contact sheet shows: all when there are at most max_frames, else max_frames evenly
    spaced from the first to the last."""
    if num_frames < 1 or max_frames < 1:
        raise ValueError(f"need num_frames >= 1 and max_frames >= 1, got {num_frames} and {max_frames}")
    if num_frames <= max_frames:
        return list(range(num_frames))
    if max_frames == 1:
        return [0]
    return [round(i * (num_frames - 1) / (max_frames - 1)) for i in range(max_frames)]


def sheet_layout(count: int, columns: int | None = None, max_columns: int = 8) -> tuple[int, int]:
    """(rows, columns) of a sheet of `count` frames: the given columns, else one row of up to
    max_columns, else the fewest rows of at most max_columns, as evenly filled as can be (9 -> 2 x 5,
    16 -> 2 x 8)."""
    if columns is None:
        rows = math.ceil(count / max_columns)
        columns = math.ceil(count / rows)
    if columns < 1:
        raise ValueError(f"columns must be >= 1, got {columns}")
    columns = min(columns, count)
    return math.ceil(count / columns), columns


def contact_sheet(
    frames: np.ndarray,
    columns: int | None = None,
    max_frames: int = 16,
    gap: int = 2,
    background: int = 0,
    max_frame_width: int | None = None,
) -> np.ndarray:
    """A grid of frames of a video as one RGB uint8 image [rows * h + (rows-1) * gap, columns * w +
    (columns-1) * gap, 3]: `sheet_indices(F, max_frames)` frames in reading order, `gap` pixels of
    grey level `background` between them (and in the cells past the last frame); `sheet_layout` picks
    rows and columns when `columns` is None. frames: [F, H, W, 3] uint8 (video_to_frames), or one
    [H, W, 3] image. max_frame_width: frames wider than this are shrunk (Pillow, bicubic, aspect kept;
    h, w are the shrunk size) so sheets of large videos stay small."""
    frames = np.asarray(frames)
    if frames.ndim == 3:
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames [F, H, W, 3], got {frames.dtype} {list(frames.shape)}")
    if gap < 0:
        raise ValueError(f"gap must be >= 0, got {gap}")
    picked = frames[sheet_indices(len(frames), max_frames)]
    h, w = picked.shape[1:3]
    if max_frame_width is not None and w > max_frame_width:
        from PIL import Image  # imported here: writing videos needs PyAV only

        w_new, h_new = max_frame_width, max(1, round(h * max_frame_width / w))
        resample = Image.Resampling.BICUBIC
        picked = np.stack([np.asarray(Image.fromarray(f).resize((w_new, h_new), resample)) for f in picked])
        h, w = h_new, w_new
    rows, cols = sheet_layout(len(picked), columns)
    sheet = np.full((rows * h + (rows - 1) * gap, cols * w + (cols - 1) * gap, 3), background, np.uint8)
    for k, frame in enumerate(picked):
        r, c = divmod(k, cols)
        sheet[r * (h + gap) : r * (h + gap) + h, c * (w + gap) : c * (w + gap) + w] = frame
    return sheet


def write_png(path: str | Path, image: np.ndarray) -> Path:
    """Write an RGB uint8 image [H, W, 3] (or greyscale [H, W]) as a lossless PNG with Pillow. Returns
    `path`; parent folders are created."""
    from PIL import Image

    image = np.ascontiguousarray(image)
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
        raise ValueError(f"expected a uint8 image [H, W, 3] or [H, W], got {image.dtype} {list(image.shape)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, format="PNG")
    return path


def save_sample(
    video: torch.Tensor | np.ndarray, stem: str | Path, fps: float = DEFAULT_FPS, **sheet_options
) -> tuple[Path, Path]:
    """A video [3, F, H, W] in [-1, 1] as `stem`.mp4 and its contact sheet `stem`.png (sheet_options go
    to contact_sheet). Returns (mp4 path, png path)."""
    stem = Path(stem)
    frames = video_to_frames(video)
    mp4 = write_mp4(stem.with_name(stem.name + ".mp4"), frames, fps=fps)
    png = write_png(stem.with_name(stem.name + ".png"), contact_sheet(frames, **sheet_options))
    return mp4, png


def prompt_slug(text: str, limit: int = 48) -> str:
    """A file-name piece of a prompt: lowercase letters and digits joined by '-', at most `limit`
    characters, cut at a word boundary ("video" when nothing is left)."""
    words = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    cut = words[:limit].rstrip("-")
    if len(words) > limit and "-" in cut:
        cut = cut[: cut.rindex("-")]
    return cut or "video"
