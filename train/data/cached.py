"""Training from a precomputed cache (train/data/cache.py): the DiT's inputs read instead of decoded and encoded.

CachedDataset is VideoDataset with its load replaced: the same sampler plans the steps and draws each
step's size and frame count (make_choose), and every per-sample draw is made as online, from the same
generator in the same order: the replacement order of a bad file, the start frame (drawn and unused:
the cache's variants have their own), the caption dropout. So a run from a cache of K = 1 variant with
options that leave the frames no choice trains on exactly the online inputs, bad files are skipped,
replaced and counted alike, and resume and any rank count work as online.

What a cache gives up against online sampling (the README's "Precompute" says the same):
- start frames: each size has K start frames per clip, drawn once; variant (epoch + a per-clip offset)
  mod K trains, so every variant serves once in K epochs, where online draws a new start every time;
- a step shorter than a clip's stored frames (a shorter clip in the step, random_frame_crop) trains the
  first frames of its stored window, where online places the shorter window anywhere in the clip;
- a bad file's last-resort replacement (every sample of its bucket failed): online resizes a sample of
  another shape to the step's, the cache has none at that shape, so only same-shape samples replace.
"""

import random
from collections.abc import Sequence

import torch

from train.data.buckets import SIDE_MULTIPLE, bucket_table
from train.data.cache import CacheReader, size_name
from train.data.dataset import VideoDataset
from train.data.metadata import Sample
from train.data.sampler import derive_seed
from train.data.video import MediaError


class _Slot:
    """Where a cached sample lands, in the place of VideoDataset's pixel buffer: `shape` is the step's
    pixel shape [F, H, W, 3] (what the replacement rules look at), the tensors are set by the load."""

    def __init__(self, shape: tuple[int, ...]):
        self.shape = shape
        self.tensors: dict[str, torch.Tensor] = {}

    def zero_(self) -> None:
        self.tensors = {}


class CachedDataset(VideoDataset):
    """VideoDataset's arguments, plus the cache to read (`transfer` is not used); see the module docstring."""

    def __init__(self, samples: list[Sample], *, cache: CacheReader, **kwargs):
        super().__init__(samples, **{**kwargs, "transfer": None})
        self.cache = cache
        self.temporal_stride = cache.shapes["vae_stride"][0]

    def _can_fill(self, index: int, extras: dict, shape: Sequence[int]) -> bool:
        """As online, and the cache has the sample at the step's height x width with enough frames (a bad
        file is tried, as online, to be counted)."""
        if not super()._can_fill(index, extras, shape):
            return False
        if bucket_table(extras["size"], extras.get("multiple", SIDE_MULTIPLE))[self.keys[index][1]] != tuple(
            shape[1:3]
        ):
            return False  # online would resize it to the step's shape: the cache holds it at its own
        entry = self.cache.entry(self.samples[index])
        return bool(entry["bad"]) or entry["variants"].get(size_name(extras["size"]), 0) >= shape[0]

    def _load(self, sample: Sample, extras: dict, rng: random.Random, out: _Slot) -> None:
        entry = self.cache.entry(sample)
        frames = out.shape[0]
        if sample.kind == "video":  # the online draw (before its decode, which may fail): the later draws follow alike
            self._frame_indices(sample, frames, rng)
        if entry["bad"]:
            raise MediaError(sample.path, entry["bad"])
        k = (extras["epoch"] + derive_seed("cache variant", self.seed, entry["key"])) % self.cache.num_variants
        tensors = self.cache.variant(entry, extras["size"], k)
        latent_frames = (frames - 1) // self.temporal_stride + 1
        # The causal VAE's first latent frames are those of the first pixel frames.
        out.tensors = {name: t[:, :latent_frames] if name != "clip_fea" else t for name, t in tensors.items()}
        out.tensors["context"] = self.cache.context(entry)

    def __getitem__(self, item: tuple[int, dict]) -> dict:
        batch = self.__getitems__([item])
        return {**{k: v[0] for k, v in batch.items() if isinstance(v, torch.Tensor)}, "text": batch["text"][0],
                "skipped": batch["skipped"], "errors": batch["errors"]}  # fmt: skip

    def __getitems__(self, items: list[tuple[int, dict]]) -> dict:
        """One step's batch: latents [B, C, T, h, w] float32, context [B, text_len, dim] float32 (zero
        past each caption's tokens, as the text encoder gives it), y and clip_fea for i2v, and what
        VideoDataset's batches carry (text, index, skipped, errors), with pixel_shape [B, 3, F, H, W]."""
        shape = self._shape(*items[0])
        slots = [_Slot(shape) for _ in items]
        filled = [self._fill(item, slot) for item, slot in zip(items, slots, strict=True)]
        # float32, as the online encoders hand them to the DiT (captions are stored in the umT5's dtype).
        out = {name: torch.stack([self._tensor(name, slot, f, shape) for slot, f in zip(slots, filled, strict=True)]).float()
               for name in (*self.cache.shapes["variant"], "context")}  # fmt: skip
        return {
            **out, "pixel_shape": (len(items), 3, *shape[:3]), "text": [f["text"] for f in filled],
            "index": torch.tensor([f["index"] for f in filled]), "skipped": [s for f in filled for s in f["skipped"]],
            "errors": [f["error"] for f in filled if "error" in f],
        }  # fmt: skip

    def _tensor(self, name: str, slot: _Slot, filled: dict, shape: tuple[int, ...]) -> torch.Tensor:
        """One slot's tensor: the caption's embedding (or the empty prompt's, dropped) padded to text_len;
        zeros for a slot nothing could fill (the run stops on it before any forward)."""
        shapes, (frames, height, width) = self.cache.shapes, shape[:3]
        if name == "context":
            if "error" in filled:
                return torch.zeros(shapes["text_len"], shapes["text_dim"], dtype=torch.float32)
            context = slot.tensors["context"] if filled["text"] else self.cache.empty_context()
            padded = torch.zeros(shapes["text_len"], context.shape[1], dtype=context.dtype)
            padded[: context.shape[0]] = context
            return padded
        if "error" in filled:
            t, s = self.temporal_stride, shapes["vae_stride"][1]
            if name == "clip_fea":
                return torch.zeros(*shapes["clip_fea"])
            channels = shapes["latent_channels"] + (shapes["mask_channels"] if name == "y" else 0)
            return torch.zeros(channels, (frames - 1) // t + 1, height // s, width // s)
        return slot.tensors[name]
