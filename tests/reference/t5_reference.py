"""Test helpers: transformers' UMT5EncoderModel as an independent reference for our umT5 encoder."""

import torch
from transformers import UMT5Config, UMT5EncoderModel

from wan.modules.t5 import UMT5Encoder, hf_to_official_key

# Tiny, but with every size distinct (dim != dim_attn != dim_ffn) so that a transposed or swapped
# tensor fails to load, and 40 tokens > 16 buckets' exact range so that log-spaced buckets are used.
TINY = dict(vocab=768, dim=48, dim_attn=64, dim_ffn=80, num_heads=4, num_layers=3, num_buckets=32)


def hf_config(cfg: dict) -> UMT5Config:
    """Our keyword arguments -> the matching UMT5Config (gated GELU-tanh = 'gated-gelu')."""
    return UMT5Config(
        vocab_size=cfg["vocab"], d_model=cfg["dim"], d_kv=cfg["dim_attn"] // cfg["num_heads"], d_ff=cfg["dim_ffn"],
        num_heads=cfg["num_heads"], num_layers=cfg["num_layers"], relative_attention_num_buckets=cfg["num_buckets"],
        relative_attention_max_distance=cfg.get("max_distance", 128), feed_forward_proj="gated-gelu",
        layer_norm_epsilon=1e-6, dropout_rate=0.0,
    )  # fmt: skip


@torch.no_grad()
def randomize(module: torch.nn.Module, seed: int) -> None:
    """Random values for every parameter, norm gains and position biases included, so that a
    swapped or misnamed tensor changes the output (default inits leave norms at 1)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        if p.ndim == 1:  # norm gains
            p.copy_(1 + 0.2 * noise)
        elif "relative_attention_bias" in name or "pos_embedding" in name:
            p.copy_(noise)  # order-1 biases: clearly visible in the softmax
        elif "shared" in name or "token_embedding" in name:
            p.copy_(noise)
        else:
            p.copy_(noise / p.shape[1] ** 0.5)


def build_pair(cfg: dict, seed: int = 0) -> tuple[UMT5EncoderModel, UMT5Encoder]:
    """A random HF encoder and ours holding the same weights (copied by name mapping)."""
    torch.manual_seed(seed)
    ref = UMT5EncoderModel(hf_config(cfg)).eval()
    randomize(ref, seed)
    ours = UMT5Encoder(**cfg).eval()
    state = {}
    for key, value in ref.state_dict().items():
        name = hf_to_official_key(key)
        if name is not None:
            state[name] = value
    ours.load_state_dict(state, strict=True)
    return ref, ours


def reference_forward(ref: UMT5EncoderModel, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return ref(input_ids=ids, attention_mask=mask).last_hidden_state


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()
