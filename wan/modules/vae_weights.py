"""VAE weight files: the official `Wan2.1_VAE.pth` / `Wan2.2_VAE.pth` and the diffusers `AutoencoderKLWan`
layout, read.

Official: a plain torch.save'd state dict whose keys are our parameter names; it carries no config,
so the widths and z_dim are read from the tensor shapes and the rest of the structure is the
release's (see `VAE_PRESETS`, `VAE22_PRESETS`). It may be given as the file or as a folder holding it.
diffusers: config.json (`_class_name` "AutoencoderKLWan") beside diffusion_pytorch_model.safetensors
(or shards with an index), as the folder itself or as `vae/` of a pipeline folder; its parameter names
are mapped to the official ones by `diffusers_to_official_key` (Wan2.1) or `diffusers22_to_official_key`.

Two families: "wan2.1" (WanVAE) and "wan2.2" (WanVAE22: `is_residual: true` in a diffusers config,
stages nested as `downsamples.i.downsamples.j` in an official file). Each loader refuses the other
family's files with a message naming the class that loads them.
"""

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from wan.modules.safetensors_io import load_into_module, resolve_weight_files
from wan.modules.state_dict_io import load_pth, load_state_dict_into, read_json_object

OFFICIAL_NAME = "Wan2.1_VAE.pth"
OFFICIAL_NAME_22 = "Wan2.2_VAE.pth"
OFFICIAL_NAMES = {"wan2.1": OFFICIAL_NAME, "wan2.2": OFFICIAL_NAME_22}
# What loads each family, for the messages that refuse the other one.
_LOADERS = {"wan2.1": "WanVAE.from_pretrained (wan.modules.vae)",
            "wan2.2": "WanVAE22.from_pretrained (wan.modules.vae2_2)"}  # fmt: skip
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
CONFIG_NAME = "config.json"

# Inside a residual block: diffusers name -> index in the official `residual` Sequential.
_RESIDUAL = {"norm1": "residual.0", "conv1": "residual.2", "norm2": "residual.3", "conv2": "residual.6",
             "conv_shortcut": "shortcut"}  # fmt: skip
_TOP = {"quant_conv": "conv1", "post_quant_conv": "conv2"}
_SIDE = {"conv_in": "conv1", "norm_out": "head.0", "conv_out": "head.2"}  # inside encoder. / decoder.


def _residual(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return f"{_RESIDUAL[head]}.{tail}" if head in _RESIDUAL else rest


def _shared_key(key: str) -> str | None:
    """The parts both families name alike: the quant convs, the encoder's and decoder's first conv and
    head, their middle blocks. Keys outside encoder./decoder. come back unchanged; other encoder and
    decoder keys give None."""
    top, _, rest = key.partition(".")
    if top in _TOP:
        return f"{_TOP[top]}.{rest}"
    if top not in ("encoder", "decoder"):
        return key
    part, _, rest2 = rest.partition(".")
    if part in _SIDE:
        return f"{top}.{_SIDE[part]}.{rest2}"
    match = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", rest)
    if match:
        kind, index, tail = match.group(1), int(match.group(2)), match.group(3)
        if kind == "attentions":  # middle = [resnet 0, attention 0, resnet 1]
            return f"{top}.middle.{2 * index + 1}.{tail}"
        return f"{top}.middle.{2 * index}.{_residual(tail)}"
    return None


def diffusers_to_official_key(key: str, num_res_blocks: int = 2) -> str:
    """An AutoencoderKLWan key -> the official Wan2.1_VAE.pth key. Unknown keys come back unchanged
    (the loader then reports them as unexpected).

    The decoder's `up_blocks.i` hold num_res_blocks + 1 residual blocks and then (all but the last)
    an upsampler; officially they are one flat `upsamples` list, so block i starts at
    i * (num_res_blocks + 2)."""
    shared = _shared_key(key)
    if shared is not None:
        return shared
    top, _, rest = key.partition(".")
    match = re.fullmatch(r"down_blocks\.(\d+)\.(.+)", rest)
    if top == "encoder" and match:
        return f"encoder.downsamples.{match.group(1)}.{_residual(match.group(2))}"
    match = re.fullmatch(r"up_blocks\.(\d+)\.(resnets|upsamplers)\.(\d+)\.(.+)", rest)
    if top == "decoder" and match:
        block, kind, index, tail = int(match.group(1)), match.group(2), int(match.group(3)), match.group(4)
        start = block * (num_res_blocks + 2)
        if kind == "upsamplers":
            return f"decoder.upsamples.{start + num_res_blocks + 1 + index}.{tail}"
        return f"decoder.upsamples.{start + index}.{_residual(tail)}"
    return key


def diffusers22_to_official_key(key: str, num_res_blocks: int = 2) -> str:
    """An AutoencoderKLWan key of a Wan2.2 (`is_residual`) VAE -> the official Wan2.2_VAE.pth key.
    Unknown keys come back unchanged.

    Both layouts nest stages: diffusers' `down_blocks.i.resnets.j` / `.downsampler` are officially
    `downsamples.i.downsamples.j` / `.downsamples.<num_res_blocks>` (the resample follows the residual
    blocks), and `up_blocks.i.resnets.j` / `.upsampler` are `upsamples.i.upsamples.j` /
    `.upsamples.<num_res_blocks + 1>`. The stages' shortcuts have no parameters."""
    shared = _shared_key(key)
    if shared is not None:
        return shared
    match = re.fullmatch(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.(?:resnets\.(\d+)|(down|up)sampler)\.(.+)", key)
    if not match or (match.group(1) == "encoder") != (match.group(2) == "down"):
        return key
    top, way, stage, resnet, resample, tail = match.groups()
    if resample is not None and resample != way:
        return key
    if resnet is not None:
        index, tail = int(resnet), _residual(tail)
    else:
        index = num_res_blocks + (way == "up")
    return f"{top}.{way}samples.{stage}.{way}samples.{index}.{tail}"


# AutoencoderKLWan config fields -> our constructor names; other fields must keep the values below.
_DIFFUSERS_FIELDS = {"base_dim": "dim", "z_dim": "z_dim", "dim_mult": "dim_mult", "num_res_blocks": "num_res_blocks",
                     "temperal_downsample": "temporal_downsample", "dropout": "dropout",
                     "latents_mean": "latents_mean", "latents_std": "latents_std"}  # fmt: skip
_DIFFUSERS_FIXED = {"attn_scales": [], "is_residual": False, "in_channels": 3, "out_channels": 3, "patch_size": None,
                    "decoder_base_dim": None, "scale_factor_temporal": None, "scale_factor_spatial": None}  # fmt: skip

# Wan2.2 (is_residual): the decoder's own base width too; the 2x2 patch makes 12 = 3 * 2 * 2 channels
# in and out. `clip_output` (written by the diffusers converter, read by no diffusers release: decode
# clamps to [-1, 1] always, as the reference and we do) is accepted and ignored.
_DIFFUSERS22_FIELDS = dict(_DIFFUSERS_FIELDS, decoder_base_dim="dec_dim")
_DIFFUSERS22_FIXED = {"attn_scales": [], "is_residual": True, "in_channels": 12, "out_channels": 12, "patch_size": 2}
# Fields a Wan2.2 config.json must hold (diffusers writes every field): diffusers' defaults for them
# are Wan2.1's. The others default as in AutoencoderKLWan.__init__.
_DIFFUSERS22_REQUIRED = ("base_dim", "z_dim", "latents_mean", "latents_std")
_DIFFUSERS22_DEFAULTS = {"dim_mult": [1, 2, 4, 4], "num_res_blocks": 2, "temperal_downsample": [False, True, True],
                         "dropout": 0.0, "decoder_base_dim": None}  # fmt: skip


def _as_list(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def _diffusers_config(cfg: dict, path: Path) -> tuple[str, dict]:
    """A diffusers config.json -> (family, our constructor kwargs)."""
    if cfg.get("is_residual") is True:
        return "wan2.2", _diffusers22_config(cfg, path)
    problems = []
    for key, value in cfg.items():
        if key.startswith("_") or key in _DIFFUSERS_FIELDS:
            continue
        if key not in _DIFFUSERS_FIXED:
            problems.append(f"unknown field {key!r}")
        elif key == "decoder_base_dim" and value not in (None, cfg.get("base_dim", 96)):
            problems.append(f"decoder_base_dim {value} differs from base_dim (Wan2.1 uses one width)")
        elif key == "scale_factor_temporal" and value not in (None, 4):
            problems.append(f"scale_factor_temporal {value} (Wan2.1 uses 4)")
        elif key == "scale_factor_spatial" and value not in (None, 8):
            problems.append(f"scale_factor_spatial {value} (Wan2.1 uses 8)")
        elif key not in ("decoder_base_dim", "scale_factor_temporal", "scale_factor_spatial"):
            fixed = _DIFFUSERS_FIXED[key]
            if _as_list(value) != fixed:
                problems.append(f"{key} {value!r} is not a Wan2.1 VAE (expects {fixed!r})")
    if problems:
        raise ValueError(f"{path}: unsupported diffusers AutoencoderKLWan config: " + "; ".join(problems))
    return "wan2.1", {ours: cfg[theirs] for theirs, ours in _DIFFUSERS_FIELDS.items() if theirs in cfg}


def _diffusers22_config(cfg: dict, path: Path) -> dict:
    cfg = dict(_DIFFUSERS22_DEFAULTS, **cfg)
    problems = [f"missing field {key!r}" for key in _DIFFUSERS22_REQUIRED if key not in cfg]
    for key, value in cfg.items():
        if key.startswith("_") or key in _DIFFUSERS22_FIELDS:
            continue
        if key == "clip_output":
            if not isinstance(value, bool):
                problems.append(f"clip_output {value!r} is not a boolean")
        elif key in ("scale_factor_temporal", "scale_factor_spatial"):
            # The pipelines' factors: they must be this structure's, 2 per temporal downsample and
            # the patch times 2 per downsample.
            td, dim_mult = cfg["temperal_downsample"], cfg["dim_mult"]
            if not isinstance(td, (list, tuple)) or not isinstance(dim_mult, (list, tuple)):
                continue  # the constructor reports those
            expected = 2 ** sum(map(bool, td)) if key == "scale_factor_temporal" else 2 * 2 ** (len(dim_mult) - 1)
            if value not in (None, expected):
                problems.append(f"{key} {value} (this structure has {expected})")
        elif key not in _DIFFUSERS22_FIXED:
            problems.append(f"unknown field {key!r}")
        elif _as_list(value) != _DIFFUSERS22_FIXED[key]:
            problems.append(f"{key} {value!r} is not a Wan2.2 VAE (expects {_DIFFUSERS22_FIXED[key]!r})")
    if problems:
        raise ValueError(f"{path}: unsupported diffusers AutoencoderKLWan (Wan2.2) config: " + "; ".join(problems))
    out = {ours: cfg[theirs] for theirs, ours in _DIFFUSERS22_FIELDS.items() if theirs in cfg}
    if out["dec_dim"] is None:  # diffusers: the decoder takes the encoder's width
        out["dec_dim"] = out["dim"]
    return out


def _expected_names(family: str | None) -> str:
    return OFFICIAL_NAMES[family] if family else " / ".join(OFFICIAL_NAMES.values())


def read_vae_source(path: str | Path, family: str | None = None) -> tuple[str, Path, dict, str | None]:
    """-> ('official', the .pth file, {}, None) or ('diffusers', the folder with the weights, our
    constructor kwargs, its family). A folder is searched for the official name of `family` (either,
    when None), then for a diffusers config."""
    path = Path(path)
    wanted = _expected_names(family)
    if path.is_file():
        return "official", path, {}, None
    if not path.is_dir():
        raise ValueError(f"{path}: no such file or folder (expected {wanted} or a diffusers VAE folder)")
    present = [name for name in OFFICIAL_NAMES.values() if (path / name).is_file()]
    mine = [name for name in present if family is None or name == OFFICIAL_NAMES[family]]
    if len(mine) > 1:
        raise ValueError(f"{path}: holds both {' and '.join(mine)}; pass the file itself")
    if mine or present:  # the other family's file: its family check names what loads it
        return "official", path / (mine or present)[0], {}, None
    if not (path / CONFIG_NAME).is_file() and (path / "vae" / CONFIG_NAME).is_file():
        path = path / "vae"  # a diffusers pipeline folder
    config_path = path / CONFIG_NAME
    if not config_path.is_file():
        found = sorted(p.name for p in path.glob("*.pth"))
        raise ValueError(
            f"{path}: neither {wanted} nor a diffusers VAE folder ({CONFIG_NAME} + {WEIGHTS_NAME})"
            + (f"; .pth files present: {', '.join(found)} (pass the file itself)" if found else "")
        )
    cfg = read_json_object(config_path)
    if cfg.get("_class_name", "AutoencoderKLWan") != "AutoencoderKLWan":
        raise ValueError(f"{config_path}: _class_name {cfg['_class_name']!r} is not AutoencoderKLWan")
    found_family, kwargs = _diffusers_config(cfg, config_path)
    return "diffusers", path, kwargs, found_family


def official_family(state: dict[str, torch.Tensor]) -> str:
    """'wan2.2' when the encoder's stages nest their blocks (`encoder.downsamples.0.downsamples.0...`),
    else 'wan2.1' (a flat `encoder.downsamples` list)."""
    return "wan2.2" if any(key.startswith("encoder.downsamples.0.downsamples.") for key in state) else "wan2.1"


def official_config(state: dict[str, torch.Tensor], base: dict, family: str = "wan2.1") -> dict:
    """The release structure (`base`) with the widths read from the file: the base width is the output
    width of encoder.conv1, z_dim that of conv2, and (Wan2.2) the decoder's base width the input width
    of its head over dim_mult[0]. Missing keys are left to the strict loader to report."""
    cfg = dict(base)
    if "encoder.conv1.weight" in state:
        cfg["dim"] = int(state["encoder.conv1.weight"].shape[0])
    if "conv2.weight" in state:
        cfg["z_dim"] = int(state["conv2.weight"].shape[0])
    if family == "wan2.2" and "decoder.head.2.weight" in state:
        cfg["dec_dim"] = int(state["decoder.head.2.weight"].shape[1]) // int(cfg["dim_mult"][0])
    return cfg


@dataclass
class VaeSource:
    """A VAE weight source, opened: what `build_vae` needs to build and load the model."""

    kind: str  # "official" or "diffusers"
    path: Path  # the .pth file, or the folder holding the safetensors
    family: str  # "wan2.1" or "wan2.2"
    config: dict  # diffusers: our constructor kwargs from config.json; official: {}
    state: dict[str, torch.Tensor] | None = None  # official: the (memory-mapped) state dict


def open_vae_source(path: str | Path, family: str | None = None) -> VaeSource:
    """Find and open the weights at `path` and tell their family; with `family` given, a source of the
    other family is refused with a ValueError naming the loader that takes it."""
    kind, source, cfg, found = read_vae_source(path, family)
    state = None
    if kind == "official":
        state = load_pth(source)
        found = official_family(state)
    if family is not None and found != family:
        how = "config.json has is_residual: true" if found == "wan2.2" else "config.json has no is_residual: true"
        if kind == "official":
            how = "nested encoder stages" if found == "wan2.2" else "a flat encoder.downsamples list"
        raise ValueError(
            f"{source}: a {found} VAE ({how}), not {family}; load it with {_LOADERS[found]} "
            "or wan.modules.vae2_2.load_any_vae"
        )
    return VaeSource(kind, source, found, cfg, state)


def build_vae(cls: type, source: VaeSource, dtype: torch.dtype | None, device: torch.device | str, base: dict, config):
    """Build `cls` on the meta device and load `source` into it strictly (see WanVAE.from_pretrained)."""
    if source.kind == "official":
        cfg = official_config(source.state, dict(base, **(config or {})), source.family)
    else:
        cfg = dict(base, **source.config)
    cfg.update(config or {})
    try:
        with torch.device("meta"):
            model = cls(**cfg)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{source.path}: {err}") from None
    if source.kind == "official":
        load_state_dict_into(model, source.state, source.path, dtype=dtype, device=device)
    else:
        files = resolve_weight_files(source.path, WEIGHTS_NAME)
        blocks = cfg.get("num_res_blocks", 2)
        to_official = diffusers22_to_official_key if source.family == "wan2.2" else diffusers_to_official_key
        load_into_module(model, files, lambda key: to_official(key, blocks), dtype=dtype, device=device)
    leftover = [name for name, t in model.state_dict(keep_vars=True).items() if t.is_meta]
    assert not leftover, f"tensors left on the meta device: {leftover}"
    return model.eval().requires_grad_(False)


def load_vae(
    cls: type, path: str | Path, dtype: torch.dtype | None, device: torch.device | str, base: dict, config,
    family: str = "wan2.1",
):  # fmt: skip
    """Open `path` as a `family` VAE and load it into a new `cls` (see WanVAE.from_pretrained)."""
    return build_vae(cls, open_vae_source(path, family), dtype, device, base, config)
