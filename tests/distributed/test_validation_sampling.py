"""Validation sampling during training (train/validation.py): videos of fixed prompts and seeds sampled
by the DiT being trained, written to output_dir/samples/step-N/ and shown in TensorBoard.

2-rank runs through train.main (gloo, debug presets, fp32): ddp writes decodable videos of the
requested size and the TensorBoard images, prompts and config; fsdp, whose forward is a collective
the ranks share prompts through, gives ddp's frames; the videos equal wan.pipeline.generate run on
the merged checkpoint; an i2v run whose second validation image is not an image reports it and
trains to its end. In-process (fast): the prompt split, and a failing DiT forward on ddp."""

import io
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import av
import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from train_runs import base_args, data, losses, one_thread, torchrun

from tools.zero_to_bf16 import merge
from train.config import ModelConfig, load_config
from train.distributed import ParallelLayout
from train.metrics import Metrics
from train.models import build_models
from train.validation import ValidationConfig, ValidationSampler, read_first_frame, sampling_options
from wan import WanModel, dit_preset
from wan.media import contact_sheet, video_to_frames
from wan.pipeline import generate

__all__ = ["data", "one_thread"]  # fixtures
pytestmark = pytest.mark.usefixtures("one_thread")  # generate computes as the ranks do

PROMPTS = [
    "a red circle moves left to right over a blue background",
    "a yellow square moves top to bottom over a purple background",
    "a white diamond moves right to left over a green background",
]
SLUGS = ["000-a-red-circle-moves-left-to-right-over", "001-a-yellow-square-moves-top-to-bottom", "002-a-white-diamond-moves-right-to-left"]  # fmt: skip
STEPS = 4
# Not the data's 64x64 x 9 frames: the [validation] size wins.
FRAMES, HEIGHT, WIDTH = 5, 48, 80
# Sharded vs ddp: the weights of step N differ by the gradients' summation order only (measured: equal
# frames at step 2, at most 1 level on 0.004% of the values at step 4).
MAX_LEVELS, MAX_DIFFERING = 2, 0.01


def run_args(engine: str, *extra: str) -> list[str]:
    """STEPS steps, a checkpoint and a validation every 2; the prompt list last (it takes every token)."""
    return [
        f"--engine={engine}", f"--max_train_steps={STEPS}", "--checkpointing_steps=2", "--checkpoints_total_limit=0",
        "--validation_steps=2", "--validation_inference_steps=4", f"--validation_num_frames={FRAMES}",
        f"--validation_height={HEIGHT}", f"--validation_width={WIDTH}", "--validation_seed=7",
        *extra, "--validation_prompts", *PROMPTS,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """One 2-rank t2v run per engine: (output_dir, stdout)."""
    root = tmp_path_factory.mktemp("validation")
    out = {}
    for engine in ("ddp", "fsdp"):
        proc = torchrun(data, root / engine, *run_args(engine), nproc=2)
        out[engine] = (root / engine, proc.stdout)
    return out


def sheet(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def decoded_frames(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def events(out: Path) -> EventAccumulator:
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0, "tensors": 0, "scalars": 0})
    acc.Reload()
    return acc


def texts(acc: EventAccumulator, tag: str) -> dict[int, str]:
    return {e.step: e.tensor_proto.string_val[0].decode() for e in acc.Tensors(f"{tag}/text_summary")}


@pytest.mark.slow
def test_ddp_run_writes_videos_and_tensorboard(runs):
    out, stdout = runs["ddp"]
    for step in (2, 4):
        folder = out / "samples" / f"step-{step}"
        assert sorted(p.name for p in folder.iterdir()) == sorted(f"{s}.{e}" for s in SLUGS for e in ("mp4", "png"))
        for stem in SLUGS:
            frames = decoded_frames(folder / f"{stem}.mp4")
            assert frames.shape == (FRAMES, HEIGHT, WIDTH, 3)
            assert frames.std() > 1  # a picture, not a flat frame
            assert sheet(folder / f"{stem}.png").shape == (HEIGHT, FRAMES * WIDTH + (FRAMES - 1) * 2, 3)
        assert f"validation at step {step}: 3 of 3 videos ({FRAMES} frames {WIDTH}x{HEIGHT}, 4 steps)" in stdout
    assert "failed: " not in stdout  # no prompt failed
    acc = events(out)
    for i, prompt in enumerate(PROMPTS):
        images = acc.Images(f"validation/{i:03d}")
        assert [e.step for e in images] == [2, 4]
        png = np.asarray(Image.open(io.BytesIO(images[-1].encoded_image_string)).convert("RGB"))
        assert np.array_equal(png, sheet(out / "samples" / "step-4" / f"{SLUGS[i]}.png"))  # shrunk only when wide
        prompts = texts(acc, f"validation/{i:03d}_prompt")
        assert sorted(prompts) == [2, 4] and prompts[4].startswith(prompt) and f"seed {7 + i}" in prompts[4]
    assert [e.step for e in acc.Scalars("validation/seconds")] == [2, 4]
    config = texts(acc, "config")[0]
    assert config.startswith("```toml\n") and "[validation]" in config and "validation_seed = 7" in config


@pytest.mark.slow
def test_sharded_engine_samples_what_ddp_samples(runs):
    """fsdp: prompt i on rank i % 2, rank 1 running a padding loop in the collective forward."""
    for step in (2, 4):
        for stem in SLUGS:
            a = sheet(runs["ddp"][0] / "samples" / f"step-{step}" / f"{stem}.png").astype(int)
            b = sheet(runs["fsdp"][0] / "samples" / f"step-{step}" / f"{stem}.png").astype(int)
            diff = np.abs(a - b)
            assert diff.max() <= MAX_LEVELS and (diff > 0).mean() <= MAX_DIFFERING, (step, stem)
    assert "3 of 3 videos" in runs["fsdp"][1]


@pytest.mark.slow
def test_videos_are_what_generate_makes_from_the_checkpoint(data, runs, tmp_path):
    """The independent path: the checkpoint merged to fp32, WanModel.from_pretrained, the run's encoders
    rebuilt from its config, wan.pipeline.generate with the same options: the same frames."""
    out, _ = runs["ddp"]
    cfg = load_config([*base_args(data, out), *run_args("ddp")])
    merge(out / "checkpoint-4", tmp_path / "merged", dtype="fp32", log=lambda _: None)
    dit = WanModel.from_pretrained(tmp_path / "merged", dtype=None)
    models = build_models(cfg.model, torch.device("cpu"), cfg.train.seed)
    options = sampling_options(
        cfg.validation, cfg.data.video_sample_size, cfg.data.video_sample_n_frames, cfg.train.shift
    )
    for i, prompt in enumerate(PROMPTS):
        video = generate(dit, models.text, models.vae, [prompt], replace(options, seed=options.seed + i))[0]
        expected = contact_sheet(video_to_frames(video))
        assert np.array_equal(sheet(out / "samples" / "step-4" / f"{SLUGS[i]}.png"), expected), prompt


@pytest.mark.slow
def test_a_failed_sample_is_reported_and_training_goes_on(data, tmp_path):
    """i2v under fsdp, the second validation image not an image: rank 1 reports it (through rank 0),
    runs its padding loop in the collective forward, and the run trains to its end; validation at the
    end of every epoch (9 steps of the demo data) and at the end. The good prompt's video is
    generate's on the merged checkpoint, its image resized and centre-cropped."""
    good, bad = tmp_path / "first.png", tmp_path / "broken.png"
    Image.fromarray((np.random.default_rng(0).random((40, 96, 3)) * 255).astype(np.uint8)).save(good)
    bad.write_text("not an image\n")
    out, steps = tmp_path / "run", 11
    args = [
        "--engine=fsdp", "--train_mode=i2v", "--preset=debug-i2v", f"--max_train_steps={steps}",
        "--checkpointing_steps=100", "--validation_steps=0", "--validation_epochs=1", "--validation_inference_steps=3",
        "--validation_guidance_scale=1.0", "--validation_images", str(good), str(bad),
        "--validation_prompts", "a red circle", "a blue square",
    ]  # fmt: skip
    proc = torchrun(data, out, *args, nproc=2)
    for step in (9, steps):
        assert f"validation at step {step}: prompt 1 'a blue square' failed: UnidentifiedImageError" in proc.stdout
        assert f"validation at step {step}: 1 of 2 videos" in proc.stdout
        assert sorted(p.name for p in (out / "samples" / f"step-{step}").iterdir()) == ["000-a-red-circle.mp4", "000-a-red-circle.png"]  # fmt: skip
    assert sorted(losses(out)) == list(range(1, steps + 1))
    assert (out / f"checkpoint-{steps}").is_dir()

    cfg = load_config([*base_args(data, out), *args])
    merge(out / f"checkpoint-{steps}", tmp_path / "merged", dtype="fp32", log=lambda _: None)
    dit = WanModel.from_pretrained(tmp_path / "merged", dtype=None)
    models = build_models(cfg.model, torch.device("cpu"), cfg.train.seed)
    options = sampling_options(
        cfg.validation, cfg.data.video_sample_size, cfg.data.video_sample_n_frames, cfg.train.shift
    )
    image = read_first_frame(good, options.height, options.width)
    video = generate(dit, models.text, models.vae, ["a red circle"], options, clip=models.clip, images=[image])[0]
    expected = contact_sheet(video_to_frames(video))
    diff = np.abs(sheet(out / "samples" / f"step-{steps}" / "000-a-red-circle.png").astype(int) - expected)
    assert diff.max() <= MAX_LEVELS and (diff > 0).mean() <= MAX_DIFFERING


# --- in-process, one rank ------------------------------------------------------------------------


class FlakyEngine:
    """A DDP-like engine (inference_forward not a collective) whose forward fails on chosen calls."""

    def __init__(self, model: WanModel, fail_calls: set[int]):
        self.model, self.fail_calls, self.calls = model, fail_calls, 0

    @torch.no_grad()
    def inference_forward(self, *args, **kwargs) -> torch.Tensor:
        self.calls += 1
        if self.calls in self.fail_calls:
            raise RuntimeError("CUDA out of memory (simulated)")
        return self.model(*args, **kwargs)


def layout(rank: int, world_size: int) -> ParallelLayout:
    cpu = torch.device("cpu")
    return ParallelLayout(
        world_size=world_size, rank=rank, local_rank=rank, device=cpu, dp_size=world_size, dp_rank=rank
    )


def test_prompts_are_split_over_ranks_with_padding():
    models = SimpleNamespace(clip=None)
    config = ValidationConfig(validation_prompts=["a", "b", "c"])
    split = [
        ValidationSampler(
            config, sampling_options(config, 64, 9, 5.0), models=models, engine=None, collective=True,
            dit_config={}, layout=layout(rank, 2), output_dir="/unused", metrics=None,
        ).mine()
        for rank in range(2)
    ]  # fmt: skip
    assert split == [[0, 2], [1, None]]  # as many loops on every rank


def test_ddp_forward_failure_is_reported_and_the_rest_sampled(tmp_path, capsys):
    """One rank: the DiT forward of the first prompt fails (ddp: no collective, so it is caught); the
    second prompt still samples, and it equals generate with the same model and options."""
    torch.manual_seed(0)
    config = dit_preset("debug")
    model = WanModel(**config).eval()
    models = build_models(ModelConfig(preset="debug"), torch.device("cpu"), seed=0)
    cfg = ValidationConfig(validation_prompts=["first", "second"], validation_inference_steps=2, validation_seed=3)
    options = sampling_options(cfg, 32, 5, 5.0)
    metrics = Metrics(tmp_path, total_steps=10, progress_bar=False)
    sampler = ValidationSampler(
        cfg, options, models=models, engine=FlakyEngine(model, {1}), collective=False, dit_config=config,
        layout=layout(0, 1), output_dir=tmp_path, metrics=metrics,
    )  # fmt: skip
    report = sampler.run(5)
    metrics.close()
    printed = capsys.readouterr().out
    assert "validation at step 5: prompt 0 'first' failed: RuntimeError: CUDA out of memory (simulated)" in printed
    assert "validation at step 5: 1 of 2 videos" in printed
    assert [o.index for o in report.failed] == [0]
    assert sorted(p.name for p in (tmp_path / "samples" / "step-5").iterdir()) == ["001-second.mp4", "001-second.png"]
    video = generate(model, models.text, models.vae, ["second"], replace(options, seed=4))[0]
    assert np.array_equal(
        sheet(tmp_path / "samples" / "step-5" / "001-second.png"), contact_sheet(video_to_frames(video))
    )


def test_images_and_texts_fail_quietly_like_scalars(tmp_path, capsys):
    """A TensorBoard writer that fails on an image costs one console line; later images, texts and
    scalars are dropped without a word, and training code never sees an exception."""
    metrics = Metrics(tmp_path, total_steps=10, progress_bar=False)
    metrics.add_text("config", "```toml\na = 1\n```", 0)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    metrics.writer.add_image = full_disk
    image = np.zeros((4, 6, 3), np.uint8)
    metrics.add_image("validation/000", image, 1)
    metrics.add_image("validation/001", image, 1)
    metrics.add_text("validation/001_prompt", "a prompt", 1)
    metrics.add_scalar("validation/seconds", 1.5, 1)
    metrics.close()
    printed = capsys.readouterr().out
    assert printed.count("TensorBoard: writing to") == 1 and "No space left on device" in printed
    assert texts(events(tmp_path), "config") == {0: "```toml\na = 1\n```"}
