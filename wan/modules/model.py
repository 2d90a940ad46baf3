"""The Wan2.1 / Wan2.2 diffusion transformer (DiT).

Parameter names are the official checkpoint keys, so a release folder loads with strict=True.
Precision follows the reference: weights may be fp32 or bf16, matmuls run in the autocast dtype,
and the time embedding, the modulation sums, every residual update (the residual stream stays
float32), all norms and the head run in float32.

Wan2.2 uses the same network: the A14B experts are Wan2.1 14B DiTs (I2V-A14B without the CLIP
image branch: `image_dim=None`), TI2V-5B a t2v-shaped DiT on 48 latent channels whose timestep may
differ per token (the first latent frame of an image-conditioned video is at t = 0).

Shapes: B batch, C channels, F/H/W latent frames/height/width, S = f*h*w tokens after patchify,
L text tokens (text_len), D model width (dim), T the rows of the time embedding: 1 (one timestep a
sample) or S (one a token).
"""

import dataclasses
import functools
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from wan.modules import dit_weights
from wan.modules.attention import attention
from wan.modules.checkpointing import ActivationCheckpointing, checkpoint_block, saved_activation_bytes
from wan.modules.precision import autocast_for_weights

ROPE_MAX_POSITIONS = 1024  # positions per axis in the reference RoPE tables
CLIP_DIM = 1280  # width of the I2V image features (open-clip ViT-H/14)
RELEASE_TOKENS = 21 * 30 * 52  # 81 frames of 480x832: 32,760 tokens
# t2v: text only; i2v: y (mask + first-frame latents) concatenated to the input channels, and with
# image_dim the CLIP image branch (Wan2.1; Wan2.2's I2V-A14B has none); ti2v (Wan2.2 TI2V-5B): a t2v
# network whose first latent frame may be an image's latent, at timestep 0 (per-token timesteps).
MODEL_TYPES = ("t2v", "i2v", "ti2v")


def has_image_branch(config: dict) -> bool:
    """Whether a DiT of `config` (WanModel keyword arguments) takes CLIP features: a Wan2.1 i2v model."""
    return config.get("model_type", "t2v") == "i2v" and config.get("image_dim", CLIP_DIM) is not None


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Timesteps [N] -> [N, dim] as [cos, sin], computed in float64 as the reference does."""
    half = dim // 2
    t = t.to(torch.float64)
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = torch.outer(t, freqs)
    return torch.cat([angles.cos(), angles.sin()], dim=1).float()


def rope_axis_pairs(head_dim: int) -> tuple[int, int, int]:
    """How many of the head_dim/2 rotation pairs go to the frame, height and width axes."""
    pairs = head_dim // 2
    return pairs - 2 * (pairs // 3), pairs // 3, pairs // 3


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved feature pairs (2i, 2i+1) of x [B, S, H, D] by the angles behind cos/sin
    [S, 1, D/2]. Returns float32."""
    real, imag = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack([real * cos - imag * sin, real * sin + imag * cos], dim=-1).flatten(-2)


class RotaryEmbedding(nn.Module):
    """3D RoPE tables: cos and sin [1024, head_dim/2], float32 computed from float64 angles.

    Real tables, not complex ones: a complex buffer loses its imaginary part when a module is cast.
    They are also rebuilt after every `.to()` / `to_empty()` (see `_apply`), so neither a cast to
    bf16 nor a meta-device construction leaves them rounded or empty.
    """

    def __init__(self, head_dim: int):
        super().__init__()
        self.head_dim = head_dim
        self.axis_pairs = rope_axis_pairs(head_dim)
        self.register_buffer("cos", torch.empty(ROPE_MAX_POSITIONS, head_dim // 2), persistent=False)
        self.register_buffer("sin", torch.empty(ROPE_MAX_POSITIONS, head_dim // 2), persistent=False)
        self.reset_tables()

    @torch.no_grad()
    def reset_tables(self, device: torch.device | str | None = None) -> None:
        device = self.cos.device if device is None else torch.device(device)
        if device.type == "meta":  # nothing to compute; tables are rebuilt when materialised
            self.cos = torch.empty(ROPE_MAX_POSITIONS, self.head_dim // 2, device=device)
            self.sin = torch.empty(ROPE_MAX_POSITIONS, self.head_dim // 2, device=device)
            return
        pos = torch.arange(ROPE_MAX_POSITIONS, dtype=torch.float64, device=device)
        angles = []
        for pairs in self.axis_pairs:
            width = 2 * pairs
            inv_freq = 10000.0 ** (-torch.arange(0, width, 2, dtype=torch.float64, device=device) / width)
            angles.append(torch.outer(pos, inv_freq))
        angle = torch.cat(angles, dim=1)
        self.cos = angle.cos().float()
        self.sin = angle.sin().float()

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.reset_tables()
        return self

    def forward(self, grid: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Tables for a (f, h, w) token grid in (f, h, w) order: cos, sin [S, 1, head_dim/2]."""
        f, h, w = grid
        if max(grid) > ROPE_MAX_POSITIONS:
            raise ValueError(f"token grid {grid} exceeds the {ROPE_MAX_POSITIONS} RoPE positions per axis")
        out = []
        for table in (self.cos, self.sin):
            t_part, h_part, w_part = table.split(self.axis_pairs, dim=1)
            full = torch.cat(
                [
                    t_part[:f].view(f, 1, 1, -1).expand(f, h, w, -1),
                    h_part[:h].view(1, h, 1, -1).expand(f, h, w, -1),
                    w_part[:w].view(1, 1, w, -1).expand(f, h, w, -1),
                ],
                dim=-1,
            )
            out.append(full.reshape(f * h * w, 1, -1))
        return out[0], out[1]


class WanRMSNorm(nn.Module):
    """RMSNorm over the last dim, in float32 whatever the input and weight dtypes."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps)


class WanLayerNorm(nn.LayerNorm):
    """LayerNorm in float32 (autocast off), whatever the input and weight dtypes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        with torch.autocast(x.device.type, enabled=False):
            return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps)


def fp32_linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """A Linear in float32 even with bf16 weights or autocast on."""
    with torch.autocast(x.device.type, enabled=False):
        return F.linear(x.float(), layer.weight.float(), layer.bias.float())


def fp32_mlp(layers: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """A Linear/activation stack in float32 even with bf16 weights or autocast on."""
    for layer in layers:
        x = fp32_linear(layer, x) if isinstance(layer, nn.Linear) else layer(x.float())
    return x


class WanSelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        # q/k RMSNorm spans all heads at once (weight [dim]), as in the release.
        self.norm_q = WanRMSNorm(dim, eps)
        self.norm_k = WanRMSNorm(dim, eps)
        # A wan.modules.ulysses.SequenceParallel when this rank holds 1/N of the tokens (self-attention
        # only: WanModel.set_sequence_parallel); None runs on every token here.
        self.sequence_parallel = None

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.num_heads, -1))  # [B, S, D] -> [B, S, H, D/H]

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, ...]) -> torch.Tensor:
        # Projections, the full-width q/k norms and RoPE act on each token alone: local under Ulysses.
        q = apply_rope(self.heads(self.norm_q(self.q(x))), rope[0], rope[1])
        k = apply_rope(self.heads(self.norm_k(self.k(x))), rope[0], rope[1])
        v = self.heads(self.v(x))
        sp = self.sequence_parallel
        if sp is None:
            return self.o(attention(q, k, v))
        # [B, S/N, H, d] -> [B, S, H/N, d]: every real token (rope[2] is [S, 0]: see shard) for this
        # rank's heads, then back.
        n = rope[2].shape[0]
        out = attention(sp.to_heads(q, n), sp.to_heads(k, n), sp.to_heads(v, n))  # [B, S, H/N * d]
        return self.o(sp.to_tokens(out.unflatten(-1, (q.shape[2] // sp.size, -1))).flatten(2))


class WanCrossAttention(WanSelfAttention):
    """Attention from video tokens to the text tokens (all text_len rows, padding included, no mask)
    and, for i2v, separately to the CLIP image tokens; the two results are summed before `o`."""

    def __init__(self, dim: int, num_heads: int, eps: float, with_image: bool):
        super().__init__(dim, num_heads, eps)
        if with_image:
            self.k_img = nn.Linear(dim, dim)
            self.v_img = nn.Linear(dim, dim)
            self.norm_k_img = WanRMSNorm(dim, eps)
        self.with_image = with_image

    def forward(self, x: torch.Tensor, context: torch.Tensor, image_context: torch.Tensor | None) -> torch.Tensor:
        q = self.heads(self.norm_q(self.q(x)))
        k = self.heads(self.norm_k(self.k(context)))
        out = attention(q, k, self.heads(self.v(context)))
        if self.with_image:
            k_img = self.heads(self.norm_k_img(self.k_img(image_context)))
            out = out + attention(q, k_img, self.heads(self.v_img(image_context)))
        return self.o(out)


class WanAttentionBlock(nn.Module):
    def __init__(self, dim: int, ffn_dim: int, num_heads: int, eps: float, with_image: bool):
        super().__init__()
        self.norm1 = WanLayerNorm(dim, eps, elementwise_affine=False)
        self.self_attn = WanSelfAttention(dim, num_heads, eps)
        self.norm3 = WanLayerNorm(dim, eps, elementwise_affine=True)
        self.cross_attn = WanCrossAttention(dim, num_heads, eps, with_image)
        self.norm2 = WanLayerNorm(dim, eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim))
        self.modulation = nn.Parameter(torch.empty(1, 6, dim))
        # Set by WanModel.set_gradient_checkpointing: selective checkpointing runs inside this call.
        self.selective_checkpoint = False
        self.checkpoint_save_matmuls = False

    def forward(
        self,
        x: torch.Tensor,  # [B, S, D] float32 residual stream
        e0: torch.Tensor,  # [B, 6, D] float32 time projection, or [B, S, 6, D] with per-token timesteps
        context: torch.Tensor,  # [B, L, D]
        image_context: torch.Tensor | None,  # [B, 257, D] for i2v
        rope: tuple[torch.Tensor, ...],  # cos, sin [S, 1, d/2] (and under sequence parallel [S, 0])
    ) -> torch.Tensor:
        if self.selective_checkpoint and torch.is_grad_enabled():
            # Inside the module call, so the policy sees this block's ops only: not an engine's hooks
            # (ZeRO-3 fetches parameters in them), and in a compiled block the traced ops, not the
            # compiled kernels (wan/modules/checkpointing.py).
            return checkpoint_block(
                self._forward, x, e0, context, image_context, rope,
                mode="selective", save_matmuls=self.checkpoint_save_matmuls,
            )  # fmt: skip
        return self._forward(x, e0, context, image_context, rope)

    def _forward(self, x, e0, context, image_context, rope):
        if e0.ndim == 3:
            mods = (self.modulation.float() + e0).chunk(6, dim=1)  # 6 x [B, 1, D]
        else:  # per-token timesteps
            mods = [m.squeeze(2) for m in (self.modulation.float() + e0).chunk(6, dim=2)]  # 6 x [B, S, D]
        shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = mods
        y = self.self_attn(self.norm1(x) * (1 + scale_sa) + shift_sa, rope)
        x = x + y.float() * gate_sa
        x = x + self.cross_attn(self.norm3(x), context, image_context).float()
        y = self.ffn(self.norm2(x) * (1 + scale_ff) + shift_ff)
        return x + y.float() * gate_ff


class Head(nn.Module):
    def __init__(self, dim: int, out_dim: int, patch_size: tuple[int, int, int], eps: float):
        super().__init__()
        self.norm = WanLayerNorm(dim, eps, elementwise_affine=False)
        self.head = nn.Linear(dim, math.prod(patch_size) * out_dim)
        self.modulation = nn.Parameter(torch.empty(1, 2, dim))

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        # The head modulates with e (the time embedding [B, D] or [B, S, D]), not with e0.
        shift, scale = (self.modulation.float() + e.unsqueeze(-2)).chunk(2, dim=-2)
        if e.ndim == 3:  # per-token timesteps: [B, S, 1, D] -> [B, S, D]
            shift, scale = shift.squeeze(-2), scale.squeeze(-2)
        return fp32_linear(self.head, self.norm(x) * (1 + scale) + shift)


class MLPProj(nn.Module):
    """CLIP image features [B, 257, image_dim] -> image context tokens [B, 257, D] (i2v only)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.proj = nn.Sequential(
            WanLayerNorm(in_dim, eps=1e-5),
            nn.Linear(in_dim, in_dim),
            nn.GELU(),
            nn.Linear(in_dim, out_dim),
            WanLayerNorm(out_dim, eps=1e-5),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class WanModel(nn.Module):
    """The Wan DiT. Keyword names are the official config.json names, plus image_dim: the CLIP
    feature width of an i2v model's image branch, None for an i2v model without one (Wan2.2)."""

    def __init__(
        self,
        *,
        model_type: str = "t2v",
        patch_size: tuple[int, int, int] = (1, 2, 2),
        text_len: int = 512,
        in_dim: int = 16,
        dim: int = 2048,
        ffn_dim: int = 8192,
        freq_dim: int = 256,
        text_dim: int = 4096,
        out_dim: int = 16,
        num_heads: int = 16,
        num_layers: int = 32,
        eps: float = 1e-6,
        image_dim: int | None = CLIP_DIM,
    ):
        super().__init__()
        patch_size = tuple(int(p) for p in patch_size)
        problems = []
        if model_type not in MODEL_TYPES:
            problems.append(f"model_type must be one of {', '.join(MODEL_TYPES)}, got {model_type!r}")
        if len(patch_size) != 3:
            problems.append(f"patch_size must have 3 entries (t, h, w), got {patch_size}")
        if dim % num_heads:
            problems.append(f"dim {dim} is not divisible by num_heads {num_heads}")
        elif (dim // num_heads) % 2 or dim // num_heads < 6:
            problems.append(f"head_dim {dim // num_heads} must be even and >= 6 for 3D RoPE")
        if freq_dim % 2:
            problems.append(f"freq_dim must be even, got {freq_dim}")
        if problems:
            raise ValueError("invalid WanModel config: " + "; ".join(problems))

        self.config = dict(
            model_type=model_type, patch_size=list(patch_size), text_len=text_len, in_dim=in_dim, dim=dim,
            ffn_dim=ffn_dim, freq_dim=freq_dim, text_dim=text_dim, out_dim=out_dim, num_heads=num_heads,
            num_layers=num_layers, eps=eps,
        )  # fmt: skip
        if image_dim != CLIP_DIM:  # not an official field: written for tiny test models and Wan2.2 i2v
            self.config["image_dim"] = image_dim
        with_image = model_type == "i2v" and image_dim is not None
        self.image_dim = image_dim if with_image else None  # None: no CLIP input
        self.model_type = model_type
        self.patch_size = patch_size
        self.text_len = text_len
        self.in_dim = in_dim
        self.dim = dim
        self.freq_dim = freq_dim
        self.out_dim = out_dim

        self.patch_embedding = nn.Conv3d(in_dim, dim, kernel_size=patch_size, stride=patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, dim * 6))
        self.blocks = nn.ModuleList(
            WanAttentionBlock(dim, ffn_dim, num_heads, eps, with_image) for _ in range(num_layers)
        )
        self.head = Head(dim, out_dim, patch_size, eps)
        if with_image:
            self.img_emb = MLPProj(image_dim, dim)
        self.rope = RotaryEmbedding(dim // num_heads)

        self.checkpointed_blocks: set[int] = set()
        self.checkpoint_policy = ActivationCheckpointing()
        self.sequence_parallel = None  # see set_sequence_parallel
        # On the meta device there is nothing to initialise (and init ops there cost a one-time
        # ~75 MB import of torch's decompositions): call init_weights() after to_empty().
        if not self.patch_embedding.weight.is_meta:
            self.init_weights()

    # ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialise every parameter as the reference does; also what follows a meta-device
        construction and `to_empty()`."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.LayerNorm, WanRMSNorm)) and m.weight is not None:
                nn.init.ones_(m.weight)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embedding.weight.flatten(1))
        nn.init.zeros_(self.patch_embedding.bias)
        for layers in (self.text_embedding, self.time_embedding):
            for m in layers:
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=0.02)
        # Zero head: a model trained from scratch starts by predicting zero velocity.
        nn.init.zeros_(self.head.head.weight)
        for block in self.blocks:
            block.modulation.copy_(torch.randn_like(block.modulation) / self.dim**0.5)
        self.head.modulation.copy_(torch.randn_like(self.head.modulation) / self.dim**0.5)
        self.rope.reset_tables()

    def set_gradient_checkpointing(
        self, mode: ActivationCheckpointing | str | bool = "full", every: int = 1, save_matmuls: bool = False
    ) -> None:
        """Recompute block activations in backward (wan/modules/checkpointing.py), as an
        ActivationCheckpointing or its fields. mode "full" (or True) keeps each checkpointed block's
        inputs only; "selective" also keeps the attention kernels' outputs (with save_matmuls the
        mm/addmm outputs too) and recomputes the rest; "none" (or False) turns it off. With every=k only
        blocks 0, k, 2k, ... are checkpointed: a trade between memory and the ~1/3 extra compute of full
        checkpointing."""
        if isinstance(mode, ActivationCheckpointing):
            if (every, save_matmuls) != (1, False):
                raise TypeError("set_gradient_checkpointing: every and save_matmuls go in the policy, not beside it")
            policy = mode
        else:
            policy = ActivationCheckpointing(mode, every, save_matmuls)
        self.checkpoint_policy = policy
        self.checkpointed_blocks = set(policy.checkpointed_blocks(len(self.blocks)))
        for i, block in enumerate(self.blocks):
            block.selective_checkpoint = policy.mode == "selective" and i in self.checkpointed_blocks
            block.checkpoint_save_matmuls = policy.save_matmuls

    def set_sequence_parallel(self, sp) -> None:
        """Run each forward on this rank's share of the tokens (`sp`: a wan.modules.ulysses.
        SequenceParallel, whose group must run the same inputs), or on all of them (None). Every rank
        of the group returns the whole output."""
        if sp is not None:
            sp.check_heads(self.blocks[0].self_attn.num_heads if len(self.blocks) else 1)
        self.sequence_parallel = sp
        for block in self.blocks:
            block.self_attn.sequence_parallel = sp

    @property
    def gradient_checkpointing_settings(self) -> dict:
        """set_gradient_checkpointing's arguments as last set (to copy them onto another build)."""
        return dataclasses.asdict(self.checkpoint_policy)

    # ----------------------------------------------------------------------------------------------
    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        clip_fea: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [B, in_dim - C_y, F, H, W] latents; t timesteps in [0, 1000): [B], or [B, S] one per token
        (S = the tokens after patchify, in (f, h, w) order: Wan2.2 TI2V); context
        [B, L <= text_len, text_dim]; y [B, C_y, F, H, W] for i2v, and clip_fea [B, 257, image_dim]
        when the model has an image branch (image_dim, Wan2.1 i2v).
        Returns the velocity prediction [B, out_dim, F, H, W] in float32."""
        with autocast_for_weights(x.device.type, self.patch_embedding.weight.dtype):
            return self._forward(x, t, context, clip_fea, y)

    def _forward(self, x, t, context, clip_fea, y):
        with_image = self.image_dim is not None
        if self.model_type == "i2v" and (y is None or (with_image and clip_fea is None)):
            need = "clip_fea [B, 257, 1280] and y" if with_image else "y"
            raise ValueError(f"an i2v WanModel needs {need} (mask + first-frame latents)")
        if not with_image and clip_fea is not None:
            raise ValueError(f"clip_fea was given to a {self.model_type} WanModel without an image embedding (img_emb)")
        if clip_fea is not None and (clip_fea.ndim != 3 or clip_fea.shape[-1] != self.image_dim):
            raise ValueError(f"clip_fea must be [B, 257, {self.image_dim}], got {list(clip_fea.shape)}")
        if y is not None:
            x = torch.cat([x, y], dim=1)
        b, c, f, h, w = x.shape
        if c != self.in_dim:
            raise ValueError(f"WanModel expects {self.in_dim} input channels (x and y together), got {c}")
        pt, ph, pw = self.patch_size
        if f % pt or h % ph or w % pw:
            raise ValueError(f"latent size (F={f}, H={h}, W={w}) is not divisible by patch_size {self.patch_size}")
        if context.shape[1] > self.text_len:
            raise ValueError(f"context has {context.shape[1]} tokens, more than text_len={self.text_len}")
        grid = (f // pt, h // ph, w // pw)
        num_tokens = math.prod(grid)
        if t.ndim == 2 and tuple(t.shape) != (b, num_tokens):
            raise ValueError(f"per-token timesteps must be [B, S] = [{b}, {num_tokens}], got {list(t.shape)}")
        if t.ndim > 2 or (t.ndim < 2 and t.numel() not in (1, b)):
            raise ValueError(f"timesteps must be [B] = [{b}] or per token [B, S], got {list(t.shape)}")

        # The residual stream is float32 from here to the head.
        x = self.patch_embedding(x).flatten(2).transpose(1, 2).float().contiguous()  # [B, S, D]

        # Zero rows to text_len: cross-attention sees all rows without a mask, as in the release.
        if context.shape[1] < self.text_len:  # F.pad copies even when there is nothing to pad
            context = F.pad(context, (0, 0, 0, self.text_len - context.shape[1]))
        context = self.text_embedding(context)  # [B, L, D]
        image_context = self.img_emb(clip_fea) if with_image else None  # [B, 257, D]

        rope = self.rope(grid)
        sp = self.sequence_parallel
        if sp is not None:  # this rank's share of the tokens from here to the head: [B, S_pad/N, D]
            x, rope = sp.shard(x, rope)
            if t.ndim == 2:
                t = sp.shard_rows(t)  # [B, S_pad/N]: this rank's tokens' timesteps

        # One embedding row per timestep: e [B, D] and e0 [B, 6, D], or per token [B, S, D], [B, S, 6, D].
        rows = t.shape[1:] if t.ndim == 2 else ()
        t = t.reshape(-1).expand(b) if t.ndim < 2 else t.reshape(-1)
        e = fp32_mlp(self.time_embedding, sinusoidal_embedding(t, self.freq_dim)).view(b, *rows, self.dim)
        e0 = fp32_mlp(self.time_projection, e).unflatten(-1, (6, self.dim))
        grad_on = torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            if grad_on and i in self.checkpointed_blocks and self.checkpoint_policy.mode == "full":
                x = checkpoint_block(block, x, e0, context, image_context, rope, mode="full")
            else:  # a selective block checkpoints inside its call
                x = block(x, e0, context, image_context, rope)

        x = self.head(x, e)  # [B, S, pt*ph*pw*out_dim], float32
        if sp is not None:
            x = sp.gather(x, num_tokens)
        return self.unpatchify(x, grid)

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """[B, S, pt*ph*pw*C] with C fastest -> [B, C, F, H, W]."""
        f, h, w = grid
        pt, ph, pw = self.patch_size
        x = x.view(x.shape[0], f, h, w, pt, ph, pw, self.out_dim)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(x.shape[0], self.out_dim, f * pt, h * ph, w * pw)

    # ----------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        folder: str | Path,
        dtype: torch.dtype | None = torch.float32,
        device: torch.device | str = "cpu",
    ) -> "WanModel":
        """Load an official release folder (config.json + diffusion_pytorch_model*.safetensors) or a
        diffusers folder (WanTransformer3DModel, or a pipeline folder with transformer/).

        Builds on the meta device and loads tensor by tensor, so host memory holds one copy of the
        model. dtype=None keeps the dtype stored in the files."""
        return dit_weights.load_dit(cls, folder, dtype=dtype, device=device)

    def save_pretrained(
        self, folder: str | Path, max_shard_size: int | str = "10GB", dtype: torch.dtype | None = None
    ) -> None:
        """Write the official layout: config.json and safetensors, sharded with an index when larger
        than max_shard_size."""
        dit_weights.save_dit(self, folder, max_shard_size=max_shard_size, dtype=dtype)

    def compile_blocks(self, dynamic_tokens: bool = True, **options) -> None:
        """torch.compile each transformer block in place (`block.compile`, torchtitan's recipe): the
        module tree, parameter names and state dicts stay the official ones, and an engine may wrap the
        blocks afterwards (DDP, fully_shard). `options` go to torch.compile.

        dynamic_tokens: one graph serves every token count S and every micro-batch above 1 (a
        micro-batch of 1 is its own graph: dynamo always specialises sizes of 1), instead of one graph
        per shape. A block sees the latent only as S (x [B, S, D], the RoPE tables [S, 1, D/2]; the
        grid's ints stay in WanModel.forward), and bucketed training draws hundreds of token counts
        (the 14B configs' options: 184), each a compile of minutes at 14B. False: one graph per shape.

        The float32 norm + modulation, RoPE and the gated residual updates are left to the compiler:
        inductor fuses those elementwise chains (and the casts between bf16 and float32) into a few
        kernels, so the model keeps no hand-fused versions of them."""
        for block in self.blocks:
            block.compile(**options)
            if dynamic_tokens:
                # The marks must be on the inputs before dynamo sees the frame (a mark traced inside
                # the compiled region raises), so they wrap the compiled call, which any caller
                # (WanModel.forward, checkpoint_block's recompute) goes through.
                block._compiled_call_impl = functools.partial(_mark_dynamic_tokens, block._compiled_call_impl)


def _mark_dynamic_tokens(compiled, x, e0, context, image_context, rope):
    """Call a compiled block with its batch and token dimensions marked dynamic. maybe_mark_dynamic:
    a dimension the compiler must specialise (a kernel's shape check) costs a graph per value, as
    without the marks, rather than an error."""
    e0_dims = [0, 1] if e0.ndim == 4 else 0  # per-token timesteps: e0 [B, S, 6, D]
    for tensor, dims in ((x, [0, 1]), (e0, e0_dims), (context, 0), (image_context, 0), *((t, 0) for t in rope)):
        if tensor is not None:
            torch._dynamo.maybe_mark_dynamic(tensor, dims)
    return compiled(x, e0, context, image_context, rope)


# ----------------------------------------------------------------------------------------------------
# What a block keeps for backward: here rather than in wan/modules/checkpointing.py because it builds a
# WanAttentionBlock, and that module must not import this one (this one imports it).


def saved_bytes_per_block(
    config: dict,
    mode: str | bool = "full",
    save_matmuls: bool = False,
    tokens: int = RELEASE_TOKENS,
    dtype: torch.dtype = torch.bfloat16,
    batch: int = 1,
    per_token: bool = False,
) -> int:
    """Exact bytes one DiT block of `config` (WanModel keyword arguments) keeps for backward for
    `batch` samples of `tokens` video tokens (and text_len text tokens), under `mode`, with float32
    weights and `dtype` autocast (float32: none), as the trainer runs it; per_token: with a timestep
    per token (Wan2.2 TI2V), so the block's modulation is per token too.

    Runs one block on fake tensors (shapes only, no memory, no compute; the CPU's kernels' output
    shapes: SDPA is flash_attention_for_cpu, which keeps the output and a float32 logsumexp, as the
    CUDA flash/cuDNN kernels do). Counts as `saved_activation_bytes`: the block's input x (the
    previous block's output), the text k/v and, under autocast, the bf16 weight copies included."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    dim, heads, text_len = config["dim"], config["num_heads"], config.get("text_len", 512)
    with_image = has_image_branch(config)
    with FakeTensorMode(), torch.device("cpu"):
        block = WanAttentionBlock(dim, config["ffn_dim"], heads, config.get("eps", 1e-6), with_image)
        block.train()
        x = torch.empty(batch, tokens, dim, requires_grad=True)
        e0 = (
            torch.empty(batch, tokens, 6, dim, requires_grad=True)
            if per_token
            else torch.empty(batch, 6, dim, requires_grad=True)
        )
        context = torch.empty(batch, text_len, dim, requires_grad=True)
        image_context = torch.empty(batch, 257, dim, requires_grad=True) if with_image else None
        half = dim // heads // 2
        rope = (torch.empty(tokens, 1, half), torch.empty(tokens, 1, half))
        autocast_dtype = None if dtype == torch.float32 else dtype
        return saved_activation_bytes(block, (x, e0, context, image_context, rope), mode, save_matmuls, autocast_dtype)


def saved_bytes_per_token_per_block(
    config: dict,
    mode: str | bool = "full",
    save_matmuls: bool = False,
    tokens: int = RELEASE_TOKENS,
    dtype: torch.dtype = torch.bfloat16,
) -> int:
    """`saved_bytes_per_block` for one sample of `tokens` tokens, divided by tokens, rounded up: the
    per-token cost with the block's fixed part (text k/v, autocast weight copies) spread over tokens."""
    return math.ceil(saved_bytes_per_block(config, mode, save_matmuls, tokens, dtype) / tokens)
