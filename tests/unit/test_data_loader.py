"""build_dataloader end to end on the demo dataset (tools/make_demo_data.py)."""

import json

import pytest
import torch

from tools.make_demo_data import make_demo_data
from train.data.loader import DataConfig, build_dataloader
from train.data.metadata import load_metadata
from train.data.synthetic import write_index_video


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo_data(tmp_path_factory.mktemp("demo"))


def config(meta, **kw) -> DataConfig:
    base = dict(train_data_meta=str(meta), video_sample_n_frames=9, video_sample_size=128, image_sample_size=128,
                dataloader_num_workers=0, max_bad_fraction=1.0)  # fmt: skip
    return DataConfig(**{**base, **kw})


def run_epoch(cfg: DataConfig, batch_size: int = 2, epoch: int = 0):
    loader, sampler, tracker = build_dataloader(cfg, batch_size=batch_size, seed=1)
    sampler.set_epoch(epoch)
    batches = []
    for batch in loader:
        tracker.update(batch)
        batches.append(batch)
    return batches, sampler, tracker


def test_demo_epoch_skips_and_counts_the_broken_files(demo):
    batches, sampler, tracker = run_epoch(config(demo))
    assert len(batches) == len(sampler) > 0
    for batch in batches:
        b, f, h, w, c = batch["pixels"].shape
        assert c == 3 and f in (1, 9) and h % 16 == 0 and w % 16 == 0 and b == 2
    served = {i for batch in batches for i in batch["index"].tolist()}
    assert len(served) > 5
    assert {p.split("/")[-1] for p in tracker.bad} <= {"truncated_000.mp4", "empty_001.mp4", "not_a_video_002.mp4"}
    assert tracker.skips >= 1 and "failed loads" in tracker.summary()


def test_absurd_sizes_are_refused_and_counted(demo, tmp_path):
    entries = json.loads(demo.read_text())
    entries[0] = dict(entries[0], width=100000)
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps([dict(e, file_path=str(demo.parent / e["file_path"])) for e in entries]))
    _, _, tracker = build_dataloader(config(meta), batch_size=1)
    assert tracker.refused == 1
    path = str((demo.parent / entries[0]["file_path"]).resolve())
    assert tracker.bad == {path: "width 100000 is outside 16..16384"}


def test_non_utf8_caption_in_a_folder_dataset_is_skipped(tmp_path):
    write_index_video(tmp_path / "a.mp4", 9, 64, 64)
    (tmp_path / "a.txt").write_text("a fine caption")
    write_index_video(tmp_path / "b.mp4", 9, 64, 64)
    (tmp_path / "b.txt").write_bytes(b"caf\xe9 \xff")
    skipped: list = []
    samples = load_metadata(None, tmp_path, skipped)
    assert [s.path.name for s in samples] == ["a.mp4"] and [s.text for s in samples] == ["a fine caption"]
    assert len(skipped) == 1 and skipped[0][0].endswith("b.mp4") and "b.txt is not UTF-8" in skipped[0][1]
    with pytest.raises(ValueError, match="not UTF-8"):  # without a list to report into, it refuses
        load_metadata(None, tmp_path)


def test_fixed_size_mode_crops_squares(demo):
    batches, _, _ = run_epoch(config(demo, enable_bucket=False))
    assert all(batch["pixels"].shape[2:4] == (128, 128) for batch in batches)


def test_video_repeat_lists_videos_more_often(demo):
    once, _, _ = run_epoch(config(demo))
    twice, _, _ = run_epoch(config(demo, video_repeat=2))
    assert len(twice) > len(once)


def test_workers_match_the_training_process(demo):
    plain, _, _ = run_epoch(config(demo), epoch=2)
    workers, _, _ = run_epoch(config(demo, dataloader_num_workers=2), epoch=2)
    assert len(plain) == len(workers)
    for a, b in zip(plain, workers, strict=True):
        assert torch.equal(a["pixels"], b["pixels"]) and a["text"] == b["text"]


def test_every_config_problem_is_listed():
    cfg = DataConfig(video_sample_n_frames=10, video_sample_size=500, caption_dropout=2.0, video_repeat=-1)
    problems = cfg.problems()
    assert len(problems) == 5  # frames not 4k+1, size not a multiple of 16, dropout, repeat, no data
    with pytest.raises(ValueError, match=r"invalid data config:(\n  .*){5}"):
        build_dataloader(cfg, batch_size=1)
