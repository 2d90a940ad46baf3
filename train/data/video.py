"""Reading frames and images from files, and shaping them for the VAE.

decode_frames decodes only what a sample needs: it seeks to the key frame at or before the first
wanted frame and stops after the last, so a 49-frame draw from a ten-minute file costs a GOP or two of
decoding, not the whole file. Every failure of a file (unreadable, no video stream, no frames, an
index past the end) is a MediaError naming the file, so a data loader can skip the sample and log
which file to fix.
"""

from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F

try:
    from PIL import Image, ImageOps
except ImportError:  # PyAV decodes images too; PIL only adds EXIF orientation and more formats
    Image = None
    ImageOps = None


class MediaError(ValueError):
    """A media file that cannot give the frames asked of it."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")

    def __reduce__(self):  # picklable across data loader worker processes
        return type(self), (self.path, self.reason)


def _open(path: str | Path) -> av.container.InputContainer:
    path = Path(path)
    if not path.is_file():
        raise MediaError(path, "no such file")
    if path.stat().st_size == 0:
        raise MediaError(path, "empty file (0 bytes)")
    try:
        return av.open(str(path), mode="r")
    except (av.FFmpegError, OSError, UnicodeDecodeError) as err:
        raise MediaError(path, f"not a readable media file ({err})") from err


def _video_stream(container: av.container.InputContainer, path: str | Path) -> av.VideoStream:
    if not container.streams.video:
        raise MediaError(path, "has no video stream")
    return container.streams.video[0]


def _rgb(frame: av.VideoFrame, cover: tuple[int, int] | None = None) -> np.ndarray:
    """The frame as [H, W, 3] uint8 RGB; with cover=(h, w), scaled by FFmpeg's swscale to cover h x w
    (keeping its aspect; area averaging when shrinking, so antialiased) and centre-cropped to it.

    The scaling runs on the decoded YUV planes (half the bytes of RGB), then the small frame takes
    swscale's unscaled YUV -> RGB path: measured on 720p -> 480p, 3x cheaper than scaling inside the
    RGB conversion and far cheaper than resizing full-size RGB frames in torch afterwards."""
    if cover is None:
        return frame.to_ndarray(format="rgb24")
    h, w = cover
    scale = max(h / frame.height, w / frame.width)
    sh, sw = max(h, round(frame.height * scale)), max(w, round(frame.width * scale))
    sh, sw = sh + sh % 2, sw + sw % 2  # even sizes for 4:2:0 chroma
    small = frame.reformat(width=sw, height=sh, interpolation="AREA" if scale < 1 else "BICUBIC")
    rgb = small.to_ndarray(format="rgb24")
    top, left = (sh - h) // 2, (sw - w) // 2
    return rgb[top : top + h, left : left + w]


def _decode_span(
    container: av.container.InputContainer,
    stream: av.VideoStream,
    wanted: list[int],
    path: str | Path,
    seek_pts: int | None,
    cover: tuple[int, int] | None = None,
) -> dict[int, np.ndarray] | None:
    """Frames for the sorted, distinct indices `wanted`, decoding from seek_pts (None: from the start).

    A frame's index is its presentation time on the stream's average-rate grid,
    round((pts - start) * time_base * rate); for constant frame rate this is its decode-order number.
    For variable frame rate an index is a moment in time, and it gets the frame on screen then (the
    last frame whose index is <= it): gaps repeat a frame, bursts drop the extra frames. Frames
    without a timestamp are numbered by decode order from the start instead.

    Returns None when a seek landed past wanted[0] or gave no frames (the caller then decodes from the
    start).
    """
    rate = stream.average_rate or stream.guessed_rate
    time_base = stream.time_base
    start = stream.start_time or 0
    use_pts = rate is not None and time_base is not None
    if seek_pts is not None:
        container.seek(seek_pts, stream=stream, backward=True, any_frame=False)
    out: dict[int, np.ndarray] = {}
    pending = 0  # position in `wanted` of the next index to fill
    held: av.VideoFrame | None = None
    held_index = 0
    broken = ""
    try:
        for counter, frame in enumerate(container.decode(stream)):
            if use_pts and frame.pts is not None:
                index = round(float((frame.pts - start) * time_base * rate))
            elif seek_pts is None:
                index = counter
            else:  # after a seek, decode order says nothing about the index
                return None
            if held is None and index > wanted[0]:
                if seek_pts is not None:
                    return None
                index = wanted[0]  # the first frame of the stream stands for everything before it
            if held is not None:
                held_rgb = None  # every wanted index before this frame's shows the held frame
                while pending < len(wanted) and wanted[pending] < index:
                    held_rgb = _rgb(held, cover) if held_rgb is None else held_rgb
                    out[wanted[pending]] = held_rgb
                    pending += 1
                if pending == len(wanted):
                    return out
            held, held_index = frame, index
    except (av.FFmpegError, OSError) as err:
        if held is None and seek_pts is not None:
            return None
        if held is None:
            raise MediaError(path, f"cannot decode video ({err})") from err
        broken = f" (decoding stopped early: {err})"  # a broken tail: keep what decoded
    if held is None and seek_pts is not None:
        return None  # the seek went past the end: the caller decodes from the start
    if held is None:
        raise MediaError(path, "video has no decodable frames")
    # the last frame holds for its own duration (one index at constant rate, maybe more at variable
    # rate), not to the header's frame count: a truncated file must not repeat its last frame. One
    # index of slack toward the header's count absorbs the rounding of variable-rate timestamps, so
    # a frame count from metadata (nb_frames) is always decodable from an intact file.
    last = held_index
    if use_pts and held.duration:
        last += max(0, round(float(held.duration * time_base * rate)) - 1)
    if not broken and stream.frames and last + 1 < stream.frames:
        last += 1
    held_rgb = None
    while pending < len(wanted) and wanted[pending] <= last:
        held_rgb = _rgb(held, cover) if held_rgb is None else held_rgb
        out[wanted[pending]] = held_rgb
        pending += 1
    if pending < len(wanted):
        raise MediaError(
            path,
            f"frame index {wanted[pending]} is out of range: the video has {last + 1}"
            f"{' readable' if broken else ''} frames{broken}",
        )
    return out


def decode_frames(
    path: str | Path, indices: list[int], cover: tuple[int, int] | None = None, out: np.ndarray | None = None
) -> np.ndarray:
    """Frames `indices` of the first video stream of `path`, as [T, H, W, 3] uint8 RGB, in the order asked.

    Indices may repeat and come in any order. Seeks to the key frame at or before the first wanted
    frame (by its pts from the stream's time_base and average rate), decodes forward and stops after
    the last; if the seek lands past the wanted frame (a container with a sparse or wrong index), it
    decodes from the start instead. Raises MediaError for unreadable files, files without frames and
    indices outside the video.

    Index i is the frame shown at time i / average_rate: the i-th frame at constant frame rate; at
    variable frame rate, frames spaced evenly in time (see _decode_span), so strides keep their speed.

    cover=(h, w): each frame comes back already scaled to cover h x w and centre-cropped to it
    ([T, h, w, 3]), scaled by FFmpeg during the RGB conversion (see _rgb). out: an array of that
    shape to fill (e.g. shared memory a DataLoader worker sends without copying), returned.
    """
    indices = [int(i) for i in indices]
    if not indices:
        raise ValueError(f"{path}: no frame indices asked for")
    if min(indices) < 0:
        raise MediaError(path, f"frame index {min(indices)} is negative")
    wanted = sorted(set(indices))
    container = _open(path)
    try:
        stream = _video_stream(container, path)
        rate = stream.average_rate or stream.guessed_rate
        seek_pts = None
        if rate and stream.time_base and wanted[0] > 0:
            # half a frame early, so a variable-rate frame rounded up to this index is not skipped
            seek_pts = (stream.start_time or 0) + int((wanted[0] - 0.5) / rate / stream.time_base)
        frames = None
        if seek_pts is None:
            frames = _decode_span(container, stream, wanted, path, None, cover)
        else:
            try:
                frames = _decode_span(container, stream, wanted, path, seek_pts, cover)
            except av.FFmpegError:
                frames = None  # a failed seek: decoding from the start may still work
        if frames is None:
            container.close()
            container = _open(path)
            stream = _video_stream(container, path)
            frames = _decode_span(container, stream, wanted, path, None, cover)
    finally:
        container.close()
    if out is None:
        return np.stack([frames[i] for i in indices])
    if out.shape[0] != len(indices):
        raise ValueError(f"out holds {out.shape[0]} frames, {len(indices)} were asked for")
    for k, i in enumerate(indices):
        out[k] = frames[i]
    return out


def load_image(path: str | Path) -> np.ndarray:
    """An image file as [H, W, 3] uint8 RGB, turned upright by its EXIF orientation (with PIL).

    Alpha is dropped and greyscale/palette images are expanded to RGB. Raises MediaError for files that
    are missing, empty, truncated or not images.
    """
    path = Path(path)
    if not path.is_file():
        raise MediaError(path, "no such file")
    if path.stat().st_size == 0:
        raise MediaError(path, "empty file (0 bytes)")
    if Image is not None:
        try:
            with Image.open(path) as image:
                image.load()
                image = ImageOps.exif_transpose(image)
                return np.asarray(image.convert("RGB")).copy()
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            raise MediaError(path, f"not a readable image ({err})") from err
    return decode_frames(path, [0])[0]


def to_frame_tensor(frames: np.ndarray) -> torch.Tensor:
    """[T, H, W, 3] (or one [H, W, 3] image) uint8 array -> [T, 3, H, W] uint8 tensor, for resize_cover_crop."""
    if frames.ndim == 3:
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected frames of shape [T, H, W, 3] or [H, W, 3], got {list(frames.shape)}")
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)


def resize_cover_crop(
    frames: torch.Tensor, height: int, width: int, chunk: int = 8, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """[T, 3, H, W] frames -> [3, T, height, width] in [-1, 1], the VAE's video layout.

    The frames are scaled to cover height x width (keeping their aspect) and centre-cropped. This crops
    the source first, to the target's aspect, then resizes the crop (bilinear, antialiased): the same
    picture up to under a source pixel of rounding, but it never holds the full-size float frames, and
    `chunk` frames are resized at a time, so a long 1080p clip stays within a few hundred MB.
    uint8 input is 0..255; floating input is taken as 0..1. dtype=torch.uint8 keeps uint8 0..255 out
    (the fast path the data loader uses; pixels_to_model maps it to [-1, 1] later).
    """
    if frames.ndim != 4 or frames.shape[1] != 3:
        raise ValueError(f"expected frames of shape [T, 3, H, W], got {list(frames.shape)}")
    if height < 1 or width < 1:
        raise ValueError(f"target size must be positive, got {height}x{width}")
    t, _, src_h, src_w = frames.shape
    if t == 0 or src_h == 0 or src_w == 0:
        raise ValueError(f"empty frames of shape {list(frames.shape)}")
    # the centred source window with the target's aspect ratio
    if src_w * height > src_h * width:  # source is wider: crop its width
        crop_h, crop_w = src_h, max(1, min(src_w, round(src_h * width / height)))
    else:
        crop_h, crop_w = max(1, min(src_h, round(src_w * height / width))), src_w
    top, left = (src_h - crop_h) // 2, (src_w - crop_w) // 2
    frames = frames[:, :, top : top + crop_h, left : left + crop_w]
    if dtype == torch.uint8:
        # uint8 in and out: torch's uint8 bilinear-antialias kernel on channels-last frames (what
        # decoded [T, H, W, 3] arrays are, seen as [T, 3, H, W]) is ~4x faster than in float, and a
        # uint8 sample is 4x less to pass from a DataLoader worker. Off by under one level.
        if frames.dtype != torch.uint8:
            raise ValueError(f"dtype=torch.uint8 needs uint8 frames, got {frames.dtype}")
        out = torch.empty(3, t, height, width, dtype=torch.uint8)
        for i in range(0, t, max(1, chunk)):
            part = frames[i : i + chunk]
            if (crop_h, crop_w) != (height, width):
                part = F.interpolate(part, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
            out[:, i : i + part.shape[0]] = part.transpose(0, 1)
        return out
    scale = 1.0 / 255.0 if frames.dtype == torch.uint8 else 1.0
    out = torch.empty(3, t, height, width, dtype=dtype)
    for i in range(0, t, max(1, chunk)):
        part = frames[i : i + chunk].to(torch.float32)
        if (crop_h, crop_w) != (height, width):
            part = F.interpolate(part, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
        out[:, i : i + part.shape[0]] = (part * (2.0 * scale) - 1.0).clamp_(-1.0, 1.0).transpose(0, 1)
    return out
