"""LoRA: a trainable low-rank update on chosen nn.Linear layers of the DiT's blocks.

    y = W x + b + (alpha / r) * B (A dropout(x))      A [r, in], B [out, r]; B starts at zero

The adapted layer keeps its class's parameters and names (`blocks.0.self_attn.q.weight`), and gains two
bias-free Linear children: `blocks.0.self_attn.q.lora_A.weight` [r, in] and `.lora_B.weight` [out, r].
So the base weights load, shard and merge by their official names everywhere, and the adapter's names
are the ComfyUI / diffusers file layout less its `diffusion_model.` prefix (tools/export_lora.py).

Why not peft (which VideoX-Fun uses): importing it imports accelerate (measured: peft 0.21.2 pulls it
in, 3.4 s), and its wrapper renames every base weight to `...q.base_layer.weight`, which every loader,
engine and merger here would have to map back. The layer is a dozen lines.
"""

import hashlib
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file

LORA_INITS = ("kaiming", "gaussian")
"""How A starts (B starts at zero, so the adapted model equals the base at step 0): "kaiming" is
peft's default (uniform in +-1/sqrt(in_features), kaiming_uniform_ with a = sqrt(5)); "gaussian" is
peft's init_lora_weights="gaussian" (normal with std 1/r)."""
ADAPTER_PARTS = ("lora_A", "lora_B")
BLOCKS_PREFIX = "blocks."


@dataclass(frozen=True)
class LoRASpec:
    rank: int
    alpha: float
    targets: tuple[str, ...]
    """Module-name suffixes: a Linear of a block is adapted when its name ends with ".<suffix>"
    ("q" adapts self_attn.q and cross_attn.q; "ffn.0" the first FFN layer)."""
    dropout: float = 0.0
    init: str = "kaiming"
    skip: tuple[str, ...] = ()
    """Substrings: a layer whose name holds one gets no adapter (VideoX-Fun's lora_skip_name)."""

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LoRALinear(nn.Linear):
    """nn.Linear with an adapter; built by turning an existing Linear into one (apply_lora), so its
    weight and bias stay the very same parameters."""

    lora_A: nn.Linear
    lora_B: nn.Linear

    def add_adapter(self, spec: LoRASpec) -> None:
        # On the base weight's device when that is meta (the engines materialise later); elsewhere (inside
        # deepspeed.zero.Init) the construction context places and partitions them.
        device = self.weight.device if self.weight.is_meta else None
        self.lora_A = nn.Linear(self.in_features, spec.rank, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(spec.rank, self.out_features, bias=False, device=device, dtype=torch.float32)
        self.lora_dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()
        self.lora_scale = spec.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.lora_scale

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, lora_rank={self.lora_A.out_features}, lora_scale={self.lora_scale:g}"


def lora_targets(model: nn.Module, targets: Iterable[str], skip: Iterable[str] = ()) -> list[str]:
    """Names of the Linear layers of `model`'s blocks that end with one of the suffixes and hold none of
    the `skip` substrings."""
    suffixes = tuple(f".{t.strip()}" for t in targets if t.strip())
    skip = tuple(s for s in skip if s)
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.startswith(BLOCKS_PREFIX) and name.endswith(suffixes)
        and not any(s in name for s in skip)
    ]  # fmt: skip


def apply_lora(model: nn.Module, spec: LoRASpec) -> list[str]:
    """Give each targeted Linear of the blocks an adapter (float32, initialised later by the engine from
    lora_initial_tensor). Returns the adapted modules' names; none is an error."""
    names = lora_targets(model, spec.targets, spec.skip)
    if not names:
        linears = sorted({n.split(".", 2)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)
                          and n.startswith(BLOCKS_PREFIX)})  # fmt: skip
        raise ValueError(
            f"[lora] target_name {','.join(spec.targets)!r} matches no Linear layer of the DiT's blocks "
            + (f"outside lora_skip_name {','.join(spec.skip)!r} " if spec.skip else "")
            + f"(their names end with: {', '.join(linears)})"
        )
    for name in names:
        module = model.get_submodule(name)
        module.__class__ = LoRALinear
        module.add_adapter(spec)
    return names


def adapter_names(model: nn.Module) -> list[str]:
    """The parameter names of every adapter in `model` (lora_A then lora_B of each adapted layer)."""
    return [n for n, _ in model.named_parameters() if is_adapter_name(n)]


def is_adapter_name(name: str) -> bool:
    return name.endswith((".lora_A.weight", ".lora_B.weight"))


def lora_initial_tensor(name: str, shape: tuple[int, ...], spec: LoRASpec, seed: int) -> torch.Tensor:
    """The starting value of adapter parameter `name` (float32, CPU): B zero; A drawn from a generator
    seeded by (seed, name), so every engine and rank count starts from the same adapter."""
    if name.endswith(".lora_B.weight"):
        return torch.zeros(shape)
    digest = hashlib.sha256(f"lora {seed} {name}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    if spec.init == "gaussian":
        return torch.randn(shape, generator=generator) / spec.rank
    bound = 1 / math.sqrt(shape[1])  # kaiming_uniform_(a=sqrt(5)) on [r, in]
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def lora_delta(down: torch.Tensor, up: torch.Tensor, scale: float) -> torch.Tensor:
    """The weight update an adapter stands for, in float32: scale * B @ A, [out, in]."""
    return scale * (up.float() @ down.float())


FILE_PREFIX = "diffusion_model."


def lora_file_tensors(adapters: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """The tensors of a LoRA file (ComfyUI / official-trainer layout) from a model's adapter parameters
    by name (`blocks.0.self_attn.q.lora_A.weight`, ...): each under `diffusion_model.`, plus each layer's
    `.alpha` (float32 scalar)."""
    out = {}
    for name in sorted(adapters):
        out[FILE_PREFIX + name] = adapters[name].contiguous()
        if name.endswith(".lora_A.weight"):
            out[f"{FILE_PREFIX}{name.rsplit('.', 2)[0]}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    return out


def read_lora_file(path: str | Path) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """A LoRA .safetensors file in the ComfyUI / official-trainer layout (tools/export_lora.py writes it):
    `[diffusion_model.]<layer>.lora_A.weight` (down), `.lora_B.weight` (up) and optional `.alpha` (absent:
    alpha = rank, scale 1). Returns {layer: (down, up, alpha / rank)}; ValueError naming the file and key
    for anything else."""
    path = Path(path)
    try:
        tensors = load_file(path)
    except (OSError, SafetensorError) as err:
        raise ValueError(f"--lora {path}: not a readable .safetensors file ({err})") from None
    names = {key.removeprefix(FILE_PREFIX): value for key, value in tensors.items()}
    layers = {key.rsplit(".", 2)[0] for key in names if key.endswith(".lora_A.weight")}
    out = {}
    for layer in sorted(layers):
        down, up = names.pop(f"{layer}.lora_A.weight"), names.pop(f"{layer}.lora_B.weight", None)
        if up is None or up.shape[1] != down.shape[0]:
            raise ValueError(
                f"--lora {path}: {layer}.lora_B.weight is missing or does not fit lora_A [{down.shape[0]}, ...]"
            )
        alpha = names.pop(f"{layer}.alpha", None)
        out[layer] = (down, up, (float(alpha) if alpha is not None else down.shape[0]) / down.shape[0])
    if names or not out:
        raise ValueError(
            f"--lora {path}: "
            + (f"keys of no lora_A / lora_B / alpha layout: {sorted(names)[:5]}" if names else "no LoRA tensors")
        )
    return out


@torch.no_grad()
def merge_lora_file(model: nn.Module, path: str | Path, strength: float = 1.0) -> int:
    """Fold a LoRA file into `model`'s weights: W += strength x alpha / rank x up @ down (in float32, then
    the weight's dtype). Returns the number of layers merged; a layer the model lacks is an error."""
    params = dict(model.named_parameters())
    adapters = read_lora_file(path)
    for layer, (down, up, scale) in adapters.items():
        weight = params.get(f"{layer}.weight")
        if weight is None or tuple(weight.shape) != (up.shape[0], down.shape[1]):
            raise ValueError(
                f"--lora {path}: {layer} is no layer of this DiT of shape [{up.shape[0]}, {down.shape[1]}]"
            )
        merged = weight.float() + lora_delta(down.to(weight.device), up.to(weight.device), strength * scale)
        weight.copy_(merged.to(weight.dtype))
    return len(adapters)


def merge_adapter_stream(
    stream: Iterable[tuple[str, torch.Tensor]], scale: float
) -> Iterable[tuple[str, torch.Tensor]]:
    """(name, tensor) of a LoRA model's state dict in order, with each adapter folded into its layer's
    weight (float32, W + scale x B @ A) and the adapter tensors left out: the plain DiT's state dict. A
    layer's weight and bias are held back until its lora_A and lora_B (which follow them) arrive."""
    held: list[tuple[str, torch.Tensor]] = []
    parts: dict[str, torch.Tensor] = {}
    for name, tensor in stream:
        if is_adapter_name(name):
            layer, part = name.rsplit(".", 2)[0], name.rsplit(".", 2)[1]
            parts[part] = tensor
            if len(parts) == 2:
                for held_name, held_tensor in held:
                    if held_name == f"{layer}.weight":
                        held_tensor = held_tensor.float() + lora_delta(parts["lora_A"], parts["lora_B"], scale)
                    yield held_name, held_tensor
                held, parts = [], {}
            continue
        if held and name.rsplit(".", 1)[0] != held[0][0].rsplit(".", 1)[0]:
            yield from held  # a layer without an adapter after all
            held = []
        if name.endswith((".weight", ".bias")) and name.startswith(BLOCKS_PREFIX):
            held.append((name, tensor))
        else:
            yield name, tensor
    yield from held
