"""tools/sample.py: videos from a training checkpoint, a release folder or a merged DiT. A tiny run
writes an mp4 that decodes to the asked frames and size, a contact sheet of the expected grid and
prompts.json; sampling a checkpoint equals sampling its tools/zero_to_bf16.py merge through
wan.pipeline.generate (bf16 and fp32), a release folder equals its --transformer copy, the
checkpoint's weights load exactly (any engine), low_memory changes nothing, i2v takes the image's
aspect, and bad options or damaged checkpoints give one `error:` line and exit 2.

The checkpoints are made once per module by the trainer (in process, 2 steps on the demo data)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from train_runs import REPO, base_args, data, one_thread, write_release_folder

from tools.sample import build_parser, i2v_size, load_checkpoint_dit, main, plan
from tools.zero_to_bf16 import merge
from train.config import load_config
from train.main import Trainer
from train.models import build_models
from wan import WanModel, dit_preset
from wan.media import contact_sheet, prompt_slug, sheet_layout, video_to_frames, write_mp4, write_png
from wan.pipeline import SamplingOptions, generate

__all__ = ["data", "one_thread"]  # fixtures

PROMPT = "a red circle moves left to right over a blue background"
FAST = ["--steps", "3", "--seed", "7"]


def quiet(line: str) -> None:
    pass


def train(data: Path, out: Path, *overrides: str) -> Path:
    """A 2-step run of the debug config (tests/train_runs.py base_args), its checkpoint-2."""
    args = [*base_args(data, out), "--max_train_steps=2", "--checkpointing_steps=2"]
    Trainer(load_config([*args, *overrides])).train()
    return out / "checkpoint-2"


@pytest.fixture(scope="module")
def t2v_checkpoint(data, tmp_path_factory) -> Path:
    return train(data, tmp_path_factory.mktemp("t2v") / "run")


@pytest.fixture(scope="module")
def i2v_checkpoint(data, tmp_path_factory) -> Path:
    return train(data, tmp_path_factory.mktemp("i2v") / "run", "--preset=debug-i2v", "--train_mode=i2v")


def sample(*args: str) -> int:
    return main([str(a) for a in args])


def decode(path: Path) -> np.ndarray:
    """Every frame of a video file, [F, H, W, 3] uint8."""
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def test_a_checkpoint_samples_to_an_mp4_a_contact_sheet_and_prompts_json(t2v_checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    assert sample("--checkpoint", t2v_checkpoint, "--prompt", PROMPT, "--prompt", "Two: dots!", "--size", "80x48",
                  "--frames", "9", "--out", out, *FAST) == 0  # fmt: skip
    printed = capsys.readouterr()
    first, second = out / f"000-{prompt_slug(PROMPT)}", out / "001-two-dots"
    for stem in (first, second):
        frames = decode(stem.with_suffix(".mp4"))
        assert frames.shape == (9, 48, 80, 3)  # the asked frames and W x H
        rows, cols = sheet_layout(9)
        assert (rows, cols) == (2, 5)
        assert Image.open(stem.with_suffix(".png")).size == (cols * 80 + (cols - 1) * 2, rows * 48 + (rows - 1) * 2)
        assert str(stem.with_suffix(".mp4")) in printed.out and str(stem.with_suffix(".png")) in printed.out
    assert "video 2/2 [" in printed.err and "3/3 steps" in printed.err  # the progress bar, on stderr
    entries = json.loads((out / "prompts.json").read_text())
    assert [(e["file"], e["prompt"], e["seed"]) for e in entries] == [
        (first.name + ".mp4", PROMPT, 7), (second.name + ".mp4", "Two: dots!", 8),
    ]  # fmt: skip
    options = entries[0]["options"]
    assert (options["num_frames"], options["width"], options["height"], options["num_inference_steps"]) == (
        9,
        80,
        48,
        3,
    )
    assert (options["shift"], options["guidance_scale"], options["sampler"], options["dtype"]) == (
        5.0,
        5.0,
        "unipc",
        "fp32",
    )


def test_a_preset_run_defaults_to_its_training_size(t2v_checkpoint, tmp_path):
    # configs/debug.toml trains 64x64 clips of 9 frames: a checkpoint of it samples those by default.
    assert sample("--checkpoint", t2v_checkpoint, "--prompt", PROMPT, "--out", tmp_path, "--steps", "2") == 0
    assert decode(tmp_path / f"000-{prompt_slug(PROMPT)}.mp4").shape == (9, 64, 64, 3)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_a_checkpoint_samples_as_its_merged_folder_through_generate(t2v_checkpoint, tmp_path, dtype):
    """The tool reads the checkpoint itself; the reference merges it with zero_to_bf16, loads the folder
    with WanModel.from_pretrained and samples through wan.pipeline.generate: the same video, bitwise."""
    out = tmp_path / "tool"
    assert sample("--checkpoint", t2v_checkpoint, "--prompt", PROMPT, "--dtype", dtype, "--out", out, *FAST) == 0

    merge(t2v_checkpoint, tmp_path / "merged", dtype=dtype, log=quiet)
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    dit = WanModel.from_pretrained(tmp_path / "merged", dtype=torch_dtype).eval()
    cfg = load_config(["--cfg", str(t2v_checkpoint / "config.toml")])
    models = build_models(cfg.model, torch.device("cpu"), cfg.train.seed)
    options = SamplingOptions(num_frames=9, height=64, width=64, num_inference_steps=3, seed=7)
    video = generate(dit, models.text, models.vae, [PROMPT], options)[0]
    reference = write_mp4(tmp_path / "reference.mp4", video_to_frames(video))
    assert (out / f"000-{prompt_slug(PROMPT)}.mp4").read_bytes() == reference.read_bytes()


def test_checkpoint_weights_load_exactly_in_fp32_and_cast_in_bf16(t2v_checkpoint):
    trained = load_file(t2v_checkpoint / "model.safetensors")  # DDP: every weight, fp32
    for dtype in (torch.float32, torch.bfloat16):
        state = load_checkpoint_dit(t2v_checkpoint, dtype).state_dict()
        assert state.keys() == trained.keys()
        assert all(torch.equal(state[k], trained[k].to(dtype)) and state[k].dtype == dtype for k in trained)


def test_low_memory_and_batching_give_the_same_videos(t2v_checkpoint, tmp_path):
    prompts = ["--prompt", PROMPT, "--prompt", "a green square"]
    assert sample("--checkpoint", t2v_checkpoint, *prompts, "--out", tmp_path / "plain", *FAST) == 0
    assert sample("--checkpoint", t2v_checkpoint, *prompts, "--out", tmp_path / "low", "--low_memory", *FAST) == 0
    assert (
        sample("--checkpoint", t2v_checkpoint, *prompts, "--out", tmp_path / "batch", "--batch_size", "2", *FAST) == 0
    )
    for name in (f"000-{prompt_slug(PROMPT)}.mp4", "001-a-green-square.mp4"):
        plain = decode(tmp_path / "plain" / name)
        assert np.array_equal(decode(tmp_path / "low" / name), plain)  # the same modules, only moved around
        # One batch of 2 vs two of 1: the same noise (seed + i); matmuls of another batch size may round
        # differently, so the frames are close rather than equal.
        assert np.abs(decode(tmp_path / "batch" / name).astype(int) - plain).max() <= 8


def test_i2v_keeps_the_aspect_of_the_image(i2v_checkpoint, tmp_path):
    image = np.zeros((64, 96, 3), np.uint8)
    image[..., 0] = np.linspace(0, 255, 96, dtype=np.uint8)
    write_png(tmp_path / "first.png", image)
    assert i2v_size(64, 96, 64 * 64) == (48, 64)  # 3:2 at the area of 64x64, sides multiples of 16
    assert i2v_size(480, 640, 832 * 480) == (544, 720)  # the release's numbers for a 4:3 image
    out = tmp_path / "out"
    assert sample("--checkpoint", i2v_checkpoint, "--prompt", PROMPT, "--image", tmp_path / "first.png",
                  "--out", out, *FAST) == 0  # fmt: skip
    assert decode(out / f"000-{prompt_slug(PROMPT)}.mp4").shape == (9, 48, 64, 3)
    entry = json.loads((out / "prompts.json").read_text())[0]
    assert entry["image"] == str(tmp_path / "first.png")
    assert entry["options"]["num_inference_steps"] == 3 and entry["options"]["shift"] == 5.0


def test_a_release_folder_and_a_transformer_folder(tmp_path):
    release, copy = tmp_path / "Wan2.1-T2V-tiny", tmp_path / "merged"
    write_release_folder(release, seed=3, head_std=0.02)
    WanModel.from_pretrained(release).save_pretrained(copy)  # a DiT folder, as zero_to_bf16 writes one
    common = ["--prompt", PROMPT, "--size", "64x32", "--frames", "5", *FAST]
    assert sample("--model", release, "--out", tmp_path / "a", *common) == 0
    assert sample("--transformer", copy, "--model", release, "--out", tmp_path / "b", *common) == 0
    name = f"000-{prompt_slug(PROMPT)}.mp4"
    frames = decode(tmp_path / "a" / name)
    assert frames.shape == (5, 32, 64, 3)
    assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    sheet = contact_sheet(frames)
    assert sheet.shape == (32, 5 * 64 + 4 * 2, 3)  # 5 frames: one row


def test_a_run_from_a_release_folder_uses_its_encoders_and_moves_with_model(data, tmp_path):
    release = tmp_path / "release"
    write_release_folder(release, seed=3, head_std=0.02)
    ckpt = train(data, tmp_path / "run", f"--pretrained_model_name_or_path={release}")
    common = ["--prompt", PROMPT, "--size", "32x32", "--frames", "5", *FAST]
    assert sample("--checkpoint", ckpt, "--out", tmp_path / "a", *common) == 0
    release.rename(tmp_path / "moved")  # config.toml names a folder that is gone
    with pytest.raises(ValueError, match="pass --model FOLDER"):
        plan(build_parser().parse_args(["--checkpoint", str(ckpt), *common]))
    assert sample("--checkpoint", ckpt, "--model", tmp_path / "moved", "--out", tmp_path / "b", *common) == 0
    name = f"000-{prompt_slug(PROMPT)}.mp4"
    assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def run_cli(*args: str, script: bool = True) -> subprocess.CompletedProcess:
    entry = [str(REPO / "tools" / "sample.py")] if script else ["-m", "tools.sample"]
    return subprocess.run(
        [sys.executable, *entry, *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=120
    )


@pytest.mark.slow
def test_help_documents_every_option():
    proc = run_cli("--help")
    assert proc.returncode == 0
    for flag in ("--model", "--checkpoint", "--transformer", "--prompt", "--prompt_file", "--negative_prompt",
                 "--image", "--size", "--width", "--height", "--frames", "--steps", "--shift", "--guidance_scale",
                 "--guidance_scale_low", "--boundary",
                 "--sampler", "--seed", "--batch_size", "--dtype", "--device", "--low_memory", "--out", "--fps"):  # fmt: skip
        assert flag in proc.stdout, flag
    assert "832x480" in proc.stdout and "i2v 40" in proc.stdout  # the release's defaults are stated
    assert "Wan2.2 T2V-A14B  1280x720" in proc.stdout and "Wan2.2 TI2V-5B   1280x704" in proc.stdout


@pytest.mark.slow
def test_bad_options_and_bad_checkpoints_give_one_error_line(t2v_checkpoint, tmp_path):
    bad = run_cli("--checkpoint", t2v_checkpoint, "--frames", "8", "--size", "60x64", "--sampler", "dpm",
                  "--steps", "0", "--image", "x.png", "--batch_size", "0", script=False)  # fmt: skip
    assert bad.returncode == 2 and bad.stdout == ""
    (line,) = bad.stderr.splitlines()
    assert line.startswith("error: no prompt")
    for expected in ("--frames must be 4k + 1", "--width must be a positive multiple of 16", "--sampler must be one of",
                     "--steps must be", "--image is for an i2v model", "--batch_size must be >= 1"):  # fmt: skip
        assert expected in line, expected

    typo = run_cli("--checkpoint", t2v_checkpoint, "--frames", "nine", "--prompt", PROMPT)
    assert typo.returncode == 2 and typo.stderr == "error: argument --frames: invalid int value: 'nine' (see --help)\n"

    missing = run_cli("--checkpoint", tmp_path / "checkpoint-9", "--prompt", PROMPT)
    assert (
        missing.returncode == 2
        and missing.stderr == f"error: --checkpoint {tmp_path / 'checkpoint-9'}: no such folder\n"
    )

    damaged = shutil.copytree(t2v_checkpoint, tmp_path / "run" / "checkpoint-2")
    with open(damaged / "model.safetensors", "r+b") as f:
        f.truncate(100)
    broken = run_cli("--checkpoint", damaged, "--prompt", PROMPT)
    assert broken.returncode == 2
    (line,) = broken.stderr.splitlines()
    assert line.startswith(f"error: {damaged} is not a complete checkpoint: model.safetensors is truncated")

    (damaged / "COMPLETE").unlink()  # an output_dir whose only checkpoint is incomplete
    none = run_cli("--checkpoint", damaged.parent, "--prompt", PROMPT)
    assert none.returncode == 2 and "no checkpoint-N in it verifies" in none.stderr


@pytest.mark.slow
def test_a_deepspeed_checkpoint_loads_as_zero_to_bf16_merges_it(tmp_path):
    """ZeRO-2 on 2 gloo ranks, bf16, only some modules trained (the frozen ones DeepSpeed keeps in bf16
    only): the tool's DiT equals the merged folder's in both dtypes, and samples."""
    from zero_to_bf16_worker import train_checkpoint

    spec = {"config": dit_preset("debug"), "seed": 42, "steps": 2, "mixed_precision": "bf16",
            "trainable_modules": ["blocks.0", "head"]}  # fmt: skip
    ckpt = train_checkpoint(tmp_path / "checkpoint-2", "zero2", spec)
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        merge(ckpt, tmp_path / name, dtype=name, log=quiet)
        merged = WanModel.from_pretrained(tmp_path / name, dtype=None).state_dict()
        state = load_checkpoint_dit(ckpt, dtype).state_dict()
        assert state.keys() == merged.keys()
        assert all(state[k].dtype == merged[k].dtype and torch.equal(state[k], merged[k]) for k in merged), name
    assert sample("--checkpoint", ckpt, "--prompt", PROMPT, "--size", "32x32", "--frames", "5", "--out", tmp_path / "o",
                  *FAST) == 0  # fmt: skip
    assert decode(tmp_path / "o" / f"000-{prompt_slug(PROMPT)}.mp4").shape == (5, 32, 32, 3)


@pytest.mark.slow
def test_sp_2_under_torchrun_writes_the_videos_of_one_process(t2v_checkpoint, tmp_path, one_thread):
    """Two processes, each video's tokens over both (9 frames of 80 x 48: 45 tokens, padded): the same
    mp4 frames and contact sheets as one process (on one thread, as each of the two runs); one set of
    files, written by rank 0."""
    args = ["--checkpoint", str(t2v_checkpoint), "--prompt", PROMPT, "--prompt", "dots", "--size", "80x48",
            "--frames", "9", *FAST]  # fmt: skip
    assert sample(*args, "--out", tmp_path / "one") == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "tools.sample",
           *args, "--sp", "2", "--out", str(tmp_path / "two")]  # fmt: skip
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("sequence parallel: each video's tokens over 2 processes") == 1  # rank 0 speaks
    one, two = sorted((tmp_path / "one").iterdir()), sorted((tmp_path / "two").iterdir())
    assert [p.name for p in one] == [p.name for p in two]
    for a, b in zip(one, two, strict=True):
        if a.suffix == ".mp4":
            assert np.array_equal(decode(a), decode(b)), a.name
        elif a.suffix == ".png":
            assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b))), a.name
