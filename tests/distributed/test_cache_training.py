"""Training from a precomputed cache (tools/precompute.py, [data] latent_cache_dir) through train.main on 2 gloo
ranks: with a cache of K = 1 and data options that leave no choice (fixed sizes; each clip's frame window
fits once, so there is no start to draw) the per-step losses and the final weights are the online run's
bit for bit, on ddp and fsdp and for i2v, caption dropout and the demo's broken files included (skipped,
replaced and counted alike), with validation videos and eval losses equal too (the encoders lent for
them); a cached run resumes as an uninterrupted one; a stale cache is refused
naming the difference; a precompute killed with SIGKILL keeps its finished shards and ends with the
files of an uninterrupted one, and 1 and 2 ranks write the same cache."""

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from ranks import descendants
from train_runs import data, engine_run_args, losses, precompute, torchrun

from tools.zero_to_bf16 import merge
from train.checkpoint_verify import find_latest
from train.config import load_config
from train.data.cache import INDEX_FILE
from train.eval_loss import EVAL_LOSS_FILE
from train.setup import open_cache
from wan import WanModel, WanVAE, vae_preset

__all__ = ["data"]  # a fixture

I2V = ["--train_mode=i2v", "--preset=debug-i2v"]
VALIDATION = ["--validation_steps=6", "--validation_inference_steps=2", "--validation_num_frames=5",
              "--validation_height=32", "--validation_width=48", "--eval_holdout=2", "--eval_steps=3",
              "--validation_prompts", "a red circle moves left to right", "a blue square moves down"]  # fmt: skip
# Every clip's metadata says 9 frames: at stride 1 the 9-frame window starts at frame 0, nothing is drawn.
FIXED = ["--video_sample_stride=1"]


def fixed_window_meta(data: Path, folder: Path) -> str:
    """The demo metadata with every video listed at 9 frames (the files have 9 to 49)."""
    entries = json.loads((data / "metadata.json").read_text())
    for e in entries:
        if e["type"] == "video":
            e["num_frames"] = 9
    path = folder / "meta9.json"
    path.write_text(json.dumps(entries))
    return f"--train_data_meta={path}"


def merged(out: Path, folder: Path) -> dict[str, torch.Tensor]:
    """The run's last checkpoint merged to float32 (tools/zero_to_bf16: every engine's layout)."""
    merge(find_latest(out), folder, dtype="fp32", log=lambda _: None)
    return dict(WanModel.from_pretrained(folder, dtype=None).state_dict())


def bad_file_summary(stdout: str) -> str:
    return re.search(r"\d+ samples served on 2 rank\(s\); .*", stdout).group(0)


@pytest.mark.slow
# fsdp and i2v in the heavy tier (CI), for time: make test keeps ddp with validation, eval loss and resume.
@pytest.mark.parametrize("case", ["ddp", *(pytest.param(c, marks=pytest.mark.heavy) for c in ("fsdp", "ddp_i2v"))])
def test_a_cache_of_one_variant_trains_what_online_training_does(data, tmp_path, case):
    engine = case.split("_")[0]
    options = [fixed_window_meta(data, tmp_path), *FIXED, *(I2V if case.endswith("i2v") else [])]
    # ddp also samples validation videos and measures the eval loss: the cached run lends itself the
    # encoders for them (and holds 2 clips out of training, as the online run does).
    args = engine_run_args(engine, *options, *(VALIDATION if case == "ddp" else []))
    precompute(data, tmp_path / "cache", *options)
    online = torchrun(data, tmp_path / "online", *args, nproc=2)
    cached = torchrun(data, tmp_path / "cached", *args, f"--latent_cache_dir={tmp_path / 'cache'}", nproc=2)
    assert "encoders: none loaded to train" in cached.stdout
    lo, lc = losses(tmp_path / "online"), losses(tmp_path / "cached")
    assert sorted(lo) == list(range(1, 7))
    assert lc == lo  # bit for bit
    assert lo[1] != lo[6]
    wo, wc = merged(tmp_path / "online", tmp_path / "wo"), merged(tmp_path / "cached", tmp_path / "wc")
    for name in wo:
        assert torch.equal(wo[name], wc[name]), name
    # The broken demo files met, replaced and counted as online (the summary line of each run).
    assert bad_file_summary(cached.stdout) == bad_file_summary(online.stdout)
    assert re.search(r"; [1-9]\d* failed loads", bad_file_summary(cached.stdout))  # some were met
    if case == "ddp":
        assert "validation at step 6: 2 of 2 videos" in cached.stdout
        sheets = sorted((tmp_path / "online" / "samples" / "step-6").glob("*.png"))
        assert len(sheets) == 2
        for sheet in sheets:
            assert sheet.read_bytes() == (tmp_path / "cached" / "samples" / "step-6" / sheet.name).read_bytes()
        evals = [[{k: v for k, v in json.loads(line).items() if k != "seconds"}
                  for line in (tmp_path / run / EVAL_LOSS_FILE).read_text().splitlines()] for run in ("online", "cached")]  # fmt: skip
        assert evals[0] == evals[1] and [e["step"] for e in evals[0]] == [0, 3, 6]  # equal numbers
    if case == "ddp":  # from the cached run's checkpoint at step 3: the uninterrupted run's steps 4-6
        resumed = tmp_path / "resumed"
        resumed.mkdir()
        subprocess.run(["cp", "-r", str(tmp_path / "cached" / "checkpoint-3"), str(resumed)], check=True)
        torchrun(data, resumed, *args, f"--latent_cache_dir={tmp_path / 'cache'}", nproc=2)
        assert losses(resumed) == {s: lc[s] for s in (4, 5, 6)}


def run_config(data: Path, cache: Path, *overrides: str):
    return load_config(["--cfg", "configs/debug.toml", f"--train_data_dir={data}", f"--latent_cache_dir={cache}",
                        f"--train_data_meta={data / 'metadata.json'}", "--video_sample_size=64", *overrides])  # fmt: skip


@pytest.mark.slow
def test_a_stale_cache_is_refused_naming_what_differs(data, tmp_path):
    torch.manual_seed(3)
    for name in ("vae_a.pth", "vae_b.pth"):
        torch.save(WanVAE(**vae_preset("debug")).state_dict(), tmp_path / name)
    cache = tmp_path / "cache"
    precompute(data, cache, f"--vae_path={tmp_path / 'vae_a.pth'}", "--max_train_samples=4")
    fits = run_config(data, cache, f"--vae_path={tmp_path / 'vae_a.pth'}", "--max_train_samples=4")
    assert open_cache(fits).num_variants == 1
    cases = {
        "vae": [f"--vae_path={tmp_path / 'vae_b.pth'}"],
        "video_sample_size": [f"--vae_path={tmp_path / 'vae_a.pth'}", "--video_sample_size=48"],
        "video_sample_stride": [f"--vae_path={tmp_path / 'vae_a.pth'}", "--video_sample_stride=1"],
    }
    for field, overrides in cases.items():
        with pytest.raises(ValueError, match="was written for other options") as err:
            open_cache(run_config(data, cache, *overrides, "--max_train_samples=4"))
        lines = str(err.value).splitlines()[1:-1]
        assert [line.split(":")[0].strip() for line in lines] == [field], str(err.value)
        assert "vae_b.pth" in str(err.value) if field == "vae" else True
    # More samples than the cache holds: named, refused before training.
    proc = torchrun(data, tmp_path / "out", f"--vae_path={tmp_path / 'vae_a.pth'}", f"--latent_cache_dir={cache}",
                    "--max_train_samples=6", check=False)  # fmt: skip
    assert proc.returncode != 0
    assert "2 samples of the metadata are not in it" in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.count("are not in it") == 1  # said once
    # The precompute itself never overwrites a finished cache: the same options find nothing to do,
    # others are refused naming the difference.
    vae_a = f"--vae_path={tmp_path / 'vae_a.pth'}"
    assert "nothing to do" in precompute(data, cache, vae_a, "--max_train_samples=4").stdout
    other = precompute(data, cache, vae_a, "--max_train_samples=4", "--video_sample_size=48", check=False)
    assert other.returncode != 0 and "holds a finished cache of other options" in other.stderr, other.stderr[-2000:]
    assert "video_sample_size: the cache has 64, this run 48" in other.stderr
    assert "the samples" not in other.stderr


def shard_files(cache: Path) -> dict[str, tuple[int, int]]:
    """name -> (inode, mtime_ns) of each finished shard's files."""
    out = {}
    for manifest in sorted(cache.glob("shard-*.json")):
        for path in (manifest, manifest.with_suffix(".safetensors")):
            st = path.stat()
            out[path.name] = (st.st_ino, st.st_mtime_ns)
    return out


@pytest.mark.slow
def test_a_killed_precompute_keeps_its_shards_and_ends_as_an_uninterrupted_one(data, tmp_path):
    options = ["--variants=2", "--shard_size=2", "--random_hw_adapt=true", "--video_sample_size=48"]
    whole = tmp_path / "whole"
    precompute(data, whole, *options)  # 1 rank, uninterrupted
    killed = tmp_path / "killed"
    proc = precompute(data, killed, *options, nproc=2, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while len(list(killed.glob("shard-*.json"))) < 3 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    for pid in [proc.pid, *descendants(proc.pid)]:  # torchrun and both ranks, mid-work
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / INDEX_FILE).exists(), "the precompute finished before the kill: the test proves nothing"
    before = shard_files(killed)
    assert len(before) >= 6
    rerun = precompute(data, killed, *options, nproc=2)
    assert "already done" in rerun.stdout
    after = shard_files(killed)
    assert {name: after[name] for name in before} == before  # finished shards kept, not rewritten
    names = sorted(p.name for p in whole.iterdir() if p.is_file())
    assert names == sorted(p.name for p in killed.iterdir() if p.is_file())
    for name in names:  # 2 ranks, killed and resumed == 1 rank uninterrupted, byte for byte
        assert (whole / name).read_bytes() == (killed / name).read_bytes(), name
