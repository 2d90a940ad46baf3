"""DiT folders: the official release layout and the diffusers layout, read and written.

Official: config.json (`_class_name` "WanModel", our constructor names) beside
diffusion_pytorch_model.safetensors, or numbered shards with diffusion_pytorch_model.safetensors.index.json.
diffusers: the same file names with WanTransformer3DModel's config and parameter names, either as the
folder itself or as `transformer/` of a pipeline folder.

Wan2.2: TI2V-5B is one such folder (model_type "ti2v"; diffusers: 48 input and output channels). An
A14B release holds two, its experts: `high_noise_model/` and `low_noise_model/` (diffusers: `transformer/`
is the high-noise expert, `transformer_2/` the low-noise one, and model_index.json has the
boundary_ratio); see `expert_folders`. I2V-A14B's config.json reads like Wan2.1 I2V-14B's: that it
has no CLIP branch is told by its tensors (no `img_emb.*`), and it is built with image_dim None.
"""

import json
import re
from pathlib import Path

import torch
import torch.nn as nn

from wan.modules.safetensors_io import index_name, load_into_module, read_header, resolve_weight_files, save_sharded
from wan.modules.state_dict_io import read_json_object

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
CONFIG_NAME = "config.json"

OFFICIAL_CONFIG_KEYS = (
    "model_type", "patch_size", "text_len", "in_dim", "dim", "ffn_dim", "freq_dim", "text_dim", "out_dim",
    "num_heads", "num_layers", "eps", "image_dim",
)  # fmt: skip
# Options of the reference constructor that every release leaves at the default; other values
# describe a model we do not implement.
OFFICIAL_FIXED = {"window_size": [-1, -1], "qk_norm": True, "cross_attn_norm": True}

# diffusers name -> official name, for everything outside `blocks.N.`.
_DIFFUSERS_TOP = {
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.time_proj": "time_projection.1",
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "condition_embedder.image_embedder.norm1": "img_emb.proj.0",
    "condition_embedder.image_embedder.ff.net.0.proj": "img_emb.proj.1",
    "condition_embedder.image_embedder.ff.net.2": "img_emb.proj.3",
    "condition_embedder.image_embedder.norm2": "img_emb.proj.4",
    "scale_shift_table": "head.modulation",
    "proj_out": "head.head",
    "patch_embedding": "patch_embedding",
}
# ... and inside `blocks.N.`.
_DIFFUSERS_BLOCK = {
    "scale_shift_table": "modulation",
    "norm2": "norm3",  # diffusers' norm2 is the affine norm before cross-attention
    "ffn.net.0.proj": "ffn.0",
    "ffn.net.2": "ffn.2",
    "attn1.to_q": "self_attn.q",
    "attn1.to_k": "self_attn.k",
    "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o",
    "attn1.norm_q": "self_attn.norm_q",
    "attn1.norm_k": "self_attn.norm_k",
    "attn2.to_q": "cross_attn.q",
    "attn2.to_k": "cross_attn.k",
    "attn2.to_v": "cross_attn.v",
    "attn2.to_out.0": "cross_attn.o",
    "attn2.norm_q": "cross_attn.norm_q",
    "attn2.norm_k": "cross_attn.norm_k",
    "attn2.add_k_proj": "cross_attn.k_img",
    "attn2.add_v_proj": "cross_attn.v_img",
    "attn2.norm_added_k": "cross_attn.norm_k_img",
}


def _map_prefix(name: str, table: dict[str, str]) -> str | None:
    for src, dst in table.items():
        if name == src or name.startswith(src + "."):
            return dst + name[len(src) :]
    return None


def diffusers_to_official_key(key: str) -> str | None:
    """A WanTransformer3DModel key -> the official key; None for keys diffusers itself ignores.
    Unknown keys come back unchanged (the loader then reports them as unexpected)."""
    if ".norm_added_q." in key:  # listed in diffusers' _keys_to_ignore_on_load_unexpected
        return None
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
    if match:
        mapped = _map_prefix(match.group(2), _DIFFUSERS_BLOCK)
        return key if mapped is None else f"blocks.{match.group(1)}.{mapped}"
    mapped = _map_prefix(key, _DIFFUSERS_TOP)
    return key if mapped is None else mapped


# Wan2.2 A14B expert sub-folders, by expert: (official release, diffusers pipeline).
EXPERT_FOLDERS = {"high": ("high_noise_model", "transformer"), "low": ("low_noise_model", "transformer_2")}
TI2V_CHANNELS = 48  # the Wan2.2 VAE's latent channels: a diffusers DiT with 48 in and out is TI2V-5B's


def _diffusers_model_type(cfg: dict) -> str:
    """diffusers has no model_type: an image branch or more input than output channels (y) is i2v; 48
    in and out channels (the Wan2.2 VAE's) ti2v; else t2v."""
    in_ch = cfg.get("in_channels", 16)
    out_ch = cfg.get("out_channels") or in_ch
    if cfg.get("image_dim") or in_ch > out_ch:
        return "i2v"
    return "ti2v" if in_ch == out_ch == TI2V_CHANNELS else "t2v"


def _diffusers_config_to_official(cfg: dict, path: Path) -> dict:
    problems = []
    if cfg.get("pos_embed_seq_len") is not None:
        problems.append("pos_embed_seq_len is set (a first-last-frame model), not a Wan2.1 T2V/I2V model")
    if cfg.get("rope_max_seq_len", 1024) != 1024:
        problems.append(f"rope_max_seq_len {cfg['rope_max_seq_len']} (Wan2.1 uses 1024)")
    if cfg.get("qk_norm", "rms_norm_across_heads") != "rms_norm_across_heads":
        problems.append(f"qk_norm {cfg['qk_norm']!r} (Wan2.1 uses 'rms_norm_across_heads')")
    if not cfg.get("cross_attn_norm", True):
        problems.append("cross_attn_norm false (Wan2.1 uses true)")
    image_dim = cfg.get("image_dim")
    known = {"patch_size", "num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "text_dim",
             "freq_dim", "ffn_dim", "num_layers", "cross_attn_norm", "qk_norm", "eps", "image_dim",
             "added_kv_proj_dim", "rope_max_seq_len", "pos_embed_seq_len"}  # fmt: skip
    problems += [f"unknown field {k!r}" for k in cfg if k not in known and not k.startswith("_")]
    if problems:
        raise ValueError(f"{path}: unsupported diffusers WanTransformer3DModel config: " + "; ".join(problems))
    heads, head_dim = cfg.get("num_attention_heads", 40), cfg.get("attention_head_dim", 128)
    model_type = _diffusers_model_type(cfg)
    return dict(
        model_type=model_type,
        patch_size=list(cfg.get("patch_size", (1, 2, 2))),
        text_len=512,
        in_dim=cfg.get("in_channels", 16),
        dim=heads * head_dim,
        ffn_dim=cfg.get("ffn_dim", 13824),
        freq_dim=cfg.get("freq_dim", 256),
        text_dim=cfg.get("text_dim", 4096),
        out_dim=cfg.get("out_channels") or cfg.get("in_channels", 16),
        num_heads=heads,
        num_layers=cfg.get("num_layers", 40),
        eps=cfg.get("eps", 1e-6),
        **({"image_dim": image_dim} if image_dim or model_type == "i2v" else {}),
    )


def _official_config(cfg: dict, path: Path) -> dict:
    problems = [
        f"unknown field {k!r}"
        for k in cfg
        if k not in OFFICIAL_CONFIG_KEYS and k not in OFFICIAL_FIXED and not k.startswith("_")
    ]
    # Every release config.json has these; text_dim and patch_size are left at 4096 and (1, 2, 2),
    # and image_dim (ours, for tiny test models) at 1280.
    problems += [
        f"missing field {k!r}"
        for k in OFFICIAL_CONFIG_KEYS
        if k not in cfg and k not in ("text_dim", "patch_size", "image_dim")
    ]
    for key, value in OFFICIAL_FIXED.items():
        if key in cfg and (list(cfg[key]) if isinstance(cfg[key], (list, tuple)) else cfg[key]) != value:
            problems.append(f"{key} {cfg[key]!r} is not supported (every Wan2.1 release uses {value!r})")
    if problems:
        raise ValueError(f"{path}: " + "; ".join(problems))
    out = {k: cfg[k] for k in OFFICIAL_CONFIG_KEYS if k in cfg}
    if (
        out["model_type"] == "i2v"
        and "image_dim" not in out
        and "img_emb.proj.0.weight" not in _tensor_names(path.parent)
    ):
        out["image_dim"] = None  # Wan2.2 I2V-A14B: y carries the image, no CLIP branch
    return out


def _tensor_names(folder: Path) -> set[str]:
    """The tensor names of a DiT folder's weights: the index's, or the single file's header."""
    index = folder / index_name(WEIGHTS_NAME)
    if index.is_file():
        weight_map = read_json_object(index).get("weight_map")
        if isinstance(weight_map, dict):
            return set(weight_map)
    return {name for file in resolve_weight_files(folder, WEIGHTS_NAME) for name in read_header(file)[0]}


def expert_folders(root: str | Path) -> dict[str, Path] | None:
    """A Wan2.2 A14B folder -> {"high": its high-noise expert's DiT folder, "low": ...}, or None when
    `root` holds no experts. Official: high_noise_model/, low_noise_model/; diffusers: transformer/
    (high) and transformer_2/ (low). One expert folder without the other is an error."""
    root = Path(root)
    for layout in (0, 1):
        found = {e: root / names[layout] for e, names in EXPERT_FOLDERS.items()}
        present = [e for e, p in found.items() if (p / CONFIG_NAME).is_file()]
        if layout == 1 and present == ["high"]:
            return None  # a Wan2.1 / TI2V diffusers pipeline: transformer/ alone
        if len(present) == 2:
            return found
        if present:
            missing = [str(p) for e, p in found.items() if e not in present]
            raise ValueError(f"{root}: a Wan2.2 A14B folder needs both experts; missing {', '.join(missing)}")
    return None


def diffusers_boundary(root: str | Path) -> float | None:
    """The boundary_ratio of a diffusers Wan2.2 pipeline folder's model_index.json (None without one)."""
    index = Path(root) / "model_index.json"
    if not index.is_file():
        return None
    value = read_json_object(index).get("boundary_ratio")
    if value is not None and not (isinstance(value, (int, float)) and 0 <= value <= 1):
        raise ValueError(f"{index}: boundary_ratio must be a number in [0, 1], got {value!r}")
    return value


def official_to_diffusers_key(name: str) -> str:
    """The diffusers name of an official parameter name: the inverse of diffusers_to_official_key."""
    top = {official: diffusers for diffusers, official in _DIFFUSERS_TOP.items()}
    block = {official: diffusers for diffusers, official in _DIFFUSERS_BLOCK.items()}
    if name.startswith("blocks."):
        index, _, rest = name[len("blocks.") :].partition(".")
        mapped = _map_prefix(rest, block)
        return name if mapped is None else f"blocks.{index}.{mapped}"
    mapped = _map_prefix(name, top)
    return name if mapped is None else mapped


def diffusers_config(model: nn.Module) -> dict:
    """WanTransformer3DModel's config for `model` (refused when diffusers cannot express it)."""
    c = model.config
    if c["text_len"] != 512:
        raise ValueError(f"--format diffusers: text_len {c['text_len']} cannot be expressed (diffusers fixes 512)")
    i2v = model.image_dim is not None  # the CLIP branch
    cfg = {
        "_class_name": "WanTransformer3DModel",
        "patch_size": list(c["patch_size"]),
        "num_attention_heads": c["num_heads"],
        "attention_head_dim": c["dim"] // c["num_heads"],
        "in_channels": c["in_dim"],
        "out_channels": c["out_dim"],
        "text_dim": c["text_dim"],
        "freq_dim": c["freq_dim"],
        "ffn_dim": c["ffn_dim"],
        "num_layers": c["num_layers"],
        "cross_attn_norm": True,
        "qk_norm": "rms_norm_across_heads",
        "eps": c["eps"],
        "image_dim": model.image_dim if i2v else None,
        "added_kv_proj_dim": c["dim"] if i2v else None,
        "rope_max_seq_len": 1024,
        "pos_embed_seq_len": None,
    }
    with torch.device("meta"):
        back = type(model)(**_diffusers_config_to_official(cfg, Path(CONFIG_NAME))).config
    if back != c:  # the reader of this folder must build the same model
        raise ValueError(f"--format diffusers: the config does not round-trip ({c} -> {back})")
    return cfg


def read_dit_folder(folder: str | Path) -> tuple[Path, dict, str]:
    """-> (the folder holding the weights, WanModel keyword arguments, 'official' or 'diffusers')."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a folder (expected a Wan DiT folder with {CONFIG_NAME})")
    experts = None if (folder / CONFIG_NAME).is_file() else expert_folders(folder)
    if experts is not None:
        raise ValueError(
            f"{folder}: a Wan2.2 A14B folder holds two DiTs, its experts: read {experts['high']} or "
            f"{experts['low']} (expert_folders)"
        )
    if not (folder / CONFIG_NAME).is_file() and (folder / "transformer" / CONFIG_NAME).is_file():
        folder = folder / "transformer"  # a diffusers pipeline folder
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise ValueError(f"{folder}: no {CONFIG_NAME}; expected a Wan DiT folder (config.json + {WEIGHTS_NAME})")
    cfg = read_json_object(path)
    class_name = cfg.get("_class_name")
    if class_name == "WanTransformer3DModel" or (class_name is None and "num_attention_heads" in cfg):
        return folder, _diffusers_config_to_official(cfg, path), "diffusers"
    if class_name not in (None, "WanModel"):
        raise ValueError(f"{path}: _class_name {class_name!r} is not a Wan DiT (WanModel or WanTransformer3DModel)")
    return folder, _official_config(cfg, path), "official"


def load_dit_weights(
    model: nn.Module,
    folder: str | Path,
    dtype: torch.dtype | None = torch.float32,
    device: torch.device | str = "cpu",
) -> None:
    """Load a DiT folder's weights into `model` (possibly on the meta device), strictly."""
    weights_folder, cfg, layout = read_dit_folder(folder)
    files = resolve_weight_files(weights_folder, WEIGHTS_NAME)
    if cfg.get("in_dim", model.in_dim) != model.in_dim:
        # The usual cause is I2V weights (36 input channels) for a T2V model (16), or the reverse.
        kind = {16: "t2v", 36: "i2v", TI2V_CHANNELS: "ti2v"}
        found = [
            (p.name, h["patch_embedding.weight"]["shape"])
            for p in files
            if "patch_embedding.weight" in (h := read_header(p)[0])
        ]
        where, shape = found[0] if found else (CONFIG_NAME, "?")
        raise ValueError(
            f"{weights_folder / where}: key 'patch_embedding.weight' has shape {shape} "
            f"(in_dim {cfg['in_dim']}, {kind.get(cfg['in_dim'], '?')} weights), the model expects "
            f"{list(model.patch_embedding.weight.shape)} (in_dim {model.in_dim}, {kind.get(model.in_dim, '?')})"
        )
    rename = diffusers_to_official_key if layout == "diffusers" else (lambda key: key)
    load_into_module(model, files, rename, dtype=dtype, device=device)


def load_dit(cls: type, folder: str | Path, dtype: torch.dtype | None, device: torch.device | str):
    weights_folder, cfg, _ = read_dit_folder(folder)
    try:
        with torch.device("meta"):
            model = cls(**cfg)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{weights_folder / CONFIG_NAME}: {err}") from None
    load_dit_weights(model, folder, dtype=dtype, device=device)
    model.rope.reset_tables(device)
    leftover = [name for name, t in model.state_dict(keep_vars=True).items() if t.is_meta]
    assert not leftover, f"tensors left on the meta device: {leftover}"
    return model


def save_dit(model: nn.Module, folder: str | Path, max_shard_size: int | str, dtype: torch.dtype | None) -> None:
    folder = Path(folder)
    save_sharded(model.state_dict(), folder, WEIGHTS_NAME, max_shard_size, dtype=dtype)
    (folder / CONFIG_NAME).write_text(json.dumps({"_class_name": "WanModel", **model.config}, indent=2) + "\n")
