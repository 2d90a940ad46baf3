"""Sizes a metadata file leaves out, read from the files (train/data/probe.py), cached in the run's
folder; and tools/prepare_metadata.py's command line. Media are written here with PyAV and PIL directly,
so the expected sizes are the ones the files were made with."""

import json
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image
from ranks import free_port, outputs, run_ranks

from train.data.loader import DataConfig, build_dataloader
from train.data.metadata import Sample, load_metadata
from train.data.probe import fill_sizes
from train.data.video import load_image

REPO = Path(__file__).resolve().parents[2]


def write_clip(path: Path, width: int, height: int, frames: int, fps: int) -> Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            image = np.full((height, width, 3), (i * 20) % 256, np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())
    return path


def write_picture(path: Path, width: int, height: int, orientation: int = 1) -> Path:
    image = Image.new("RGB", (width, height), (200, 40, 40))
    if orientation == 1:
        image.save(path)
    else:
        exif = Image.Exif()
        exif[0x0112] = orientation
        image.save(path, exif=exif.tobytes())
    return path


# (file name, how it is written, the sizes the trainer must see: width, height, num_frames, fps)
MEDIA = {
    "clip a.mp4": (lambda p: write_clip(p, 64, 48, 13, 12), (64, 48, 13, 12.0)),
    "clip b.mkv": (lambda p: write_clip(p, 48, 32, 9, 8), (48, 32, 9, 8.0)),  # mkv keeps no frame count
    "still.png": (lambda p: write_picture(p, 40, 30), (40, 30, None, None)),
    "turned.jpg": (lambda p: write_picture(p, 40, 30, orientation=6), (30, 40, None, None)),  # a quarter turn
}


@pytest.fixture
def dataset(tmp_path) -> Path:
    """A VideoX-Fun metadata.json without sizes (images without a type) beside its media."""
    data = tmp_path / "data"
    data.mkdir()
    entries = []
    for name, (write, _) in MEDIA.items():
        write(data / name)
        entry = {"file_path": name, "text": f"caption of {name}"}
        if name.endswith((".mp4", ".mkv")):
            entry["type"] = "video"
        entries.append(entry)
    meta = data / "metadata.json"
    meta.write_text(json.dumps(entries, ensure_ascii=False), encoding="utf-8")
    return meta


def expected(meta: Path) -> list[Sample]:
    out = []
    for name, (_, (width, height, frames, fps)) in MEDIA.items():
        kind = "image" if frames is None else "video"
        out.append(Sample((meta.parent / name).resolve(), f"caption of {name}", kind, width, height, frames, fps))
    return out


def test_probed_sizes_are_the_written_ones(dataset):
    skipped = []
    samples = fill_sizes(load_metadata(dataset), dataset, skipped=skipped)
    assert samples == expected(dataset) and skipped == []
    turned = samples[-1]  # the upright picture training decodes has the probed size
    assert load_image(turned.path).shape[:2] == (turned.height, turned.width)


def test_the_cache_answers_a_second_call_without_opening_a_file(dataset, tmp_path, capsys):
    first = fill_sizes(load_metadata(dataset), dataset, cache_dir=tmp_path / "out")
    line = capsys.readouterr().out
    assert "probed 4 files" in line and "(0 unreadable)" in line and "cached in" in line
    for name in MEDIA:
        (dataset.parent / name).unlink()  # only the cache can know their sizes now
    again = fill_sizes(load_metadata(dataset), dataset, cache_dir=tmp_path / "out")
    assert again == first == expected(dataset)
    line = capsys.readouterr().out
    assert "sizes of 4 entries from cache" in line and "probed" not in line


def test_edited_metadata_is_probed_again(dataset, tmp_path, capsys):
    fill_sizes(load_metadata(dataset), dataset, cache_dir=tmp_path / "out")
    entries = json.loads(dataset.read_text(encoding="utf-8"))
    entries[0]["text"] = "a new caption"
    entries.append({"file_path": "gone.mp4", "text": "", "type": "video"})
    dataset.write_text(json.dumps(entries), encoding="utf-8")
    capsys.readouterr()
    skipped = []
    samples = fill_sizes(load_metadata(dataset), dataset, cache_dir=tmp_path / "out", skipped=skipped)
    out = capsys.readouterr().out
    assert "probed 5 files" in out and "(1 unreadable)" in out
    assert [s.text for s in samples][0] == "a new caption" and len(samples) == 4
    assert [Path(p).name for p, _ in skipped] == ["gone.mp4"] and "No such file" in skipped[0][1]
    assert len(list((tmp_path / "out" / "metadata_cache").glob("*.json"))) == 2  # one per metadata version


def test_a_corrupt_cache_is_reported_and_replaced(dataset, tmp_path, capsys):
    fill_sizes(load_metadata(dataset), dataset, cache_dir=tmp_path / "out")
    (cache,) = (tmp_path / "out" / "metadata_cache").glob("*.json")
    for garbage in ('{"version": 1, "results": {"x": [1', '{"version": 1, "fingerprint": "x", "results": {}}'):
        cache.write_text(garbage)
        capsys.readouterr()
        samples = fill_sizes(load_metadata(dataset), dataset, cache_dir=tmp_path / "out")
        out = capsys.readouterr().out
        assert f"ignoring the probe cache {cache}" in out and "probed 4 files" in out
        assert samples == expected(dataset)
        assert json.loads(cache.read_text())["results"]  # rewritten whole
    fill_sizes(load_metadata(dataset), dataset, cache_dir=tmp_path / "out")
    assert "from cache" in capsys.readouterr().out


def test_build_dataloader_refuses_unreadable_files_once_and_keeps_the_first_n(dataset, tmp_path):
    data = dataset.parent
    write_clip(data / "cut.mp4", 64, 48, 17, 12)
    whole = (data / "cut.mp4").read_bytes()
    (data / "cut.mp4").write_bytes(whole[: len(whole) * 3 // 5])  # the moov atom at the end is gone
    (data / "text.mp4").write_text("not a video\n")
    entries = json.loads(dataset.read_text(encoding="utf-8"))
    broken = [{"file_path": name, "text": "", "type": "video"} for name in ("cut.mp4", "text.mp4", "missing.mp4")]
    entries = [entries[0], broken[0], entries[1], broken[1], entries[2], broken[2], entries[3]]
    dataset.write_text(json.dumps(entries), encoding="utf-8")
    config = DataConfig(train_data_meta=str(dataset), video_sample_n_frames=9, video_sample_size=64,
                        image_sample_size=64, dataloader_num_workers=0)  # fmt: skip
    loader, _, tracker = build_dataloader(config, batch_size=1, cache_dir=tmp_path / "out")
    assert tracker.refused == 3
    assert sorted(Path(p).name for p in tracker.bad) == ["cut.mp4", "missing.mp4", "text.mp4"]
    assert loader.dataset.samples == expected(dataset)

    config.max_train_samples = 3  # the first three listed entries, one of them broken
    loader, _, tracker = build_dataloader(config, batch_size=1, cache_dir=tmp_path / "out")
    assert loader.dataset.samples == expected(dataset)[:2] and list(tracker.bad) == [str(data / "cut.mp4")]


def test_a_folder_dataset_is_probed_and_cached(tmp_path, capsys):
    write_clip(tmp_path / "a.mp4", 64, 48, 9, 8)
    write_picture(tmp_path / "b.png", 48, 64)
    config = DataConfig(train_data_dir=str(tmp_path), video_sample_n_frames=9, video_sample_size=64,
                        image_sample_size=64, dataloader_num_workers=0)  # fmt: skip
    truth = [Sample(tmp_path / "a.mp4", "", "video", 64, 48, 9, 8.0), Sample(tmp_path / "b.png", "", "image", 48, 64)]
    for line in ("probed 2 files", "sizes of 2 entries from cache"):
        loader, _, _ = build_dataloader(config, batch_size=1, cache_dir=tmp_path / "out")
        assert loader.dataset.samples == truth and line in capsys.readouterr().out


RANK_SCRIPT = """
import json, os, sys
import torch.distributed as dist
import train.data.probe as probe
from train.data.metadata import load_metadata

rank, meta, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[4])
dist.init_process_group("gloo")
real = probe.probe_all
def recorded(paths, *args, **kwargs):  # the real probe, with a note of which files this rank opened
    paths = list(paths)
    open(f"{out}/opened-{rank}.json", "w").write(json.dumps(paths))
    return real(paths, *args, **kwargs)
probe.probe_all = recorded
samples = probe.fill_sizes(load_metadata(meta), meta, cache_dir=out)
open(f"{out}/sizes-{rank}.json", "w").write(json.dumps([[str(s.path), s.width, s.height, s.num_frames] for s in samples]))
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_two_ranks_share_the_probing_and_both_get_every_size(dataset, tmp_path):
    out, port = tmp_path / "out", str(free_port())
    out.mkdir()
    procs = run_ranks(lambda r: ["-c", RANK_SCRIPT, str(r), str(dataset), str(out), port], timeout=120)
    assert all(p.returncode == 0 for p in procs), outputs(procs)
    truth = [[str(s.path), s.width, s.height, s.num_frames] for s in expected(dataset)]
    for rank in range(2):
        assert json.loads((out / f"sizes-{rank}.json").read_text()) == truth
        assert json.loads((out / f"opened-{rank}.json").read_text()) == [path for path, *_ in truth][rank::2]
    assert "probed 4 files" in procs[0].output and "probed" not in procs[1].output


def prepare(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "tools" / "prepare_metadata.py"), *args, "--workers=1"]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_prepare_metadata_resolves_against_the_metadata_folder_from_anywhere(dataset, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = prepare(str(dataset), str(tmp_path / "prepared.json"), cwd=elsewhere)
    assert proc.returncode == 0, proc.stderr
    assert load_metadata(tmp_path / "prepared.json") == expected(dataset)


@pytest.mark.slow
def test_prepare_metadata_fails_when_it_writes_no_sample(dataset, tmp_path):
    outside = tmp_path / "meta" / "metadata.json"  # the metadata moved out of the data folder
    outside.parent.mkdir()
    outside.write_bytes(dataset.read_bytes())
    proc = prepare(str(outside), str(tmp_path / "prepared.json"), cwd=tmp_path)
    assert proc.returncode == 1
    assert "none of the 4 listed files could be read" in proc.stderr and "--data-dir" in proc.stderr
    assert str(outside.parent) in proc.stderr
    proc = prepare(str(outside), str(tmp_path / "prepared.json"), f"--data-dir={dataset.parent}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert load_metadata(tmp_path / "prepared.json", dataset.parent) == expected(dataset)
