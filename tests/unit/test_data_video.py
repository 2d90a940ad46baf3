"""Frame decoding, image loading and cover-crop resizing on small synthetic files.

Every synthetic video frame encodes its own index as a flat grey level (index * LEVEL_STEP), so a
decoded frame says which source frame it is, whatever seeking and decoding did on the way.
"""

import pickle
import random
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from train.data.buckets import frame_indices
from train.data.video import MediaError, decode_frames, load_image, resize_cover_crop, to_frame_tensor

LEVEL_STEP = 5


def write_clip(
    path: Path,
    n: int,
    codec: str = "libx264",
    gop: int = 8,
    size: tuple[int, int] = (48, 64),
    pts: list[int] | None = None,
    time_base: Fraction = Fraction(1, 1000),
    texture: bool = False,
    faststart: bool = False,
) -> Path:
    """An mp4 whose frame i is grey at mean level i*LEVEL_STEP, key frames every `gop` frames.

    pts: presentation times in `time_base` units (variable frame rate); default 24 fps.
    texture: add a fixed zero-mean noise pattern, so packets are large (flat frames take a few bytes).
    faststart: put the index (moov) before the data, as streaming-ready files do.
    """
    h, w = size
    pattern = np.random.default_rng(0).integers(-8, 9, (h, w, 1)) if texture else np.zeros((h, w, 1), np.int64)
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), mode="w", options=options) as container:
        stream = container.add_stream(codec, rate=24)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.codec_context.gop_size = gop
        if codec == "libx264":
            # no scene-cut key frames (flat frames all differ), and near-lossless levels
            stream.options = {"sc_threshold": "0", "crf": "1", "bf": "2"}
        else:
            stream.options = {"sc_threshold": "1000000000"}
            stream.codec_context.qmin, stream.codec_context.qmax = 1, 2
        if pts is not None:
            stream.codec_context.time_base = time_base
        for i in range(n):
            image = np.clip(pattern + i * LEVEL_STEP, 0, 255).astype(np.uint8).repeat(3, axis=2)
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            if pts is not None:
                frame.pts, frame.time_base = pts[i], time_base
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def levels(frames: np.ndarray) -> list[int]:
    """The frame indices encoded in decoded frames."""
    return [round(float(f.mean()) / LEVEL_STEP) for f in frames]


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return write_clip(tmp_path_factory.mktemp("video") / "clip.mp4", 45)


def test_clip_has_key_frames_every_gop(clip):
    with av.open(str(clip)) as container:
        packets = sorted((p for p in container.demux(video=0) if p.pts is not None), key=lambda p: p.pts)
    keys = [i for i, p in enumerate(packets) if p.is_keyframe]
    assert keys[:3] == [0, 8, 16]


@pytest.mark.parametrize(
    "indices",
    [[0], [0, 1, 2, 3, 4], [19, 22, 25, 28, 31], [13], [44], [40, 44], [9, 17, 25, 33, 41], [7, 8, 9]],
)
def test_decode_frames_gives_the_requested_indices(clip, indices):
    frames = decode_frames(clip, indices)
    assert frames.shape == (len(indices), 48, 64, 3) and frames.dtype == np.uint8
    assert levels(frames) == indices


def test_decode_frames_any_order_and_repeats(clip):
    indices = [30, 12, 30, 5]
    assert levels(decode_frames(clip, indices)) == indices


def test_decode_frames_with_frame_indices_draw(clip):
    rng = random.Random(3)
    for _ in range(5):
        indices = frame_indices(45, 9, 3, rng)
        assert levels(decode_frames(clip, indices)) == indices


def test_decode_frames_mpeg4(tmp_path):
    path = write_clip(tmp_path / "clip.mp4", 30, codec="mpeg4", gop=8)
    for indices in ([0, 2, 4], [11, 13, 15, 17, 19], [29]):
        assert levels(decode_frames(path, indices)) == indices


def test_decode_frames_variable_frame_rate(tmp_path):
    # 20 frames: 40 ms apart, then a 200 ms gap, then 40 ms apart again (average rate ~17.9 fps)
    pts = [40 * i for i in range(10)] + [360 + 200 + 40 * i for i in range(10)]
    path = write_clip(tmp_path / "vfr.mp4", 20, pts=pts, gop=4)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        rate, tb, start = stream.average_rate, stream.time_base, stream.start_time or 0
        decoded_pts = [f.pts for f in container.decode(video=0)]
    grid = [round(float((p - start) * tb * rate)) for p in decoded_pts]
    assert len(set(grid)) < 20 and max(b - a for a, b in zip(grid, grid[1:], strict=False)) > 1  # collisions and a gap
    # index k shows the frame on screen at time k / rate: the last frame whose grid index is <= k
    # (a gap repeats the frame before it, a collision keeps the later frame)
    expected = [max(i for i in range(20) if grid[i] <= k) for k in range(grid[-1] + 1)]
    assert levels(decode_frames(path, list(range(grid[-1] + 1)))) == expected
    for k in (1, 2, 5, 9, 11, 12, 16, grid[-1]):  # one at a time: through a seek
        assert levels(decode_frames(path, [k])) == [expected[k]]


def test_index_out_of_range(clip):
    with pytest.raises(MediaError, match="out of range.*45 frames"):
        decode_frames(clip, [40, 45])
    with pytest.raises(MediaError, match="negative"):
        decode_frames(clip, [-1])


@pytest.mark.parametrize("kind", ["zero", "text", "truncated", "missing"])
def test_broken_files_raise_media_error(tmp_path, clip, kind):
    path = tmp_path / f"{kind}.mp4"
    if kind == "zero":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("this is not a video\n" * 50)
    elif kind == "truncated":
        path.write_bytes(clip.read_bytes()[: clip.stat().st_size // 3])
    with pytest.raises(MediaError) as info:
        decode_frames(path, [0, 20, 40])
    assert str(path) in str(info.value)
    assert isinstance(info.value, ValueError)
    copy = pickle.loads(pickle.dumps(info.value))  # crosses worker processes intact
    assert (copy.path, copy.reason, str(copy)) == (info.value.path, info.value.reason, str(info.value))


def test_truncated_streaming_file_does_not_repeat_its_last_frame(tmp_path):
    # the index survives at the front, the data is cut: frames past the cut are errors, not copies
    path = write_clip(tmp_path / "full.mp4", 45, texture=True, faststart=True)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size * 6 // 10])
    assert levels(decode_frames(path, [5, 40])) == [5, 40]
    assert levels(decode_frames(cut, [5])) == [5]
    with pytest.raises(MediaError, match="out of range"):
        decode_frames(cut, [5, 40])
    with pytest.raises(MediaError, match="out of range"):
        decode_frames(cut, [40])


def test_load_image(tmp_path):
    from PIL import Image

    array = np.zeros((20, 30, 3), np.uint8)
    array[5:10, 10:20] = (200, 100, 50)
    Image.fromarray(array).save(tmp_path / "a.png")
    loaded = load_image(tmp_path / "a.png")
    assert loaded.shape == (20, 30, 3) and loaded.dtype == np.uint8
    np.testing.assert_array_equal(loaded, array)
    Image.fromarray(array[:, :, 0]).convert("L").save(tmp_path / "grey.png")
    assert load_image(tmp_path / "grey.png").shape == (20, 30, 3)


def test_load_image_broken(tmp_path):
    from PIL import Image

    (tmp_path / "zero.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image")
    Image.fromarray(np.full((64, 64, 3), 9, np.uint8)).save(tmp_path / "full.jpg")
    (tmp_path / "cut.jpg").write_bytes((tmp_path / "full.jpg").read_bytes()[:200])
    for name in ("zero.jpg", "text.jpg", "cut.jpg", "missing.jpg"):
        with pytest.raises(MediaError, match=name):
            load_image(tmp_path / name)


def test_resize_cover_crop_shape_and_range():
    frames = torch.randint(0, 256, (5, 3, 90, 160), dtype=torch.uint8)
    out = resize_cover_crop(frames, 64, 64)
    assert out.shape == (3, 5, 64, 64) and out.dtype == torch.float32
    assert out.min() >= -1 and out.max() <= 1
    black_white = torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1).expand(2, 3, 40, 40)
    out = resize_cover_crop(black_white, 32, 48)
    assert out.shape == (3, 2, 32, 48)
    assert torch.allclose(out[:, 0], torch.tensor(-1.0)) and torch.allclose(out[:, 1], torch.tensor(1.0))
    # float input is 0..1
    assert torch.allclose(resize_cover_crop(torch.full((1, 3, 8, 8), 0.5), 4, 4), torch.tensor(0.0))


@pytest.mark.parametrize("src,dst", [((90, 160), (48, 48)), ((160, 90), (64, 32)), ((100, 100), (32, 64))])
def test_resize_cover_crop_keeps_a_centred_pattern_centred(src, dst):
    h, w = src
    frames = torch.zeros(1, 3, h, w, dtype=torch.uint8)
    # a bright square at the centre of the source, small enough to survive any crop
    s = min(h, w) // 4
    frames[:, :, h // 2 - s // 2 : h // 2 + s // 2, w // 2 - s // 2 : w // 2 + s // 2] = 255
    out = resize_cover_crop(frames, *dst)[0, 0] + 1  # >= 0, mass where the square is
    ys, xs = torch.meshgrid(torch.arange(dst[0]), torch.arange(dst[1]), indexing="ij")
    cy, cx = (out * ys).sum() / out.sum(), (out * xs).sum() / out.sum()
    assert abs(cy - (dst[0] - 1) / 2) < 1.0 and abs(cx - (dst[1] - 1) / 2) < 1.0
    # cover, not fit: the target is filled edge to edge (no padding), the square is scaled, not squashed
    mask = out > 1
    rows, cols = mask.any(1).sum().item(), mask.any(0).sum().item()
    assert abs(rows - cols) <= 2


def test_decode_then_resize(clip):
    frames = decode_frames(clip, [0, 4, 8])
    out = resize_cover_crop(to_frame_tensor(frames), 32, 32)
    assert out.shape == (3, 3, 32, 32)
    expected = torch.tensor([0, 4, 8], dtype=torch.float32) * LEVEL_STEP / 127.5 - 1
    assert torch.allclose(out.mean(dim=(0, 2, 3)), expected, atol=0.02)


class CountingContainer:
    """Wraps an input container: counts decoded frames, and can make seeks land `seek_shift` pts late."""

    def __init__(self, container, log: dict, seek_shift: int = 0):
        self._container, self._log, self._shift = container, log, seek_shift

    def __getattr__(self, name):
        return getattr(self._container, name)

    def seek(self, offset, **kwargs):
        self._log["seeks"] += 1
        return self._container.seek(offset + self._shift, **kwargs)

    def decode(self, *args, **kwargs):
        for frame in self._container.decode(*args, **kwargs):
            self._log["decoded"] += 1
            yield frame


def counting_open(monkeypatch, seek_shift: int = 0) -> dict:
    import train.data.video as video

    log = {"opens": 0, "seeks": 0, "decoded": 0}
    real_open = video._open

    def _open(path):
        log["opens"] += 1
        return CountingContainer(real_open(path), log, seek_shift)

    monkeypatch.setattr(video, "_open", _open)
    return log


def test_decode_frames_seeks_instead_of_decoding_everything(clip, monkeypatch):
    log = counting_open(monkeypatch)
    assert levels(decode_frames(clip, [34, 35])) == [34, 35]
    # key frames every 8: the seek lands on frame 32, decoding stops at the frame after 35
    # (a few more may be in flight in the decoder's reorder and thread buffers)
    assert log["opens"] == 1 and log["seeks"] == 1
    assert log["decoded"] <= 10, log
    log.update(opens=0, seeks=0, decoded=0)
    assert levels(decode_frames(clip, [0, 1])) == [0, 1]
    assert log["opens"] == 1 and log["seeks"] == 0 and log["decoded"] <= 8, log


def test_decode_frames_falls_back_when_the_seek_lands_past(clip, monkeypatch):
    with av.open(str(clip)) as container:
        stream = container.streams.video[0]
        one_frame = int(1 / stream.average_rate / stream.time_base)
    log = counting_open(monkeypatch, seek_shift=20 * one_frame)
    assert levels(decode_frames(clip, [10, 12])) == [10, 12]
    assert log["opens"] == 2 and log["seeks"] == 1, log


def test_audio_only_file_has_no_video_stream(tmp_path):
    path = tmp_path / "sound.wav"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000, layout="mono")
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    with pytest.raises(MediaError, match="no video stream"):
        decode_frames(path, [0])


def test_uint8_resize_matches_the_float_path_within_one_level():
    gen = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (5, 90, 160, 3), generator=gen, dtype=torch.uint8).permute(0, 3, 1, 2)
    fast = resize_cover_crop(frames, 64, 80, dtype=torch.uint8)  # channels-last view, as decoded frames are
    exact = resize_cover_crop(frames, 64, 80)  # float [-1, 1]
    assert fast.dtype == torch.uint8 and fast.shape == exact.shape == (3, 5, 64, 80)
    assert ((fast.float() / 127.5 - 1) - exact).abs().max() <= 1.01 / 127.5


def test_decode_with_cover_scales_and_crops_while_decoding(tmp_path, clip):
    from train.data.synthetic import read_index, write_index_video

    path = write_index_video(tmp_path / "codes.mp4", 24, 192, 108)  # 16:9
    covered = decode_frames(path, [3, 10, 17], cover=(48, 80))  # shrink, crop a little of the height
    assert covered.shape == (3, 48, 80, 3) and covered.dtype == np.uint8
    assert [read_index(f) for f in covered] == [3, 10, 17]
    # A flat clip: the same levels as decoding full size, then resize_cover_crop.
    full = resize_cover_crop(to_frame_tensor(decode_frames(clip, [5, 6])), 32, 40, dtype=torch.uint8)
    fast = torch.from_numpy(decode_frames(clip, [5, 6], cover=(32, 40))).permute(3, 0, 1, 2)
    assert fast.shape == full.shape and (fast.float() - full.float()).abs().mean() < 2
