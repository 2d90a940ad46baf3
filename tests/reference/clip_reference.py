"""Test helpers: transformers' CLIPVisionModel as an independent reference for our CLIPVision, and
files in the official open-clip layout written from it."""

import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from wan.modules.clip import CLIPVision


def hf_config(cfg: dict) -> CLIPVisionConfig:
    """Our CLIPVision kwargs -> a CLIPVisionConfig of the same tower (exact GELU, not quick_gelu)."""
    return CLIPVisionConfig(
        hidden_size=cfg["width"], intermediate_size=cfg["mlp_dim"], num_hidden_layers=cfg["num_layers"],
        num_attention_heads=cfg["num_heads"], image_size=cfg["image_size"], patch_size=cfg["patch_size"],
        hidden_act="gelu", layer_norm_eps=cfg["eps"], projection_dim=cfg["width"],
    )  # fmt: skip


@torch.no_grad()
def randomize(module: torch.nn.Module, seed: int) -> None:
    """Random values for every parameter, norm gains and biases included, so that a swapped or
    misnamed tensor changes the output (default inits leave norms at 1 and biases at 0)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        if name.endswith("bias"):
            p.copy_(0.1 * noise)
        elif "norm" in name:  # LayerNorm gains
            p.copy_(1 + 0.1 * noise)
        elif "embedding" in name:  # class / position embeddings
            p.copy_(noise * 0.5)
        else:
            p.copy_(noise / p[0].numel() ** 0.5)


def build_hf(cfg: dict, seed: int = 0) -> CLIPVisionModel:
    """A random CLIPVisionModel with eager attention (not SDPA, which our attention() uses)."""
    config = hf_config(cfg)
    config._attn_implementation = "eager"
    model = CLIPVisionModel(config).eval()
    randomize(model, seed)
    return model


def _hf_layer_to_official(rest: str) -> str:
    table = {"layer_norm1": "norm1", "layer_norm2": "norm2", "self_attn.out_proj": "attn.proj", "mlp.fc1": "mlp.0",
             "mlp.fc2": "mlp.2"}  # fmt: skip
    module, _, leaf = rest.rpartition(".")
    return f"{table[module]}.{leaf}"


def official_state(hf: CLIPVisionModel, extras: bool = True) -> dict[str, torch.Tensor]:
    """The HF weights as the official open-clip checkpoint holds them: `visual.*` with fused to_qkv,
    all num_layers blocks, post_norm and head; with extras, also a few `textual.*` tensors and
    `log_scale`, which a vision loader must skip. Written out by hand, independently of wan/."""
    sd = {k.removeprefix("vision_model."): v.clone() for k, v in hf.state_dict().items()}
    width = sd["embeddings.class_embedding"].shape[0]
    out = {
        "visual.patch_embedding.weight": sd["embeddings.patch_embedding.weight"],
        "visual.cls_embedding": sd["embeddings.class_embedding"].view(1, 1, width),
        "visual.pos_embedding": sd["embeddings.position_embedding.weight"].unsqueeze(0),
        "visual.pre_norm.weight": sd["pre_layrnorm.weight"],
        "visual.pre_norm.bias": sd["pre_layrnorm.bias"],
    }
    n_layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers."))
    for i in range(n_layers):
        pre = f"encoder.layers.{i}."
        for leaf in ("weight", "bias"):
            out[f"visual.transformer.{i}.attn.to_qkv.{leaf}"] = torch.cat(
                [sd[f"{pre}self_attn.{p}_proj.{leaf}"] for p in "qkv"]
            )
        for k, v in sd.items():
            if k.startswith(pre) and "_proj" not in k.replace("out_proj", ""):
                out[f"visual.transformer.{i}.{_hf_layer_to_official(k[len(pre) :])}"] = v
    out["visual.post_norm.weight"] = sd["post_layernorm.weight"]
    out["visual.post_norm.bias"] = sd["post_layernorm.bias"]
    out["visual.head"] = torch.randn(width, 16)
    if extras:
        out["textual.token_embedding.weight"] = torch.randn(50, 8)
        out["textual.blocks.0.attn.q.weight"] = torch.randn(8, 8)
        out["textual.head.0.weight"] = torch.randn(12, 8)
        out["log_scale"] = torch.tensor(2.6592)
    return out


def ours_from_hf(cfg: dict, hf: CLIPVisionModel) -> CLIPVision:
    """Our model with the HF weights, copied by the name mapping of official_state (last block dropped)."""
    ours = CLIPVision(**cfg).eval()
    last = f"transformer.{cfg['num_layers'] - 1}."
    state = {
        k.removeprefix("visual."): v
        for k, v in official_state(hf, extras=False).items()
        if k.startswith("visual.") and not k.startswith(("visual.post_norm.", "visual.head", "visual." + last))
    }
    ours.load_state_dict(state, strict=True)
    return ours


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()
