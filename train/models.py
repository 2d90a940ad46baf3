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
    WanVAE22,
    dit_preset,
    vae22_preset,
    vae_preset,
)
from wan.configs import A14B_BOUNDARY, EXPERT_PRESETS, EXPERTS, WAN22_LATENTS, latent_geometry
from wan.encoders import TextEncoder, park_on_host
from wan.modules.checkpointing import ActivationCheckpointing
from wan.modules.dit_weights import (
    WEIGHTS_NAME,
    diffusers_boundary,
    diffusers_to_official_key,
    expert_folders,
    read_dit_folder,
)
from wan.modules.lora import LoRASpec, adapter_names, apply_lora, lora_initial_tensor
from wan.modules.model import has_image_branch
from wan.modules.safetensors_io import read_header, read_tensor, resolve_weight_files
from wan.modules.state_dict_io import assign_tensor, check_entries
from wan.modules.ulysses import SequenceParallel

log = logging.getLogger(__name__)

# The file names of a release folder, as the official code opens them.
VAE_FILE = "Wan2.1_VAE.pth"
VAE22_FILE = "Wan2.2_VAE.pth"  # Wan2.2 TI2V-5B's (48 latent channels); the A14B releases hold Wan2.1's
T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
TOKENIZER_DIR = "google/umt5-xxl"
CLIP_FILE = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"


@dataclass
class Models:
    """The frozen encoders; the DiT is built by the engine from a DiTRecipe."""

    vae: WanVAE | WanVAE22
    text: TextEncoder
    clip: CLIPVision | None  # a Wan2.1 i2v DiT's only


class DiTWeights:
    """The DiT's starting weights, read one full float32 CPU tensor at a time by official name.

    From a release, diffusers or merged folder: tensors are read lazily from the safetensors files
    (every file, key and shape checked up front by `check`). Without a folder: the seeded random
    init of WanModel, built once on the CPU (one full copy: fine for the debug presets the tests
    and demo use; benchmarks of the release sizes pay one host copy per rank)."""

    def __init__(self, folder: str, config: dict, seed: int, override: str = ""):
        self.folder, self.config, self.seed, self.override = folder, config, seed, override
        self._entries: dict[str, tuple[Path, dict, int]] = {}
        self._random: dict[str, torch.Tensor] | None = None
        self._override: dict[str, tuple[Path, dict, int] | torch.Tensor] = {}
        self._adapter: dict[str, tuple[int, ...]] = {}
        self._lora: LoRASpec | None = None
        if folder:
            weights_folder, _, layout = read_dit_folder(folder)
            rename = diffusers_to_official_key if layout == "diffusers" else (lambda key: key)
            for path in resolve_weight_files(weights_folder, WEIGHTS_NAME):
                header, data_start = read_header(path)
                for key, info in header.items():
                    name = rename(key)
                    if name is not None:
                        self._entries[name] = (path, info, data_start)
        if override:
            self._override = read_override_file(Path(override))

    def check(self, model: torch.nn.Module) -> None:
        """Refuse, listing every problem, unless the folder holds each of `model`'s tensors once with
        its shape (model may be on the meta device)."""
        if self.override:  # VideoX-Fun's load_state_dict(strict=False): a subset, but nothing unknown
            entries = [(Path(self.override).name, name, name, _shape(value)) for name, value in self._override.items()]
            expected = model.state_dict(keep_vars=True)
            kept = [("(kept)", n, n, list(t.shape)) for n, t in expected.items() if n not in self._override]
            check_entries(model, entries + kept, self.override)
        if not self.folder:
            return
        entries = [(p.name, name, name, info["shape"]) for name, (p, info, _) in self._entries.items()]
        check_entries(model, entries, self.folder)

    def add_adapter(self, model: torch.nn.Module, spec: LoRASpec) -> None:
        """Serve the starting values of `model`'s LoRA adapter (lora_initial_tensor) by name too."""
        shapes = dict(model.named_parameters())
        self._adapter = {name: tuple(shapes[name].shape) for name in adapter_names(model)}
        self._lora = spec

    def read(self, name: str) -> torch.Tensor:
        """The full tensor `name` in float32 on the CPU (a fresh tensor the caller may keep)."""
        if name in self._adapter:
            return lora_initial_tensor(name, self._adapter[name], self._lora, self.seed)
        if name in self._override:
            value = self._override[name]
            if isinstance(value, torch.Tensor):
                return value.float() if value.is_floating_point() else value.clone()
            path, info, data_start = value
            with open(path, "rb") as f:
                tensor = read_tensor(f, info, data_start)
            return tensor.float() if tensor.is_floating_point() else tensor
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


def _shape(value: tuple[Path, dict, int] | torch.Tensor) -> list[int]:
    return list(value.shape) if isinstance(value, torch.Tensor) else value[1]["shape"]


def read_override_file(path: Path) -> dict[str, tuple[Path, dict, int] | torch.Tensor]:
    """A DiT state-dict file (VideoX-Fun's transformer_path: .safetensors, or a .pth/.bin/.pt saved by
    torch, optionally under "state_dict"), by official name (diffusers names are mapped): safetensors
    entries are read lazily, torch files memory-mapped, never unpickled beyond tensors."""
    if path.suffix == ".safetensors":
        header, data_start = read_header(path)
        items = {key: (path, info, data_start) for key, info in header.items()}
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:  # a corrupt or non-torch file: name it
            raise ValueError(f"transformer_path {path}: not a torch state-dict file ({err})") from None
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(f"transformer_path {path}: expected a dict of tensors (a state dict)")
        items = dict(state)
    out = {}
    for key, value in items.items():
        name = diffusers_to_official_key(key)
        if name is not None:
            out[name] = value
    return out


@dataclass
class DiTRecipe:
    """How to build the DiT being trained; the engine decides where it lives (meta, zero.Init, sharded)
    and loads `weights` into it."""

    config: dict
    """WanModel keyword arguments (a preset's, or the folder's config.json)."""
    weights: DiTWeights
    trainable_modules: list[str] = field(default_factory=lambda: ["."])
    trainable_modules_low_learning_rate: list[str] = field(default_factory=list)
    """Substrings of parameters that also train, at half the learning rate (trainable_modules wins)."""
    checkpoint_policy: ActivationCheckpointing = ActivationCheckpointing()
    """Which blocks recompute in backward, and how (the [model] section's checkpoint_policy)."""
    compile: bool = False
    """torch.compile each block in place (after the trainable flags and checkpointing, before the
    engine wraps the model): see compile_dit."""
    sequence_parallel: SequenceParallel | None = None
    """This rank's sequence group ([parallel] sp > 1): every forward runs on its share of the tokens."""
    lora: LoRASpec | None = None
    """A LoRA adapter on the blocks' target layers: it alone trains ([lora] section)."""
    frozen_dtype: torch.dtype = torch.float32
    """The dtype frozen weights are held in where the engine holds them apart from the trainable ones
    (DDP, FSDP): bf16 for a LoRA run under bf16 / fp16 mixed precision (no float32 copy of a weight
    that never changes), else float32."""

    def build(self) -> WanModel:
        """The DiT on the meta device, its folder's weights checked against it, trainable parameters
        chosen and checkpointing set: the engine places it (materialize, fully_shard) and loads
        `weights` into it (ZeRO-3 builds its own inside zero.Init and copies these choices)."""
        with torch.device("meta"):
            model = WanModel(**self.config)
        self.weights.check(model)
        apply_trainable_modules(model, self.trainable_modules, self.trainable_modules_low_learning_rate)
        if self.lora is not None:
            self.apply_lora(model)
            self.weights.add_adapter(model, self.lora)
            for param in model.parameters():
                if not param.requires_grad:
                    param.data = param.data.to(self.frozen_dtype)
        model.set_gradient_checkpointing(self.checkpoint_policy)
        model.set_sequence_parallel(self.sequence_parallel)
        if self.compile:
            compile_dit(model)
        return model

    def apply_lora(self, model: torch.nn.Module) -> None:
        """Freeze the whole DiT and give the target layers their (trainable) adapters."""
        model.requires_grad_(False)
        apply_lora(model, self.lora)

    def parameter_counts(self) -> tuple[int, int]:
        """(trainable, total) parameters, counted on a meta-device build (an adapter counts in both)."""
        with torch.device("meta"):
            model = WanModel(**self.config)
        counts = apply_trainable_modules(model, self.trainable_modules, self.trainable_modules_low_learning_rate)
        if self.lora is None:
            return counts
        self.apply_lora(model)
        params = dict(model.named_parameters())
        return sum(params[n].numel() for n in adapter_names(model)), sum(p.numel() for p in params.values())

    def is_low_lr(self, name: str) -> bool:
        """Whether the trainable parameter `name` trains at half the learning rate: it matches
        trainable_modules_low_learning_rate and not trainable_modules (VideoX-Fun: the first list wins)."""
        return is_low_lr(name, self.trainable_modules, self.trainable_modules_low_learning_rate)

    def named_tensors(self, model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, full float32 CPU tensor) for each of model's parameters and persistent buffers."""
        for name in model.state_dict(keep_vars=True):
            yield name, self.weights.read(name)

    def materialize(self, device: torch.device) -> WanModel:
        """The whole DiT on `device` with its starting weights, each in the dtype build() gave it (DDP:
        every rank holds it)."""
        model = self.build()
        dtypes = {name: t.dtype for name, t in model.state_dict(keep_vars=True).items()}
        for name, tensor in self.named_tensors(model):
            assign_tensor(model, name, tensor.to(device, dtype=dtypes[name] if tensor.is_floating_point() else None))
        model.rope.reset_tables(device)
        self.weights.release()
        return model


def expert_sources(model_cfg) -> dict[str, str] | None:
    """Wan2.2 A14B: {expert: its DiT folder ("" for a preset's random weights)} for "high" and "low"
    (train/experts.py); None for a model without experts. From transformer_path (a merged folder of
    both, tools/zero_to_bf16.py's) or the release folder, else the preset (EXPERT_PRESETS)."""
    m = model_cfg
    folder = m.transformer_path if m.transformer_path and not Path(m.transformer_path).is_file() else ""
    folder = folder or m.pretrained_model_name_or_path
    if folder:
        experts = expert_folders(folder) if Path(folder).is_dir() else None
        return None if experts is None else {e: str(p) for e, p in experts.items()}
    return dict.fromkeys(EXPERTS, "") if m.preset in EXPERT_PRESETS else None


def dit_source(model_cfg, expert: str | None = None) -> tuple[dict, str, str, str]:
    """(WanModel kwargs, where they come from, the weights folder or "", the override file or ""): the
    DiT of transformer_path (a merged folder) or of the release folder, else [model] preset's. Reads
    config.json only. A14B: `expert`'s (default the high-noise one: both have the same config)."""
    m = model_cfg
    override = m.transformer_path if m.transformer_path and Path(m.transformer_path).is_file() else ""
    experts = expert_sources(m)
    if experts is not None:
        if override:
            raise ValueError(
                f"transformer_path {override}: one file of DiT tensors, but the model has two experts "
                "(Wan2.2 A14B): give a folder with high_noise_model/ and low_noise_model/ (tools/zero_to_bf16.py's)"
            )
        folder = experts[expert or EXPERTS[0]]
        if folder:
            return read_dit_folder(folder)[1], folder, folder, ""
        return dit_preset(m.preset), f"preset {m.preset} ({expert or EXPERTS[0]}-noise expert)", "", ""
    if expert is not None:
        raise ValueError(f"expert {expert!r}: the model has no experts")
    folder = (m.transformer_path if not override else "") or m.pretrained_model_name_or_path
    if folder:
        return read_dit_folder(folder)[1], folder, folder, override
    return dit_preset(m.preset), f"preset {m.preset}", "", override


def model_boundary(model_cfg, experts_cfg) -> float | None:
    """The A14B experts' boundary: [experts] boundary, else a diffusers folder's boundary_ratio, else the
    release's for the model type; None for a model without experts."""
    if expert_sources(model_cfg) is None:
        return None
    if experts_cfg.boundary:
        return experts_cfg.boundary
    root = model_cfg.pretrained_model_name_or_path
    found = diffusers_boundary(root) if root else None
    return found if found is not None else A14B_BOUNDARY[dit_source(model_cfg)[0].get("model_type", "t2v")]


def build_dit_recipe(
    model_cfg, seed: int, lora: LoRASpec | None = None, mixed_precision: str = "fp32", expert: str | None = None
) -> DiTRecipe:
    """From the [model] section: the DiT of dit_source, checked against train_mode before anything loads
    (a preset's with random weights). A transformer_path that is one file (VideoX-Fun's) replaces the
    tensors it holds and keeps the rest. With a LoRA spec only the adapter trains, its frozen base held
    in bf16 unless mixed_precision is fp32. expert: an A14B expert's (random weights: seeded per expert)."""
    m = model_cfg
    config, source, folder, override = dit_source(m, expert)
    check_mode(config.get("model_type", "t2v"), config.get("in_dim", 16), m.train_mode, source)
    if expert is not None:
        seed += EXPERTS.index(expert)  # two different random experts; each the same in any run
    return DiTRecipe(
        config=config, weights=DiTWeights(folder, config, seed, override), trainable_modules=m.trainable_modules,
        trainable_modules_low_learning_rate=m.trainable_modules_low_learning_rate,
        checkpoint_policy=m.checkpoint_policy, compile=m.compile, lora=lora,
        frozen_dtype=torch.bfloat16 if lora is not None and mixed_precision != "fp32" else torch.float32,
    )  # fmt: skip


# Compiled graphs one code object may keep (dynamo's recompile_limit, 8 by default). Every block shares
# one (dynamo inlines the modules: parameters are graph inputs, so one graph serves all blocks). With
# dynamic token counts a run makes one or two per grad mode (train.plan count_compiles); the limit only
# matters when a dimension gets specialised after all (one graph per shape then, as with static
# shapes): past it dynamo would run new shapes eagerly (with a warning), so set it above any bucket table.
COMPILE_RECOMPILE_LIMIT = 1024

# compile_dit's shape policy: the token count (and a micro-batch above 1) dynamic, so a run compiles a
# bounded number of times whatever its buckets (WanModel.compile_blocks); train.plan counts by it.
COMPILE_DYNAMIC_TOKENS = True


def compile_dit(model: WanModel) -> None:
    """torch.compile each DiT block in place (WanModel.compile_blocks) with the token count dynamic:
    one graph per grad mode and micro-batch class (1, or more), however many bucket shapes the data
    draws (counted by CompileWatch; predicted by train.plan count_compiles). Call after the trainable
    flags and checkpointing are set, before the engine wraps the model (DDP, fully_shard), as
    torchtitan does."""
    import torch._dynamo.config as dynamo_config

    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, COMPILE_RECOMPILE_LIMIT)
    dynamo_config.accumulated_recompile_limit = max(
        dynamo_config.accumulated_recompile_limit, 4 * COMPILE_RECOMPILE_LIMIT
    )
    # dynamic=False: only the marked dimensions are dynamic; any other that changed would recompile
    # per value rather than turn dynamic unasked (none does: the text context is padded to text_len).
    model.compile_blocks(dynamic_tokens=COMPILE_DYNAMIC_TOKENS, dynamic=False)


class CompileWatch:
    """Counts the graphs torch.compile has made in this process (dynamo's unique_graphs counter): with
    compiled DiT blocks, one per grad mode and micro-batch class (1, or more) with dynamic token counts,
    else one per shape (more only if a block graph-breaks)."""

    def __init__(self):
        self.seen = self.total()

    @staticmethod
    def total() -> int:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])

    def new(self) -> int:
        """Graphs compiled since the last call."""
        total = self.total()
        fresh, self.seen = total - self.seen, total
        return fresh


def uses_wan22_vae(dit_config: dict) -> bool:
    """Whether the DiT works on the Wan2.2 VAE's latents (48 channels: TI2V-5B), not the Wan2.1 VAE's."""
    return latent_geometry(dit_config) == WAN22_LATENTS


def release_files(root: Path, dit_config: dict) -> dict[str, Path]:
    """The files the run needs from a release folder for a DiT of `dit_config` (its VAE; CLIP for a
    Wan2.1 i2v DiT); every missing one listed in one error."""
    vae = VAE22_FILE if uses_wan22_vae(dit_config) else VAE_FILE
    files = {"dit": root, "vae": root / vae, "t5": root / T5_FILE, "tokenizer": root / TOKENIZER_DIR}
    if has_image_branch(dit_config):
        files["clip"] = root / CLIP_FILE
    missing = [str(p) for p in files.values() if not p.exists()]
    if missing:
        raise ValueError(f"pretrained_model_name_or_path {root} lacks: " + ", ".join(missing))
    return files


def build_models(model_cfg, device: torch.device, seed: int) -> Models:
    """The frozen encoders of the [model] section in their own precision (umT5 stays bf16 as released),
    offloaded to the CPU when `low_vram` (one kept host copy each, pinned for a GPU: wan/encoders.py);
    `vae_path` replaces the release's VAE. The umT5 (11 GB at release size) is replicated on every rank
    under every engine: it is frozen, so no engine shards it."""
    m = model_cfg
    dit_config = dit_source(m)[0]
    i2v, wan22_vae = has_image_branch(dit_config), uses_wan22_vae(dit_config)
    vae_class = WanVAE22 if wan22_vae else WanVAE
    home = torch.device("cpu") if m.low_vram else device
    if m.pretrained_model_name_or_path:
        files = release_files(Path(m.pretrained_model_name_or_path), dit_config)
        vae = vae_class.from_pretrained(m.vae_path or files["vae"], dtype=torch.float32, device=home)
        t5 = UMT5Encoder.from_pretrained(files["t5"], device=home)
        tokenizer = WanTokenizer(files["tokenizer"], max_length=m.tokenizer_max_length)
        clip = CLIPVision.from_pretrained(files["clip"], device=home) if i2v else None
    else:
        debug = m.preset.startswith("debug")
        torch.manual_seed(seed + 1)  # the same random encoders on every rank
        with torch.device(home):  # drawn where they run: the release sizes' random init is minutes on a CPU
            if m.vae_path:
                vae = vae_class.from_pretrained(m.vae_path, dtype=torch.float32, device=home)
            elif wan22_vae:
                vae = WanVAE22(**vae22_preset("debug" if debug else "wan2.2"))
            else:
                vae = WanVAE(**vae_preset("debug" if debug else "wan2.1"))
            t5 = UMT5Encoder(**T5_PRESETS["debug" if debug else "umt5-xxl"])
            if not debug:
                t5 = t5.to(torch.bfloat16)  # as released (11 GB, not 23)
            clip = CLIPVision(**CLIP_PRESETS["debug" if debug else "vit-h-14"]) if i2v else None
        # Random weights need no real vocabulary: the debug tokenizer's ids fit any umT5 vocabulary.
        tokenizer = WanTokenizer.debug(max_length=m.tokenizer_max_length)
    for frozen in (vae, t5, clip):
        if frozen is not None:
            frozen.eval().requires_grad_(False)
    if m.low_vram:  # their one host copy (pinned for a GPU), uploaded for each use (the umT5's by TextEncoder)
        for frozen in (vae, clip):
            if frozen is not None:
                park_on_host(frozen, device)
    return Models(vae, TextEncoder(tokenizer, t5, device=device, offload=m.low_vram), clip)


def mode_fits(model_type: str, train_mode: str) -> bool:
    """Whether a DiT of model_type trains in train_mode: i2v for an i2v DiT only (its input width holds y);
    ti2v (the first latent frame the clean image's) for a Wan2.2 TI2V DiT only, which trains normal too."""
    if train_mode == "ti2v" or model_type == "ti2v":
        return model_type == "ti2v" and train_mode in ("normal", "ti2v")
    return (model_type == "i2v") == (train_mode == "i2v")


def check_mode(model_type: str, in_dim: int, train_mode: str, source: str) -> None:
    """A t2v DiT cannot train in i2v mode, nor the reverse: the patch embedding's input width differs."""
    if train_mode == "ti2v" or model_type == "ti2v":
        if not mode_fits(model_type, train_mode):
            raise ValueError(
                f"train_mode={train_mode!r} does not fit {source}, a {model_type} DiT: train_mode 'ti2v' is for a "
                "Wan2.2 TI2V DiT, which trains 'normal' (text only) or 'ti2v' (the first frame given)"
            )
        return
    i2v = train_mode == "i2v"
    if (model_type == "i2v") != i2v:
        raise ValueError(
            f"train_mode={train_mode!r} needs a{'n i2v' if i2v else ' t2v'} DiT, but {source} is {model_type} "
            f"(patch_embedding input width {in_dim}; "
            f"{'36 = 16 noisy + 4 mask + 16 first-frame latent channels' if i2v else '16 latent channels'} expected)"
        )


def apply_trainable_modules(dit: WanModel, patterns: list[str], low_lr_patterns: list[str] = ()) -> tuple[int, int]:
    """Freeze every parameter whose name matches none of the substrings of `patterns` or of
    `low_lr_patterns` ("." matches all names). Returns (trainable, total) parameter counts; no match at
    all is an error."""
    trainable = total = 0
    for name, param in dit.named_parameters():
        keep = any(p in name for p in patterns) or any(p in name for p in low_lr_patterns)
        param.requires_grad_(keep)
        total += param.numel()
        trainable += param.numel() if keep else 0
    if trainable == 0:
        lists = f"trainable_modules {patterns}" + (
            f" and trainable_modules_low_learning_rate {list(low_lr_patterns)} match" if low_lr_patterns else " matches"
        )
        raise ValueError(f"{lists} no DiT parameter (names look like blocks.0.ffn.0)")
    return trainable, total


def is_low_lr(name: str, patterns: list[str], low_lr_patterns: list[str]) -> bool:
    """A parameter trains at half the lr when only the low-lr list matches it (the first list wins)."""
    return not any(p in name for p in patterns) and any(p in name for p in low_lr_patterns)
