"""The frozen encoders as the trainer calls them: prompts -> DiT context, pixel clips -> latents,
first frames -> I2V conditioning. Everything here runs under no_grad.

`offload=True` (the trainer's `low_vram`) keeps an encoder's weights on the CPU and moves them to the
compute device only while it encodes (`on_device`). The host copy is made once and kept: the encoders
are frozen, so it stays valid, and only the device copy is freed after each use.
"""

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn

from wan.modules.clip import CLIPVision
from wan.modules.t5 import UMT5Encoder
from wan.modules.tokenizer import WanTokenizer
from wan.modules.vae import WanVAE

# Pinned host memory is packed into blocks of this size: torch's pinned allocator rounds each block up
# to a power of two, which costs about 1.3x the umT5's 11.4 GB when each weight is pinned on its own.
# A block also goes to the device in one copy rather than one per weight.
HOST_BLOCK_BYTES = 256 * 2**20
_ALIGN = 512  # bytes: a multiple of every dtype's size, and whole cache lines for the copies


@dataclass
class _HostCopy:
    """A parked module. weights: its parameters and buffers, each once, holding their host copies;
    slots: where the module refers to them, (a submodule's _parameters or _buffers, name, weight index);
    blocks: the host blocks the weights are views of when packed, (block, [(weight index, byte offset)])."""

    weights: list[torch.Tensor]
    pointers: list[int]
    slots: list[tuple[dict, str, int]]
    blocks: list[tuple[torch.Tensor, list[tuple[int, int]]]]
    device_type: str


# module -> its host copy, for as long as the module lives.
_HOST_COPIES: "weakref.WeakKeyDictionary[nn.Module, _HostCopy]" = weakref.WeakKeyDictionary()


def _slots(module: nn.Module) -> tuple[list[torch.Tensor], list[tuple[dict, str, int]]]:
    """The module's parameters and buffers, each once (a tied weight sits in several slots)."""
    weights: list[torch.Tensor] = []
    index: dict[int, int] = {}
    slots = []
    for sub in module.modules():
        for table in (sub._parameters, sub._buffers):
            for name, t in table.items():
                if t is not None:
                    if id(t) not in index:
                        index[id(t)] = len(weights)
                        weights.append(t)
                    slots.append((table, name, index[id(t)]))
    return weights, slots


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _view(block: torch.Tensor, offset: int, like: torch.Tensor) -> torch.Tensor:
    return block[offset : offset + _nbytes(like)].view(like.dtype).view(like.shape)


def _pack(weights: list[torch.Tensor], pin: bool) -> list[tuple[torch.Tensor, list[tuple[int, int]]]]:
    """Moves each weight's data into host blocks of up to HOST_BLOCK_BYTES (pinned when `pin`; a weight
    larger than a block gets one of its own), in order, as views of the blocks."""
    layout: list[list[tuple[int, int]]] = [[]]
    sizes = [0]
    for i, t in enumerate(weights):
        if sizes[-1] and sizes[-1] + _nbytes(t) > HOST_BLOCK_BYTES:
            layout.append([])
            sizes.append(0)
        layout[-1].append((i, sizes[-1]))
        sizes[-1] += -(-_nbytes(t) // _ALIGN) * _ALIGN
    blocks = []
    for members, size in zip(layout, sizes, strict=True):
        if not members:  # a module without weights
            continue
        block = torch.empty(size, dtype=torch.uint8, pin_memory=pin)
        for i, offset in members:
            # Weight by weight, so each old storage goes at once: one block more than the module at most.
            weights[i].data = _view(block, offset, weights[i]).copy_(weights[i].data)
        blocks.append((block, members))
    return blocks


def park_on_host(module: nn.Module, device: torch.device | str) -> None:
    """Move a frozen module's weights into the host memory that `on_device(module, device)` uploads
    from, kept for the module's life. For a CUDA device the weights are packed into pinned blocks
    (asynchronous DMA, one copy per block); for the CPU they stay the tensors they are. Done once:
    `on_device` parks a module itself when it is not parked for that kind of device."""
    device = torch.device(device)
    weights, slots = _slots(module)
    if device.type == "cpu":
        blocks = []
        for t in weights:
            if t.device.type != "cpu":
                t.data = t.data.cpu()
    else:  # pinned memory needs CUDA; any other device still gets one copy per block
        blocks = _pack(weights, pin=device.type == "cuda" and torch.cuda.is_available())
    pointers = [t.data_ptr() for t in weights]
    _HOST_COPIES[module] = _HostCopy(weights, pointers, slots, blocks, device.type)


def _parked(module: nn.Module, device: torch.device) -> _HostCopy | None:
    """The module's host copy when it serves `device` and the module still holds exactly those tensors
    with their host data (nothing moved, replaced or added weights since park_on_host)."""
    kept = _HOST_COPIES.get(module)
    if kept is None or (device.type != "cpu" and kept.device_type != device.type):
        return None
    weights, slots = _slots(module)
    if len(weights) != len(kept.weights) or len(slots) != len(kept.slots):
        return None
    for t, mine, pointer in zip(weights, kept.weights, kept.pointers, strict=True):
        if t is not mine or t.device.type != "cpu" or t.data_ptr() != pointer:
            return None
    return kept


@contextmanager
def on_device(module: nn.Module, device: torch.device | str) -> Iterator[None]:
    """Run a frozen module on `device` from its kept host copy (see park_on_host). Each block goes to
    the device in one copy (asynchronous from pinned memory) and the module computes with views of it;
    on exit the module holds its host tensors again and the device copy is dropped: nothing is
    copied back and no host memory is allocated after the first use. The weights must not change on
    the device: the host copy would not see it."""
    device = torch.device(device)
    kept = _parked(module, device)
    if kept is None:
        park_on_host(module, device)
        kept = _HOST_COPIES[module]
    if device.type == "cpu":  # it computes where the host copy is
        yield
        return
    on_device_weights = _upload(kept, device)
    try:
        # The module's slots get these tensors rather than the host tensors a new `.data`: that works
        # for every device (meta too), and the host copy is never touched.
        for table, name, i in kept.slots:
            table[name] = on_device_weights[i]
        yield
    finally:
        for table, name, i in kept.slots:
            table[name] = kept.weights[i]
        on_device_weights.clear()  # even while a traceback keeps this frame


def _upload(kept: _HostCopy, device: torch.device) -> list[torch.Tensor]:
    """Each weight on `device`, as views of its block sent in one (asynchronous, when pinned) copy."""
    out: list[torch.Tensor] = list(kept.weights)
    for block, members in kept.blocks:
        uploaded = block.to(device, non_blocking=True)
        for i, offset in members:
            host = kept.weights[i]
            view = _view(uploaded, offset, host)
            out[i] = nn.Parameter(view, requires_grad=False) if isinstance(host, nn.Parameter) else view
    return out


@contextmanager
def _on_device(module: nn.Module, device: torch.device, offload: bool) -> Iterator[None]:
    if not offload:
        yield
        return
    with on_device(module, device):
        yield


class TextEncoder:
    """Prompts -> context [B, max_length (512), dim] float32 (or `dtype`), zero past each prompt's
    tokens, as the DiT expects it."""

    def __init__(
        self, tokenizer: WanTokenizer, model: UMT5Encoder, device: str | torch.device = "cpu", offload: bool = False
    ):
        self.tokenizer = tokenizer
        self.model = model.eval().requires_grad_(False)
        self.device = torch.device(device)
        self.offload = offload
        if offload:
            park_on_host(self.model, self.device)
        else:
            self.model.to(self.device)

    @torch.no_grad()
    def __call__(
        self, prompts: list[str], device: str | torch.device | None = None, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        ids, mask = self.tokenizer(prompts)
        with _on_device(self.model, self.device, self.offload):
            context = self.model(ids.to(self.device), mask.to(self.device))
        return context.to(device or self.device, dtype)


@torch.no_grad()
def encode_latents(vae: WanVAE, clips: torch.Tensor, mini_batch: int, offload: bool = False) -> torch.Tensor:
    """Pixel clips [B, 3, T, H, W] in [-1, 1] -> normalised latents [B, 16, 1 + (T-1)/4, H/8, W/8],
    encoding at most `mini_batch` clips at once (the trainer's `vae_mini_batch`)."""
    if mini_batch < 1:
        raise ValueError(f"vae_mini_batch must be >= 1, got {mini_batch}")
    with _on_device(vae, clips.device, offload):
        return torch.cat([vae.encode(chunk) for chunk in clips.split(mini_batch)])


def i2v_mask(num_frames: int, latent_height: int, latent_width: int, batch: int = 1, device=None) -> torch.Tensor:
    """The reference I2V mask [B, 4, T_lat, h, w]: ones where the conditioning frame is, zeros after.

    Built on pixel frames (frame 0 repeated 4 times so the first latent frame's group of 4 is all
    ones), then folded to groups of 4: channel c of latent frame i is pixel-frame slot 4i + c."""
    if (num_frames - 1) % 4:
        raise ValueError(f"num_frames must be 4k+1, got {num_frames}")
    mask = torch.zeros(batch, num_frames + 3, latent_height, latent_width, device=device)
    mask[:, :4] = 1  # frame 0 (the given image), repeated 4 times
    mask = mask.view(batch, (num_frames + 3) // 4, 4, latent_height, latent_width)
    return mask.transpose(1, 2)


@torch.no_grad()
def encode_i2v_condition(
    vae: WanVAE, clip: CLIPVision | None, first_frames: torch.Tensor, num_frames: int, offload: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """First frames [B, 3, H, W] in [-1, 1] of clips of num_frames frames -> (y, clip_fea):
    y [B, 4 + 16, T_lat, H/8, W/8] = [mask ; latents of (first frame, then zero frames)], the DiT's
    `y`; clip_fea [B, 257, 1280], the CLIP features of the first frame (None without `clip`: Wan2.2's
    I2V-A14B takes y alone)."""
    b, _, h, w = first_frames.shape
    video = torch.zeros(b, 3, num_frames, h, w, device=first_frames.device, dtype=first_frames.dtype)
    video[:, :, 0] = first_frames
    with _on_device(vae, first_frames.device, offload):
        latents = vae.encode(video)
    mask = i2v_mask(num_frames, latents.shape[-2], latents.shape[-1], b, latents.device).to(latents.dtype)
    if clip is None:
        return torch.cat([mask, latents], dim=1), None
    with _on_device(clip, first_frames.device, offload):
        clip_fea = clip.encode_image(first_frames)
    return torch.cat([mask, latents], dim=1), clip_fea


@torch.no_grad()
def encode_first_frame(vae, first_frames: torch.Tensor, offload: bool = False) -> torch.Tensor:
    """Wan2.2 TI2V: first frames [B, 3, H, W] in [-1, 1] -> their normalised latents [B, C, 1, h, w],
    each image encoded alone as a one-frame video (the first latent frame of its video)."""
    with _on_device(vae, first_frames.device, offload):
        return vae.encode(first_frames.unsqueeze(2))
