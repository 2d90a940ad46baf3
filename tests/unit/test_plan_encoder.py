"""train.plan's encoder column and peak on a shipped config where, with low_vram, the umT5 (11.4 GB on
the GPU while it encodes) outweighs a small bucket's activations: the column must show it."""

from pathlib import Path

import pytest
import torch

from train.config import load_config
from train.plan import CUDA_CONTEXT, GB, plan, report
from wan import T5_PRESETS, UMT5Encoder

REPO = Path(__file__).resolve().parents[2]


def test_the_umt5_drives_the_small_buckets_and_its_column_says_so():
    cfg = load_config(["--cfg", str(REPO / "configs/14b_zero3.toml")])
    assert cfg.model.low_vram
    with torch.device("meta"):
        umt5 = 2 * sum(p.numel() for p in UMT5Encoder(**T5_PRESETS["umt5-xxl"]).parameters())  # bf16
    rows, info = plan(cfg, gpus=8, gpu_memory=80 * GB)
    text = report(cfg, rows, info)
    driven = [r for r in rows if umt5 > r.activations + r.buffers]
    assert driven and len(driven) < len(rows)  # the smallest buckets only
    assert [r.encoders for r in driven] == [umt5] * len(driven)  # not 0.0
    for r in rows:
        encoding = r in driven
        # The peak is the states plus whichever is larger: the step's activations and buffers, or the umT5
        # alone while it encodes (low_vram: the step's activations are gone by then).
        step = umt5 if encoding else r.activations + r.buffers
        assert r.peak == pytest.approx(r.states + step + CUDA_CONTEXT)
        assert r.encoders == (umt5 if encoding else 0)
        assert r.peak_while == ("encoding (umT5)" if encoding else "training")
        b = r.bucket
        row = next(line for line in text.splitlines() if line.startswith(f"| {b.kind} | {b.size:.4g} | {b.frames} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert float(cells[7]) == round(r.encoders / GB, 1) and float(cells[10]) == round(r.peak / GB, 1)
        assert cells[11] == r.peak_while
    assert "| 11.4 |" in text and "| encoding (umT5) | fits |" in text


def test_without_low_vram_the_encoders_always_count():
    cfg = load_config(["--cfg", str(REPO / "configs/14b_zero3.toml"), "--low_vram=false"])
    rows, info = plan(cfg, gpus=8, gpu_memory=80 * GB)
    on_gpu = sum(info["encoders"].values())
    for r in rows:
        assert r.encoders == on_gpu
        assert r.peak == pytest.approx(r.states + on_gpu + r.activations + r.buffers + CUDA_CONTEXT)


def test_a_run_from_a_precomputed_cache_holds_no_encoder():
    cfg = load_config(["--cfg", str(REPO / "configs/14b_zero3.toml"), "--low_vram=false"])
    online, _ = plan(cfg, gpus=8, gpu_memory=80 * GB)
    cfg.data.latent_cache_dir = "/data/cache"
    cached, info = plan(cfg, gpus=8, gpu_memory=80 * GB)
    assert info["encoders"] == {}
    with torch.device("meta"):
        umt5 = 2 * sum(p.numel() for p in UMT5Encoder(**T5_PRESETS["umt5-xxl"]).parameters())
    for o, c in zip(online, cached, strict=True):
        assert c.encoders == 0 and o.encoders > umt5  # umT5 + VAE on every GPU, online
        assert c.peak == pytest.approx(o.peak - o.encoders)
