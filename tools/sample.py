"""Sample videos from a Wan2.1 model: a release folder, a training checkpoint of any engine, or a merged DiT.

    python -m tools.sample --model /models/Wan2.1-T2V-1.3B --prompt "a cat surfing a wave" --out samples
    python -m tools.sample --checkpoint output/run/checkpoint-1000 --prompt_file prompts.txt --out samples
    python -m tools.sample --transformer merged/ --model /models/Wan2.1-T2V-14B --prompt "..." --low_memory
    python -m tools.sample --model /models/Wan2.1-I2V-14B-480P --image first.jpg --prompt "..."
    torchrun --nproc_per_node 4 -m tools.sample --sp 4 --model /models/Wan2.1-T2V-14B --prompt "..."
    python tools/sample.py --help

Weights (one source):
  --model FOLDER        a Wan2.1 release folder: the DiT (config.json + safetensors), Wan2.1_VAE.pth,
                        models_t5_umt5-xxl-enc-bf16.pth, google/umt5-xxl/ and, for i2v, the CLIP .pth.
  --checkpoint DIR      output_dir/checkpoint-N of a training run (ddp, zero2, zero3 or fsdp; or an
                        output_dir: its newest checkpoint that verifies). The DiT is read tensor by tensor
                        as tools/zero_to_bf16.py reads it (no merged copy is written); the encoders are
                        the run's, from the config.toml saved in the checkpoint: its release folder, or
                        for a run on random weights (the debug presets) the same seeded random encoders
                        train/models.py built. --model FOLDER replaces the run's release folder (when
                        the path in config.toml is not valid on this machine).
  --transformer FOLDER  a DiT folder (official or diffusers layout, e.g. tools/zero_to_bf16.py output)
                        with --model FOLDER for the encoders.
  --lora FILE           a LoRA .safetensors (tools/export_lora.py, or a ComfyUI-layout Wan LoRA) merged
                        into the DiT's weights with strength --lora_scale (default 1.0). A LoRA run's
                        --checkpoint needs none: its adapter is merged already.

Output: OUT/NNN-<prompt slug>.mp4 (h264, --fps), OUT/NNN-<prompt slug>.png (a contact sheet of up to 16
evenly spaced frames) and OUT/prompts.json (per file: prompt, seed, image and every option). Sample i
(0-based, over all prompts) starts from the noise of seed + i, whatever the batch size.

Defaults are the release's (Wan2.1 generate.py): 832x480, 81 frames, guidance 5.0, the release's
negative prompt, UniPC; t2v 50 steps at shift 5.0, i2v 40 steps at shift 3.0 (5.0 for areas other
than 832x480). A checkpoint of a run on random weights (a debug preset) defaults to the run's
video_sample_size and video_sample_n_frames instead.

i2v: the image is resized as the release does: its aspect ratio kept for an area of about height *
width, each side rounded down to a multiple of 16 (e.g. a 4:3 image at the 832x480 area gives
720x544), bicubic on [-1, 1] values for the VAE; CLIP sees the image as given (it resizes to 224
itself). Videos of different sizes are never batched together.

--sp N (under torchrun, N processes): every process loads the models and samples every video with the
others, each on 1/N of its tokens (wan/modules/ulysses.py: the same videos as one process, faster on
N GPUs for long videos); rank 0 writes the files.
"""

import argparse
import json
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

if __package__ in (None, ""):  # run as a script: python tools/sample.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from wan import WanModel  # noqa: E402
from wan.media import DEFAULT_FPS, contact_sheet, prompt_slug, video_to_frames, write_mp4, write_png  # noqa: E402
from wan.modules.dit_weights import read_dit_folder  # noqa: E402
from wan.modules.lora import merge_lora_file  # noqa: E402
from wan.modules.state_dict_io import assign_tensor, prepare_tensor  # noqa: E402
from wan.modules.ulysses import SequenceParallel  # noqa: E402
from wan.pipeline import DEFAULT_NEGATIVE_PROMPT, SamplingOptions, generate  # noqa: E402
from wan.samplers import SAMPLERS  # noqa: E402

# The release's sampling defaults (Wan2.1 generate.py _validate_args and its configs).
RELEASE_SIZE = (832, 480)  # (width, height)
RELEASE_FRAMES = 81
RELEASE_GUIDANCE = 5.0
RELEASE_STEPS = {"t2v": 50, "i2v": 40}
RELEASE_SHIFT = 5.0
RELEASE_I2V_480P_SHIFT = 3.0  # i2v at 832*480 or 480*832
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
SHEET_FRAME_WIDTH = 416  # contact-sheet frames wider than this are shrunk (half of 832)


class UsageError(ValueError):
    """Bad options: every problem, one line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("; ".join(problems))


# ----------------------------------------------------------------------------------------------------
# Command line


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, as every other problem (argparse adds the usage first)
        self.exit(2, f"error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m tools.sample",
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    w = parser.add_argument_group("weights (one of --model, --checkpoint, --transformer with --model)")
    w.add_argument("--model", metavar="FOLDER", help="a Wan2.1 release folder (the DiT and the encoders)")
    w.add_argument(
        "--checkpoint",
        metavar="DIR",
        help="a training checkpoint (output_dir/checkpoint-N, any engine) or an output_dir (its newest checkpoint)",
    )
    w.add_argument(
        "--transformer", metavar="FOLDER", help="a DiT folder (e.g. tools/zero_to_bf16.py output); needs --model"
    )
    w.add_argument(
        "--lora", metavar="FILE", default="",
        help="a LoRA .safetensors (tools/export_lora.py or a ComfyUI Wan LoRA) merged into the DiT's weights",
    )  # fmt: skip
    w.add_argument("--lora_scale", type=float, default=1.0, metavar="S", help="strength of --lora (default 1.0)")

    p = parser.add_argument_group("prompts")
    p.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="a prompt (repeatable)")
    p.add_argument("--prompt_file", metavar="FILE", help="a text file of prompts, one per line (blank lines skipped)")
    p.add_argument(
        "--negative_prompt",
        default=None,
        metavar="TEXT",
        help="the negative prompt of classifier-free guidance (default: the release's, a Chinese list of defects; "
        "'' is an empty prompt)",
    )
    p.add_argument(
        "--image",
        action="append",
        default=[],
        metavar="PATH",
        help="i2v: the first frame, one per prompt (in order) or one for all (repeatable)",
    )

    s = parser.add_argument_group("sampling")
    s.add_argument(
        "--size",
        metavar="WxH",
        help="width x height in pixels, multiples of 16 (default 832x480; i2v: the area, the aspect is the "
        "image's; a checkpoint of a preset run: its video_sample_size)",
    )
    s.add_argument("--width", type=int, help="width in pixels (instead of --size)")
    s.add_argument("--height", type=int, help="height in pixels (instead of --size)")
    s.add_argument(
        "--frames",
        type=int,
        help="frames, 4k+1 (default 81; a checkpoint of a preset run: its video_sample_n_frames)",
    )
    s.add_argument("--steps", type=int, help="denoising steps (default: t2v 50, i2v 40)")
    s.add_argument(
        "--shift", type=float, help="sigma shift of the sampling schedule (default: 5.0; i2v at 832x480: 3.0)"
    )
    s.add_argument(
        "--guidance_scale",
        type=float,
        default=RELEASE_GUIDANCE,
        help="classifier-free guidance scale (default 5.0; 1.0 turns guidance off)",
    )
    s.add_argument("--sampler", default="unipc", help=f"one of {', '.join(SAMPLERS)} (default unipc)")
    s.add_argument("--seed", type=int, default=42, help="sample i uses the noise of seed + i (default 42)")
    s.add_argument("--batch_size", type=int, default=1, help="prompts per DiT batch (default 1)")

    r = parser.add_argument_group("running")
    r.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        help="DiT weights: bf16 (the release's inference precision) or fp32 (default: bf16 on CUDA, fp32 "
        "otherwise); the VAE runs in fp32, umT5 in bf16 as released",
    )
    r.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    r.add_argument(
        "--low_memory",
        action="store_true",
        help="keep every model on the CPU except while it works (the DiT, umT5, CLIP and VAE take turns on "
        "the device): less device memory, more transfers",
    )
    r.add_argument(
        "--sp",
        type=int,
        default=1,
        help="sequence parallel over N processes: run under `torchrun --nproc_per_node N`; each video's tokens "
        "are split over them (the DiT's heads must divide by N), rank 0 writes the files (default 1)",
    )
    r.add_argument("--out", default="samples", metavar="DIR", help="output folder (default samples)")
    r.add_argument(
        "--fps", type=float, default=DEFAULT_FPS, help=f"frames per second of the mp4 (default {DEFAULT_FPS})"
    )
    return parser


def parse_size(text: str) -> tuple[int, int] | None:
    """'832x480' (or 832*480, the release's spelling) -> (832, 480); None when malformed."""
    m = re.fullmatch(r"\s*(\d+)\s*[x*X]\s*(\d+)\s*", text)
    return (int(m.group(1)), int(m.group(2))) if m else None


def read_prompts(args: argparse.Namespace, problems: list[str]) -> list[str]:
    prompts = list(args.prompt)
    problems += ["--prompt: an empty prompt" for p in prompts if not p.strip()]
    if args.prompt_file:
        path = Path(args.prompt_file)
        try:
            prompts += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as err:
            problems.append(
                f"--prompt_file {path}: cannot read it ({err.strerror if isinstance(err, OSError) else err})"
            )
    if not prompts and not any("--prompt" in p for p in problems):
        problems.append("no prompt: give --prompt TEXT or --prompt_file FILE")
    return prompts


# ----------------------------------------------------------------------------------------------------
# Weights


@dataclass
class Source:
    """Where the weights come from, resolved from the command line before anything heavy loads."""

    kind: str  # "model", "checkpoint" or "transformer"
    describe: str
    model_type: str  # "t2v" or "i2v", of the DiT
    model_cfg: object  # train.config.ModelConfig for build_models
    seed: int  # build_models' seed (random encoders)
    checkpoint: Path | None = None
    base: str | None = None  # --model replacing a run's release folder
    dit_folder: str | None = None
    run_defaults: dict = field(default_factory=dict)  # width, height, frames from a preset run's config


def resolve_source(args: argparse.Namespace, problems: list[str]) -> Source | None:
    """Which weights, with every problem that can be seen without loading them."""
    from train.config import ModelConfig

    given = [name for name in ("model", "checkpoint", "transformer") if getattr(args, name)]
    if args.transformer and not args.model:
        problems.append("--transformer needs --model FOLDER (the release folder of the encoders)")
        return None
    if not given:
        problems.append("no weights: give --model FOLDER, --checkpoint DIR, or --transformer FOLDER with --model")
        return None
    if args.checkpoint and args.transformer:
        problems.append("--checkpoint and --transformer are two DiTs: give one")
        return None
    missing = [
        f"--{name} {getattr(args, name)}: no such folder" for name in given if not Path(getattr(args, name)).is_dir()
    ]
    if missing:
        problems += missing
        return None
    if args.checkpoint:
        return _checkpoint_source(Path(args.checkpoint), args.model, problems)
    dit_folder = args.transformer or args.model
    try:
        _, config, _ = read_dit_folder(dit_folder)
    except (ValueError, OSError) as err:
        problems.append(str(err))
        return None
    model_type = config.get("model_type", "t2v")
    model_cfg = ModelConfig(
        pretrained_model_name_or_path=args.model,
        train_mode="i2v" if model_type == "i2v" else "normal",
        low_vram=args.low_memory,
    )
    return Source(
        kind="transformer" if args.transformer else "model",
        describe=f"{dit_folder}" + (f" (encoders: {args.model})" if args.transformer else ""),
        model_type=model_type, model_cfg=model_cfg, seed=0, dit_folder=dit_folder,
    )  # fmt: skip


def _checkpoint_source(path: Path, model: str | None, problems: list[str]) -> Source | None:
    from tools.zero_to_bf16 import open_checkpoint
    from train.checkpoint import CONFIG_FILE
    from train.checkpoint_verify import MARKER_FILE, find_latest
    from train.config import load_config

    if not (path / MARKER_FILE).exists() and any(path.glob("checkpoint-*")):  # an output_dir
        latest = find_latest(path)
        if latest is None:
            problems.append(f"--checkpoint {path}: no checkpoint-N in it verifies (python -m train.checkpoint verify)")
            return None
        print(f"{path}: newest verified checkpoint: {latest.name}")
        path = latest
    try:
        ckpt = open_checkpoint(path)  # a complete checkpoint: marker and file sizes
    except ValueError as err:
        problems.append(str(err))
        return None
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        problems.append(f"{config_file}: missing, so the run's models are unknown")
        return None
    argv = ["--cfg", str(config_file)]
    data = ckpt.run_config.get("data", {})
    if not data.get("train_data_dir") and not data.get("train_data_meta"):
        argv.append(f"--train_data_dir={path}")  # a config without data (not the trainer's): none is read here
    try:
        cfg = load_config(argv, notes=[])
    except ValueError as err:  # ConfigError lists every problem
        problems.append(f"{config_file}: {err}")
        return None
    m = cfg.model
    if model:
        if not m.pretrained_model_name_or_path:
            problems.append(
                f"--model with --checkpoint replaces the run's release folder, but {path} is a run on random "
                f"weights (preset {m.preset!r}): its encoders are the seeded random ones; drop --model"
            )
            return None
        m.pretrained_model_name_or_path = model
        m.transformer_path = "" if m.transformer_path and not Path(m.transformer_path).exists() else m.transformer_path
    elif m.pretrained_model_name_or_path and not Path(m.pretrained_model_name_or_path).is_dir():
        problems.append(
            f"{config_file}: the run used [model] pretrained_model_name_or_path = {m.pretrained_model_name_or_path}, "
            "which is not here; pass --model FOLDER (a copy of that release folder)"
        )
        return None
    m.low_vram = False  # set from --low_memory later
    defaults = {}
    if not m.pretrained_model_name_or_path:  # a preset run: the sizes it trained at (as config.toml says)
        if "video_sample_size" in data:
            defaults["width"] = defaults["height"] = cfg.data.video_sample_size
        if "video_sample_n_frames" in data:
            defaults["frames"] = cfg.data.video_sample_n_frames
    model_type = "i2v" if m.train_mode == "i2v" else "t2v"
    return Source(
        kind="checkpoint", describe=f"{path} (step {ckpt.step}, {ckpt.engine}, world size {ckpt.world_size})",
        model_type=model_type, model_cfg=m, seed=cfg.train.seed, checkpoint=path,
        base=model if model and not m.transformer_path else None, run_defaults=defaults,
    )  # fmt: skip


def load_checkpoint_dit(
    path: str | Path, dtype: torch.dtype, device: torch.device | str = "cpu", base: str | None = None
) -> WanModel:
    """The DiT of training checkpoint `path` (any engine), read one tensor at a time as
    tools/zero_to_bf16.py merges it (tensors the checkpoint lacks come from the run's base model),
    cast to `dtype` and placed on `device`: no merged copy on disk, one copy in memory."""
    from tools.zero_to_bf16 import CheckpointDiT

    dit = CheckpointDiT(Path(path), base)
    model = dit.model
    for name in dit.expected:
        assign_tensor(model, name, prepare_tensor(dit.read(name, dtype), dtype, device))
    model.rope.reset_tables(device)
    return model.eval().requires_grad_(False)


def load_models(source: Source, dtype: torch.dtype, device: torch.device, low_memory: bool):
    """(dit, train.models.Models) with the DiT in `dtype`; under low_memory everything stays on the CPU."""
    from train.models import build_models

    home = torch.device("cpu") if low_memory else device
    if source.kind == "checkpoint":
        dit = load_checkpoint_dit(source.checkpoint, dtype, home, base=source.base)
    else:
        dit = WanModel.from_pretrained(source.dit_folder, dtype=dtype, device=home).eval().requires_grad_(False)
    model_cfg = replace(source.model_cfg, low_vram=low_memory)
    models = build_models(model_cfg, device, source.seed)
    return dit, models


# ----------------------------------------------------------------------------------------------------
# Images (i2v)


def i2v_size(image_height: int, image_width: int, area: int) -> tuple[int, int]:
    """(height, width) of an i2v video for an image: its aspect ratio at about `area` pixels, each side
    rounded down to a multiple of 16 (VAE 8 x patch 2), as the release's image2video.py computes it."""
    aspect = image_height / image_width
    lat_h = int(math.sqrt(area * aspect) // 8 // 2 * 2)
    lat_w = int(math.sqrt(area / aspect) // 8 // 2 * 2)
    return max(lat_h, 2) * 8, max(lat_w, 2) * 8


def load_first_frame(path: str) -> torch.Tensor:
    """An image file (EXIF orientation applied) as [3, H, W] in [-1, 1] at its own size: the pipeline
    resizes it to the video size for the VAE (bicubic, as the release) and gives CLIP the original."""
    from train.data.video import load_image

    return torch.from_numpy(load_image(path)).permute(2, 0, 1).float() / 127.5 - 1


# ----------------------------------------------------------------------------------------------------
# Progress


class ProgressBar:
    """Denoising progress on stderr: a redrawn bar on a terminal, else a line at each quarter."""

    def __init__(self, label: str, stream=None, width: int = 30):
        self.label, self.stream, self.width = label, stream or sys.stderr, width
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = time.monotonic()
        self.shown = -1

    def __call__(self, step: int, total: int) -> None:
        """Step `step` (1-based) of `total` is done."""
        elapsed = time.monotonic() - self.start
        rate = f"{elapsed / step:.2f} s/step" if step else ""
        filled = self.width * step // max(total, 1)
        line = f"{self.label} [{'#' * filled}{'.' * (self.width - filled)}] {step}/{total} steps {rate}"
        if self.tty:
            self.stream.write("\r" + line + ("\n" if step >= total else ""))
        else:
            quarter = 4 * step // max(total, 1)
            if quarter == self.shown:
                return
            self.shown = quarter
            self.stream.write(line + "\n")
        self.stream.flush()


# ----------------------------------------------------------------------------------------------------
# The run


@dataclass
class Plan:
    """Everything decided before a model loads."""

    source: Source
    prompts: list[str]
    images: list[str | None]
    options: SamplingOptions
    dtype: str
    device: torch.device
    batch_size: int
    low_memory: bool
    out: Path
    fps: float
    sp: int = 1
    lora: str = ""
    """A LoRA .safetensors file (tools/export_lora.py, ComfyUI layout) merged into the DiT's weights."""
    lora_scale: float = 1.0


# SamplingOptions field -> the option that sets it, for its problems.
FLAGS = {"num_frames": "--frames", "num_inference_steps": "--steps", "height": "--height", "width": "--width",
         "guidance_scale": "--guidance_scale", "shift": "--shift", "sampler": "--sampler",
         "negative_prompt": "--negative_prompt", "seed": "--seed"}  # fmt: skip


def plan(args: argparse.Namespace) -> Plan:
    """The checked options; UsageError listing every problem found."""
    problems: list[str] = []
    prompts = read_prompts(args, problems)
    source = resolve_source(args, problems)

    size = None
    if args.size and (args.width is not None or args.height is not None):
        problems.append("give --size WxH or --width/--height, not both")
    elif args.size:
        size = parse_size(args.size)
        if size is None:
            problems.append(f"--size must look like 832x480, got {args.size!r}")
    defaults = source.run_defaults if source else {}
    width = args.width if args.width is not None else size[0] if size else defaults.get("width", RELEASE_SIZE[0])
    height = args.height if args.height is not None else size[1] if size else defaults.get("height", RELEASE_SIZE[1])
    frames = args.frames if args.frames is not None else defaults.get("frames", RELEASE_FRAMES)

    i2v = source is not None and source.model_type == "i2v"
    images: list[str | None] = [None] * len(prompts)
    if source is not None and not i2v and args.image:
        problems.append(f"--image is for an i2v model; {source.describe} is t2v")
    if i2v:
        if not args.image:
            problems.append(f"{source.describe} is an i2v model: give --image PATH (the first frame)")
        elif len(args.image) not in (1, len(prompts)):
            problems.append(
                f"--image: give one image for all prompts or one per prompt ({len(prompts)}), got {len(args.image)}"
            )
        else:
            images = list(args.image) * (len(prompts) if len(args.image) == 1 else 1)
        problems += [f"--image {p}: no such file" for p in dict.fromkeys(args.image) if not Path(p).is_file()]

    steps = args.steps if args.steps is not None else RELEASE_STEPS["i2v" if i2v else "t2v"]
    shift = args.shift
    if shift is None:
        release_480p = i2v and width * height == RELEASE_SIZE[0] * RELEASE_SIZE[1]
        shift = RELEASE_I2V_480P_SHIFT if release_480p else RELEASE_SHIFT
    if args.batch_size < 1:
        problems.append(f"--batch_size must be >= 1, got {args.batch_size}")
    if args.lora and not Path(args.lora).is_file():
        problems.append(f"--lora {args.lora}: no such file")
    if not args.fps > 0:
        problems.append(f"--fps must be > 0, got {args.fps}")

    world_size, local_rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))
    if args.sp < 1:
        problems.append(f"--sp must be >= 1, got {args.sp}")
    elif args.sp > 1 and args.sp != world_size:
        problems.append(
            f"--sp {args.sp} runs under `torchrun --nproc_per_node {args.sp}`; this is {world_size} process(es)"
        )
    cuda = f"cuda:{local_rank}" if args.sp > 1 else "cuda"
    device = None
    try:
        device = torch.device(args.device or (cuda if torch.cuda.is_available() else "cpu"))
        if args.sp > 1 and device.type == "cuda" and device.index is None:
            device = torch.device(cuda)  # --device cuda under torchrun: each process its own GPU
        if device.type == "cuda" and not torch.cuda.is_available():
            problems.append(f"--device {args.device}: CUDA is not available here")
    except RuntimeError as err:
        problems.append(f"--device {args.device}: {err}")
    dtype = args.dtype or ("bf16" if device is not None and device.type == "cuda" else "fp32")

    options = SamplingOptions(
        num_frames=frames, height=height, width=width, num_inference_steps=steps,
        guidance_scale=args.guidance_scale, shift=shift, sampler=args.sampler,
        negative_prompt=DEFAULT_NEGATIVE_PROMPT if args.negative_prompt is None else args.negative_prompt,
        seed=args.seed,
    )  # fmt: skip
    for problem in options.problems():  # "num_frames must be ..." -> "--frames must be ..."
        name, _, rest = problem.partition(" ")
        problems.append(f"{FLAGS.get(name, name)} {rest}")
    if problems:
        raise UsageError(problems)
    return Plan(
        source,
        prompts,
        images,
        options,
        dtype,
        device,
        args.batch_size,
        args.low_memory,
        Path(args.out),
        args.fps,
        args.sp,
        args.lora,
        args.lora_scale,
    )


def batches(sizes: list[tuple[int, int]], batch_size: int) -> list[list[int]]:
    """Sample indices in order, at most batch_size per batch, only samples of one video size together."""
    out: list[list[int]] = []
    for i, size in enumerate(sizes):
        if out and len(out[-1]) < batch_size and sizes[out[-1][0]] == size:
            out[-1].append(i)
        else:
            out.append([i])
    return out


def run(plan_: Plan, log=print) -> list[dict]:
    """Load the models, sample every prompt, write the files; returns prompts.json's entries."""
    p, o = plan_, plan_.options
    main_rank = True
    if p.sp > 1:  # every rank samples every video together; rank 0 writes and speaks
        if p.device.type == "cuda":
            torch.cuda.set_device(p.device)
        dist.init_process_group("nccl" if p.device.type == "cuda" else "gloo")
        main_rank = dist.get_rank() == 0
        log = log if main_rank else lambda line: None
    first_frames = [None if img is None else load_first_frame(img) for img in p.images]
    area = o.width * o.height
    sizes = [(o.height, o.width) if img is None else i2v_size(img.shape[1], img.shape[2], area) for img in first_frames]
    log(f"weights: {p.source.describe}")
    t0 = time.monotonic()
    dit, models = load_models(p.source, DTYPES[p.dtype], p.device, p.low_memory)
    if p.lora:
        layers = merge_lora_file(dit, p.lora, p.lora_scale)
        log(f"LoRA {p.lora}: merged into {layers} layers (strength {p.lora_scale:g})")
    where = "on the CPU until used (low memory)" if p.low_memory else f"on {p.device}"
    log(f"models loaded in {time.monotonic() - t0:.1f} s (DiT {p.dtype}, {where})")
    if p.sp > 1:
        dit.set_sequence_parallel(SequenceParallel(dist.group.WORLD))
        log(f"sequence parallel: each video's tokens over {p.sp} processes")

    p.out.mkdir(parents=True, exist_ok=True)
    digits = max(3, len(str(len(p.prompts) - 1)))
    entries: list[dict] = []
    groups = batches(sizes, p.batch_size)
    for group in groups:
        height, width = sizes[group[0]]
        options = replace(o, seed=o.seed + group[0], height=height, width=width)
        images = [first_frames[i] for i in group] if first_frames[group[0]] is not None else None
        first, last, total = group[0] + 1, group[-1] + 1, len(p.prompts)
        label = f"video {first}/{total}" if first == last else f"videos {first}-{last}/{total}"
        videos = generate(
            dit, models.text, models.vae, [p.prompts[i] for i in group], options, clip=models.clip if images else None,
            images=images, device=p.device, offload=p.low_memory, progress=ProgressBar(label) if main_rank else None,
        )  # fmt: skip
        for k, i in enumerate(group if main_rank else []):
            stem = p.out / f"{i:0{digits}d}-{prompt_slug(p.prompts[i])}"
            frames = video_to_frames(videos[k])
            mp4 = write_mp4(stem.with_name(stem.name + ".mp4"), frames, fps=p.fps)
            sheet = contact_sheet(frames, max_frame_width=SHEET_FRAME_WIDTH)
            png = write_png(stem.with_name(stem.name + ".png"), sheet)
            log(f"wrote {mp4} ({len(frames)} frames {width}x{height}) and {png} (contact sheet)")
            entries.append({
                "file": mp4.name, "sheet": png.name, "prompt": p.prompts[i], "seed": o.seed + i,
                "image": p.images[i], "options": {**asdict(replace(options, seed=o.seed + i)), "dtype": p.dtype,
                                                  "fps": p.fps},
                "weights": p.source.describe,
            })  # fmt: skip
    if main_rank:
        index = p.out / "prompts.json"
        index.write_text(json.dumps(entries, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        log(f"wrote {index}")
    if p.sp > 1:
        dist.destroy_process_group()
    return entries


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(plan(args), log=lambda line: print(line, flush=True))
    except (ValueError, OSError) as err:  # bad options, a missing or damaged file, a full disk: say which
        message = " ".join(str(err).split("\n"))
        print(f"error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
