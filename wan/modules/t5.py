"""The umT5-XXL text encoder of Wan2.1 (encoder only).

Parameter names are the keys of the official `models_t5_umt5-xxl-enc-bf16.pth`, so that file loads
strictly; a Hugging Face `UMT5EncoderModel` folder loads too, by name mapping.

Architecture (umT5): token embedding, then blocks of pre-norm self-attention and pre-norm gated
GELU-tanh feed-forward, then a final norm. Every block has its own relative position bias (32
buckets, bidirectional, log-spaced up to distance 128). No biases anywhere, no 1/sqrt(d) score
scaling, T5 RMS LayerNorm (no mean subtraction) with eps 1e-6.

Precision: the residual stream, every norm and the attention bias stay float32; the matmuls run in
the weights' dtype (bf16 weights: bf16 autocast, as the reference runs the encoder in bf16). The
reference keeps a bf16 residual stream with bf16 weights; ours is float32, which differs from it at
bf16 rounding level only and needs no fp16 overflow clamp.

Shapes: B batch, L tokens, D model width (dim), H heads, E head width (dim_attn / H).
"""

import math
import re
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from wan.modules.precision import autocast_for_weights
from wan.modules.safetensors_io import load_into_module, read_header, resolve_weight_files
from wan.modules.state_dict_io import load_pth, load_state_dict_into, read_json_object

OFFICIAL_WEIGHTS_NAME = "models_t5_umt5-xxl-enc-bf16.pth"
HF_WEIGHTS_NAME = "model.safetensors"
HF_CONFIG_NAME = "config.json"

T5_PRESETS: dict[str, dict] = {
    "umt5-xxl": dict(vocab=256384, dim=4096, dim_attn=4096, dim_ffn=10240, num_heads=64, num_layers=24, num_buckets=32),
    # Tiny: width 64 is the debug DiT's text_dim; vocab 768 is wan/assets/debug_spm.model's size.
    "debug": dict(vocab=768, dim=64, dim_attn=64, dim_ffn=128, num_heads=4, num_layers=2, num_buckets=32),
}


def relative_position_bucket(rel_pos: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """Bidirectional T5 buckets of rel_pos = key position - query position.

    Half the buckets are for keys after the query. In each half, distances below half of it get
    one bucket each; larger distances share log-spaced buckets up to max_distance, beyond which
    everything falls into the last bucket.
    """
    half = num_buckets // 2
    buckets = (rel_pos > 0).long() * half
    dist = rel_pos.abs()
    max_exact = half // 2
    # log(0) at dist 0 gives -inf here, but torch.where picks the exact bucket there.
    large = (
        max_exact
        + (torch.log(dist.float() / max_exact) / math.log(max_distance / max_exact) * (half - max_exact)).long()
    )
    large = large.clamp(max=half - 1)
    return buckets + torch.where(dist < max_exact, dist, large)


class T5LayerNorm(nn.Module):
    """T5's RMS norm (scale only, no mean subtraction), in float32 whatever the input and weight
    dtypes; returns float32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps)


class T5RelativeEmbedding(nn.Module):
    """One layer's relative position bias: a learned [num_buckets, H] table."""

    def __init__(self, num_buckets: int, num_heads: int):
        super().__init__()
        self.embedding = nn.Embedding(num_buckets, num_heads)

    def forward(self, buckets: torch.Tensor) -> torch.Tensor:
        """buckets [L, L] -> bias [1, H, L, L] in float32."""
        return F.embedding(buckets, self.embedding.weight.float()).permute(2, 0, 1).unsqueeze(0)


class T5Attention(nn.Module):
    def __init__(self, dim: int, dim_attn: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim_attn, bias=False)
        self.k = nn.Linear(dim, dim_attn, bias=False)
        self.v = nn.Linear(dim, dim_attn, bias=False)
        self.o = nn.Linear(dim_attn, dim, bias=False)

    def forward(self, x: torch.Tensor, pos_bias: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        """x [B, L, D], pos_bias [1, H, L, L] float32, key_mask [B, 1, 1, L] bool (True = a real
        token) or None when every key is real -> [B, L, D]."""
        q, k, v = (layer(x).unflatten(-1, (self.num_heads, -1)).transpose(1, 2) for layer in (self.q, self.k, self.v))
        bias = pos_bias.to(q.dtype)
        if key_mask is not None:
            # finfo.min of the score dtype, not -inf: a row whose keys are all padding stays finite.
            bias = bias.masked_fill(~key_mask, torch.finfo(q.dtype).min)  # [B, H, L, L]
        # T5 does not scale scores by 1/sqrt(E): its initialisation absorbs that.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)  # [B, H, L, E]
        return self.o(out.transpose(1, 2).flatten(2))


class T5FeedForward(nn.Module):
    """fc2(fc1(x) * gelu_tanh(gate(x))); `gate` is a Sequential so its key is `gate.0.weight`."""

    def __init__(self, dim: int, dim_ffn: int):
        super().__init__()
        self.gate = nn.Sequential(nn.Linear(dim, dim_ffn, bias=False), nn.GELU(approximate="tanh"))
        self.fc1 = nn.Linear(dim, dim_ffn, bias=False)
        self.fc2 = nn.Linear(dim_ffn, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x) * self.gate(x))


class T5SelfAttentionBlock(nn.Module):
    def __init__(self, dim: int, dim_attn: int, dim_ffn: int, num_heads: int, num_buckets: int, eps: float):
        super().__init__()
        self.norm1 = T5LayerNorm(dim, eps)
        self.attn = T5Attention(dim, dim_attn, num_heads)
        self.norm2 = T5LayerNorm(dim, eps)
        self.ffn = T5FeedForward(dim, dim_ffn)
        self.pos_embedding = T5RelativeEmbedding(num_buckets, num_heads)  # per layer: umT5, not T5

    def forward(self, x: torch.Tensor, buckets: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        """x [B, L, D] float32 residual stream; key_mask [B, 1, 1, L] bool (True = a real token) or
        None when every key is real."""
        x = x + self.attn(self.norm1(x), self.pos_embedding(buckets), key_mask).float()
        return x + self.ffn(self.norm2(x)).float()


class UMT5Encoder(nn.Module):
    """The umT5 encoder. Keyword names follow the official constructor (T5Encoder)."""

    def __init__(
        self,
        *,
        vocab: int = 256384,
        dim: int = 4096,
        dim_attn: int = 4096,
        dim_ffn: int = 10240,
        num_heads: int = 64,
        num_layers: int = 24,
        num_buckets: int = 32,
        max_distance: int = 128,
        eps: float = 1e-6,
    ):
        super().__init__()
        problems = []
        if dim_attn % num_heads:
            problems.append(f"dim_attn {dim_attn} is not divisible by num_heads {num_heads}")
        if num_buckets % 4 or num_buckets < 4:
            problems.append(
                f"num_buckets must be a positive multiple of 4 (bidirectional T5 buckets), got {num_buckets}"
            )
        if max_distance <= num_buckets // 4:
            problems.append(f"max_distance {max_distance} must exceed num_buckets / 4 = {num_buckets // 4}")
        if problems:
            raise ValueError("invalid UMT5Encoder config: " + "; ".join(problems))
        self.config = dict(
            vocab=vocab, dim=dim, dim_attn=dim_attn, dim_ffn=dim_ffn, num_heads=num_heads, num_layers=num_layers,
            num_buckets=num_buckets, max_distance=max_distance, eps=eps,
        )  # fmt: skip
        self.dim = dim
        self.num_buckets = num_buckets
        self.max_distance = max_distance

        self.token_embedding = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(
            T5SelfAttentionBlock(dim, dim_attn, dim_ffn, num_heads, num_buckets, eps) for _ in range(num_layers)
        )
        self.norm = T5LayerNorm(dim, eps)
        if not self.token_embedding.weight.is_meta:  # on meta there is nothing to initialise
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """The reference initialisation (normal with fan-based stds, norms at one)."""
        cfg = self.config
        nn.init.normal_(self.token_embedding.weight, std=1.0)
        for block in self.blocks:
            attn, ffn = block.attn, block.ffn
            nn.init.normal_(attn.q.weight, std=(cfg["dim"] * cfg["dim_attn"]) ** -0.5)
            nn.init.normal_(attn.k.weight, std=cfg["dim"] ** -0.5)
            nn.init.normal_(attn.v.weight, std=cfg["dim"] ** -0.5)
            nn.init.normal_(attn.o.weight, std=(cfg["num_heads"] * cfg["dim_attn"]) ** -0.5)
            nn.init.normal_(ffn.gate[0].weight, std=cfg["dim"] ** -0.5)
            nn.init.normal_(ffn.fc1.weight, std=cfg["dim"] ** -0.5)
            nn.init.normal_(ffn.fc2.weight, std=cfg["dim_ffn"] ** -0.5)
            nn.init.normal_(
                block.pos_embedding.embedding.weight, std=(2 * cfg["num_buckets"] * cfg["num_heads"]) ** -0.5
            )
            nn.init.ones_(block.norm1.weight)
            nn.init.ones_(block.norm2.weight)
        nn.init.ones_(self.norm.weight)

    # ----------------------------------------------------------------------------------------------
    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """ids [B, L] token ids, mask [B, L] (1 = token, 0 = padding; None = no padding).
        Returns [B, L, dim] float32, zero wherever mask is 0."""
        if ids.ndim != 2:
            raise ValueError(f"ids must be [B, L], got shape {list(ids.shape)}")
        if mask is None:
            mask = torch.ones_like(ids)
        elif mask.shape != ids.shape:
            raise ValueError(f"mask shape {list(mask.shape)} differs from ids shape {list(ids.shape)}")
        vocab = self.token_embedding.num_embeddings
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
            raise ValueError(f"token ids must lie in [0, {vocab}), got [{int(ids.min())}, {int(ids.max())}]")
        # bf16 weights: matmuls in bf16 as the reference runs them (it casts the whole encoder).
        with autocast_for_weights(ids.device.type, self.token_embedding.weight.dtype):
            return self._forward(ids, mask)

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, length = ids.shape
        valid = mask != 0  # [B, L]
        # Drop the columns past the last real token of the whole batch: they are padding keys that
        # every query masks, and padding queries whose output is zeroed. Relative positions do not
        # change, so real tokens get the same result at a fraction of the cost (captions are
        # ~100 of the 512 tokens).
        used = valid.any(dim=0).nonzero()
        n = int(used.max()) + 1 if used.numel() else 0
        if n == 0:
            return torch.zeros(b, length, self.dim, device=ids.device, dtype=torch.float32)
        ids, valid = ids[:, :n], valid[:, :n]

        pos = torch.arange(n, device=ids.device)
        buckets = relative_position_bucket(pos[None, :] - pos[:, None], self.num_buckets, self.max_distance)
        key_mask = None if bool(valid.all()) else valid[:, None, None, :]  # [B, 1, 1, n]

        x = self.token_embedding(ids).float()  # [B, n, D] float32 residual stream
        for block in self.blocks:
            x = block(x, buckets, key_mask)
        x = self.norm(x).masked_fill(~valid.unsqueeze(-1), 0.0)  # [B, n, D] float32
        return x if n == length else F.pad(x, (0, 0, 0, length - n))  # zero rows back to L

    # ----------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        dtype: torch.dtype | None = None,
        device: torch.device | str = "cpu",
    ) -> "UMT5Encoder":
        """Load the official encoder file (`models_t5_umt5-xxl-enc-bf16.pth`, or a Wan release folder
        holding it) or a Hugging Face UMT5EncoderModel / UMT5 folder (config.json with
        model.safetensors or shards and model.safetensors.index.json; decoder and lm_head tensors
        of a full UMT5 model are skipped).

        Builds on the meta device and loads tensor by tensor (strict), so memory holds one copy.
        dtype=None keeps the file's dtype (bf16 for the release: no fp32 copy). The sizes of a .pth
        are read from its tensor shapes. Returns the encoder in eval mode with requires_grad off, as
        Wan uses it frozen; call requires_grad_(True) to fine-tune. Bad files raise ValueError
        naming the file and the offending keys."""
        path = Path(path)
        if path.is_dir() and not (path / HF_CONFIG_NAME).is_file() and (path / OFFICIAL_WEIGHTS_NAME).is_file():
            path = path / OFFICIAL_WEIGHTS_NAME  # a Wan release folder
        if path.is_dir():
            folder, cfg = read_hf_folder(path)
            files = resolve_weight_files(folder, HF_WEIGHTS_NAME)
            keys = {key for f in files for key in read_header(f)[0]}
            model = _build_on_meta(cls, cfg, folder / HF_CONFIG_NAME)
            load_into_module(model, files, hf_renamer(keys), dtype=dtype, device=device)
        elif path.is_file():
            state = load_pth(path)
            model = _build_on_meta(cls, config_from_state_dict(state), path)
            load_state_dict_into(model, state, path, dtype=dtype, device=device)
        else:
            raise ValueError(f"{path}: no such file or folder (expected {OFFICIAL_WEIGHTS_NAME} or an HF UMT5 folder)")
        leftover = [name for name, t in model.state_dict(keep_vars=True).items() if t.is_meta]
        assert not leftover, f"tensors left on the meta device: {leftover}"
        return model.eval().requires_grad_(False)


def _build_on_meta(cls: type, cfg: dict, source: Path) -> UMT5Encoder:
    try:
        with torch.device("meta"):
            return cls(**cfg)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{source}: {err}") from None


def config_from_state_dict(state: dict[str, torch.Tensor]) -> dict:
    """UMT5Encoder keyword arguments read from the shapes of an official state dict. Sizes that
    cannot be read (keys missing) keep the umt5-xxl values; the strict load then names the keys."""
    cfg = dict(T5_PRESETS["umt5-xxl"])
    shape = {k: list(v.shape) for k, v in state.items()}
    if len(shape.get("token_embedding.weight", [])) == 2:
        cfg["vocab"], cfg["dim"] = shape["token_embedding.weight"]
    if len(shape.get("blocks.0.attn.q.weight", [])) == 2:
        cfg["dim_attn"] = shape["blocks.0.attn.q.weight"][0]
    if len(shape.get("blocks.0.ffn.fc1.weight", [])) == 2:
        cfg["dim_ffn"] = shape["blocks.0.ffn.fc1.weight"][0]
    if len(shape.get("blocks.0.pos_embedding.embedding.weight", [])) == 2:
        cfg["num_buckets"], cfg["num_heads"] = shape["blocks.0.pos_embedding.embedding.weight"]
    layers = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    if layers:
        cfg["num_layers"] = max(layers) + 1
    return cfg


# --------------------------------------------------------------------------------------------------
# Hugging Face UMT5 folders

_HF_BLOCK = {
    "layer.0.layer_norm.weight": "norm1.weight",
    "layer.0.SelfAttention.q.weight": "attn.q.weight",
    "layer.0.SelfAttention.k.weight": "attn.k.weight",
    "layer.0.SelfAttention.v.weight": "attn.v.weight",
    "layer.0.SelfAttention.o.weight": "attn.o.weight",
    "layer.0.SelfAttention.relative_attention_bias.weight": "pos_embedding.embedding.weight",
    "layer.1.layer_norm.weight": "norm2.weight",
    "layer.1.DenseReluDense.wi_0.weight": "ffn.gate.0.weight",  # the GELU branch
    "layer.1.DenseReluDense.wi_1.weight": "ffn.fc1.weight",  # the linear branch
    "layer.1.DenseReluDense.wo.weight": "ffn.fc2.weight",
}


def hf_to_official_key(key: str) -> str | None:
    """An HF UMT5 key -> the official key; None for tensors the encoder does not use (decoder,
    lm_head). Unknown keys come back unchanged (the loader then reports them as unexpected)."""
    if key in ("shared.weight", "encoder.embed_tokens.weight"):
        return "token_embedding.weight"
    if key == "encoder.final_layer_norm.weight":
        return "norm.weight"
    if key.startswith(("decoder.", "lm_head.")):
        return None
    match = re.fullmatch(r"encoder\.block\.(\d+)\.(.+)", key)
    if match and match.group(2) in _HF_BLOCK:
        return f"blocks.{match.group(1)}.{_HF_BLOCK[match.group(2)]}"
    return key


def hf_renamer(keys: set[str]):
    """hf_to_official_key, except that the tied embedding is read once when a file stores both
    `shared.weight` and `encoder.embed_tokens.weight`."""

    def rename(key: str) -> str | None:
        if key == "encoder.embed_tokens.weight" and "shared.weight" in keys:
            return None
        return hf_to_official_key(key)

    return rename


def hf_config_to_kwargs(cfg: dict, source: Path) -> dict:
    """An HF UMT5Config dict -> UMT5Encoder keyword arguments; refuses configs of other models."""
    problems = []
    if cfg.get("model_type") != "umt5":
        problems.append(
            f"model_type {cfg.get('model_type')!r} is not 'umt5' (T5 and mT5 share one position bias across "
            "layers; umT5 has one per layer)"
        )
    if cfg.get("feed_forward_proj", "gated-gelu") != "gated-gelu":
        problems.append(f"feed_forward_proj {cfg['feed_forward_proj']!r} (umT5 uses 'gated-gelu', GELU-tanh)")
    missing = [k for k in ("vocab_size", "d_model", "d_kv", "d_ff", "num_heads", "num_layers") if k not in cfg]
    if missing:
        problems.append("missing fields " + ", ".join(missing))
    if problems:
        raise ValueError(f"{source}: not a umT5 encoder config: " + "; ".join(problems))
    return dict(
        vocab=cfg["vocab_size"], dim=cfg["d_model"], dim_attn=cfg["num_heads"] * cfg["d_kv"], dim_ffn=cfg["d_ff"],
        num_heads=cfg["num_heads"], num_layers=cfg["num_layers"],
        num_buckets=cfg.get("relative_attention_num_buckets", 32),
        max_distance=cfg.get("relative_attention_max_distance", 128), eps=cfg.get("layer_norm_epsilon", 1e-6),
    )  # fmt: skip


def read_hf_folder(folder: Path) -> tuple[Path, dict]:
    """-> (folder, UMT5Encoder keyword arguments) for an HF UMT5 folder; also accepts a pipeline
    folder with the encoder in text_encoder/."""
    if not (folder / HF_CONFIG_NAME).is_file() and (folder / "text_encoder" / HF_CONFIG_NAME).is_file():
        folder = folder / "text_encoder"
    path = folder / HF_CONFIG_NAME
    if not path.is_file():
        raise ValueError(f"{folder}: neither {OFFICIAL_WEIGHTS_NAME} nor an HF UMT5 folder ({HF_CONFIG_NAME})")
    cfg = read_json_object(path)
    return folder, hf_config_to_kwargs(cfg, path)
