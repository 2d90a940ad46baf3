"""Sample videos from a Wan2.1 or Wan2.2 model: a release folder, a training checkpoint (any engine) or a merged DiT.

    python -m tools.sample --model /models/Wan2.1-T2V-1.3B --prompt "a cat surfing a wave" --out samples
    python -m tools.sample --checkpoint output/run/checkpoint-1000 --prompt_file prompts.txt --out samples
    python -m tools.sample --transformer merged/ --model /models/Wan2.1-T2V-14B --prompt "..." --low_memory
    python -m tools.sample --model /models/Wan2.1-I2V-14B-480P --image first.jpg --prompt "..."
    python -m tools.sample --model /models/Wan2.2-T2V-A14B --prompt "..." --low_memory
    python -m tools.sample --model /models/Wan2.2-I2V-A14B --image first.jpg --prompt "..." --low_memory
    python -m tools.sample --model /models/Wan2.2-TI2V-5B --prompt "..." [--image first.jpg]
    torchrun --nproc_per_node 4 -m tools.sample --sp 4 --model /models/Wan2.1-T2V-14B --prompt "..."
    python tools/sample.py --help

Weights (one source):
  --model FOLDER        a release folder (the official layout): the DiT (config.json + safetensors; Wan2.2
                        A14B: its two experts, high_noise_model/ and low_noise_model/), the VAE
                        (Wan2.1_VAE.pth; TI2V-5B: Wan2.2_VAE.pth), models_t5_umt5-xxl-enc-bf16.pth,
                        google/umt5-xxl/ and, for Wan2.1 i2v, the CLIP .pth.
  --checkpoint DIR      output_dir/checkpoint-N of a training run (ddp, zero2, zero3 or fsdp; or an
                        output_dir: its newest checkpoint that verifies). The DiT is read tensor by tensor
                        as tools/zero_to_bf16.py reads it (no merged copy is written); the encoders are
                        the run's, from the config.toml saved in the checkpoint: its release folder, or
                        for a run on random weights (the debug presets) the same seeded random encoders
                        train/models.py built. --model FOLDER replaces the run's release folder (when
                        the path in config.toml is not valid on this machine). A Wan2.2 A14B run's
                        checkpoint gives both experts; one of a run that trained one expert only
                        ([experts] train_experts) cannot sample alone: merge it with tools/zero_to_bf16.py,
                        put the other expert's folder beside it and sample with --transformer.
  --transformer FOLDER  a DiT folder (official or diffusers layout, e.g. tools/zero_to_bf16.py output) with
                        --model FOLDER for the encoders. A14B: a folder of both experts, high_noise_model/
                        and low_noise_model/ (as zero_to_bf16.py writes an A14B run's), or a diffusers
                        pipeline's transformer/ and transformer_2/ (its model_index.json boundary_ratio
                        is the default --boundary).
  --lora FILE           a LoRA .safetensors (tools/export_lora.py, or a ComfyUI-layout Wan LoRA) merged
                        into the DiT's weights with strength --lora_scale (default 1.0). A LoRA run's
                        --checkpoint needs none: its adapter is merged already. Not for A14B experts
                        (refused: not supported yet).

Output: OUT/NNN-<prompt slug>.mp4 (h264, --fps), OUT/NNN-<prompt slug>.png (a contact sheet of up to 16
evenly spaced frames) and OUT/prompts.json (per file: prompt, seed, image, the release whose defaults
apply and every option; A14B: the boundary too). Sample i (0-based, over all prompts) starts from the
noise of seed + i, whatever the batch size.

Defaults are those of the model's release (Wan2.1 / Wan2.2 generate.py and their configs), with the
release's negative prompt and UniPC; each flag overrides its own default only:
  release          size      frames  steps  shift  guidance   boundary  fps
  Wan2.1 T2V       832x480   81      50     5.0    5.0        -         16
  Wan2.1 I2V       832x480   81      40     3.0*   5.0        -         16
  Wan2.2 T2V-A14B  1280x720  81      40     12.0   4.0 / 3.0  0.875     16
  Wan2.2 I2V-A14B  1280x720  81      40     5.0    3.5 / 3.5  0.9       16
  Wan2.2 TI2V-5B   1280x704  121     50     5.0    5.0        -         24
  guidance: A14B's high-noise / low-noise expert (--guidance_scale / --guidance_scale_low).
  * Wan2.1 i2v: shift 3.0 at the 832x480 area, 5.0 at any other.
A checkpoint of a run on random weights (a debug preset) defaults to the run's video_sample_size and
video_sample_n_frames instead (rounded down to the VAE's multiple and to 4k + 1).

Wan2.2 A14B: the high-noise expert denoises the steps whose timestep t >= boundary x 1000, the
low-noise expert the rest, each with its own guidance scale. --boundary defaults to the model's: a
diffusers folder's model_index.json boundary_ratio, a training run's [experts] boundary, else the
release's (0.875 t2v, 0.9 i2v). I2V-A14B has no CLIP: the image conditions through the VAE alone.
--low_memory keeps one expert on the device at a time; --sp splits the tokens of both.
Wan2.2 TI2V-5B (the Wan2.2 VAE: sizes are multiples of 32): text-to-video, or with --image the
image's latent as the first latent frame of the video.

Images (i2v; TI2V with --image): the image is resized as the release does: its aspect ratio kept for
an area of about height * width, each side rounded down to a multiple of 16 (32 for TI2V-5B's Wan2.2
VAE; e.g. a 4:3 image at the 832x480 area gives 720x544), bicubic on [-1, 1] values for the VAE; a
Wan2.1 i2v model's CLIP sees the image as given (it resizes to 224 itself). Videos of different sizes
are never batched together.

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
from wan.configs import A14B_BOUNDARY, EXPERTS, latent_geometry  # noqa: E402
from wan.media import contact_sheet, prompt_slug, video_to_frames, write_mp4, write_png  # noqa: E402
from wan.modules.dit_weights import diffusers_boundary, expert_folders, read_dit_folder  # noqa: E402
from wan.modules.lora import merge_lora_file  # noqa: E402
from wan.modules.state_dict_io import assign_tensor, prepare_tensor  # noqa: E402
from wan.modules.ulysses import SequenceParallel  # noqa: E402
from wan.pipeline import (  # noqa: E402
    DEFAULT_NEGATIVE_PROMPT,
    PATCH,
    SIZE_MULTIPLE,
    Experts,
    SamplingOptions,
    generate,
    resize_images,
)
from wan.samplers import SAMPLERS  # noqa: E402


@dataclass(frozen=True)
class Release:
    """A release's sampling defaults (its generate.py and wan/configs)."""

    name: str
    size: tuple[int, int]  # (width, height); i2v: the area
    frames: int
    steps: int
    shift: float
    guidance: float  # the only model's, or A14B's high-noise expert's
    guidance_low: float | None = None  # A14B's low-noise expert's
    boundary: float | None = None  # A14B
    fps: float = 16.0
    shift_480p: float | None = None  # Wan2.1 i2v at the 832x480 area


# The releases' sampling defaults, by release key (release_key: the model's type and whether it has experts).
RELEASES = {
    "t2v": Release("Wan2.1 T2V", (832, 480), 81, 50, 5.0, 5.0),
    "i2v": Release("Wan2.1 I2V", (832, 480), 81, 40, 5.0, 5.0, shift_480p=3.0),
    "t2v-A14B": Release("Wan2.2 T2V-A14B", (1280, 720), 81, 40, 12.0, 4.0, 3.0, A14B_BOUNDARY["t2v"]),
    "i2v-A14B": Release("Wan2.2 I2V-A14B", (1280, 720), 81, 40, 5.0, 3.5, 3.5, A14B_BOUNDARY["i2v"]),
    "ti2v-5B": Release("Wan2.2 TI2V-5B", (1280, 704), 121, 50, 5.0, 5.0, fps=24.0),
}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
SHEET_FRAME_WIDTH = 416  # contact-sheet frames wider than this are shrunk (half of 832)


def release_key(model_type: str, experts: bool) -> str:
    """The RELEASES key of a DiT of `model_type` ("t2v", "i2v", "ti2v"), A14B experts or not."""
    if model_type == "ti2v":
        return "ti2v-5B"
    return f"{model_type}-A14B" if experts else model_type


def release_table() -> str:
    """RELEASES as the table of the module docstring."""
    rows = [("release", "size", "frames", "steps", "shift", "guidance", "boundary", "fps")]
    for r in RELEASES.values():
        shift = f"{r.shift_480p:.1f}*" if r.shift_480p is not None else f"{r.shift:.1f}"
        guidance = f"{r.guidance:.1f}" + (f" / {r.guidance_low:.1f}" if r.guidance_low is not None else "")
        boundary = "-" if r.boundary is None else f"{r.boundary:g}"
        rows.append((r.name, f"{r.size[0]}x{r.size[1]}", str(r.frames), str(r.steps), shift, guidance, boundary,
                     f"{r.fps:g}"))  # fmt: skip
    widths = [max(len(row[k]) for row in rows) for k in range(len(rows[0]))]
    return "\n".join(("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True))).rstrip() for row in rows)


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
    w.add_argument(
        "--model",
        metavar="FOLDER",
        help="a Wan2.1 or Wan2.2 release folder (the DiT or A14B experts, and the encoders)",
    )
    w.add_argument(
        "--checkpoint",
        metavar="DIR",
        help="a training checkpoint (output_dir/checkpoint-N, any engine) or an output_dir (its newest checkpoint)",
    )
    w.add_argument(
        "--transformer", metavar="FOLDER",
        help="a DiT folder, or an A14B folder of both experts (e.g. tools/zero_to_bf16.py output); needs --model",
    )  # fmt: skip
    w.add_argument(
        "--lora", metavar="FILE", default="",
        help="a LoRA .safetensors (tools/export_lora.py or a ComfyUI Wan LoRA) merged into the DiT's weights "
        "(not for A14B experts)",
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
        help="the first frame, one per prompt (in order) or one for all (repeatable): required for i2v, "
        "optional for TI2V-5B",
    )

    s = parser.add_argument_group("sampling (defaults: the release's, see the table below)")
    s.add_argument(
        "--size",
        metavar="WxH",
        help="width x height in pixels, multiples of 16 (TI2V-5B: 32) (default: the release's, e.g. 832x480; "
        "with --image: the area, the aspect is the image's; a checkpoint of a preset run: its video_sample_size)",
    )
    s.add_argument("--width", type=int, help="width in pixels (instead of --size)")
    s.add_argument("--height", type=int, help="height in pixels (instead of --size)")
    s.add_argument(
        "--frames",
        type=int,
        help="frames, 4k+1 (default: the release's, 81; TI2V-5B 121; a checkpoint of a preset run: its "
        "video_sample_n_frames)",
    )
    s.add_argument("--steps", type=int, help="denoising steps (default: the release's: Wan2.1 t2v 50, i2v 40, ...)")
    s.add_argument(
        "--shift",
        type=float,
        help="sigma shift of the sampling schedule (default: the release's: 5.0; Wan2.1 i2v at 832x480 3.0; "
        "T2V-A14B 12.0)",
    )
    s.add_argument(
        "--guidance_scale",
        type=float,
        help="classifier-free guidance scale; A14B: the high-noise expert's (default: the release's; 1.0 turns "
        "guidance off)",
    )
    s.add_argument(
        "--guidance_scale_low",
        type=float,
        help="A14B: the low-noise expert's guidance scale (default: the release's: T2V-A14B 3.0, I2V-A14B 3.5)",
    )
    s.add_argument(
        "--boundary",
        type=float,
        help="A14B: the high-noise expert takes the steps with timestep >= boundary x 1000 (default: the "
        "model's: a diffusers boundary_ratio, a run's [experts] boundary, else the release's 0.875 t2v, 0.9 i2v)",
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
        help="keep every model on the CPU except while it works (the DiT or one A14B expert at a time, umT5, "
        "CLIP and VAE take turns on the device): less device memory, more transfers",
    )
    r.add_argument(
        "--sp",
        type=int,
        default=1,
        help="sequence parallel over N processes: run under `torchrun --nproc_per_node N`; each video's tokens "
        "are split over them (the DiT's heads must divide by N), rank 0 writes the files (default 1)",
    )
    r.add_argument("--out", default="samples", metavar="DIR", help="output folder (default samples)")
    r.add_argument("--fps", type=float, help="frames per second of the mp4 (default: the release's, 16; TI2V-5B 24)")
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
    model_type: str  # "t2v", "i2v" or "ti2v", of the DiT (A14B: of its experts)
    model_cfg: object  # train.config.ModelConfig for build_models
    seed: int  # build_models' seed (random encoders)
    checkpoint: Path | None = None
    base: str | None = None  # --model replacing a run's release folder
    dit_folder: str | None = None
    run_defaults: dict = field(default_factory=dict)  # width, height, frames from a preset run's config
    experts: dict[str, str] | None = None
    """Wan2.2 A14B: {"high": ..., "low": ...}, each expert's DiT folder ("" for a checkpoint's); None: one DiT."""
    boundary: float | None = None  # A14B: the model's boundary (before --boundary)
    multiple: int = SIZE_MULTIPLE  # the video's sides: VAE stride x patch (16; the Wan2.2 VAE's 32)

    @property
    def release(self) -> Release:
        return RELEASES[release_key(self.model_type, self.experts is not None)]


def size_multiple(dit_config: dict) -> int:
    """Pixels per DiT token side: the VAE's spatial stride (of the DiT's latents) x the patch."""
    return latent_geometry(dit_config).spatial_factor * PATCH


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
        experts = expert_folders(dit_folder)
        if experts is None:
            _, config, _ = read_dit_folder(dit_folder)
        else:
            configs = {e: read_dit_folder(experts[e])[1] for e in EXPERTS}
            config = configs["high"]
            types = {e: c.get("model_type", "t2v") for e, c in configs.items()}
            if types["high"] != types["low"]:
                problems.append(f"{dit_folder}: the experts are of two model types ({types})")
                return None
    except (ValueError, OSError) as err:
        problems.append(str(err))
        return None
    model_type = config.get("model_type", "t2v")
    model_cfg = ModelConfig(
        pretrained_model_name_or_path=args.model,
        transformer_path=args.transformer or "",  # the VAE (and CLIP) that build_models picks fit this DiT
        train_mode="i2v" if model_type == "i2v" else "normal",
        low_vram=args.low_memory,
    )
    boundary = None
    if experts is not None:
        try:
            found = [diffusers_boundary(root) for root in dict.fromkeys((dit_folder, args.model))]
        except ValueError as err:
            problems.append(str(err))
            return None
        boundary = next((b for b in found if b is not None), A14B_BOUNDARY.get(model_type))
    describe = f"{dit_folder}" + (" (Wan2.2 A14B experts)" if experts else "")
    return Source(
        kind="transformer" if args.transformer else "model",
        describe=describe + (f" (encoders: {args.model})" if args.transformer else ""),
        model_type=model_type, model_cfg=model_cfg, seed=0, dit_folder=dit_folder,
        experts=None if experts is None else {e: str(p) for e, p in experts.items()}, boundary=boundary,
        multiple=size_multiple(config),
    )  # fmt: skip


def _checkpoint_source(path: Path, model: str | None, problems: list[str]) -> Source | None:
    from tools.zero_to_bf16 import open_checkpoint
    from train.checkpoint import CONFIG_FILE
    from train.checkpoint_verify import MARKER_FILE, find_latest
    from train.config import load_config
    from train.models import dit_source, model_boundary

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
    if len(ckpt.experts) == 1:
        (trained,) = ckpt.experts
        other = next(e for e in EXPERTS if e != trained)
        problems.append(
            f"--checkpoint {path}: a Wan2.2 A14B run that trained the {trained}-noise expert only "
            f"([experts] train_experts = [{trained!r}]) cannot sample alone: merge it with `python -m "
            f"tools.zero_to_bf16 {path} OUT`, put the {other}-noise expert's folder (the release's) beside it in "
            "OUT (high_noise_model/, low_noise_model/) and sample with --transformer OUT --model RELEASE"
        )
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
    try:
        config = dit_source(m)[0]  # A14B: the high-noise expert's (both have one config)
        boundary = model_boundary(m, cfg.experts) if ckpt.experts else None
    except (ValueError, OSError) as err:
        problems.append(f"{config_file}: {err}")
        return None
    multiple = size_multiple(config)
    defaults = {}
    if not m.pretrained_model_name_or_path:  # a preset run: the sizes it trained at (as config.toml says)
        if "video_sample_size" in data:  # as its validation samples: rounded down to the VAE's multiple
            size = max(multiple, cfg.data.video_sample_size // multiple * multiple)
            defaults["width"] = defaults["height"] = size
        if "video_sample_n_frames" in data:
            defaults["frames"] = max(1, (cfg.data.video_sample_n_frames - 1) // 4 * 4 + 1)
    experts = ", ".join(ckpt.experts)
    return Source(
        kind="checkpoint",
        describe=f"{path} (step {ckpt.step}, {ckpt.engine}, world size {ckpt.world_size}"
        + (f"; Wan2.2 A14B experts {experts})" if ckpt.experts else ")"),
        model_type=config.get("model_type", "t2v"), model_cfg=m, seed=cfg.train.seed, checkpoint=path,
        base=model if model and not m.transformer_path else None, run_defaults=defaults,
        experts=dict.fromkeys(ckpt.experts, "") if ckpt.experts else None, boundary=boundary, multiple=multiple,
    )  # fmt: skip


def load_checkpoint_dit(
    path: str | Path,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    base: str | None = None,
    expert: str | None = None,
) -> WanModel:
    """The DiT of training checkpoint `path` (any engine; an A14B run's: `expert`'s, "high" or "low"),
    read one tensor at a time as tools/zero_to_bf16.py merges it (tensors the checkpoint lacks come from
    the run's base model), cast to `dtype` and placed on `device`: no merged copy on disk, one copy in
    memory."""
    from tools.zero_to_bf16 import CheckpointDiT

    dit = CheckpointDiT(Path(path), base, expert=expert)
    model = dit.model
    for name in dit.expected:
        assign_tensor(model, name, prepare_tensor(dit.read(name, dtype), dtype, device))
    model.rope.reset_tables(device)
    return model.eval().requires_grad_(False)


def load_models(
    source: Source, dtype: torch.dtype, device: torch.device, low_memory: bool, boundary: float | None = None
):
    """(dit, train.models.Models) with the DiT in `dtype` (A14B: wan.pipeline.Experts at `boundary`,
    default the model's); under low_memory everything stays on the CPU."""
    from train.models import build_models

    home = torch.device("cpu") if low_memory else device

    def load(folder: str | None, expert: str | None) -> WanModel:
        if source.kind == "checkpoint":
            return load_checkpoint_dit(source.checkpoint, dtype, home, base=source.base, expert=expert)
        return WanModel.from_pretrained(folder, dtype=dtype, device=home).eval().requires_grad_(False)

    if source.experts is None:
        dit = load(source.dit_folder, None)
    else:
        high, low = (load(source.experts[e], e) for e in EXPERTS)
        dit = Experts(high, low, source.boundary if boundary is None else boundary)
    model_cfg = replace(source.model_cfg, low_vram=low_memory)
    models = build_models(model_cfg, device, source.seed)
    return dit, models


# ----------------------------------------------------------------------------------------------------
# Images (i2v, TI2V)


def i2v_size(image_height: int, image_width: int, area: int, multiple: int = SIZE_MULTIPLE) -> tuple[int, int]:
    """(height, width) of a video for an image: its aspect ratio at about `area` pixels, each side
    rounded down to a multiple of `multiple` (VAE stride x patch: 16, the Wan2.2 VAE's 32), as the
    release's image2video.py computes it (Wan2.1 and Wan2.2 I2V-A14B at 16)."""
    aspect = image_height / image_width
    height = int(math.sqrt(area * aspect) // multiple) * multiple
    width = int(math.sqrt(area / aspect) // multiple) * multiple
    return max(height, multiple), max(width, multiple)


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
    boundary: float | None = None
    """Wan2.2 A14B: the experts' boundary (--boundary, else the model's); None for one DiT."""

    @property
    def release(self) -> Release:
        """The release whose defaults filled the options not given."""
        return self.source.release


# SamplingOptions field -> the option that sets it, for its problems.
FLAGS = {"num_frames": "--frames", "num_inference_steps": "--steps", "height": "--height", "width": "--width",
         "guidance_scale": "--guidance_scale", "guidance_scale_low": "--guidance_scale_low", "shift": "--shift",
         "sampler": "--sampler", "negative_prompt": "--negative_prompt", "seed": "--seed"}  # fmt: skip


def plan(args: argparse.Namespace) -> Plan:
    """The checked options; UsageError listing every problem found."""
    problems: list[str] = []
    prompts = read_prompts(args, problems)
    source = resolve_source(args, problems)
    release = source.release if source else RELEASES["t2v"]
    experts = source is not None and source.experts is not None

    size = None
    if args.size and (args.width is not None or args.height is not None):
        problems.append("give --size WxH or --width/--height, not both")
    elif args.size:
        size = parse_size(args.size)
        if size is None:
            problems.append(f"--size must look like 832x480, got {args.size!r}")
    defaults = source.run_defaults if source else {}
    width = args.width if args.width is not None else size[0] if size else defaults.get("width", release.size[0])
    height = args.height if args.height is not None else size[1] if size else defaults.get("height", release.size[1])
    frames = args.frames if args.frames is not None else defaults.get("frames", release.frames)

    i2v = source is not None and source.model_type == "i2v"
    ti2v = source is not None and source.model_type == "ti2v"
    images: list[str | None] = [None] * len(prompts)
    if source is not None and not (i2v or ti2v) and args.image:
        problems.append(f"--image is for an i2v model (or TI2V-5B); {source.describe} is {source.model_type}")
    if i2v and not args.image:
        problems.append(f"{source.describe} is an i2v model: give --image PATH (the first frame)")
    if (i2v or ti2v) and args.image:
        if len(args.image) not in (1, len(prompts)):
            problems.append(
                f"--image: give one image for all prompts or one per prompt ({len(prompts)}), got {len(args.image)}"
            )
        else:
            images = list(args.image) * (len(prompts) if len(args.image) == 1 else 1)
        problems += [f"--image {p}: no such file" for p in dict.fromkeys(args.image) if not Path(p).is_file()]

    steps = args.steps if args.steps is not None else release.steps
    shift = args.shift
    if shift is None:
        at_480p = width * height == RELEASES["i2v"].size[0] * RELEASES["i2v"].size[1]
        shift = release.shift_480p if release.shift_480p is not None and at_480p else release.shift
    guidance = args.guidance_scale if args.guidance_scale is not None else release.guidance
    guidance_low = args.guidance_scale_low if args.guidance_scale_low is not None else release.guidance_low
    boundary = None
    if experts:
        boundary = args.boundary if args.boundary is not None else source.boundary
        if boundary is None:
            problems.append(f"{source.describe}: no release boundary for {source.model_type} experts: give --boundary")
        elif not 0 <= boundary <= 1:
            problems.append(f"--boundary must be in [0, 1] (a fraction of the 1000 timesteps), got {boundary}")
    elif source is not None:
        one = f"{source.describe} is one DiT, not Wan2.2 A14B experts"
        if args.guidance_scale_low is not None:
            problems.append(f"--guidance_scale_low is the low-noise A14B expert's; {one} (use --guidance_scale)")
        if args.boundary is not None:
            problems.append(f"--boundary is where the A14B experts meet; {one}")
        guidance_low = None
    if args.batch_size < 1:
        problems.append(f"--batch_size must be >= 1, got {args.batch_size}")
    if args.lora and not Path(args.lora).is_file():
        problems.append(f"--lora {args.lora}: no such file")
    if args.lora and experts:
        problems.append(
            f"--lora with Wan2.2 A14B experts ({source.describe}) is not supported yet: a LoRA adapts one DiT "
            "(a LoRA run's --checkpoint needs no --lora: its adapters are merged)"
        )
    fps = args.fps if args.fps is not None else release.fps
    if not fps > 0:
        problems.append(f"--fps must be > 0, got {fps}")

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
        num_frames=frames, height=height, width=width, num_inference_steps=steps, guidance_scale=guidance,
        guidance_scale_low=guidance_low, shift=shift, sampler=args.sampler,
        negative_prompt=DEFAULT_NEGATIVE_PROMPT if args.negative_prompt is None else args.negative_prompt,
        seed=args.seed,
    )  # fmt: skip
    found = options.problems()
    for problem in found:  # "num_frames must be ..." -> "--frames must be ..."
        name, _, rest = problem.partition(" ")
        problems.append(f"{FLAGS.get(name, name)} {rest}")
    multiple = source.multiple if source else SIZE_MULTIPLE
    for name, value in (("width", width), ("height", height)):
        if multiple > SIZE_MULTIPLE and not any(p.startswith(f"{name} ") for p in found) and value % multiple:
            problems.append(
                f"--{name} must be a multiple of {multiple} pixels for the Wan2.2 VAE of {source.describe} "
                f"(stride {multiple // PATCH} x patch {PATCH}), got {value}"
            )
    if problems:
        raise UsageError(problems)
    return Plan(
        source, prompts, images, options, dtype, device, args.batch_size, args.low_memory, Path(args.out), fps,
        args.sp, args.lora, args.lora_scale, boundary,
    )  # fmt: skip


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
    area, multiple = o.width * o.height, p.source.multiple
    sizes = [
        (o.height, o.width) if img is None else i2v_size(img.shape[1], img.shape[2], area, multiple)
        for img in first_frames
    ]
    log(f"weights: {p.source.describe}")
    t0 = time.monotonic()
    dit, models = load_models(p.source, DTYPES[p.dtype], p.device, p.low_memory, p.boundary)
    if p.lora:
        layers = merge_lora_file(dit, p.lora, p.lora_scale)
        log(f"LoRA {p.lora}: merged into {layers} layers (strength {p.lora_scale:g})")
    where = "on the CPU until used (low memory)" if p.low_memory else f"on {p.device}"
    log(f"models loaded in {time.monotonic() - t0:.1f} s (DiT {p.dtype}, {where})")
    if isinstance(dit, Experts):
        log(f"experts: high-noise for timesteps >= {dit.boundary * 1000:g} (boundary {dit.boundary:g}, guidance "
            f"{o.guidance_scale:g}), low-noise below (guidance {o.low_noise_guidance:g})")  # fmt: skip
    if p.sp > 1:
        for module in dit.modules() if isinstance(dit, Experts) else [dit]:
            module.set_sequence_parallel(SequenceParallel(dist.group.WORLD))
        log(f"sequence parallel: each video's tokens over {p.sp} processes")

    p.out.mkdir(parents=True, exist_ok=True)
    digits = max(3, len(str(len(p.prompts) - 1)))
    entries: list[dict] = []
    groups = batches(sizes, p.batch_size)
    for group in groups:
        height, width = sizes[group[0]]
        options = replace(o, seed=o.seed + group[0], height=height, width=width)
        images = [first_frames[i] for i in group] if first_frames[group[0]] is not None else None
        if images is not None and models.clip is None:
            # Without CLIP only the VAE sees the image, at the video size: resized here as generate would
            # (bicubic, on the device), so generate gets it at the size it encodes.
            images = [resize_images(img.to(p.device).unsqueeze(0), height, width)[0] for img in images]
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
            recorded = {**asdict(replace(options, seed=o.seed + i)), "dtype": p.dtype, "fps": p.fps}
            if p.boundary is not None:
                recorded["boundary"] = p.boundary
            entries.append({
                "file": mp4.name, "sheet": png.name, "prompt": p.prompts[i], "seed": o.seed + i,
                "image": p.images[i], "options": recorded, "release": p.release.name, "weights": p.source.describe,
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
