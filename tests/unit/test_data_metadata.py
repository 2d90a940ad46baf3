"""Metadata formats and their errors, the synthetic demo data, probing with tools/prepare_metadata."""

import json
import os
from pathlib import Path

import av
import numpy as np
import pytest

import tools.prepare_metadata as prep
from tools.make_demo_data import make_demo_data
from train.data.metadata import Sample, load_metadata, save_metadata
from train.data.synthetic import read_index, write_image, write_index_video, write_video


def decode(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def error_of(meta, data_dir=None) -> str:
    with pytest.raises(ValueError) as info:
        load_metadata(meta, data_dir)
    return str(info.value)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return make_demo_data(tmp_path_factory.mktemp("demo"))


# ---------------------------------------------------------------- formats


def some_samples(root: Path) -> list[Sample]:
    return [
        Sample((root / "clips/a.mp4").resolve(), 'a red circle, moving "fast"\nleft', "video", 256, 144, 49, 16.0),
        Sample((root / "b.png").resolve(), "", "image", 128, 96),
        Sample((root / "b.png").resolve(), "ünïcødé 画像", "image"),  # duplicates are allowed
        Sample((root / "c.webm").resolve(), "no sizes yet", "video"),
        Sample(Path("/elsewhere/d.jpg"), "outside the data folder", "image", 7, 9, None, None),
        Sample((root / "e.mov").resolve(), "drop-frame rate", "video", 32, 32, 5, 29.97002997002997),
    ]


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv"])
def test_round_trip(tmp_path, suffix):
    samples = some_samples(tmp_path / "data")
    meta = save_metadata(samples, tmp_path / f"meta{suffix}", data_dir=tmp_path / "data")
    assert load_metadata(meta, tmp_path / "data") == samples
    # without data_dir, paths are written relative to the file's folder and read back from there
    meta = save_metadata(samples, tmp_path / "data" / f"meta{suffix}")
    assert load_metadata(meta) == samples
    assert "/elsewhere/d.jpg" in meta.read_text()  # outside the folder: kept absolute
    assert str(tmp_path) not in meta.read_text()  # inside it: relative


def test_save_refuses_unknown_format(tmp_path):
    with pytest.raises(ValueError, match=r"\.txt"):
        save_metadata(some_samples(tmp_path), tmp_path / "meta.txt")


def test_relative_paths(tmp_path):
    meta = tmp_path / "meta" / "m.json"
    meta.parent.mkdir()
    entries = [
        {"file_path": "a/b.mp4", "text": "x", "type": "video"},
        {"file_path": "../up/c.png", "text": "y", "type": "image"},
        {"file_path": str(tmp_path / "abs.mp4"), "text": "z", "type": "video"},
    ]
    meta.write_text(json.dumps(entries))
    with_dir = load_metadata(meta, tmp_path / "data")
    assert [s.path for s in with_dir] == [tmp_path / "data/a/b.mp4", tmp_path / "up/c.png", tmp_path / "abs.mp4"]
    without = load_metadata(meta)
    assert [s.path for s in without] == [tmp_path / "meta/a/b.mp4", tmp_path / "up/c.png", tmp_path / "abs.mp4"]
    assert load_metadata(meta, "") == without  # train_data_dir "" means no folder, as in the spec


def test_missing_type_follows_extension(tmp_path):
    meta = tmp_path / "m.jsonl"
    names = ["a.mp4", "b.MOV", "c.mkv", "d.webm", "e.avi", "f.png", "g.jpg", "h.unknown"]
    meta.write_text("".join(json.dumps({"file_path": n, "text": n}) + "\n" for n in names) + "\n\n")
    kinds = [s.kind for s in load_metadata(meta)]
    assert kinds == ["video"] * 5 + ["image"] * 3
    # an explicit type is kept, even against the extension
    meta.write_text(json.dumps({"file_path": "a.mp4", "text": "", "type": "image"}))
    assert load_metadata(meta)[0].kind == "image"


def test_csv_details(tmp_path):
    meta = tmp_path / "m.csv"
    meta.write_text(
        "\ufefffile_path,text,type,width,height,extra\n"
        'a.mp4,"a caption, with a comma",video,512.0, 288 ,ignored\n'
        "b.png,b,,,,\n"
    )
    a, b = load_metadata(meta)
    assert (a.text, a.kind, a.width, a.height, a.num_frames) == ("a caption, with a comma", "video", 512, 288, None)
    assert (b.kind, b.width, b.height) == ("image", None, None)


def test_folder(tmp_path):
    root = tmp_path / "clips"
    (root / "sub").mkdir(parents=True)
    (root / ".hidden").mkdir()
    for name in ["b.mp4", "a.png", "sub/c.MKV", "sub/d.jpg", ".hidden/e.mp4", "notes.md", "f.txt"]:
        (root / name).write_bytes(b"")
    (root / "b.txt").write_text("  a blue box\n")
    (root / "sub/c.txt").write_text("c caption")
    samples = load_metadata(root)
    assert [(s.path.relative_to(root).as_posix(), s.text, s.kind) for s in samples] == [
        ("a.png", "", "image"),
        ("b.mp4", "a blue box", "video"),
        ("sub/c.MKV", "c caption", "video"),
        ("sub/d.jpg", "", "image"),
    ]
    assert load_metadata(None, root) == samples
    assert load_metadata("", root) == samples


# ---------------------------------------------------------------- errors


def test_json_errors_are_listed_together(tmp_path):
    meta = tmp_path / "bad.json"
    entries = [
        {"text": "no path"},
        {"file_path": "a.mp4", "text": "t", "type": "movie"},
        {"file_path": "b.mp4", "text": "t", "width": "wide", "height": -3},
        {"file_path": "c.mp4", "text": "t", "num_frames": 2.5, "fps": "fast"},
        "just a string",
        {"file_path": "d.mp4"},
        {"file_path": 7, "text": 8, "width": True},
        {"file_path": "ok.mp4", "text": "fine", "width": 512.0, "height": "288"},
    ]
    meta.write_text(json.dumps(entries))
    message = error_of(meta)
    expected = [
        "entry [0]: field 'file_path' is missing",
        "entry [1]: field 'type' must be 'video' or 'image', got 'movie'",
        "entry [2]: field 'width' must be a positive whole number, got 'wide'",
        "entry [2]: field 'height' must be a positive whole number, got -3",
        "entry [3]: field 'num_frames' must be a positive whole number, got 2.5",
        "entry [3]: field 'fps' must be a positive number, got 'fast'",
        "entry [4]: expected an object",
        "entry [5]: field 'text' is missing",
        "entry [6]: field 'file_path' must be a string, got 7",
        "entry [6]: field 'text' must be a string, got 8",
        "entry [6]: field 'width' must be a positive whole number, got True",
    ]
    for line in expected:
        assert f"{meta}: {line}" in message, (line, message)
    assert "11 problem(s)" in message and "entry [7]" not in message


def test_jsonl_errors(tmp_path):
    meta = tmp_path / "bad.jsonl"
    meta.write_text(
        '{"file_path": "a.mp4", "text": "ok"}\n\n{"file_path": "b.mp4", "text": \n'
        '[1, 2]\n{"file_path": "c.mp4", "text": "x", "height": "tall"}\n'
    )
    message = error_of(meta)
    assert f"{meta}: line 3: not valid JSON" in message
    assert f"{meta}: line 4: expected an object" in message
    assert f"{meta}: line 5: field 'height'" in message
    assert "3 problem(s)" in message


def test_csv_errors(tmp_path):
    meta = tmp_path / "bad.csv"
    meta.write_text(
        "file_path,text,type,width\n"
        'a.mp4,"two\nlines",video,10\n'  # lines 2-3: fine, and line numbers after it stay right
        "b.mp4,too,many,1,cells\n"  # line 4
        "\n"  # line 5: blank, skipped
        "c.mp4,few\n"  # line 6
        "d.mp4,x,image,0\n"  # line 7
        ',x,image,\n"e.mp4","multi\nline",movie,3\n'  # lines 8, 9-10
    )
    message = error_of(meta)
    assert f"{meta}: line 4: 5 cells, the header has 4" in message
    assert f"{meta}: line 6: 2 cells, the header has 4" in message
    assert f"{meta}: line 7: field 'width' must be a positive whole number, got '0'" in message
    assert f"{meta}: line 8: field 'file_path' is missing or empty" in message
    assert f"{meta}: line 9: field 'type' must be 'video' or 'image', got 'movie'" in message
    assert "line 2" not in message and "line 3" not in message and "5 problem(s)" in message
    meta.write_text("path,text\na.mp4,x\n")
    assert "no 'file_path' column" in error_of(meta)
    meta.write_text("")
    assert "empty CSV" in error_of(meta)


def test_file_level_errors(tmp_path):
    assert "does not exist" in error_of(tmp_path / "missing.json")
    assert "give train_data_meta" in error_of(None, None)
    (tmp_path / "m.yaml").write_text("[]")
    assert "unknown metadata format '.yaml'" in error_of(tmp_path / "m.yaml")
    (tmp_path / "m.json").write_text("{not json")
    assert "not valid JSON" in error_of(tmp_path / "m.json")
    (tmp_path / "m.json").write_text('{"file_path": "a.mp4"}')
    assert "expected a JSON list" in error_of(tmp_path / "m.json")
    (tmp_path / "m.json").write_text("[]")
    assert "lists no samples" in error_of(tmp_path / "m.json")
    (tmp_path / "empty").mkdir()
    assert "no media files" in error_of(tmp_path / "empty")


# ---------------------------------------------------------------- synthetic media


def test_index_video_round_trip(tmp_path):
    path = write_index_video(tmp_path / "index.mp4", 49, 64, 48, fps=16)
    frames = decode(path)
    assert len(frames) == 49 and frames[0].shape == (48, 64, 3)
    assert [read_index(frame) for frame in frames] == list(range(49))
    # resized (strided subsampling), as CHW floats in [-1, 1], or grey: still read
    assert read_index(frames[37][::3, ::2]) == 37
    chw = frames[21].transpose(2, 0, 1).astype(np.float32) / 127.5 - 1
    assert read_index(chw, value_range=(-1, 1)) == 21
    assert read_index(frames[5].mean(axis=2)) == 5
    # a centre crop of 18% of the width and 30% of the height, as bucketing may do
    for i in (0, 22, 48):
        assert read_index(frames[i][7:41, 6:58]) == i


def test_write_image_and_video_shapes(tmp_path):
    image = np.zeros((30, 40, 3), np.uint8)
    image[:, :20] = (200, 30, 30)
    for name in ("x.png", "x.jpg"):
        (frame,) = decode(write_image(tmp_path / name, image))
        assert frame.shape == (30, 40, 3) and np.abs(frame.astype(int) - image).mean() < 3
    with pytest.raises(ValueError, match="even"):
        write_video(tmp_path / "odd.mp4", [np.zeros((31, 40, 3), np.uint8)])


def test_demo_data(demo):
    entries = json.loads(demo.read_text())
    samples = load_metadata(demo)
    assert len(samples) == len(entries) == 12 + 6 + 3
    root = demo.parent
    for entry, sample in zip(entries, samples, strict=True):
        assert not Path(entry["file_path"]).is_absolute() and sample.path == (root / entry["file_path"]).resolve()
        assert sample.path.with_suffix(".txt").read_text().strip() == sample.text
        if entry["file_path"].startswith("broken/"):
            with pytest.raises(av.FFmpegError):
                decode(sample.path)
            continue
        frames = decode(sample.path)
        assert frames[0].shape == (sample.height, sample.width, 3), entry
        assert len(frames) == (sample.num_frames if sample.kind == "video" else 1), entry
    kinds = [s.kind for s in samples]
    assert kinds.count("video") == 15 and kinds.count("image") == 6
    assert len({(s.width, s.height) for s in samples}) >= 5
    assert {s.path.suffix for s in samples} == {".mp4", ".png", ".jpg"}
    assert min(s.num_frames for s in samples if s.num_frames) >= 9 and max(s.width for s in samples) <= 256
    assert "a " in samples[0].text and " moves " in samples[0].text and "background" in samples[0].text
    assert sorted(p.name for p in (root / "broken").glob("*.mp4")) == [
        "empty_001.mp4",
        "not_a_video_002.mp4",
        "truncated_000.mp4",
    ]
    assert load_metadata(root)  # also a plain folder dataset, captions in .txt files


def test_demo_data_is_deterministic(tmp_path):
    files = []
    for name in ("one", "two"):
        make_demo_data(tmp_path / name, num_videos=3, num_images=2, num_broken=3, seed=5)
        files.append({p.relative_to(tmp_path / name): p.read_bytes() for p in (tmp_path / name).rglob("*.*")})
    assert files[0] == files[1]
    make_demo_data(tmp_path / "three", num_videos=3, num_images=2, num_broken=0, seed=6)
    assert (tmp_path / "three/metadata.json").read_bytes() != (tmp_path / "one/metadata.json").read_bytes()


# ---------------------------------------------------------------- probing


def test_prepare_metadata_on_demo(demo, tmp_path, monkeypatch, capsys):
    truth = load_metadata(demo)
    stripped = [Sample(s.path, s.text, s.kind) for s in truth]
    in_meta = save_metadata(stripped, tmp_path / "in.jsonl", data_dir=demo.parent)
    monkeypatch.setattr(prep, "CHUNK", 4)  # several tasks, so the process pool really runs
    good, bad = prep.prepare_metadata(in_meta, tmp_path / "out.csv", data_dir=demo.parent, workers=2)
    broken = [s for s in truth if s.path.parent.name == "broken"]
    assert [path for path, _ in bad] == [s.path for s in broken]
    assert all("Invalid data" in reason for _, reason in bad)
    expected = [
        s if s.kind == "video" else Sample(s.path, s.text, s.kind, s.width, s.height) for s in truth if s not in broken
    ]
    assert good == expected
    assert load_metadata(tmp_path / "out.csv", demo.parent) == expected
    lines = (tmp_path / "out.csv.bad.txt").read_text().splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(s.path) for s in broken]
    assert "truncated_000.mp4" in capsys.readouterr().err


def test_probe_counts_packets_when_the_container_does_not_say(tmp_path):
    path = write_index_video(tmp_path / "clip.mkv", 13, 48, 32, fps=12)
    with av.open(str(path)) as container:
        assert container.streams.video[0].frames == 0  # mkv keeps no frame count
    info = prep.probe(path)
    assert (info["width"], info["height"], info["num_frames"], info["fps"], info["still"]) == (48, 32, 13, 12.0, False)
    info = prep.probe(write_image(tmp_path / "still.png", np.zeros((6, 10, 3), np.uint8)))
    assert (info["width"], info["height"], info["num_frames"], info["fps"], info["still"]) == (10, 6, 1, None, True)


def test_prepare_metadata_refuses_a_video_listed_as_image(tmp_path):
    write_index_video(tmp_path / "clip.mp4", 5, 32, 32)
    write_image(tmp_path / "pic.png", np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "in.json").write_text(
        json.dumps(
            [
                {"file_path": "clip.mp4", "text": "a", "type": "image"},
                {"file_path": "pic.png", "text": "b", "type": "image", "width": 99},
                {"file_path": "missing.mp4", "text": "c"},
                {"file_path": "pic.png", "text": "d", "type": "video"},
            ]
        )
    )
    good, bad = prep.prepare_metadata(tmp_path / "in.json", tmp_path / "out.json", verbose=False)
    assert good == [Sample(tmp_path / "pic.png", "b", "image", 8, 8)]
    assert [p.name for p, _ in bad] == ["clip.mp4", "missing.mp4", "pic.png"]
    assert "video of 5 frames" in bad[0][1] and "No such file" in bad[1][1] and "still image" in bad[2][1]


def test_a_dying_worker_marks_only_its_file(demo, tmp_path, monkeypatch):
    real_probe = prep.probe

    def crashing_probe(path):
        if str(path).endswith("video_003.mp4"):
            os._exit(3)  # as a segfault inside FFmpeg would end the worker
        return real_probe(path)

    monkeypatch.setattr(prep, "probe", crashing_probe)  # the forked workers inherit it
    monkeypatch.setattr(prep, "CHUNK", 4)
    good, bad = prep.prepare_metadata(demo, tmp_path / "out.json", workers=2, verbose=False)
    assert len(good) == 12 + 6 - 1
    assert [(p.name, "died" in r) for p, r in bad if p.parent.name != "broken"] == [("video_003.mp4", True)]
    assert len(bad) == 4
