"""The one attention function every Wan attention layer calls.

Keeping it in one place means a faster kernel (flash-attn 3, a sequence-parallel all-to-all) is
swapped in here and nowhere else.
"""

import torch
import torch.nn.functional as F


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Full (unmasked) multi-head attention.

    q: [B, Sq, H, D], k and v: [B, Sk, H, D] -> [B, Sq, H * D].

    Runs in the autocast dtype when autocast is on (the reference runs attention in bf16 even though
    RoPE hands it float32 q and k), else in v's dtype.
    """
    device_type = q.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = v.dtype
    # SDPA wants heads before the sequence: [B, H, S, D].
    q, k, v = (t.to(dtype).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).flatten(2)
