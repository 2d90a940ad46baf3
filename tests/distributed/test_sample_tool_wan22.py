"""tools/sample.py on the Wan2.2 releases: A14B experts (an official release folder, a --transformer folder
of both experts, a training checkpoint of an A14B run), I2V-A14B without CLIP and TI2V-5B on the Wan2.2
VAE, text-only and with an image. Each samples the video wan.pipeline.generate gives for the same models
and options (the mp4 bytes), with the release's defaults where no flag overrides them (plan()); bad
inputs (a LoRA with experts, a one-expert checkpoint, a TI2V size off the 32-pixel grid) are refused
with a message that says why.

The release folders are tiny (the debug presets, random weights); the A14B runs train 2 steps on one
rank under torchrun (marked slow)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from train_runs import REPO, base_args, data, one_thread, torchrun, write_release_folder

import tools.sample
from tools.sample import RELEASES, build_parser, i2v_size, load_first_frame, main, plan, release_table
from tools.zero_to_bf16 import merge
from train.config import ModelConfig, load_config
from train.main import Trainer
from train.models import VAE22_FILE, VAE_FILE, build_models
from wan import WanModel, WanVAE22, dit_preset, vae22_preset
from wan.media import prompt_slug, video_to_frames, write_mp4, write_png
from wan.modules.dit_weights import CONFIG_NAME, WEIGHTS_NAME, expert_folders
from wan.pipeline import Experts, SamplingOptions, generate
from wan.samplers import build_sampler

__all__ = ["data", "one_thread"]  # fixtures

PROMPT = "a red circle moves left to right over a blue background"
FAST = ["--steps", "3", "--seed", "7"]
NAME = f"000-{prompt_slug(PROMPT)}.mp4"
FP32 = torch.float32


def random_dit(preset: str, seed: int) -> WanModel:
    """A debug DiT with a random head (the init's zero head would sample pure noise)."""
    torch.manual_seed(seed)
    dit = WanModel(**dit_preset(preset))
    torch.nn.init.normal_(dit.head.head.weight, std=0.02)
    return dit


def write_a14b_release(root: Path, preset: str = "debug-t2v-A14B") -> Path:
    """A tiny Wan2.2 A14B release folder in the official layout: high_noise_model/ and low_noise_model/
    (two different random experts) beside the encoders of tests/train_runs.py write_release_folder."""
    write_release_folder(root, seed=3)
    for name in (CONFIG_NAME, WEIGHTS_NAME):  # its Wan2.1 DiT: the experts replace it
        (root / name).unlink()
    for k, folder in enumerate(("high_noise_model", "low_noise_model")):
        random_dit(preset, 10 + k).save_pretrained(root / folder)
    return root


def write_ti2v_release(root: Path) -> Path:
    """A tiny Wan2.2 TI2V-5B release folder: a debug-ti2v DiT, the debug Wan2.2 VAE as Wan2.2_VAE.pth and
    write_release_folder's text encoder files."""
    write_release_folder(root, seed=3)
    (root / VAE_FILE).unlink()
    torch.manual_seed(5)
    torch.save(WanVAE22(**vae22_preset("debug")).state_dict(), root / VAE22_FILE)
    random_dit("debug-ti2v", 12).save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def a14b(tmp_path_factory) -> Path:
    return write_a14b_release(tmp_path_factory.mktemp("a14b") / "Wan2.2-T2V-A14B-tiny")


@pytest.fixture(scope="module")
def ti2v(tmp_path_factory) -> Path:
    return write_ti2v_release(tmp_path_factory.mktemp("ti2v") / "Wan2.2-TI2V-5B-tiny")


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    """A 3:2 image (96 x 64) with a horizontal red ramp."""
    pixels = np.zeros((64, 96, 3), np.uint8)
    pixels[..., 0] = np.linspace(0, 255, 96, dtype=np.uint8)
    return write_png(tmp_path_factory.mktemp("image") / "first.png", pixels)


def planned(*args):
    return plan(build_parser().parse_args([str(a) for a in args]))


def sample(*args) -> int:
    return main([str(a) for a in args])


def reference(
    path: Path, dit, model_cfg: ModelConfig, options: SamplingOptions, seed: int = 0, fps: float = 16, **kwargs
) -> bytes:
    """The mp4 of wan.pipeline.generate for `dit` and build_models(model_cfg), written as the tool writes it."""
    models = build_models(model_cfg, torch.device("cpu"), seed)
    video = generate(dit, models.text, models.vae, [PROMPT], options, **kwargs)[0]
    return write_mp4(path, video_to_frames(video), fps=fps).read_bytes()


def decode(path: Path) -> np.ndarray:
    """Every frame of a video file, [F, H, W, 3] uint8."""
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def from_folder(folder: Path) -> WanModel:
    return WanModel.from_pretrained(folder, dtype=FP32).eval()


def test_the_docstring_states_the_release_defaults():
    assert release_table() in tools.sample.__doc__  # the table of --help is RELEASES
    assert build_parser().epilog.count("Wan2.2 T2V-A14B  1280x720") == 1


def test_a14b_release_defaults_and_overrides(a14b, tmp_path):
    p = planned("--model", a14b, "--prompt", PROMPT)
    o = p.options
    assert p.release.name == "Wan2.2 T2V-A14B" and p.source.experts is not None
    assert (o.width, o.height, o.num_frames, o.num_inference_steps, o.shift) == (1280, 720, 81, 40, 12.0)
    assert (o.guidance_scale, o.guidance_scale_low, p.boundary, p.fps) == (4.0, 3.0, 0.875, 16)
    # Every flag overrides its own default only.
    p = planned("--model", a14b, "--prompt", PROMPT, "--guidance_scale", "6", "--boundary", "0.5", "--fps", "8")
    assert (p.options.guidance_scale, p.options.guidance_scale_low, p.boundary, p.fps) == (6.0, 3.0, 0.5, 8)
    assert p.options.shift == 12.0
    # A diffusers pipeline folder's boundary_ratio is the model's boundary.
    diffusers = tmp_path / "diffusers"
    for expert, folder in expert_folders(a14b).items():
        shutil.copytree(folder, diffusers / {"high": "transformer", "low": "transformer_2"}[expert])
    (diffusers / "model_index.json").write_text(json.dumps({"boundary_ratio": 0.7}))
    assert planned("--transformer", diffusers, "--model", a14b, "--prompt", PROMPT).boundary == 0.7


def test_a14b_release_samples_as_generate_with_both_experts(a14b, tmp_path):
    """Both experts serve (3 steps at shift 12: timesteps 999, 959 high, 856 low); the tool's video is
    generate's with Experts(high, low, 0.875) and the release's guidance 4.0 / 3.0 and shift 12, bitwise;
    a --transformer folder of both experts (as zero_to_bf16.py writes an A14B run's) with --low_memory
    (one expert on the device at a time) gives the same file."""
    timesteps = build_sampler("unipc", 3, 12.0).timesteps.tolist()
    assert any(t >= 875 for t in timesteps) and any(t < 875 for t in timesteps)
    common = ["--prompt", PROMPT, "--size", "32x32", "--frames", "5", *FAST]
    assert sample("--model", a14b, "--out", tmp_path / "a", *common) == 0
    entry = json.loads((tmp_path / "a" / "prompts.json").read_text())[0]
    assert entry["release"] == "Wan2.2 T2V-A14B"
    o = entry["options"]
    assert (o["guidance_scale"], o["guidance_scale_low"], o["shift"], o["boundary"], o["fps"]) == (4.0, 3.0, 12.0,
                                                                                                    0.875, 16)  # fmt: skip

    folders = expert_folders(a14b)
    dit = Experts(from_folder(folders["high"]), from_folder(folders["low"]), 0.875)
    options = SamplingOptions(num_frames=5, height=32, width=32, num_inference_steps=3, guidance_scale=4.0,
                              guidance_scale_low=3.0, shift=12.0, seed=7)  # fmt: skip
    expected = reference(tmp_path / "reference.mp4", dit, ModelConfig(pretrained_model_name_or_path=str(a14b)), options)
    assert (tmp_path / "a" / NAME).read_bytes() == expected
    high_only = Experts(dit.high, dit.high, 0.875)  # the low-noise expert made a difference
    assert reference(tmp_path / "high.mp4", high_only, ModelConfig(pretrained_model_name_or_path=str(a14b)),
                     options) != expected  # fmt: skip

    merged = tmp_path / "merged"
    for folder in folders.values():
        shutil.copytree(folder, merged / folder.name)
    assert sample("--transformer", merged, "--model", a14b, "--low_memory", "--out", tmp_path / "b", *common) == 0
    assert (tmp_path / "b" / NAME).read_bytes() == expected


def test_i2v_a14b_takes_the_image_without_clip(tmp_path, image):
    release = write_a14b_release(tmp_path / "Wan2.2-I2V-A14B-tiny", "debug-i2v-A14B")
    p = planned("--model", release, "--prompt", PROMPT, "--image", image)
    o = p.options
    assert p.release.name == "Wan2.2 I2V-A14B" and p.source.model_cfg.train_mode == "i2v"
    assert (o.width, o.height, o.num_frames, o.num_inference_steps, o.shift) == (1280, 720, 81, 40, 5.0)
    assert (o.guidance_scale, o.guidance_scale_low, p.boundary) == (3.5, 3.5, 0.9)
    with pytest.raises(ValueError, match="is an i2v model: give --image PATH"):
        planned("--model", release, "--prompt", PROMPT)
    # The image's 3:2 aspect at the 64x64 area, sides multiples of 16.
    assert sample("--model", release, "--prompt", PROMPT, "--image", image, "--size", "64x64", "--frames", "5",
                  "--out", tmp_path / "out", *FAST) == 0  # fmt: skip
    entry = json.loads((tmp_path / "out" / "prompts.json").read_text())[0]
    assert (entry["options"]["width"], entry["options"]["height"], entry["options"]["boundary"]) == (64, 48, 0.9)
    folders = expert_folders(release)
    dit = Experts(from_folder(folders["high"]), from_folder(folders["low"]), 0.9)
    options = SamplingOptions(num_frames=5, height=48, width=64, num_inference_steps=3, guidance_scale=3.5,
                              guidance_scale_low=3.5, shift=5.0, seed=7)  # fmt: skip
    frame = load_first_frame(str(image))
    resized = torch.nn.functional.interpolate(frame[None], size=(48, 64), mode="bicubic", align_corners=False)[0]
    expected = reference(tmp_path / "reference.mp4", dit, ModelConfig(pretrained_model_name_or_path=str(release),
                         train_mode="i2v"), options, images=[resized])  # fmt: skip
    assert (tmp_path / "out" / NAME).read_bytes() == expected


def test_ti2v_release_text_only_and_with_an_image(ti2v, image, tmp_path):
    p = planned("--model", ti2v, "--prompt", PROMPT)
    o = p.options
    assert p.release.name == "Wan2.2 TI2V-5B" and p.source.experts is None and p.source.multiple == 32
    assert (o.width, o.height, o.num_frames, o.num_inference_steps, o.shift) == (1280, 704, 121, 50, 5.0)
    assert (o.guidance_scale, o.guidance_scale_low, p.boundary, p.fps) == (5.0, None, None, 24)

    dit = from_folder(ti2v)
    model_cfg = ModelConfig(pretrained_model_name_or_path=str(ti2v))
    common = ["--model", ti2v, "--prompt", PROMPT, "--frames", "5", *FAST]
    assert sample(*common, "--size", "64x32", "--out", tmp_path / "text") == 0
    options = SamplingOptions(num_frames=5, height=32, width=64, num_inference_steps=3, seed=7)
    expected = reference(tmp_path / "text.mp4", dit, model_cfg, options, fps=24)
    assert (tmp_path / "text" / NAME).read_bytes() == expected

    # With an image: its 3:2 aspect at the 64x64 area, sides multiples of 32; its latent the first frame.
    assert i2v_size(64, 96, 64 * 64, 32) == (32, 64) and i2v_size(64, 96, 64 * 64) == (48, 64)
    assert sample(*common, "--size", "64x64", "--image", image, "--out", tmp_path / "image") == 0
    entry = json.loads((tmp_path / "image" / "prompts.json").read_text())[0]
    assert (entry["image"], entry["options"]["width"], entry["options"]["height"]) == (str(image), 64, 32)
    with_image = reference(tmp_path / "image.mp4", dit, model_cfg, options, fps=24,
                           images=[load_first_frame(str(image))])  # fmt: skip
    assert (tmp_path / "image" / NAME).read_bytes() == with_image != expected


def test_bad_wan22_options_are_refused_with_the_reason(a14b, ti2v, tmp_path, capsys):
    lora = tmp_path / "lora.safetensors"
    lora.write_bytes(b"")
    with pytest.raises(ValueError, match=r"--lora with Wan2\.2 A14B experts .* is not supported yet"):
        planned("--model", a14b, "--prompt", PROMPT, "--lora", lora)
    with pytest.raises(ValueError, match=r"--boundary must be in \[0, 1\]"):
        planned("--model", a14b, "--prompt", PROMPT, "--boundary", "1.5")
    with pytest.raises(ValueError, match="--image is for an i2v model"):
        planned("--model", a14b, "--prompt", PROMPT, "--image", lora)
    with pytest.raises(ValueError) as err:
        planned(
            "--model", ti2v, "--prompt", PROMPT, "--size", "48x96", "--guidance_scale_low", "2", "--boundary", "0.5"
        )
    assert err.value.problems == [
        f"--guidance_scale_low is the low-noise A14B expert's; {ti2v} is one DiT, not Wan2.2 A14B experts "
        "(use --guidance_scale)",
        f"--boundary is where the A14B experts meet; {ti2v} is one DiT, not Wan2.2 A14B experts",
        f"--width must be a multiple of 32 pixels for the Wan2.2 VAE of {ti2v} (stride 16 x patch 2), got 48",
    ]
    # On the command line: one error line, exit 2.
    assert sample("--model", ti2v, "--prompt", PROMPT, "--width", "64", "--height", "80") == 2
    assert capsys.readouterr().err == (
        f"error: --height must be a multiple of 32 pixels for the Wan2.2 VAE of {ti2v} (stride 16 x patch 2), got 80\n"
    )
    assert RELEASES["ti2v-5B"].size == (1280, 704)  # the release's own size is on the grid


# ----------------------------------------------------------------------------------------------------
# Checkpoints of A14B runs (torchrun, 1 rank, 2 steps)

A14B_RUN = ["--preset=debug-t2v-A14B", "--max_train_steps=2", "--checkpointing_steps=2"]


@pytest.fixture(scope="module")
def a14b_checkpoint(data, tmp_path_factory) -> Path:
    """Both experts trained, [experts] boundary 0.9 (the checkpoint's default boundary then)."""
    out = tmp_path_factory.mktemp("a14b_run") / "run"
    torchrun(data, out, *A14B_RUN, "--boundary=0.9")
    return out / "checkpoint-2"


@pytest.mark.slow
def test_an_a14b_checkpoint_samples_both_experts_as_its_merge(a14b_checkpoint, tmp_path):
    """The tool reads both experts from the checkpoint; the reference merges it with zero_to_bf16 (the
    release layout), loads the two folders and samples through generate at the run's boundary 0.9, with
    the T2V-A14B release's steps, shift and guidance at the run's video_sample_size and frames."""
    p = planned("--checkpoint", a14b_checkpoint, "--prompt", PROMPT)
    o = p.options
    assert (o.width, o.height, o.num_frames) == (64, 64, 9)  # configs/debug.toml's sizes
    assert (o.num_inference_steps, o.shift, o.guidance_scale, o.guidance_scale_low, p.boundary) == (40, 12.0, 4.0,
                                                                                                     3.0, 0.9)  # fmt: skip
    assert sample("--checkpoint", a14b_checkpoint, "--prompt", PROMPT, "--frames", "5", "--out", tmp_path / "o",
                  *FAST) == 0  # fmt: skip
    assert json.loads((tmp_path / "o" / "prompts.json").read_text())[0]["options"]["boundary"] == 0.9

    merge(a14b_checkpoint, tmp_path / "merged", dtype="fp32", log=lambda _: None)
    folders = expert_folders(tmp_path / "merged")
    dit = Experts(from_folder(folders["high"]), from_folder(folders["low"]), 0.9)
    cfg = load_config(["--cfg", str(a14b_checkpoint / "config.toml")])
    options = SamplingOptions(num_frames=5, height=64, width=64, num_inference_steps=3, guidance_scale=4.0,
                              guidance_scale_low=3.0, shift=12.0, seed=7)  # fmt: skip
    expected = reference(tmp_path / "reference.mp4", dit, cfg.model, options, seed=cfg.train.seed)
    assert (tmp_path / "o" / NAME).read_bytes() == expected


@pytest.mark.slow
def test_a_one_expert_checkpoint_is_refused_naming_the_fix(data, a14b_checkpoint, tmp_path):
    lora = tmp_path / "lora.safetensors"
    lora.write_bytes(b"")
    with pytest.raises(ValueError, match=r"--lora with Wan2\.2 A14B experts"):
        planned("--checkpoint", a14b_checkpoint, "--prompt", PROMPT, "--lora", lora)
    out = tmp_path / "run"
    torchrun(data, out, *A14B_RUN, '--train_experts=["high"]')
    with pytest.raises(ValueError) as err:
        planned("--checkpoint", out / "checkpoint-2", "--prompt", PROMPT)
    (problem,) = err.value.problems
    assert "trained the high-noise expert only" in problem and "cannot sample alone" in problem
    assert f"python -m tools.zero_to_bf16 {out / 'checkpoint-2'} OUT" in problem
    assert "low-noise expert's folder" in problem and "--transformer OUT --model RELEASE" in problem


@pytest.mark.slow
@pytest.mark.heavy  # CI's heavy tier, for time (sequence parallel sampling is tested on one DiT in the default tier)
def test_sp_2_splits_both_experts(a14b, tmp_path, one_thread):
    """--sp 2 under torchrun with A14B experts: each expert's tokens over both processes, the videos of one
    process (on one thread, as each of the two runs)."""
    args = ["--model", str(a14b), "--prompt", PROMPT, "--size", "32x32", "--frames", "5", *FAST]
    assert sample(*args, "--out", tmp_path / "one") == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "tools.sample",
           *args, "--sp", "2", "--out", str(tmp_path / "two")]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("sequence parallel: each video's tokens over 2 processes") == 1
    assert "experts: high-noise for timesteps >= 875" in proc.stdout
    assert np.array_equal(decode(tmp_path / "one" / NAME), decode(tmp_path / "two" / NAME))


def test_a_ti2v_checkpoint_samples_text_only_and_with_an_image(data, image, tmp_path):
    """A 2-step TI2V run (in process, the debug-ti2v DiT on the debug Wan2.2 VAE): its checkpoint samples
    as a TI2V-5B model (the release's fps 24; the run's 64x64 clips of 9 frames), with or without an image."""
    out = tmp_path / "run"
    args = [*base_args(data, out), "--preset=debug-ti2v", "--train_mode=ti2v", "--bucket_side_multiple=32",
            "--max_train_steps=2", "--checkpointing_steps=2"]  # fmt: skip
    Trainer(load_config(args)).train()
    ckpt = out / "checkpoint-2"
    p = planned("--checkpoint", ckpt, "--prompt", PROMPT)
    assert p.release.name == "Wan2.2 TI2V-5B" and p.source.model_type == "ti2v" and p.source.multiple == 32
    assert (p.options.width, p.options.height, p.options.num_frames, p.fps) == (64, 64, 9, 24)
    common = ["--checkpoint", ckpt, "--prompt", PROMPT, "--frames", "5", *FAST]
    assert sample(*common, "--out", tmp_path / "text") == 0
    assert sample(*common, "--image", image, "--out", tmp_path / "image") == 0
    assert decode(tmp_path / "text" / NAME).shape == (5, 64, 64, 3)
    assert decode(tmp_path / "image" / NAME).shape == (5, 32, 64, 3)  # 3:2 at the 64x64 area, on the 32 grid
