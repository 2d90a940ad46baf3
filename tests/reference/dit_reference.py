"""Test helpers: diffusers' WanTransformer3DModel as an independent reference for our DiT."""

import torch
from diffusers import WanTransformer3DModel

from wan import WanModel
from wan.modules.dit_weights import diffusers_to_official_key


def diffusers_kwargs(cfg: dict) -> dict:
    """Our (official) config -> WanTransformer3DModel keyword arguments."""
    head_dim = cfg["dim"] // cfg["num_heads"]
    i2v = cfg["model_type"] == "i2v" and cfg.get("image_dim", 1280) is not None  # with a CLIP branch
    return dict(
        patch_size=tuple(cfg["patch_size"]), num_attention_heads=cfg["num_heads"], attention_head_dim=head_dim,
        in_channels=cfg["in_dim"], out_channels=cfg["out_dim"], text_dim=cfg["text_dim"], freq_dim=cfg["freq_dim"],
        ffn_dim=cfg["ffn_dim"], num_layers=cfg["num_layers"], cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        eps=cfg["eps"], image_dim=cfg.get("image_dim", 1280) if i2v else None, added_kv_proj_dim=cfg["dim"] if i2v else None,
    )  # fmt: skip


@torch.no_grad()
def randomize(module: torch.nn.Module, seed: int) -> None:
    """Give every parameter random values, norms and biases included, so that a swapped or
    misnamed tensor changes the output (default inits leave norms at 1 and many biases at 0)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        if name.endswith("bias"):
            p.copy_(0.1 * noise)
        elif p.ndim == 1:  # norm weights
            p.copy_(1 + 0.1 * noise)
        elif "scale_shift_table" in name or "modulation" in name:
            p.copy_(noise / p.shape[-1] ** 0.5)
        else:
            fan_in = p[0].numel()
            p.copy_(noise / fan_in**0.5)


def build_pair(cfg: dict, seed: int = 0) -> tuple[WanTransformer3DModel, WanModel]:
    """A random diffusers model and our model holding the same weights (copied by name mapping)."""
    torch.manual_seed(seed)
    ref = WanTransformer3DModel(**diffusers_kwargs(cfg)).eval()
    randomize(ref, seed)
    ours = WanModel(**cfg).eval()
    state = {diffusers_to_official_key(k): v for k, v in ref.state_dict().items()}
    ours.load_state_dict(state, strict=True)
    return ref, ours


def reference_forward(ref: WanTransformer3DModel, x, t, context, text_len, clip_fea=None, y=None):
    """The diffusers call that matches WanModel.forward: the diffusers pipeline pads text to
    text_len itself, and takes i2v conditioning pre-concatenated on channels."""
    context = torch.nn.functional.pad(context, (0, 0, 0, text_len - context.shape[1]))
    if y is not None:
        x = torch.cat([x, y], dim=1)
    return ref(x, t.float(), context, encoder_hidden_states_image=clip_fea, return_dict=False)[0]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()
