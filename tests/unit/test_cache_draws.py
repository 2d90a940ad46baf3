"""A cache of K variants with the random data options (random_hw_adapt with the token-length sizes,
random_frame_crop, random start frames): over the first K epochs the cached loader's steps have the online
loader's sizes, frame counts, samples, bad-file replacements and dropped captions; what differs is the
documented part (train/data/cached.py): a step's latents are the first frames of one of the sample's K
stored windows, equal to encoding those pixel frames, and a sample trains another window each epoch."""

import ast
import json

import pytest
import torch
from train_runs import REPO, data

from tools.precompute import precompute
from train.config import load_config
from train.data.buckets import bucket_table
from train.data.cache import CacheReader, start_rng
from train.data.dataset import VideoDataset, pixels_to_model
from train.data.loader import build_dataloader, load_samples, training_keys
from train.models import build_models
from wan.encoders import encode_latents

__all__ = ["data"]  # a fixture

K = 2
RANDOM = ["--random_hw_adapt=true", "--training_with_video_token_length=true", "--random_frame_crop=true",
          "--video_sample_size=48", "--image_sample_size=112", "--token_sample_size=64", "--video_sample_n_frames=17",
          "--video_sample_stride=1"]  # fmt: skip


def config(data, meta, cache, *extra):
    return load_config([
        "--cfg", str(REPO / "configs" / "debug.toml"), f"--train_data_dir={data}", f"--train_data_meta={meta}",
        f"--latent_cache_dir={cache}", "--dataloader_num_workers=0", "--mixed_precision=fp32", *RANDOM, *extra,
    ])  # fmt: skip


def batches(cfg, cache=None) -> tuple[list[dict], int]:
    """Every batch of the first K epochs (one rank, batch 2), and the samples refused up front."""
    d = cfg.data
    loader, sampler, tracker = build_dataloader(d, 2, seed=cfg.train.seed, cache=cache)
    out = []
    for epoch in range(K):
        sampler.set_epoch(epoch)
        out += [{**b, "epoch": epoch} for b in loader]
    return out, tracker.refused


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """The demo metadata plus a file listed again with another caption, and an entry of absurd size."""
    folder = tmp_path_factory.mktemp("cache")
    entries = json.loads((data / "metadata.json").read_text())
    video = next(e for e in entries if e["type"] == "video")
    entries += [{**video, "text": "the same clip, told otherwise"},
                {**video, "file_path": "videos/absurd.mp4", "width": 99999}]  # fmt: skip
    (folder / "meta.json").write_text(json.dumps(entries))
    cfg = config(data, folder / "meta.json", folder / "cache")
    precompute(cfg, K, 8, torch.device("cpu"), 0, 1)
    cache = CacheReader(folder / "cache", cfg.data.train_data_dir)
    (online, refused_online), (cached, refused_cached) = batches(cfg), batches(cfg, cache)
    assert refused_online == refused_cached == 1  # the absurd entry, refused alike
    return cfg, cache, online, cached


def test_the_cached_steps_draw_what_the_online_steps_draw(runs):
    _, _, online, cached = runs
    assert len(online) == len(cached) > 8
    shapes = set()
    for o, c in zip(online, cached, strict=True):
        b, f, h, w, _ = o["pixels"].shape
        assert c["pixel_shape"] == (b, 3, f, h, w)
        assert c["latents"].shape == (b, 16, (f - 1) // 4 + 1, h // 8, w // 8)
        assert torch.equal(c["index"], o["index"])
        assert c["text"] == o["text"] and c["skipped"] == o["skipped"]
        shapes.add((f, h, w))
    # The random options did draw: several sizes and frame counts, and the demo's broken files were met.
    assert len({s[1:] for s in shapes}) >= 3 and len({s[0] for s in shapes}) >= 3
    assert any(c["skipped"] for c in cached)
    assert any("" in c["text"] for c in cached)  # caption dropout, drawn alike


def test_a_cached_step_trains_the_first_frames_of_one_of_k_windows(runs):
    cfg, cache, _, cached = runs
    skipped: list = []
    samples = load_samples(cfg.data, skipped)
    keys = training_keys(samples, cfg.data)
    models = build_models(cfg.model, torch.device("cpu"), cfg.train.seed)
    loader = VideoDataset(samples, keys=keys, video_sample_stride=cfg.data.video_sample_stride)
    windows: dict[int, set[tuple[int, tuple[int, ...]]]] = {}
    checked_prefix = 0
    for batch in cached:
        b, _, frames, height, width = batch["pixel_shape"]
        for slot in range(b):
            i = int(batch["index"][slot])
            s = samples[i]
            if s.kind != "video":
                continue
            entry = cache.entry(s)
            # The stored size at the step's height x width (sizes are spelt as repr: 64, or 682.66...).
            name = next(
                n for n in entry["variants"] if bucket_table(ast.literal_eval(n))[keys[i][1]] == (height, width)
            )
            size, stored = ast.literal_eval(name), entry["variants"][name]
            matches = []
            for k in range(K):
                # Variant k's whole stored window, decoded and encoded here, cut to the step's frames.
                pixels = torch.empty(stored, height, width, 3, dtype=torch.uint8)
                loader._load(s, {}, start_rng(cfg.train.seed, entry["key"], size, k), pixels)
                latents = encode_latents(models.vae, pixels_to_model(pixels[None]), 1)[0]
                if torch.equal(latents[:, : (frames - 1) // 4 + 1], batch["latents"][slot]):
                    matches.append(k)
                    if frames < stored:
                        # The first frames alone, encoded: the same latents (the causal VAE's prefix).
                        alone = encode_latents(models.vae, pixels_to_model(pixels[None, :frames]), 1)[0]
                        assert torch.equal(alone, batch["latents"][slot])
                        checked_prefix += 1
            assert len(matches) >= 1, (s.path, frames, stored)
            windows.setdefault(i, set()).add((batch["epoch"], tuple(matches)))
    assert checked_prefix > 0  # some steps trained fewer frames than stored
    # A sample seen once in each of the K epochs, whose windows differ (one match each), trained K windows.
    rotated = [w for w in windows.values() if len(w) == K and all(len(m) == 1 for _, m in w)]
    assert rotated and all(len({m for _, m in w}) == K for w in rotated)
