"""Write a small synthetic dataset for smoke tests and demos: moving shapes, still images, broken files.

    python -m tools.make_demo_data OUT_DIR [--num-videos 12 --num-images 6 --num-broken 3 --seed 0]

OUT_DIR gets videos/*.mp4 (a coloured shape moving over a gradient, several aspect ratios, 9..49 frames,
128..256 px on the long side), images/*.png|jpg, broken/*.mp4 (a truncated mp4, a zero-byte file, a
text file named .mp4), a same-name .txt caption beside every file (so OUT_DIR also reads as a plain
folder dataset) and metadata.json in VideoX-Fun's format (file_path relative to OUT_DIR, text, type,
width, height; videos also num_frames and fps). Broken files are listed like the rest, so a loader
meets them as it would in a real dataset. The same seed writes the same files (one encoder thread).
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: python tools/make_demo_data.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train.data.synthetic import write_image, write_video  # noqa: E402

COLOURS = {
    "red": (220, 40, 40), "green": (40, 190, 60), "blue": (40, 70, 220), "yellow": (235, 215, 40),
    "orange": (240, 140, 30), "purple": (140, 50, 190), "cyan": (40, 200, 210), "white": (245, 245, 245),
}  # fmt: skip
SHAPES = ("circle", "square", "diamond")
DIRECTIONS = ("left to right", "right to left", "top to bottom", "bottom to top")
# (width, height): 16:9, 9:16, 1:1, 4:3, 3:4, 2:1 at 128..256 px on the long side, even for yuv420p
VIDEO_SIZES = ((256, 144), (144, 256), (160, 160), (192, 144), (144, 192), (256, 128))
IMAGE_SIZES = ((256, 144), (128, 128), (192, 256), (200, 150))
FRAME_COUNTS = (9, 13, 17, 21, 25, 33, 41, 49)
FRAME_RATES = (16, 24)
BROKEN_KINDS = ("truncated", "empty", "not_a_video")


def gradient(width: int, height: int, colour: tuple[int, int, int], vertical: bool) -> np.ndarray:
    """A background from a dark shade of colour to a light one, (height, width, 3) float."""
    ramp = np.linspace(0.25, 1.0, height if vertical else width)
    ramp = ramp[:, None] if vertical else ramp[None, :]
    ramp = np.broadcast_to(ramp, (height, width))
    return ramp[..., None] * np.asarray(colour, dtype=np.float64)


def shape_mask(shape: str, width: int, height: int, cx: float, cy: float, radius: float) -> np.ndarray:
    ys, xs = np.mgrid[0:height, 0:width] + 0.5
    dx, dy = np.abs(xs - cx), np.abs(ys - cy)
    if shape == "circle":
        return dx**2 + dy**2 <= radius**2
    if shape == "square":
        return (dx <= radius) & (dy <= radius)
    return dx + dy <= radius * 1.3  # diamond


def scene_frames(
    width: int, height: int, num_frames: int, shape: str, colour: str, background: str, direction: str
) -> list[np.ndarray]:
    """The frames of a shape crossing the frame in `direction`, uint8 (height, width, 3)."""
    base = gradient(width, height, COLOURS[background], vertical=direction in DIRECTIONS[:2])
    radius = min(width, height) / 6
    frames = []
    for i in range(num_frames):
        t = i / max(num_frames - 1, 1)
        travel = radius + t * ((width if direction in DIRECTIONS[:2] else height) - 2 * radius)
        if direction == "right to left":
            travel = width - travel
        elif direction == "bottom to top":
            travel = height - travel
        cx, cy = (travel, height / 2) if direction in DIRECTIONS[:2] else (width / 2, travel)
        frame = base.copy()
        frame[shape_mask(shape, width, height, cx, cy, radius)] = COLOURS[colour]
        frames.append(np.clip(frame, 0, 255).astype(np.uint8))
    return frames


def _pick_colours(rng: np.random.Generator) -> tuple[str, str]:
    shape_colour, background = rng.choice(list(COLOURS), size=2, replace=False)
    return str(shape_colour), str(background)


def make_demo_data(
    out_dir: str | Path, num_videos: int = 12, num_images: int = 6, num_broken: int = 3, seed: int = 0
) -> Path:
    """Write the dataset into out_dir (created; files of the same names are replaced) and return the
    path of its metadata.json."""
    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    entries: list[dict] = []

    def add(relative: str, text: str, kind: str, **sizes: float) -> None:
        (out / relative).with_suffix(".txt").write_text(text + "\n", encoding="utf-8")
        entries.append({"file_path": relative, "text": text, "type": kind, **sizes})

    for i in range(num_videos):
        width, height = VIDEO_SIZES[i % len(VIDEO_SIZES)]
        num_frames = int(FRAME_COUNTS[int(rng.integers(len(FRAME_COUNTS)))])
        fps = FRAME_RATES[i % len(FRAME_RATES)]
        shape, direction = str(rng.choice(SHAPES)), str(rng.choice(DIRECTIONS))
        colour, background = _pick_colours(rng)
        relative = f"videos/video_{i:03d}.mp4"
        write_video(out / relative, scene_frames(width, height, num_frames, shape, colour, background, direction), fps)
        text = f"a {colour} {shape} moves {direction} over a {background} background"
        add(relative, text, "video", width=width, height=height, num_frames=num_frames, fps=fps)

    for i in range(num_images):
        width, height = IMAGE_SIZES[i % len(IMAGE_SIZES)]
        shape = str(rng.choice(SHAPES))
        colour, background = _pick_colours(rng)
        image = gradient(width, height, COLOURS[background], vertical=bool(i % 2))
        cx, cy = rng.uniform(0.3, 0.7) * width, rng.uniform(0.3, 0.7) * height
        image[shape_mask(shape, width, height, cx, cy, min(width, height) / 5)] = COLOURS[colour]
        relative = f"images/image_{i:03d}.{'png' if i % 2 == 0 else 'jpg'}"
        write_image(out / relative, np.clip(image, 0, 255).astype(np.uint8))
        add(relative, f"a {colour} {shape} on a {background} background", "image", width=width, height=height)

    for i in range(num_broken):
        kind = BROKEN_KINDS[i % len(BROKEN_KINDS)]
        relative = f"broken/{kind}_{i:03d}.mp4"
        path = out / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if kind == "truncated":  # the moov atom sits at the end of an mp4: cut, it is gone
            write_video(path, scene_frames(160, 160, 17, "circle", "red", "blue", "left to right"), 16)
            data = path.read_bytes()
            path.write_bytes(data[: len(data) * 3 // 5])
        elif kind == "empty":
            path.write_bytes(b"")
        else:
            path.write_text("this is not a video, only text in a file named .mp4\n", encoding="utf-8")
        text = "a red circle moves left to right over a blue background"
        add(relative, text, "video", width=160, height=160, num_frames=17, fps=16)

    meta = out / "metadata.json"
    meta.write_text(json.dumps(entries, indent=1) + "\n", encoding="utf-8")
    return meta


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--num-videos", type=int, default=12)
    parser.add_argument("--num-images", type=int, default=6)
    parser.add_argument("--num-broken", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    meta = make_demo_data(args.out_dir, args.num_videos, args.num_images, args.num_broken, args.seed)
    print(f"wrote {meta}")


if __name__ == "__main__":
    main()
