"""The one attention function every Wan attention layer calls, and the choice of its kernel.

Keeping it in one place means a faster kernel (flash-attn 3, a sequence-parallel all-to-all) is
swapped in here and nowhere else.

The kernel is chosen once at setup, explicitly (`set_attention_backend`), from the config's
`attention_backend` and the device:

    "auto"       CUDA sm90+: FlashAttention-3 when `flash_attn_interface` is importable on sm90, else
                 cuDNN; other CUDA GPUs: flash; CPU: whatever torch picks (its flash-cpu or math kernel)
    "cudnn", "flash", "efficient", "math"   that SDPA kernel alone
    "fa3"        FlashAttention-3 (`flash_attn_interface.flash_attn_func`, Hopper only)

SDPA runs under `torch.nn.attention.sdpa_kernel([kernel])` (which also holds inside torch.compile):
given a single kernel, SDPA raises when that kernel cannot take the call (an odd head_dim, a dtype it
lacks) instead of silently falling back to a slower one, so a torch upgrade or an unusual shape shows
up as an error, not as a slow run. One exception, deliberate: "auto" with float32 inputs on CUDA
(mixed_precision = "fp32": flash, cuDNN and FA3 have no fp32 kernels) uses the memory-efficient
kernel. Before `set_attention_backend` is called (tests, notebooks) SDPA is left to torch's own choice.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

ATTENTION_BACKENDS = ("auto", "cudnn", "flash", "efficient", "math", "fa3")
_SDPA_KERNELS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}


@dataclass(frozen=True)
class _Choice:
    name: str  # the resolved backend ("cudnn", "fa3", ...; "default": torch's own choice)
    kernels: tuple[SDPBackend, ...] | None  # SDPA kernels allowed; None: torch's choice
    fp32_kernels: tuple[SDPBackend, ...] | None  # for float32 inputs (auto on CUDA: efficient; None: as kernels)
    fa3: bool = False


_DEFAULT = _Choice("default", None, None)
_choice = _DEFAULT


def _fa3_func():
    """flash_attn_interface.flash_attn_func, or None when FlashAttention-3 is not installed."""
    try:
        from flash_attn_interface import flash_attn_func
    except ImportError:
        return None
    return flash_attn_func


def device_label(device: torch.device | str) -> str:
    """The device for log lines: "sm90" for a CUDA device of compute capability 9.0, else its type ("cpu")."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(device)
        return f"sm{major}{minor}"
    return device.type


def _problem(name: str, device: torch.device) -> str | None:
    """Why `name` cannot run on `device`, or None when it can."""
    cuda = device.type == "cuda" and torch.cuda.is_available()
    capability = torch.cuda.get_device_capability(device) if cuda else None
    where = f"{device_label(device)}" if cuda else f"the {device.type} device"
    if name == "math":
        return None
    if name == "flash":
        if device.type == "cpu":
            return None  # torch's flash-attention CPU kernel
        if not cuda or not torch.backends.cuda.is_flash_attention_available():
            return f"this torch build has no flash-attention kernel for {where}"
        if capability < (8, 0):
            return f"flash attention needs compute capability 8.0+ (sm80), {where} is older"
        return None
    if not cuda:
        what = {"cudnn": "cuDNN attention", "efficient": "memory-efficient attention", "fa3": "FlashAttention-3"}
        return f"{what[name]} runs on CUDA GPUs only, not on {where} (use 'auto' or 'math')"
    if name == "efficient":
        return None
    if name == "cudnn":
        if not torch.backends.cudnn.is_available():
            return "cuDNN is not available in this torch build"
        if capability < (8, 0):
            return f"cuDNN attention needs compute capability 8.0+ (sm80), {where} is older"
        return None
    if name == "fa3":
        if capability[0] != 9:
            return f"FlashAttention-3 runs on Hopper (sm90) only, {where} is not"
        if _fa3_func() is None:
            return (
                "flash_attn_interface (FlashAttention-3, built from flash-attention's hopper/ folder) is not installed"
            )
        return None
    raise AssertionError(name)


def resolve_attention_backend(name: str, device: torch.device | str) -> str:
    """The backend `name` stands for on `device` ("auto" resolved); ValueError when it cannot run there,
    naming what is missing."""
    device = torch.device(device)
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}, got {name!r}")
    if name == "auto":
        if device.type != "cuda":
            return "default"  # torch picks between its flash-cpu and math kernels
        capability = torch.cuda.get_device_capability(device)
        if capability[0] == 9 and _problem("fa3", device) is None:
            return "fa3"
        if capability >= (9, 0) and _problem("cudnn", device) is None:
            return "cudnn"
        return "flash" if _problem("flash", device) is None else "efficient"
    problem = _problem(name, device)
    if problem is not None:
        raise ValueError(f"attention_backend {name!r} is not available: {problem}")
    return name


def set_attention_backend(name: str, device: torch.device | str) -> str:
    """Choose the attention kernel for the process (call once at setup, before any forward and before
    torch.compile traces: a compiled graph keeps the kernel it was traced with until a guard on this
    choice recompiles it). Returns the resolved name: "cudnn", "flash", "efficient", "math", "fa3", or
    "default" (the CPU's "auto": torch's own choice). Raises ValueError for a backend `device` lacks."""
    global _choice
    device = torch.device(device)
    resolved = resolve_attention_backend(name, device)
    auto_cuda = name == "auto" and device.type == "cuda"
    fp32 = (SDPBackend.EFFICIENT_ATTENTION,) if auto_cuda else None
    if resolved == "default":
        _choice = _DEFAULT
    elif resolved == "fa3":  # explicit "fa3" with float32 inputs: FA3 itself refuses them
        _choice = _Choice("fa3", None, fp32, fa3=True)
    else:
        kernels = (_SDPA_KERNELS[resolved],)
        _choice = _Choice(resolved, kernels, fp32 or kernels)
    return resolved


def attention_backend() -> str:
    """The backend set_attention_backend chose ("default" before it is called)."""
    return _choice.name


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
    choice = _choice
    if choice.fa3 and (dtype != torch.float32 or choice.fp32_kernels is None):
        # FlashAttention-3 takes [B, S, H, D] as is (no transposes); some versions also return the LSE.
        out = _fa3_func()(q.to(dtype), k.to(dtype), v.to(dtype))
        out = out[0] if isinstance(out, tuple) else out
        return out.flatten(2)
    # SDPA wants heads before the sequence: [B, H, S, D].
    q, k, v = (t.to(dtype).transpose(1, 2) for t in (q, k, v))
    kernels = choice.fp32_kernels if dtype == torch.float32 and choice.fp32_kernels else choice.kernels
    if kernels is None:
        out = F.scaled_dot_product_attention(q, k, v)
    else:
        with sdpa_kernel(list(kernels)):
            out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).flatten(2)
