"""Analytic FLOP count of a DiT training step, and the accelerators' peak throughput for MFU.

Counted from the real shapes of each step (buckets differ from step to step): matmul FLOPs only, 2 per
multiply-add; norms, RoPE, modulation, softmax and other elementwise work are left out (a few percent
at Wan's widths). A forward pass is

    patch embedding       S x (in_dim x pt x ph x pw) x D           (Conv3d as a matmul)
    time embedding        freq_dim x D + D x D + D x 6D             (per sample)
    text embedding        L x (text_dim x D + D x D)                (L = text_len: padded, no mask)
    image embedding       257 x (1280 x 1280 + 1280 x D)            (i2v only)
    per block
      self-attention      4 S D^2 (q, k, v, o)  +  2 S^2 D (scores, weighted sum)
      cross-attention     2 S D^2 (q, o)  +  2 L D^2 (k, v on the text)  +  2 S L D
      image cross-attn    2 x 257 x D^2 (k_img, v_img)  +  2 S 257 D    (i2v only)
      feed-forward        2 S D ffn_dim
    head                  S x D x (pt ph pw out_dim)

(each product x 2 FLOPs, x batch), with S = f h w / (pt ph pw) video tokens. Training is forward x 3
(backward computes the input and the weight gradients, each a forward's worth), the convention of
MFU (PaLM, Megatron): **model FLOPs exclude recomputation**, so MFU does not rise by recomputing more.
The recompute of activation checkpointing is counted apart (`StepFlops.recompute`; hardware FLOPs =
model + recompute): "full" recomputes the forward of each checkpointed block, "selective" recomputes
it without the attention products (their outputs are kept), and "selective" with
`save_matmuls` recomputes no matmul at all (only elementwise work, not counted). The same holds in
compiled blocks, where the selective checkpoint is traced with the block (measured in
tests/unit/test_selective_compile.py).
"""

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the FLOP count reads the policy's fields only: importing it would import torch
    from wan.modules.checkpointing import ActivationCheckpointing

CLIP_TOKENS = 257  # open-clip ViT-H/14 tokens of the i2v image condition
CLIP_DIM = 1280


@dataclass(frozen=True)
class StepFlops:
    """FLOPs of one training micro-batch (forward + backward)."""

    model: float
    """Forward x 3, without recomputation: what MFU divides."""
    recompute: float
    """The extra forward work of activation checkpointing (hardware FLOPs = model + recompute)."""
    forward: float
    """One forward pass."""


def tokens(config: dict, latent_shape: tuple[int, int, int]) -> int:
    """Video tokens of one sample: latent (frames, height, width) divided by the patch size."""
    pt, ph, pw = config.get("patch_size", (1, 2, 2))
    f, h, w = latent_shape
    return (f // pt) * (h // ph) * (w // pw)


def forward_breakdown(config: dict, batch: int, latent_shape: tuple[int, int, int]) -> dict[str, float]:
    """Matmul FLOPs of one forward pass by part: embed, text, time, image, blocks_linear,
    blocks_attention (the S^2 and S x L products), head. `config` holds WanModel's keyword arguments;
    latent_shape is the DiT input's (frames, height, width)."""
    d, ffn, layers = config["dim"], config["ffn_dim"], config["num_layers"]
    text_len = config.get("text_len", 512)
    patch = math.prod(config.get("patch_size", (1, 2, 2)))
    s = tokens(config, latent_shape)
    image_dim = config.get("image_dim", CLIP_DIM)
    # CLIP tokens: a Wan2.1 i2v model's (Wan2.2's I2V-A14B has image_dim None: no image branch).
    with_image = config.get("model_type", "t2v") == "i2v" and image_dim is not None
    img = CLIP_TOKENS if with_image else 0
    linear = 4 * s * d * d + 2 * s * d * d + 2 * text_len * d * d + 2 * img * d * d + 2 * s * d * ffn
    attention = 2 * s * s * d + 2 * s * text_len * d + 2 * s * img * d
    out = {
        "embed": s * config["in_dim"] * patch * d,
        "text": text_len * (config["text_dim"] * d + d * d),
        "time": config.get("freq_dim", 256) * d + d * d + 6 * d * d,
        "image": img * (image_dim * image_dim + image_dim * d) if with_image else 0,
        "blocks_linear": layers * linear,
        "blocks_attention": layers * attention,
        "head": s * d * patch * config["out_dim"],
    }
    return {k: 2.0 * batch * v for k, v in out.items()}


def forward_flops(config: dict, batch: int, latent_shape: tuple[int, int, int]) -> float:
    """Matmul FLOPs of one forward pass (2 per multiply-add)."""
    return sum(forward_breakdown(config, batch, latent_shape).values())


def step_flops(
    config: dict,
    batch: int,
    latent_shape: tuple[int, int, int],
    checkpointing: "ActivationCheckpointing | None" = None,
) -> StepFlops:
    """Model FLOPs (forward x 3) and recompute FLOPs of one micro-batch of `batch` samples under
    `checkpointing` (None: none)."""
    parts = forward_breakdown(config, batch, latent_shape)
    forward = sum(parts.values())
    layers = config["num_layers"]
    recompute = 0.0
    if checkpointing is not None and layers:
        if checkpointing.mode == "full":
            per_block = parts["blocks_linear"] + parts["blocks_attention"]
        elif checkpointing.mode == "selective":
            per_block = 0.0 if checkpointing.save_matmuls else parts["blocks_linear"]
        else:
            per_block = 0.0
        recompute = checkpointing.count(layers) / layers * per_block
    return StepFlops(model=3.0 * forward, recompute=recompute, forward=forward)


def micro_batch_flops(config: dict, x0_shape: tuple[int, ...], model_cfg=None) -> StepFlops:
    """step_flops for a latent batch x0 [B, C, F, H, W] under a [model] section's checkpoint_policy
    (None: no checkpointing)."""
    b, _, f, h, w = x0_shape
    return step_flops(config, b, (f, h, w), model_cfg.checkpoint_policy if model_cfg is not None else None)


# Dense (no structured sparsity) bf16 tensor-core peaks in TFLOP/s, FP32 accumulate, at boost clock,
# from the vendors' datasheets: NVIDIA H100 / H200 datasheets (SXM 989.4, PCIe 756, NVL 835), A100
# datasheet (312, SXM and PCIe), L40S datasheet (362.05), L40 (181), L4 (121), A10 (125), A40 (149.7),
# RTX A6000 (154.8) and GeForce RTX 4090 / RTX 6000 Ada (Ada whitepaper, FP16/BF16 with FP32
# accumulate: 165.2 / 364.2), RTX 3090 (Ampere GA102 whitepaper: 71), B200 (HGX B200: 2250), AMD MI300X
# (1307.4) and MI250X (383). Looked up in order: the first pattern found in the device name wins.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    (r"GH200", 989.4),
    (r"H200 NVL", 835.0),
    (r"H200", 989.4),
    (r"H100 PCIe", 756.0),
    (r"H100 NVL", 835.0),
    (r"H100", 989.4),
    (r"H800 PCIe", 756.0),
    (r"H800", 989.4),
    (r"B200", 2250.0),
    (r"A100", 312.0),
    (r"A800", 312.0),
    (r"L40S", 362.05),
    (r"L40", 181.0),
    (r"\bL4\b", 121.0),
    (r"RTX 6000 Ada", 364.2),
    (r"A6000", 154.8),
    (r"RTX 4090", 165.2),
    (r"RTX 3090", 71.0),
    (r"\bA40\b", 149.7),
    (r"\bA10G?\b", 125.0),
    (r"MI300X", 1307.4),
    (r"MI250X", 383.0),
)


def peak_tflops(device_name: str | None, override: float = 0.0) -> float | None:
    """The dense bf16 peak of one accelerator in TFLOP/s: `override` when > 0 ([logging] peak_tflops),
    else looked up by the device's name (torch.cuda.get_device_name); None for a CPU or an unknown
    name (MFU is then not reported, TFLOP/s is)."""
    if override > 0:
        return float(override)
    if not device_name:
        return None
    for pattern, peak in PEAK_BF16_TFLOPS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return peak
    return None


def device_peak_tflops(device, override: float = 0.0) -> float | None:
    """peak_tflops for a torch device: its CUDA name, None on the CPU (unless overridden)."""
    import torch

    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" and torch.cuda.is_available() else None
    return peak_tflops(name, override)
