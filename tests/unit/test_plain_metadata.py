"""A dataset as a VideoX-Fun user brings it, written here with PyAV and PIL (not our tools): a plain
metadata.json of {file_path, text, type} with no sizes, file names with spaces and non-ASCII letters,
images listed without a type, broken entries among the good ones. It trains as it is on 2 ranks; the
broken files are named once and counted; a restart takes the sizes from the run's cache."""

import json
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image
from train_runs import REPO, torchrun

VIDEOS = {"clip één 01.mp4": (64, 48, 13), "视频 2.mp4": (48, 64, 9), "wide clip 3.mp4": (64, 32, 17)}
IMAGES = {"photo één.png": (64, 48), "照片 2.jpg": (48, 64)}


def write_clip(path: Path, width: int, height: int, frames: int) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        ramp = np.linspace(0, 255, width, dtype=np.uint8)[None, :, None]
        for i in range(frames):
            image = np.broadcast_to(np.roll(ramp, 3 * i, axis=1), (height, width, 3)).copy()
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> tuple[Path, list[str]]:
    """(metadata.json, the broken entries' file names)."""
    data = tmp_path_factory.mktemp("plain data")
    for name, (width, height, frames) in VIDEOS.items():
        write_clip(data / name, width, height, frames)
    for name, (width, height) in IMAGES.items():
        Image.new("RGB", (width, height), (30, 120, 200)).save(data / name)
    write_clip(data / "cut clip.mp4", 64, 48, 17)
    whole = (data / "cut clip.mp4").read_bytes()
    (data / "cut clip.mp4").write_bytes(whole[: len(whole) // 2])  # the mp4's moov atom (at the end) is cut off
    (data / "notes é.mp4").write_text("a text file, not a video\n", encoding="utf-8")
    broken = ["cut clip.mp4", "notes é.mp4", "missing 丢失.mp4"]
    good = [{"file_path": n, "text": f"a gradient sliding in {n}", "type": "video"} for n in VIDEOS]
    good += [{"file_path": n, "text": f"a blue picture {n}"} for n in IMAGES]  # no type: by extension
    bad = [{"file_path": n, "text": "broken", "type": "video"} for n in broken]
    entries = [good[0], bad[0], good[1], good[2], bad[1], good[3], bad[2], good[4]]
    meta = data / "metadata.json"
    meta.write_text(json.dumps(entries, ensure_ascii=False, indent=1), encoding="utf-8")
    return meta, broken


def run(meta: Path, out: Path, steps: int):
    args = [
        "--cfg", str(REPO / "configs" / "debug.toml"), f"--train_data_meta={meta}", "--train_data_dir=",
        "--eval_holdout=0", "--validation_prompts=[]", f"--output_dir={out}", "--mixed_precision=fp32", "--progress_bar=false", "--dataloader_num_workers=0",
        f"--max_train_steps={steps}", "--checkpointing_steps=2", "--resume_from_checkpoint=latest",
        "--video_sample_n_frames=9",
    ]  # fmt: skip
    proc = torchrun(meta.parent, out, *args, nproc=2, base=False, env={"PYTHONIOENCODING": "utf-8"})
    return proc.stdout, proc.stderr


@pytest.mark.slow
def test_plain_videox_fun_metadata_trains_and_restarts_from_the_cache(plain, tmp_path):
    meta, broken = plain
    out = tmp_path / "run"
    stdout, stderr = run(meta, out, steps=2)
    assert "probed 8 files" in stdout and "(3 unreadable)" in stdout and "cached in" in stdout
    assert stdout.count("probed") == 1  # one line, from rank 0, not one per rank
    for name in broken:  # the end-of-run list names each once (rank 0's first warning is on stderr)
        assert stdout.count(name) == 1, (name, stdout)
        assert stderr.count(name) <= 1, (name, stderr)
    assert "3 samples refused up front; 3 bad files in all" in stdout
    assert (out / "checkpoint-2").is_dir()

    stdout, _ = run(meta, out, steps=4)
    assert "resumed from" in stdout and (out / "checkpoint-4").is_dir()
    assert "probed" not in stdout and "sizes of 8 entries from cache" in stdout
    assert "3 samples refused up front; 3 bad files in all" in stdout  # the cached bad files count again
