"""The precomputed cache on disk: what `python -m tools.precompute` writes and `[data] latent_cache_dir` trains from.

A cache folder holds
  index.json                written last (rank 0): the fingerprint, K, the shards, the tensor shapes
  empty_prompt.safetensors  the umT5 embedding of "" (caption dropout), trimmed to its tokens
  shard-00000.safetensors   a run of samples' tensors: per variant the VAE latents (and y, clip_fea for
                            i2v), per sample its caption's umT5 embedding trimmed to its tokens
  shard-00000.json          what the shard holds, per sample; written after the tensors, so a shard is
                            finished when its .json exists (a killed precompute redoes only the others)
Every file is written to a temporary name, fsynced and renamed.

What a sample's variants are. A step's size and frame count are drawn by the sampler, as online
(train/data/dataset.py make_choose); a sample can be asked for any size its options allow, so the cache
holds, per size, K variants of the most frames the size allows for the clip (min(drawn count, its own
frames at the stride), 4k+1), each from its own start frame drawn as the online loader draws one. A
step that trains fewer frames (a shorter clip in the step, random_frame_crop) takes the first latent
frames: the VAE is causal, so they equal encoding the first pixel frames (bit for bit on the CPU).

The fingerprint covers what changes the tensors: the encoders' files (or the preset and seed of their
random weights), the code version of the encoders and of the resize, the sizes and frame rules, the
stride and the bucketing. A cache that differs is refused, naming each difference.
"""

import hashlib
import json
import os
import random
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from train.data.buckets import (
    batch_frame_count,
    clip_frame_count,
    decoded_mean_side,
    downsample_choices,
    downsampled_size,
    frames_for_token_budget,
    token_length_choices,
    token_length_sizes,
)
from train.data.dataset import SizeOptions
from train.data.metadata import Sample

CACHE_FORMAT = 1
INDEX_FILE = "index.json"
EMPTY_PROMPT_FILE = "empty_prompt.safetensors"
# Bump when wan's VAE, umT5 or CLIP code computes other numbers, or the decode's resize and crop change:
# caches written before are refused then.
ENCODER_CODE_VERSION = "wan2.1-encoders-1"
RESIZE_RULE = "decode_frames cover + centre crop, 1"
# The data options a cache is drawn for (SizeOptions but random_frame_crop, which the prefix serves).
FINGERPRINT_DATA_FIELDS = (
    "video_sample_size", "image_sample_size", "token_sample_size", "video_sample_n_frames", "video_sample_stride",
    "random_hw_adapt", "training_with_video_token_length", "enable_bucket",
)  # fmt: skip
_IDENTITY_CHUNK = 2**20
OPEN_SHARDS = 64  # per process: a cache of a million clips has tens of thousands of shards


def shard_name(j: int) -> str:
    return f"shard-{j:05d}"


def size_name(size: int | float) -> str:
    """A training size as the cache's tensor names spell it (random_hw_adapt's sizes may be fractional)."""
    return repr(size)


def sample_key(path: Path, data_dir: str | Path | None) -> str:
    """A sample's name in the cache: its path under train_data_dir when it is there (so the data may
    move with the cache), else the absolute path."""
    if data_dir:
        try:
            return Path(path).relative_to(Path(data_dir).resolve()).as_posix()
        except ValueError:
            pass
    return Path(path).as_posix()


def text_digest(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


# --- the fingerprint --------------------------------------------------------------------------------


def file_identity(path: str | Path) -> str:
    """A model file's identity without reading all of it (the umT5 is 11 GB): name, size and a hash of
    its first, middle and last MiB; a folder (the tokenizer): each file's."""
    path = Path(path)
    if path.is_dir():
        parts = [f"{p.relative_to(path).as_posix()}={file_identity(p)}" for p in sorted(path.rglob("*")) if p.is_file()]
        return hashlib.blake2b("\n".join(parts).encode(), digest_size=12).hexdigest()
    size = path.stat().st_size
    digest = hashlib.blake2b(digest_size=12)
    with open(path, "rb") as f:
        for offset in sorted({0, max(size // 2 - _IDENTITY_CHUNK // 2, 0), max(size - _IDENTITY_CHUNK, 0)}):
            f.seek(offset)
            digest.update(f.read(_IDENTITY_CHUNK))
    return f"{path.name} {size} bytes {digest.hexdigest()}"


def encoder_identities(model_cfg, seed: int) -> dict[str, str]:
    """What the frozen encoders are (train.models.build_models builds them from the same fields)."""
    from train.models import CLIP_FILE, T5_FILE, TOKENIZER_DIR, VAE_FILE

    m = model_cfg
    i2v = m.train_mode == "i2v"
    if m.pretrained_model_name_or_path:
        root = Path(m.pretrained_model_name_or_path)
        out = {
            "vae": file_identity(m.vae_path or root / VAE_FILE), "text_encoder": file_identity(root / T5_FILE),
            "tokenizer": file_identity(root / TOKENIZER_DIR),
        }  # fmt: skip
        if i2v:
            out["clip"] = file_identity(root / CLIP_FILE)
    else:  # random weights drawn from the run's seed (build_models: seed + 1)
        random_weights = (
            f"random weights of the {'debug' if m.preset.startswith('debug') else 'release'} preset, seed {seed}"
        )
        out = {"vae": file_identity(m.vae_path) if m.vae_path else random_weights, "text_encoder": random_weights,
               "tokenizer": "debug tokenizer"}  # fmt: skip
        if i2v:
            out["clip"] = random_weights
    out["tokenizer_max_length"] = str(m.tokenizer_max_length)
    return out


def fingerprint(data_cfg, model_cfg, seed: int) -> dict:
    """Everything a cache's tensors depend on, as JSON values."""
    return {
        "format": CACHE_FORMAT, "encoder_code": ENCODER_CODE_VERSION, "resize": RESIZE_RULE,
        "train_mode": model_cfg.train_mode, **encoder_identities(model_cfg, seed),
        **{name: getattr(data_cfg, name) for name in FINGERPRINT_DATA_FIELDS},
    }  # fmt: skip


def differences(cached: dict, wanted: dict) -> list[str]:
    """One line per field where a cache's fingerprint and the run's differ."""
    return [
        f"{name}: the cache has {cached.get(name)!r}, this run {wanted.get(name)!r}"
        for name in sorted(set(cached) | set(wanted))
        if cached.get(name) != wanted.get(name)
    ]


# --- what each sample holds ------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """One training size of a sample: frames is the pixel frames stored (1 for an image)."""

    size: int | float
    frames: int


def token_length_fallback(options: SizeOptions, mean_sides: list[float]) -> bool:
    """Whether a step of clips with these mean sides may draw any token-length size: token_length_choices
    allows every size when none is below 1.25 x the smallest clip's side."""
    sizes = token_length_sizes(options.video_sample_size, options.image_sample_size)
    return not [s for s in sizes if s < min(mean_sides) * 1.25]


def sample_variants(options: SizeOptions, sample: Sample, any_size: bool = False) -> list[Variant]:
    """Every size a step may train `sample` at (make_choose's draws), with its stored frame count.
    any_size: the sample's bucket holds a clip that lets a token-length step draw every size."""
    o = options
    if sample.kind == "image":
        sizes = [o.image_sample_size]
        if o.random_hw_adapt:
            ratios, _ = downsample_choices(o.image_sample_size, o.image_sample_size / o.video_sample_size)
            sizes = [downsampled_size(o.image_sample_size, r) for r in ratios]
        return [Variant(s, 1) for s in dict.fromkeys(sizes)]
    cap = max(o.image_sample_size, o.video_sample_size)
    if o.random_hw_adapt and o.training_with_video_token_length:
        every = token_length_sizes(o.video_sample_size, o.image_sample_size)
        own = token_length_choices(every, [decoded_mean_side(sample.height, sample.width, cap)])
        sizes = every if any_size else own
        drawn = {s: frames_for_token_budget(s, o.token_sample_size, o.video_sample_n_frames) for s in sizes}
    elif o.random_hw_adapt:
        ratios, _ = downsample_choices(o.video_sample_size)
        drawn = {downsampled_size(o.video_sample_size, r): o.video_sample_n_frames for r in ratios}
    else:
        drawn = {o.video_sample_size: o.video_sample_n_frames}
    available = [clip_frame_count(sample.num_frames, o.video_sample_n_frames, o.video_sample_stride)]
    return [Variant(s, batch_frame_count(n, available)) for s, n in drawn.items()]


def start_rng(seed: int, key: str, size: int | float, k: int) -> random.Random:
    """The generator of variant k's start frame (the same draw the online loader makes, its own seed)."""
    from train.data.sampler import derive_seed

    return random.Random(derive_seed("cache start", seed, key, size_name(size), k))


# --- writing ----------------------------------------------------------------------------------------


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    write(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # readable as any file the user writes (save_file makes it private)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """A safetensors file, atomically (the names sorted: equal contents give equal bytes)."""
    ordered = {name: tensors[name].contiguous() for name in sorted(tensors)}
    _atomic(path, lambda tmp: save_file(ordered, str(tmp)))


def write_json(path: Path, value: dict) -> None:
    _atomic(path, lambda tmp: tmp.write_text(json.dumps(value, indent=1, sort_keys=True) + "\n"))


def remove_temporaries(folder: Path) -> list[Path]:
    """Files a killed precompute left half-written."""
    left = sorted(folder.glob("*.tmp-*"))
    for path in left:
        path.unlink(missing_ok=True)
    return left


def read_json(path: Path) -> dict | None:
    """A cache JSON file, or None when it is missing; a damaged one is named in a ValueError."""
    if not path.exists():
        return None
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: not a readable cache file ({err}); delete it and rerun tools.precompute") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: not a cache file (expected a JSON object)")
    return value


# --- reading ----------------------------------------------------------------------------------------


class CacheReader:
    """A finished cache: the index read and checked at once, tensors read lazily (safetensors, memory
    mapped) by whichever process asks: the handles are opened again in each DataLoader worker."""

    def __init__(self, folder: str | Path, data_dir: str | Path | None = None):
        self.folder = Path(folder)
        self.data_dir = data_dir
        index_path = self.folder / INDEX_FILE
        index = read_json(index_path)
        if index is None:
            hint = " (a precompute is unfinished: rerun it)" if any(self.folder.glob("shard-*.json")) else ""
            raise ValueError(
                f"[data] latent_cache_dir {self.folder}: no {INDEX_FILE}{hint}; write one with python -m tools.precompute"
            )
        problems = [f"{index_path}: field {name!r} missing" for name in ("format", "fingerprint", "variants", "shards",
                    "shapes", "samples", "refused") if name not in index]  # fmt: skip
        if not problems and index["format"] != CACHE_FORMAT:
            problems.append(f"{index_path}: format {index['format']!r}, this code reads {CACHE_FORMAT}")
        if problems:
            raise ValueError("; ".join(problems))
        self.index = index
        self.num_variants = int(index["variants"])
        self.shapes = index["shapes"]
        # By (file, caption digest): a file listed twice with two captions is two samples.
        self.entries: dict[tuple[str, str], dict] = {}
        for j in index["shards"]:
            manifest = read_json(self.folder / f"{shard_name(j)}.json")
            if manifest is None or not (self.folder / f"{shard_name(j)}.safetensors").exists():
                raise ValueError(f"{self.folder}: shard {shard_name(j)} listed in {INDEX_FILE} is missing")
            for n, entry in enumerate(manifest["samples"]):
                self.entries[entry["key"], entry["text"]] = {**entry, "shard": j, "slot": n}
        self.files = {key for key, _ in self.entries}
        # Samples the precompute refused up front (absurd sizes, unreadable headers): counted, not missing.
        self.refused: dict[str, str] = dict(index.get("refused", []))
        self._files: OrderedDict[int, object] = OrderedDict()  # the open shards, least recently used first
        self._empty: torch.Tensor | None = None

    @property
    def fingerprint(self) -> dict:
        return self.index["fingerprint"]

    def __getstate__(self) -> dict:  # to DataLoader workers: no open handles
        return {**self.__dict__, "_files": OrderedDict(), "_empty": None}

    def entry(self, sample: Sample) -> dict:
        return self.entries[sample_key(sample.path, self.data_dir), text_digest(sample.text)]

    def fill_sizes(self, samples: list[Sample], skipped: list[tuple[str, str]]) -> list[Sample]:
        """The samples with the sizes the precompute read (their files need not be here); those it refused
        up front go to `skipped` with its reason, as online; a sample the cache lacks, or whose caption
        changed since, is refused with the others like it in one ValueError."""
        missing, changed, out = [], [], []
        for s in samples:
            key = sample_key(s.path, self.data_dir)
            entry = self.entries.get((key, text_digest(s.text)))
            if entry is not None:
                out.append(Sample(s.path, s.text, s.kind, entry["width"], entry["height"], entry["num_frames"], s.fps))
            elif key in self.refused:
                skipped.append((str(s.path), self.refused[key]))
            else:
                (changed if key in self.files else missing).append(str(s.path))
        problems = []
        for what, paths in (("are not in it", missing), ("have another caption than when it was written", changed)):
            if paths:
                shown = ", ".join(paths[:5]) + (f" and {len(paths) - 5} more" if len(paths) > 5 else "")
                problems.append(f"{len(paths)} samples of the metadata {what} ({shown})")
        if problems:
            raise ValueError(
                f"[data] latent_cache_dir {self.folder} does not fit the metadata: "
                + "; ".join(problems)
                + ". Rerun python -m tools.precompute with this config: it keeps the shards that still fit"
            )
        return out

    def _file(self, shard: int):
        """Shard `shard` opened (memory mapped); at most OPEN_SHARDS stay open per process."""
        if shard in self._files:
            self._files.move_to_end(shard)
        else:
            if len(self._files) >= OPEN_SHARDS:
                self._files.popitem(last=False)
            self._files[shard] = safe_open(str(self.folder / f"{shard_name(shard)}.safetensors"), framework="pt")
        return self._files[shard]

    def variant(self, entry: dict, size: int | float, k: int) -> dict[str, torch.Tensor]:
        """Variant k of the sample at `size`: latents [C, T, h, w] (and y, clip_fea for i2v)."""
        f = self._file(entry["shard"])
        prefix = f"{entry['slot']}/{size_name(size)}/{k}/"
        return {name: f.get_tensor(prefix + name) for name in self.shapes["variant"]}

    def context(self, entry: dict) -> torch.Tensor:
        """The sample's caption embedding, [tokens, dim]."""
        return self._file(entry["shard"]).get_tensor(f"{entry['slot']}/context")

    def empty_context(self) -> torch.Tensor:
        """The embedding of "" (a dropped caption), [tokens, dim]."""
        if self._empty is None:
            with safe_open(str(self.folder / EMPTY_PROMPT_FILE), framework="pt") as f:
                self._empty = f.get_tensor("context")
        return self._empty
