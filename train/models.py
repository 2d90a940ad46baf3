"""The run's models: the DiT that trains, and the frozen encoders that turn a batch into its inputs.

From a Wan2.1 release folder (the files the official code reads), or, with no folder, built with
random weights from a preset: the debug presets for tests and the demo (tiny models, the debug
tokenizer), the release sizes for benchmarks.
"""

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from wan import (
    CLIP_PRESETS,
    T5_PRESETS,
    CLIPVision,
    UMT5Encoder,
    WanModel,
    WanTokenizer,
    WanVAE,
    dit_preset,
    vae_preset,
)
from wan.encoders import TextEncoder
from wan.modules.dit_weights import WEIGHTS_NAME, diffusers_to_official_key, read_dit_folder
from wan.modules.safetensors_io import read_header, read_tensor, resolve_weight_files
from wan.modules.state_dict_io import assign_tensor, check_entries

log = logging.getLogger(__name__)

# The file names of a release folder, as the official code opens them.
VAE_FILE = "Wan2.1_VAE.pth"
T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
TOKENIZER_DIR = "google/umt5-xxl"
CLIP_FILE = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"


@dataclass
class Models:
    """The frozen encoders; the DiT is built by the engine from a DiTRecipe."""

    vae: WanVAE
    text: TextEncoder
    clip: CLIPVision | None  # i2v only


class DiTWeights:
    """The DiT's starting weights, read one full float32 CPU tensor at a time by official name.

    From a release, diffusers or merged folder: tensors are read lazily from the safetensors files
    (every file, key and shape checked up front by `check`). Without a folder: the seeded random
    init of WanModel, built once on the CPU (one full copy: fine for the debug presets the tests
    and demo use; benchmarks of the release sizes pay one host copy per rank)."""

    def __init__(self, folder: str, config: dict, seed: int):
        self.folder, self.config, self.seed = folder, config, seed
        self._entries: dict[str, tuple[Path, dict, int]] = {}
        self._random: dict[str, torch.Tensor] | None = None
        if folder:
            weights_folder, _, layout = read_dit_folder(folder)
            rename = diffusers_to_official_key if layout == "diffusers" else (lambda key: key)
            for path in resolve_weight_files(weights_folder, WEIGHTS_NAME):
                header, data_start = read_header(path)
                for key, info in header.items():
                    name = rename(key)
                    if name is not None:
                        self._entries[name] = (path, info, data_start)

    def check(self, model: torch.nn.Module) -> None:
        """Refuse, listing every problem, unless the folder holds each of `model`'s tensors once with
        its shape (model may be on the meta device)."""
        if not self.folder:
            return
        entries = [(p.name, name, name, info["shape"]) for name, (p, info, _) in self._entries.items()]
        check_entries(model, entries, self.folder)

    def read(self, name: str) -> torch.Tensor:
        """The full tensor `name` in float32 on the CPU (a fresh tensor the caller may keep)."""
        if not self.folder:
            if self._random is None:
                torch.manual_seed(self.seed)  # the same random weights on every rank and engine
                self._random = WanModel(**self.config).state_dict()
            return self._random[name].clone()
        path, info, data_start = self._entries[name]
        with open(path, "rb") as f:
            tensor = read_tensor(f, info, data_start)
        return tensor.float() if tensor.is_floating_point() else tensor

    def release(self) -> None:
        """Drop the random init's copy once the engine holds the weights."""
        self._random = None


@dataclass
class DiTRecipe:
    """How to build the DiT being trained; the engine decides where it lives (meta, zero.Init, sharded)
    and loads `weights` into it."""

    config: dict
    """WanModel keyword arguments (a preset's, or the folder's config.json)."""
    weights: DiTWeights
    trainable_modules: list[str] = field(default_factory=lambda: ["."])
    gradient_checkpointing: bool = False
    gradient_checkpointing_every: int = 1

    def build(self) -> WanModel:
        """The DiT on the meta device, its folder's weights checked against it, trainable parameters
        chosen and checkpointing set: the engine places it (materialize, fully_shard) and loads
        `weights` into it (ZeRO-3 builds its own inside zero.Init and copies these choices)."""
        with torch.device("meta"):
            model = WanModel(**self.config)
        self.weights.check(model)
        apply_trainable_modules(model, self.trainable_modules)
        if self.gradient_checkpointing:
            model.set_gradient_checkpointing(True, every=self.gradient_checkpointing_every)
        return model

    def parameter_counts(self) -> tuple[int, int]:
        """(trainable, total) parameters, counted on a meta-device build."""
        with torch.device("meta"):
            model = WanModel(**self.config)
        return apply_trainable_modules(model, self.trainable_modules)

    def named_tensors(self, model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, full float32 CPU tensor) for each of model's parameters and persistent buffers."""
        for name in model.state_dict(keep_vars=True):
            yield name, self.weights.read(name)

    def materialize(self, device: torch.device) -> WanModel:
        """The whole DiT on `device` with its starting weights (DDP, ZeRO-2: every rank holds it)."""
        model = self.build()
        for name, tensor in self.named_tensors(model):
            assign_tensor(model, name, tensor.to(device))
        model.rope.reset_tables(device)
        self.weights.release()
        return model


def build_dit_recipe(model_cfg, seed: int) -> DiTRecipe:
    """From the [model] section: the DiT of transformer_path (a merged folder) or of the release folder
    (checked against train_mode before anything loads), or a preset's, with random weights."""
    m = model_cfg
    folder = m.transformer_path or m.pretrained_model_name_or_path
    if folder:
        _, config, _ = read_dit_folder(folder)
        source = folder
    else:
        config, source = dit_preset(m.preset), f"preset {m.preset}"
    check_mode(config.get("model_type", "t2v"), config.get("in_dim", 16), m.train_mode, source)
    return DiTRecipe(
        config=config, weights=DiTWeights(folder, config, seed), trainable_modules=m.trainable_modules,
        gradient_checkpointing=m.gradient_checkpointing, gradient_checkpointing_every=m.gradient_checkpointing_every,
    )  # fmt: skip


def release_files(root: Path, i2v: bool) -> dict[str, Path]:
    """The files the run needs from a release folder; every missing one listed in one error."""
    files = {"dit": root, "vae": root / VAE_FILE, "t5": root / T5_FILE, "tokenizer": root / TOKENIZER_DIR}
    if i2v:
        files["clip"] = root / CLIP_FILE
    missing = [str(p) for p in files.values() if not p.exists()]
    if missing:
        raise ValueError(f"pretrained_model_name_or_path {root} lacks: " + ", ".join(missing))
    return files


def build_models(
    pretrained: str, preset: str, train_mode: str, device: torch.device, seed: int, low_vram: bool = False
) -> Models:
    """The frozen encoders in their own precision (umT5 stays bf16 as released), offloaded to the CPU
    when `low_vram`. The umT5 (11 GB at release size) is replicated on every rank under every engine:
    it is frozen, so no engine shards it."""
    i2v = train_mode == "i2v"
    home = torch.device("cpu") if low_vram else device
    if pretrained:
        files = release_files(Path(pretrained), i2v)
        vae = WanVAE.from_pretrained(files["vae"], dtype=torch.float32, device=home)
        t5 = UMT5Encoder.from_pretrained(files["t5"], device=home)
        tokenizer = WanTokenizer(files["tokenizer"])
        clip = CLIPVision.from_pretrained(files["clip"], device=home) if i2v else None
    else:
        debug = preset.startswith("debug")
        torch.manual_seed(seed + 1)  # the same random encoders on every rank
        vae = WanVAE(**vae_preset("debug" if debug else "wan2.1")).to(home)
        t5 = UMT5Encoder(**T5_PRESETS["debug" if debug else "umt5-xxl"]).to(home)
        # Random weights need no real vocabulary: the debug tokenizer's ids fit any umT5 vocabulary.
        tokenizer = WanTokenizer.debug()
        clip = CLIPVision(**CLIP_PRESETS["debug" if debug else "vit-h-14"]).to(home) if i2v else None
    for frozen in (vae, t5, clip):
        if frozen is not None:
            frozen.eval().requires_grad_(False)
    return Models(vae, TextEncoder(tokenizer, t5, device=device, offload=low_vram), clip)


def check_mode(model_type: str, in_dim: int, train_mode: str, source: str) -> None:
    """A t2v DiT cannot train in i2v mode, nor the reverse: the patch embedding's input width differs."""
    i2v = train_mode == "i2v"
    if (model_type == "i2v") != i2v:
        raise ValueError(
            f"train_mode={train_mode!r} needs a{'n i2v' if i2v else ' t2v'} DiT, but {source} is {model_type} "
            f"(patch_embedding input width {in_dim}; "
            f"{'36 = 16 noisy + 4 mask + 16 first-frame latent channels' if i2v else '16 latent channels'} expected)"
        )


def apply_trainable_modules(dit: WanModel, patterns: list[str]) -> tuple[int, int]:
    """Freeze every parameter whose name matches none of the substrings ("." matches all names).
    Returns (trainable, total) parameter counts; no match at all is an error."""
    trainable = total = 0
    for name, param in dit.named_parameters():
        keep = any(p in name for p in patterns)
        param.requires_grad_(keep)
        total += param.numel()
        trainable += param.numel() if keep else 0
    if trainable == 0:
        raise ValueError(f"trainable_modules {patterns} matches no DiT parameter (names look like blocks.0.ffn.0)")
    return trainable, total
