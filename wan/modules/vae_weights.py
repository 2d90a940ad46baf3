"""VAE weight files: the official `Wan2.1_VAE.pth` and the diffusers `AutoencoderKLWan` layout, read.

Official: a plain torch.save'd state dict whose keys are our parameter names; it carries no config,
so the base width and z_dim are read from the tensor shapes and the rest of the structure is the
release's (see `VAE_PRESETS`). It may be given as the file or as a folder holding it.
diffusers: config.json (`_class_name` "AutoencoderKLWan") beside diffusion_pytorch_model.safetensors
(or shards with an index), as the folder itself or as `vae/` of a pipeline folder; its parameter names
are mapped to the official ones by `diffusers_to_official_key`.
"""

import re
from pathlib import Path

import torch

from wan.modules.safetensors_io import load_into_module, resolve_weight_files
from wan.modules.state_dict_io import load_pth, load_state_dict_into, read_json_object

OFFICIAL_NAME = "Wan2.1_VAE.pth"
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


def diffusers_to_official_key(key: str, num_res_blocks: int = 2) -> str:
    """An AutoencoderKLWan key -> the official Wan2.1_VAE.pth key. Unknown keys come back unchanged
    (the loader then reports them as unexpected).

    The decoder's `up_blocks.i` hold num_res_blocks + 1 residual blocks and then (all but the last)
    an upsampler; officially they are one flat `upsamples` list, so block i starts at
    i * (num_res_blocks + 2)."""
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


# AutoencoderKLWan config fields -> our constructor names; other fields must keep the values below.
_DIFFUSERS_FIELDS = {"base_dim": "dim", "z_dim": "z_dim", "dim_mult": "dim_mult", "num_res_blocks": "num_res_blocks",
                     "temperal_downsample": "temporal_downsample", "dropout": "dropout",
                     "latents_mean": "latents_mean", "latents_std": "latents_std"}  # fmt: skip
_DIFFUSERS_FIXED = {"attn_scales": [], "is_residual": False, "in_channels": 3, "out_channels": 3, "patch_size": None,
                    "decoder_base_dim": None, "scale_factor_temporal": None, "scale_factor_spatial": None}  # fmt: skip


def _diffusers_config(cfg: dict, path: Path) -> dict:
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
            if (list(value) if isinstance(value, (list, tuple)) else value) != fixed:
                problems.append(f"{key} {value!r} is not a Wan2.1 VAE (expects {fixed!r})")
    if problems:
        raise ValueError(f"{path}: unsupported diffusers AutoencoderKLWan config: " + "; ".join(problems))
    return {ours: cfg[theirs] for theirs, ours in _DIFFUSERS_FIELDS.items() if theirs in cfg}


def read_vae_source(path: str | Path) -> tuple[str, Path, dict]:
    """-> ('official', the .pth file, {}) or ('diffusers', the folder with the weights, WanVAE kwargs)."""
    path = Path(path)
    if path.is_file():
        return "official", path, {}
    if not path.is_dir():
        raise ValueError(f"{path}: no such file or folder (expected {OFFICIAL_NAME} or a diffusers VAE folder)")
    if (path / OFFICIAL_NAME).is_file():
        return "official", path / OFFICIAL_NAME, {}
    if not (path / CONFIG_NAME).is_file() and (path / "vae" / CONFIG_NAME).is_file():
        path = path / "vae"  # a diffusers pipeline folder
    config_path = path / CONFIG_NAME
    if not config_path.is_file():
        found = sorted(p.name for p in path.glob("*.pth"))
        raise ValueError(
            f"{path}: neither {OFFICIAL_NAME} nor a diffusers VAE folder ({CONFIG_NAME} + {WEIGHTS_NAME})"
            + (f"; .pth files present: {', '.join(found)} (pass the file itself)" if found else "")
        )
    cfg = read_json_object(config_path)
    if cfg.get("_class_name", "AutoencoderKLWan") != "AutoencoderKLWan":
        raise ValueError(f"{config_path}: _class_name {cfg['_class_name']!r} is not AutoencoderKLWan")
    return "diffusers", path, _diffusers_config(cfg, config_path)


def official_config(state: dict[str, torch.Tensor], base: dict) -> dict:
    """The release structure (`base`) with the widths read from the file: the base width is the output
    width of encoder.conv1, z_dim that of conv2. Missing keys are left to the strict loader to report."""
    cfg = dict(base)
    if "encoder.conv1.weight" in state:
        cfg["dim"] = int(state["encoder.conv1.weight"].shape[0])
    if "conv2.weight" in state:
        cfg["z_dim"] = int(state["conv2.weight"].shape[0])
    return cfg


def load_vae(cls: type, path: str | Path, dtype: torch.dtype | None, device: torch.device | str, base: dict, config):
    """Build `cls` on the meta device and load `path` into it strictly (see WanVAE.from_pretrained)."""
    kind, source, cfg = read_vae_source(path)
    if kind == "official":
        state = load_pth(source)
        cfg = official_config(state, base)
    else:
        cfg = dict(base, **cfg)
    cfg.update(config or {})
    try:
        with torch.device("meta"):
            model = cls(**cfg)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{source}: {err}") from None
    if kind == "official":
        load_state_dict_into(model, state, source, dtype=dtype, device=device)
    else:
        files = resolve_weight_files(source, WEIGHTS_NAME)
        blocks = cfg.get("num_res_blocks", 2)
        load_into_module(model, files, lambda key: diffusers_to_official_key(key, blocks), dtype=dtype, device=device)
    leftover = [name for name, t in model.state_dict(keep_vars=True).items() if t.is_meta]
    assert not leftover, f"tensors left on the meta device: {leftover}"
    return model.eval().requires_grad_(False)
