"""The Wan2.1 I2V image encoder: the vision tower of open-clip xlm-roberta-large-vit-huge-14.

Only the part Wan uses is built: patch + CLS + position embedding, pre-norm, and the first
num_layers - 1 transformer blocks. The I2V features are the output of the penultimate block with no
final norm (the official `use_31_block=True`), so the last block, `post_norm` and `head` are never run;
the loaders check that the last block's tensors are in the file with the right shapes and then skip
them, so loading stays strict without holding ~80 MB (fp32) of weights that are never used.

Parameter names are the official checkpoint's `visual.*` keys without the `visual.` prefix
(`patch_embedding.weight`, `cls_embedding`, `pos_embedding`, `pre_norm.*`,
`transformer.N.{norm1, attn.to_qkv, attn.proj, norm2, mlp.0, mlp.2}.*`).
`num_layers` is the depth of the checkpoint (32 for ViT-H/14); the module holds num_layers - 1 blocks.

Precision: the residual stream and every LayerNorm are float32; the patch embedding, attention and
MLP matmuls run in the autocast dtype (bf16/fp16 weights turn autocast on, as in WanModel). The
reference runs the whole tower in fp16 on GPU, with its LayerNorms in float32.

Shapes: B batch, S = 1 + (image_size / patch_size)^2 tokens (257 for ViT-H/14 at 224 px), D width.
"""

import re
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from wan.modules.attention import attention
from wan.modules.model import WanLayerNorm
from wan.modules.precision import autocast_for_weights
from wan.modules.safetensors_io import read_header, read_tensor, resolve_weight_files
from wan.modules.state_dict_io import assign_tensor, check_entries, load_pth, prepare_tensor, read_json_object

# Normalisation of the open-clip (and OpenAI CLIP) image transforms.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

CLIP_PRESETS = {
    # open-clip xlm-roberta-large-vit-huge-14, as Wan2.1 I2V uses it: features [B, 257, 1280].
    "vit-h-14": dict(image_size=224, patch_size=14, width=1280, mlp_dim=5120, num_heads=16, num_layers=32, eps=1e-5),
    # Tiny, for tests: features [B, 5, 64]. Not 1280 wide, so it cannot feed a WanModel as it stands
    # (WanModel checks clip_fea against CLIP_TOKENS x CLIP_DIM = 257 x 1280).
    "debug": dict(image_size=28, patch_size=14, width=64, mlp_dim=256, num_heads=4, num_layers=3, eps=1e-5),
}

HF_WEIGHTS_NAME = "model.safetensors"
HF_CONFIG_NAME = "config.json"


def preprocess(images: torch.Tensor, size: int) -> torch.Tensor:
    """Images [B, 3, H, W] in [-1, 1] -> CLIP input [B, 3, size, size], float32.

    As the official `CLIPModel.visual`: bicubic resize of the [-1, 1] image (align_corners=False, no
    antialiasing, no crop, aspect ratio not kept), then x * 0.5 + 0.5, then (x - mean) / std. Nothing
    is clamped: bicubic overshoot past [-1, 1] goes through as it does in the reference.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W] in [-1, 1], got shape {list(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"images must be a floating tensor in [-1, 1], got {images.dtype}")
    x = F.interpolate(images.float(), size=(size, size), mode="bicubic", align_corners=False)
    x = x * 0.5 + 0.5
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        # One fused projection: rows [q | k | v], each head-major (official `view(b, s, 3, n, d)`).
        self.to_qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.to_qkv(x).unflatten(-1, (3, self.num_heads, -1)).unbind(2)  # 3 x [B, S, H, D/H]
        return self.proj(attention(q, k, v))  # [B, S, D]


class AttentionBlock(nn.Module):
    """Pre-norm transformer block with an exact-GELU MLP."""

    def __init__(self, dim: int, mlp_dim: int, num_heads: int, eps: float):
        super().__init__()
        self.norm1 = WanLayerNorm(dim, eps=eps)
        self.attn = SelfAttention(dim, num_heads)
        self.norm2 = WanLayerNorm(dim, eps=eps)
        # Names mlp.0 / mlp.2 as in the release (its mlp.3 is a parameterless Dropout).
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, S, D] float32 residual stream
        x = x + self.attn(self.norm1(x)).float()
        return x + self.mlp(self.norm2(x)).float()


class CLIPVision(nn.Module):
    """The ViT image tower; `forward` gives the penultimate block's output [B, S, width] (float32)."""

    def __init__(
        self,
        *,
        image_size: int = 224,
        patch_size: int = 14,
        width: int = 1280,
        mlp_dim: int = 5120,
        num_heads: int = 16,
        num_layers: int = 32,
        eps: float = 1e-5,
    ):
        super().__init__()
        problems = []
        if image_size % patch_size:
            problems.append(f"image_size {image_size} is not divisible by patch_size {patch_size}")
        if width % num_heads:
            problems.append(f"width {width} is not divisible by num_heads {num_heads}")
        if num_layers < 2:
            problems.append(f"num_layers must be >= 2 (the features come from block num_layers - 1), got {num_layers}")
        if problems:
            raise ValueError("invalid CLIPVision config: " + "; ".join(problems))
        self.config = dict(
            image_size=image_size, patch_size=patch_size, width=width, mlp_dim=mlp_dim, num_heads=num_heads,
            num_layers=num_layers, eps=eps,
        )  # fmt: skip
        self.image_size = image_size
        self.patch_size = patch_size
        self.width = width
        self.num_layers = num_layers
        self.num_tokens = 1 + (image_size // patch_size) ** 2  # CLS + patches: 257 for ViT-H/14
        self.out_dim = width

        # No conv bias: open-clip drops it when the tower has a pre-norm.
        self.patch_embedding = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.cls_embedding = nn.Parameter(torch.empty(1, 1, width))
        self.pos_embedding = nn.Parameter(torch.empty(1, self.num_tokens, width))
        self.pre_norm = WanLayerNorm(width, eps=eps)
        # The last of the num_layers blocks is not built: its output is never used.
        self.transformer = nn.Sequential(
            *(AttentionBlock(width, mlp_dim, num_heads, eps) for _ in range(num_layers - 1))
        )
        if not self.pos_embedding.is_meta:
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Random weights as open-clip initialises them (also what follows a meta build and
        `to_empty()`). Wan only ever uses the released weights; this is for tests and debugging."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d, nn.LayerNorm)):
                m.reset_parameters()
        gain = self.width**-0.5
        self.cls_embedding.normal_(std=gain)
        self.pos_embedding.normal_(std=gain)

    # ----------------------------------------------------------------------------------------------
    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> [B, 3, image_size, image_size] normalised, float32."""
        return preprocess(images, self.image_size)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> I2V features [B, num_tokens, width] (257 x 1280), float32.

        Gradients follow torch's grad mode: call under torch.no_grad() for a frozen encoder."""
        return self.forward(self.preprocess(images)).float()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Preprocessed images [B, 3, image_size, image_size] -> [B, num_tokens, width] float32: the
        output of block num_layers - 1, no final norm."""
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, self.image_size, self.image_size):
            raise ValueError(
                f"CLIPVision expects preprocessed images [B, 3, {self.image_size}, {self.image_size}], "
                f"got {list(images.shape)} (use encode_image for [-1, 1] images of any size)"
            )
        with autocast_for_weights(images.device.type, self.patch_embedding.weight.dtype):
            return self._forward(images)

    def _forward(self, images: torch.Tensor) -> torch.Tensor:
        b = images.shape[0]
        x = self.patch_embedding(images.to(self.patch_embedding.weight.dtype))  # [B, D, h, w]
        x = x.flatten(2).transpose(1, 2).float()  # [B, h*w, D]; float32 residual stream from here
        x = torch.cat([self.cls_embedding.float().expand(b, -1, -1), x], dim=1)  # [B, S, D]
        # The pre-norm follows the position embedding (official: pre_norm(x + pos_embedding)).
        x = self.pre_norm(x + self.pos_embedding.float())
        for block in self.transformer:
            x = block(x)
        return x

    # ----------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        dtype: torch.dtype | None = torch.float32,
        device: torch.device | str = "cpu",
        config: dict | None = None,
    ) -> "CLIPVision":
        """Load, strictly, either

        - the official `models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth` (a file): sizes from
          `config` (default CLIP_PRESETS["vit-h-14"]); `textual.*`, `log_scale`, `visual.post_norm.*`
          and `visual.head` are skipped, the last block is checked and skipped; keys without the
          `visual.` prefix are read too;
        - a Hugging Face folder (config.json + model.safetensors, or shards with an index) of a
          `CLIPVisionModel` (keys with or without `vision_model.`) or a whole `CLIPModel` (its text
          side is skipped): sizes from config.json (`config` must be None); q/k/v are fused into
          to_qkv, `post_layernorm` is skipped, the last layer is checked and skipped.

        Builds on the meta device, so host memory holds one copy. dtype=None keeps the file's dtype.
        Any problem raises ValueError naming the file and keys.
        """
        path = Path(path)
        if path.is_dir():
            if config is not None:
                raise ValueError(f"{path}: a Hugging Face folder gives its own config; do not pass config")
            config = read_hf_config(path)
        elif config is None:
            config = CLIP_PRESETS["vit-h-14"]
        try:
            with torch.device("meta"):
                model = cls(**config)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: {err}") from None
        if path.is_dir():
            load_hf_weights(model, path, dtype=dtype, device=device)
        else:
            load_official_weights(model, path, dtype=dtype, device=device)
        leftover = [name for name, t in model.state_dict(keep_vars=True).items() if t.is_meta]
        assert not leftover, f"tensors left on the meta device: {leftover}"
        return model.eval()


# --------------------------------------------------------------------------------------------------
# Loading. Entries are (file name, key in the file, module name or None to skip, shape in our layout).


def _check_with_last_block(model: CLIPVision, entries: list[tuple[str, str, str | None, list[int]]], where: str):
    """check_entries for the module, plus the same check of the unbuilt last block against a
    meta-built block: the file must hold it exactly, though it is not loaded. Returns the last
    block's name prefix."""
    last = f"transformer.{model.num_layers - 1}."
    main = [e for e in entries if e[2] is None or not e[2].startswith(last)]
    tail = [e for e in entries if e[2] is not None and e[2].startswith(last)]
    cfg = model.config
    holder = nn.Module()  # names the block transformer.<num_layers - 1>, as in the file
    with torch.device("meta"):
        block = AttentionBlock(cfg["width"], cfg["mlp_dim"], cfg["num_heads"], cfg["eps"])
    holder.transformer = nn.Module()
    holder.transformer.add_module(str(model.num_layers - 1), block)
    problems = []
    for module, part, label in ((model, main, where), (holder, tail, f"{where} (last block, checked but not loaded)")):
        try:
            check_entries(module, part, label)
        except ValueError as err:
            problems.append(str(err))
    if problems:
        raise ValueError("\n".join(problems))
    return last


def official_to_module_key(key: str) -> str | None:
    """An official checkpoint key -> our name; None for the tensors the vision features do not use."""
    if key == "log_scale" or key.startswith("textual."):
        return None
    name = key.removeprefix("visual.")
    if name == "head" or name.startswith("post_norm."):
        return None
    return name


def load_official_weights(
    model: CLIPVision, path: str | Path, dtype: torch.dtype | None = torch.float32, device: torch.device | str = "cpu"
) -> None:
    path = Path(path)
    state = load_pth(path)  # memory-mapped: the skipped text tower is never read
    entries = [(path.name, k, official_to_module_key(k), list(v.shape)) for k, v in state.items()]
    last = _check_with_last_block(model, entries, str(path))
    for _, key, name, _ in entries:
        if name is not None and not name.startswith(last):
            assign_tensor(model, name, prepare_tensor(state[key], dtype, device))


def read_hf_config(folder: Path) -> dict:
    """config.json of a CLIPVisionModel (or of a CLIPModel, whose vision_config is used) -> our kwargs."""
    path = folder / HF_CONFIG_NAME
    if not path.is_file():
        raise ValueError(f"{folder}: no {HF_CONFIG_NAME}; expected a Hugging Face CLIPVisionModel folder")
    cfg = read_json_object(path)
    if cfg.get("model_type") == "clip" or isinstance(cfg.get("vision_config"), dict):
        cfg = cfg.get("vision_config") or {}
    if cfg.get("model_type", "clip_vision_model") != "clip_vision_model":
        raise ValueError(f"{path}: model_type {cfg['model_type']!r} is not a CLIP vision model")
    problems = []
    if cfg.get("hidden_act", "quick_gelu") != "gelu":  # transformers' default is quick_gelu
        problems.append(f"hidden_act {cfg.get('hidden_act', 'quick_gelu')!r} (the Wan CLIP uses exact 'gelu')")
    if cfg.get("num_channels", 3) != 3:
        problems.append(f"num_channels {cfg['num_channels']} (RGB only)")
    sizes = {}
    for ours, theirs in (("image_size", "image_size"), ("patch_size", "patch_size")):
        value = cfg.get(theirs, 224 if theirs == "image_size" else 32)
        if isinstance(value, (list, tuple)):
            if len(set(value)) != 1:
                problems.append(f"{theirs} {value} is not square")
                continue
            value = value[0]
        sizes[ours] = int(value)
    if problems:
        raise ValueError(f"{path}: unsupported CLIP vision config: " + "; ".join(problems))
    return dict(
        **sizes,
        width=cfg.get("hidden_size", 768),
        mlp_dim=cfg.get("intermediate_size", 3072),
        num_heads=cfg.get("num_attention_heads", 12),
        num_layers=cfg.get("num_hidden_layers", 12),
        eps=cfg.get("layer_norm_eps", 1e-5),
    )


# Hugging Face name (after `vision_model.`) -> ours; q/k/v are handled apart.
_HF_TOP = {
    "embeddings.patch_embedding.weight": "patch_embedding.weight",
    "embeddings.class_embedding": "cls_embedding",
    "embeddings.position_embedding.weight": "pos_embedding",
    "pre_layrnorm.weight": "pre_norm.weight",
    "pre_layrnorm.bias": "pre_norm.bias",
}
_HF_LAYER = {
    "layer_norm1": "norm1",
    "self_attn.out_proj": "attn.proj",
    "layer_norm2": "norm2",
    "mlp.fc1": "mlp.0",
    "mlp.fc2": "mlp.2",
}
_HF_SKIP = re.compile(r"post_layernorm\..*|embeddings\.position_ids|text_model\..*|(text|visual)_projection\..*|logit_scale")  # fmt: skip
_HF_QKV = re.compile(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)")


def hf_to_module_key(key: str) -> str | None:
    """A CLIPVisionModel / CLIPModel key -> our name; None for keys we skip. q/k/v projections map
    to the fused `attn.to_qkv`; unknown keys come back unchanged (then reported as unexpected)."""
    name = key.removeprefix("vision_model.")
    if _HF_SKIP.fullmatch(name):
        return None
    if name in _HF_TOP:
        return _HF_TOP[name]
    match = _HF_QKV.fullmatch(name)
    if match:
        return f"transformer.{match.group(1)}.attn.to_qkv.{match.group(3)}"
    match = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", name)
    if match and match.group(2) in _HF_LAYER:
        return f"transformer.{match.group(1)}.{_HF_LAYER[match.group(2)]}.{match.group(3)}"
    return key


def _hf_shape(name: str, shape: list[int]) -> list[int]:
    """The shape a HF tensor takes in our layout (before q/k/v fusion)."""
    if name == "cls_embedding":
        return [1, 1, *shape]
    if name == "pos_embedding":
        return [1, *shape]
    return list(shape)


def load_hf_weights(
    model: CLIPVision, folder: str | Path, dtype: torch.dtype | None = torch.float32, device: torch.device | str = "cpu"
) -> None:
    folder = Path(folder)
    files = resolve_weight_files(folder, HF_WEIGHTS_NAME)
    headers = {path: read_header(path) for path in files}
    entries, problems = [], []
    qkv: dict[str, dict[str, tuple[Path, str, list[int]]]] = {}  # our to_qkv name -> {q/k/v: (file, key, shape)}
    for path, (header, _) in headers.items():
        for key, info in header.items():
            name = hf_to_module_key(key)
            match = _HF_QKV.fullmatch(key.removeprefix("vision_model."))
            if match:
                part = qkv.setdefault(name, {})
                if match.group(2) in part:
                    problems.append(f"{path.name}: key {key!r} also appears as {part[match.group(2)][1]!r}")
                part[match.group(2)] = (path, key, list(info["shape"]))
            else:
                entries.append((path.name, key, name, _hf_shape(name, info["shape"]) if name else None))
    for name, parts in qkv.items():
        keys = " + ".join(parts[p][1] for p in "qkv" if p in parts)
        if set(parts) != set("qkv"):
            absent = [p + "_proj" for p in "qkv" if p not in parts]
            problems.append(f"{parts[next(iter(parts))][0].name}: {keys!r} present but {', '.join(absent)} missing")
        elif not parts["q"][2] == parts["k"][2] == parts["v"][2]:
            shapes = ", ".join(f"{parts[p][1]!r} {parts[p][2]}" for p in "qkv")
            problems.append(f"{parts['q'][0].name}: q/k/v shapes differ: {shapes}")
        else:
            shape = parts["q"][2]
            entries.append((parts["q"][0].name, keys, name, [3 * shape[0], *shape[1:]]))
    try:
        last = _check_with_last_block(model, entries, str(folder))
    except ValueError as err:
        if not problems:
            raise
        problems.append(str(err))
    if problems:
        raise ValueError(f"cannot load {folder}:\n  " + "\n  ".join(problems))

    def read(path: Path, key: str) -> torch.Tensor:
        header, data_start = headers[path]
        with open(path, "rb") as f:
            return read_tensor(f, header[key], data_start)

    for path, (header, _) in headers.items():
        for key in header:
            name = hf_to_module_key(key)
            if name is None or name.startswith(last) or name in qkv:
                continue
            tensor = read(path, key)
            tensor = tensor.reshape(_hf_shape(name, list(tensor.shape)))  # class / position embeddings
            assign_tensor(model, name, prepare_tensor(tensor, dtype, device))
    for name, parts in qkv.items():
        if not name.startswith(last):
            fused = torch.cat([read(*parts[p][:2]) for p in "qkv"])  # rows [q | k | v], as to_qkv
            assign_tensor(model, name, prepare_tensor(fused, dtype, device))
