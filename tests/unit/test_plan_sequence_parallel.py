"""train.plan with [parallel] sp: each GPU holds 1/sp of a sample's tokens, so the blocks' activations
halve at sp = 2 (cross-attention's text keys and values, the embeddings and the head stay whole: within
10% of half); the model states are sharded over every GPU as before; a 14B run at 720p x 81 that fits
nowhere without it gets sp suggested; an sp the GPUs or the heads do not divide is refused."""

from pathlib import Path

import pytest

from train.config import load_config
from train.plan import GB, plan, report

REPO = Path(__file__).resolve().parents[2]
# 960 x 960 pixels a frame (1280 x 720's area), 81 frames: 75,600 tokens, one bucket size.
SIZE_720P = ["--video_sample_size=960", "--image_sample_size=960", "--video_sample_n_frames=81",
             "--random_hw_adapt=false", "--training_with_video_token_length=false"]  # fmt: skip


def planned(sp: int):
    cfg = load_config(["--cfg", str(REPO / "configs/14b_fsdp.toml"), *SIZE_720P, f"--sp={sp}"])
    rows, info = plan(cfg, gpus=8, gpu_memory=80 * GB)
    video = max((r for r in rows if r.bucket.kind == "video"), key=lambda r: r.peak)
    return cfg, rows, info, video


def test_sequence_parallel_divides_the_activations_and_is_suggested():
    cfg1, rows1, info1, one = planned(1)
    _, _, _, two = planned(2)
    assert one.tokens == two.tokens == 75_600
    assert one.states == two.states
    assert 0.45 <= two.activations / one.activations <= 0.55, (one.activations, two.activations)
    assert not one.fits
    text = report(cfg1, rows1, info1)
    assert "[parallel] sp = 4 (sequence parallel: each sample's activations over 4 GPUs; every bucket fits)" in text
    cfg4, rows4, info4, four = planned(4)
    assert four.fits and "sequence parallel over 4 GPUs" in report(cfg4, rows4, info4)


def test_an_sp_the_gpus_or_heads_do_not_divide_is_refused():
    cfg = load_config(["--cfg", str(REPO / "configs/14b_fsdp.toml"), "--sp=3"])
    with pytest.raises(ValueError, match="sp = 3 must divide the 8 GPUs and the DiT's 40 heads"):
        plan(cfg, gpus=8, gpu_memory=80 * GB)
