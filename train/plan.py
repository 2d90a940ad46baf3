"""Will a config fit? Per-GPU memory of every bucket the config's data options can produce.

    python -m train.plan --cfg configs/14b_zero3.toml --gpus 8 --gpu_memory 80GB [--sp=2] [--section.key=value ...]

Per GPU, for each (kind, size, frames) the data options can draw (its largest aspect bucket, which
binds), as a micro-batch of train_batch_size x the token-length repeats:

  model states   parameters, gradients, fp32 master weights and AdamW state of the DiT by the
                 engine's layout (the ZeRO / FSDP formulas below, trainable subset, offload flags),
                 plus the frozen encoders on the GPU: umT5 (bf16, replicated), VAE (fp32), CLIP
                 (i2v); with low_vram they come to the GPU only while encoding (counted then);
                 from a precomputed cache ([data] latent_cache_dir) none.
  activations    what autograd keeps for backward, measured exactly on fake tensors of the real shapes
                 (wan/modules/model.py: saved_bytes_per_block) for each block's mode: the
                 checkpointed blocks under the configured mode, the others under "none" (a compiled
                 selective block keeps the same: tests/unit/test_selective_compile.py); plus the
                 embeddings and head. bf16 weight copies of autocast count under ddp (fp32 weights);
                 the sharded / bf16 engines hold no such copies. With [parallel] sp (sequence
                 parallel) a GPU holds 1/sp of each sample's tokens: the blocks are measured at that
                 many (cross-attention's text keys and values stay whole on every GPU); the
                 embeddings and head are counted whole.
  buffers        DeepSpeed's reduce / all-gather buckets, FSDP's all-gathered blocks and one block's
                 unsharded gradient, the recompute's one-block peak (a checkpointed block's "none"
                 activations during its backward), and the activation gradients in flight (2 x the
                 residual stream).

Model states per GPU (Ψ all DiT parameters, Ψt trainable, N GPUs, bf16 mixed precision):
  ddp      4Ψ (fp32 params, also the master) + 4Ψt grads + 8Ψt AdamW
  zero2    2Ψ (bf16 params) + (2 grads + 4 master + 8 AdamW) Ψt / N
  zero3    (2Ψ + (2 + 4 + 8) Ψt) / N
  fsdp     (4Ψ + (4 + 8) Ψt) / N  (fp32 shards are the master; bf16 is gathered per block)
Wan2.2 A14B: each trained expert's engine holds its own, so x 2 for both experts. offload_optimizer
moves master + AdamW to host memory, offload_param the parameter shards. fp32 training: 4-byte params and grads, and DeepSpeed keeps an fp32 master apart from the fp32 params.

The verdict: fits when the peak (states + max(activations + buffers, the largest encoder while
encoding with low_vram)) + a CUDA context of 1 GiB is within gpu_memory x (1 - headroom). The table
says which of the two drives each peak ("peak while"); the encoders column holds the encoder bytes on
the GPU at that peak.

Compiles ([model] compile): the graphs the compiled DiT blocks build over a run, counted from the
shapes the options draw (every aspect bucket, micro-batch and token count): one per grad mode and
micro-batch class (1, or more) with compile_dit's dynamic token counts, and what static shapes would
cost (one per micro-batch x token count).
"""

import argparse
import dataclasses
import functools
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from train.config import RunConfig, load_config
from train.data.buckets import (
    MIN_VIDEO_FRAMES,
    bucket_table,
    downsample_choices,
    downsampled_size,
    frames_for_token_budget,
    token_length_repeats,
    token_length_sizes,
    valid_frame_count,
)
from train.data.loader import longest_step_frames
from train.distributed import ParallelLayout
from train.engines import REGISTRY, engine_traits
from train.engines.base import ModelStates
from wan.modules.dit_weights import expert_folders
from wan.modules.lora import LoRASpec, apply_lora
from wan.modules.model import has_image_branch

GB, GIB = 10**9, 2**30
CUDA_CONTEXT = 1 * GIB
VAE_STRIDE = (4, 8, 8)  # pixel frames -> latent: 1 + (F - 1) / 4; sides / 8 (the Wan2.2 VAE's: / 16)


def parse_bytes(text: str) -> int:
    """'80GB', '80GiB', '141G', '8e10' -> bytes (GB = 10^9, GiB = 2^30; a bare G means GB)."""
    t = text.strip().upper().replace(" ", "")
    for suffix, unit in (("GIB", GIB), ("GB", GB), ("G", GB), ("MIB", 2**20), ("MB", 10**6), ("B", 1)):
        if t.endswith(suffix):
            return int(float(t[: -len(suffix)]) * unit)
    return int(float(t))


# ----------------------------------------------------------------------------------------------------
# What the data can produce


@dataclass(frozen=True)
class Bucket:
    kind: str  # "video" or "image"
    size: int | float  # the training size the bucket table is scaled to
    frames: int  # pixel frames
    height: int
    width: int
    ratios: int  # aspect buckets at this size (this one has the most pixels x repeats)
    repeats: int  # training_with_video_token_length copies of a small batch
    spatial: int = VAE_STRIDE[1]  # the VAE's spatial stride: half the bucket side multiple (8; Wan2.2's 16)

    def latent(self) -> tuple[int, int, int]:
        return _latent(self.frames, self.height, self.width, self.spatial)


def data_buckets(cfg: RunConfig, frame_cap: int | None = None) -> list[Bucket]:
    """Every (kind, size, frames) the [data] options can draw (train/data/dataset.py make_choose), each
    with its largest aspect bucket (pixels x token-length repeats); shorter random_frame_crop lengths
    are smaller and left out. The clips' own sizes are unknown here: every size the rules allow is listed. frame_cap: the most frames
    the clips give (train/data/loader.py longest_step_frames), which caps every video's frames as the
    sampler does."""
    d = cfg.data
    shapes: set[tuple[str, int | float, int]] = set()
    if d.random_hw_adapt:
        ratios, _ = downsample_choices(d.image_sample_size, d.image_sample_size / d.video_sample_size)
        shapes |= {("image", downsampled_size(d.image_sample_size, r), 1) for r in ratios}
    else:
        shapes.add(("image", d.image_sample_size, 1))
    if d.random_hw_adapt and d.training_with_video_token_length:
        for size in token_length_sizes(d.video_sample_size, d.image_sample_size):
            shapes.add(("video", size, frames_for_token_budget(size, d.token_sample_size, d.video_sample_n_frames)))
    elif d.random_hw_adapt:
        ratios, _ = downsample_choices(d.video_sample_size)
        shapes |= {("video", downsampled_size(d.video_sample_size, r), d.video_sample_n_frames) for r in ratios}
    else:
        shapes.add(("video", d.video_sample_size, max(d.video_sample_n_frames, MIN_VIDEO_FRAMES)))
    out = []
    if frame_cap is not None:
        shapes = {(kind, size, min(frames, frame_cap) if kind == "video" else frames) for kind, size, frames in shapes}
    for kind, size, frames in shapes:
        sides = aspect_buckets(cfg, size)
        # The most pixels x repeats binds: a smaller bucket may be repeated more.
        h, w = max(sides, key=lambda hw: (hw[0] * hw[1] * step_repeats(cfg, frames, *hw), hw[0] * hw[1]))
        out.append(Bucket(kind, size, frames, h, w, len(sides), step_repeats(cfg, frames, h, w), vae_spatial(cfg)))
    return sorted(out, key=lambda b: (b.kind != "video", -b.frames * b.height * b.width))


def aspect_buckets(cfg: RunConfig, size: int | float) -> list[tuple[int, int]]:
    """The distinct (height, width) buckets a step at training size `size` may have."""
    m = cfg.data.bucket_side_multiple
    if not cfg.data.enable_bucket:
        return [(int(size) // m * m,) * 2]
    return sorted(set(bucket_table(size, m).values()))


def step_repeats(cfg: RunConfig, frames: int, height: int, width: int) -> int:
    """Copies of the batch a step trains at once (train/main.py Trainer.copies): with
    training_with_video_token_length, 2 or 4 below its budget, images and random_hw_adapt included,
    as VideoX-Fun's loop does."""
    d = cfg.data
    if not d.training_with_video_token_length:
        return 1
    return token_length_repeats(frames, height, width, d.token_sample_size, d.video_sample_n_frames)


# ----------------------------------------------------------------------------------------------------
# The models


def dit_config(cfg: RunConfig) -> tuple[dict, str]:
    """(WanModel kwargs, where they came from): the folder's config.json, else the preset its name
    suggests (14B / 1.3B, I2V), else [model] preset."""
    from wan import dit_preset

    m = cfg.model
    for folder in (m.transformer_path, m.pretrained_model_name_or_path):
        path = Path(folder) / "config.json" if folder else None
        if path is not None and not path.is_file() and path.parent.is_dir():
            experts = expert_folders(path.parent)  # Wan2.2 A14B: the experts share one config
            path = experts["high"] / "config.json" if experts else path
        if path is not None and path.is_file():
            config = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
            return config, str(path)
    name = (m.pretrained_model_name_or_path or m.transformer_path).lower()
    guess = guess_preset(name, m.train_mode == "i2v")
    if guess:
        return dit_preset(guess), f"preset {guess} (from the name {name!r}; no config.json here)"
    return dit_preset(m.preset), f"preset {m.preset}"


@functools.cache
def _param_counts(config_json: str, trainable: tuple[str, ...], low: tuple[str, ...], lora: LoRASpec | None) -> dict:
    from train.models import apply_trainable_modules
    from wan import WanModel

    config = json.loads(config_json)
    with torch.device("meta"):
        model = WanModel(**config)
    apply_trainable_modules(model, list(trainable), list(low))
    if lora is not None:  # the whole DiT frozen, the adapters (in the blocks) trainable
        model.requires_grad_(False)
        apply_lora(model, lora)
    blocks = [sum(p.numel() for p in b.parameters()) for b in model.blocks]
    return {
        "total": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "largest_block": max(blocks, default=0),
        "block_linear": sum(mod.weight.numel() for mod in model.blocks[0].modules() if isinstance(mod, torch.nn.Linear))
        if blocks
        else 0,
    }


def param_counts(cfg: RunConfig, config: dict) -> dict:
    m = cfg.model
    return _param_counts(
        json.dumps(config, sort_keys=True),
        tuple(m.trainable_modules),
        tuple(m.trainable_modules_low_learning_rate),
        cfg.lora.spec,
    )


@functools.cache
def encoder_bytes(debug: bool, i2v: bool, wan22_vae: bool = False) -> dict[str, int]:
    """Bytes of the frozen encoders as build_models holds them: umT5 bf16, VAE fp32 (Wan2.1's, or Wan2.2's
    for TI2V-5B), CLIP (a Wan2.1 i2v DiT's) fp16."""
    from wan import CLIP_PRESETS, T5_PRESETS, CLIPVision, UMT5Encoder, WanVAE, WanVAE22, vae22_preset, vae_preset

    def count(module: torch.nn.Module, nbytes: int) -> int:
        return sum(p.numel() for p in module.parameters()) * nbytes

    with torch.device("meta"):
        vae = (WanVAE22(**vae22_preset("debug" if debug else "wan2.2")) if wan22_vae
               else WanVAE(**vae_preset("debug" if debug else "wan2.1")))  # fmt: skip
        out = {"umT5": count(UMT5Encoder(**T5_PRESETS["debug" if debug else "umt5-xxl"]), 2), "VAE": count(vae, 4)}
        if i2v:
            out["CLIP"] = count(CLIPVision(**CLIP_PRESETS["debug" if debug else "vit-h-14"]), 2)
    return out


def guess_preset(name: str, i2v: bool) -> str | None:
    """The release a folder name suggests (planning without the folder here)."""
    if "a14b" in name:
        return "i2v-A14B" if i2v else "t2v-A14B"
    if "ti2v" in name or "5b" in name:
        return "ti2v-5B"
    if "14b" in name:
        return "i2v-14B" if i2v else "14B"
    return "1.3B" if "1.3b" in name else None


def trained_experts(cfg: RunConfig) -> int:
    """DiTs the run trains: a Wan2.2 A14B run's trained experts (each with its own engine), else 1."""
    from train.models import expert_sources
    from wan.configs import EXPERT_PRESETS

    m = cfg.model
    folder = m.transformer_path or m.pretrained_model_name_or_path
    if folder and not Path(folder).exists():  # planned from the name alone
        has_experts = guess_preset(folder.lower(), m.train_mode == "i2v") in EXPERT_PRESETS
    else:
        has_experts = expert_sources(m) is not None
    return len(cfg.experts.train_experts) if has_experts else 1


def model_state_bytes(cfg: RunConfig, counts: dict, gpus: int) -> dict[str, float]:
    """Per-GPU bytes of the DiT's params, grads, master weights and AdamW state on the GPU, and what
    offloading puts in host memory ("host"): the engine's own formula (its traits' memory); with [ema], its
    float32 average of the trainable weights, 1/N of a copy on every engine (train/ema.py), on the GPU or
    (device = "cpu") the host."""
    layout = ParallelLayout.planned(gpus, cfg.parallel.sp)
    experts = trained_experts(cfg)
    states = ModelStates(
        total=counts["total"], trainable=counts["trainable"], fp32=cfg.train.mixed_precision == "fp32", layout=layout,
        parallel=cfg.parallel, low_precision_frozen=cfg.lora.enabled and cfg.train.mixed_precision != "fp32",
    )  # fmt: skip
    # Wan2.2 A14B: every trained expert's engine holds its own states, sharded alike.
    out = {k: v * experts for k, v in engine_traits(cfg.parallel.engine).memory(states).items()}
    if cfg.ema.enabled:
        average = 4 * counts["trainable"] * experts / layout.world_size
        if cfg.ema.device == "cpu":
            out["host"] = out.get("host", 0.0) + average
        else:
            out["ema"] = average
    return out


# ----------------------------------------------------------------------------------------------------
# Activations


def _fake_bytes(
    config_json: str,
    mode: str,
    save_matmuls: bool,
    tokens: int,
    batch: int,
    dtype: torch.dtype,
    per_token: bool = False,
) -> int:
    from wan.modules.model import saved_bytes_per_block

    return saved_bytes_per_block(json.loads(config_json), mode, save_matmuls, tokens, dtype, batch, per_token)


_fake_bytes = functools.lru_cache(maxsize=None)(_fake_bytes)


@functools.cache
def _outside_blocks_bytes(
    config_json: str, batch: int, latent: tuple[int, int, int], dtype: torch.dtype, frozen: bool = False
) -> int:
    """What the embeddings and the head keep for backward (fake tensors), the loss's inputs included.
    frozen: a LoRA run, where the embeddings and the head do not train: only what the gradient flowing
    from the blocks (their adapters) back through the head needs."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from wan import WanModel
    from wan.modules.checkpointing import StorageCounter

    config = dict(json.loads(config_json), num_layers=0)
    i2v = config.get("model_type") == "i2v"
    with FakeTensorMode(), torch.device("cpu"):
        model = WanModel(**config).train()
        counter = StorageCounter(exclude=list(model.parameters()))
        c = config["out_dim"]  # the noisy latent's channels; an i2v model's y brings the rest
        x = torch.empty(batch, c, *latent)
        y = torch.empty(batch, config["in_dim"] - c, *latent) if i2v else None
        clip = torch.empty(batch, 257, config.get("image_dim", 1280)) if has_image_branch(config) else None
        context = torch.empty(batch, config.get("text_len", 512), config["text_dim"])

        def pack(t):
            counter.add(t)
            return t

        if frozen:
            model.requires_grad_(False)
            # The blocks' output requires grad (their adapters train): stand it in at the patch embedding.
            model.patch_embedding.register_forward_hook(lambda module, args, out: out.detach().requires_grad_())

        autocast = torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
            pred = model(x, torch.full((batch,), 500.0), context, clip_fea=clip, y=y)
            (pred.float() - x).square().mean()
    return counter.nbytes


@dataclass
class Activations:
    saved: float  # autograd's saved tensors over the whole model for one micro-batch
    recompute_peak: float  # one checkpointed block's "none" activations during its backward
    in_flight: float  # activation gradients in flight
    detail: dict = field(default_factory=dict)


def activation_bytes(
    cfg: RunConfig, config: dict, counts: dict, batch: int, latent: tuple[int, int, int]
) -> Activations:
    """Saved activations of a micro-batch of `batch` samples of `latent` (frames, height, width)."""
    policy = cfg.model.checkpoint_policy
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.mixed_precision, torch.float32)
    key = json.dumps(config, sort_keys=True)
    pt, ph, pw = config.get("patch_size", (1, 2, 2))
    sample_tokens = (latent[0] // pt) * (latent[1] // ph) * (latent[2] // pw)
    tokens = -(-sample_tokens // cfg.parallel.sp)  # this GPU's share (wan/modules/ulysses.py pads to sp)
    layers = config["num_layers"]
    checkpointed = policy.count(layers)
    # autocast's bf16 weight copies exist only with fp32 weights (an engine without low_precision_params);
    # the others compute with bf16 parameters (gathered and freed where they are sharded).
    low_params = engine_traits(cfg.parallel.engine).low_precision_params
    copies = 2 * counts["block_linear"] if dtype != torch.float32 and low_params else 0
    # ti2v: a timestep per token, so the time embedding e0 and each block's modulation are per token too.
    per_token = cfg.model.train_mode == "ti2v"
    none = _fake_bytes(key, "none", False, tokens, batch, dtype, per_token) - copies
    if checkpointed:
        ckpt = _fake_bytes(key, policy.mode, policy.save_matmuls, tokens, batch, dtype, per_token)
    else:
        ckpt = 0
    outside = _outside_blocks_bytes(key, batch, latent, dtype, cfg.lora.enabled)
    # The inputs every block shares (text context in the compute dtype, e0 and the RoPE tables in fp32,
    # i2v's image context): saved_bytes_per_block leaves them out; one copy lives through the backward.
    d, text_len = config["dim"], config.get("text_len", 512)
    image = 257 if has_image_branch(config) else 0
    shared = (
        batch * (text_len + image) * d * dtype.itemsize
        + batch * (tokens if per_token else 1) * 6 * d * 4
        + 2 * tokens * (d // config["num_heads"] // 2) * 4
    )
    saved = checkpointed * ckpt + (layers - checkpointed) * none + outside + shared
    residual = batch * tokens * config["dim"] * 4
    return Activations(
        saved=saved, recompute_peak=none if checkpointed else 0, in_flight=2 * residual,
        detail={"per_block_none": none, "per_block_checkpointed": ckpt, "outside_blocks": outside, "shared": shared,
                "tokens": sample_tokens},
    )  # fmt: skip


def buffer_bytes(cfg: RunConfig, counts: dict, acts: Activations) -> dict[str, float]:
    p = cfg.parallel
    out = {"recompute": acts.recompute_peak, "grad_in_flight": acts.in_flight}
    out.update(engine_traits(p.engine).buffers(p, counts["largest_block"]))
    return out


# ----------------------------------------------------------------------------------------------------
# Compiles ([model] compile)


def _latent(frames: int, height: int, width: int, spatial: int = VAE_STRIDE[1]) -> tuple[int, int, int]:
    return 1 + (frames - 1) // VAE_STRIDE[0], height // spatial, width // spatial


def vae_spatial(cfg: RunConfig) -> int:
    """The VAE's spatial stride, from the bucket sides' multiple (its stride x the DiT's patch of 2)."""
    return cfg.data.bucket_side_multiple // 2


def step_shapes(cfg: RunConfig, frame_cap: int | None = None) -> set[tuple[int, tuple[int, int, int]]]:
    """Every (micro-batch, latent (F, H, W)) a training step can give the DiT: each aspect bucket of
    each (kind, size, frames) of data_buckets, random_frame_crop's shorter lengths included. Steps of
    clips shorter than the drawn frame count train at their length: more shapes, which cost graphs only
    with static shapes."""
    out = set()
    for b in data_buckets(cfg, frame_cap):
        full = valid_frame_count(b.frames)
        lengths = [full] + (list(range(MIN_VIDEO_FRAMES, full, 4)) if cfg.data.random_frame_crop else [])
        for height, width in aspect_buckets(cfg, b.size):
            for frames in lengths:
                batch = cfg.train.train_batch_size * step_repeats(cfg, frames, height, width)
                out.add((batch, _latent(frames, height, width, vae_spatial(cfg))))
    return out


def no_grad_shapes(cfg: RunConfig) -> set[tuple[int, tuple[int, int, int]]]:
    """(batch, latent) of the DiT's no_grad forwards: the eval loss's held-out clips (train/eval_loss.py
    clip_shape: every aspect bucket at the base sizes; forwards of up to train_batch_size quantiles) and
    validation sampling (one size; a batch of 2 with guidance: the conditional and unconditional
    passes together). Held-out clips shorter than video_sample_n_frames add shorter ones."""
    from train.validation import sampling_options

    d, v = cfg.data, cfg.validation
    out = set()
    if v.eval_holdout:
        q, b = len(v.eval_quantiles), cfg.train.train_batch_size
        batches = {min(b, q - j) for j in range(0, q, b)}
        for size, frames in (
            (d.video_sample_size, valid_frame_count(d.video_sample_n_frames)),
            (d.image_sample_size, 1),
        ):
            out |= {(n, _latent(frames, *hw, vae_spatial(cfg))) for hw in aspect_buckets(cfg, size) for n in batches}
    if v.sampling_enabled():
        o = sampling_options(v, d.video_sample_size, d.video_sample_n_frames, cfg.train.shift, d.bucket_side_multiple)
        out.add((2 if o.guided else 1, _latent(o.num_frames, o.height, o.width, vae_spatial(cfg))))
    return out


@dataclass(frozen=True)
class CompileCount:
    dynamic_tokens: bool  # the shape policy counted (train/models.py COMPILE_DYNAMIC_TOKENS)
    latent_shapes: int  # distinct latents (F, H, W) training steps can give the DiT
    token_counts: int  # distinct token counts among them
    graphs: int  # graphs the compiled blocks build over a run, training and no_grad together
    by_mode: dict = field(default_factory=dict)  # "training" / "no_grad" -> graph keys


def count_compiles(cfg: RunConfig, dynamic_tokens: bool | None = None, frame_cap: int | None = None) -> CompileCount:
    """The graphs [model] compile builds over a run, from the shapes the data options can draw. A
    block's graph depends on the grad mode and on its inputs' shapes, which are (micro-batch, tokens):
    static shapes compile once per distinct pair; with dynamic tokens (compile_dit's policy) once per
    grad mode and micro-batch class, 1 or more (dynamo specialises a size of 1). Selective
    checkpointing runs inside a block's call (WanAttentionBlock.forward), so in training the blocks it
    checkpoints and the others (gradient_checkpointing_every > 1) are a graph each."""
    from train.models import COMPILE_DYNAMIC_TOKENS

    dynamic = COMPILE_DYNAMIC_TOKENS if dynamic_tokens is None else dynamic_tokens
    config, policy = dit_config(cfg)[0], cfg.model.checkpoint_policy
    pt, ph, pw = config.get("patch_size", (1, 2, 2))
    layers = config["num_layers"]
    mixed = policy.mode == "selective" and policy.count(layers) < layers
    kinds = ("selective", "plain") if mixed else ("plain",)

    def graph(batch: int, latent: tuple[int, int, int]) -> tuple:
        tokens = (latent[0] // pt) * (latent[1] // ph) * (latent[2] // pw)
        return (min(batch, 2),) if dynamic else (batch, tokens)

    train = step_shapes(cfg, frame_cap)
    by_mode = {
        "training": {(*graph(*s), kind) for s in train for kind in kinds},
        "no_grad": {(*graph(*s), "plain") for s in no_grad_shapes(cfg)},
    }
    return CompileCount(
        dynamic_tokens=dynamic, latent_shapes=len({latent for _, latent in train}),
        token_counts=len({(f // pt) * (h // ph) * (w // pw) for _, (f, h, w) in train}),
        graphs=sum(len(keys) for keys in by_mode.values()), by_mode=by_mode,
    )  # fmt: skip


def compile_line(cfg: RunConfig, info: dict) -> str:
    """The report's line on compiles: how many graphs, what they are, and what static shapes would cost."""
    c, static = info["compiles"], info["compiles_static"]
    parts = []
    for mode, keys in c.by_mode.items():
        twice = " (each twice: selective-checkpointed blocks and the others)" if len({k[-1] for k in keys}) > 1 else ""
        if keys and c.dynamic_tokens:
            classes = sorted({k[0] for k in keys})
            parts.append(
                f"{mode}: " + ", ".join("micro-batch 1" if b == 1 else "micro-batch 2+" for b in classes) + twice
            )
        elif keys:
            parts.append(f"{mode}: {len(keys)}{twice}")
    what = (
        f"{c.graphs} graph{'s' if c.graphs != 1 else ''} of the DiT blocks over a run ("
        + ("token counts dynamic; " if c.dynamic_tokens else "one per micro-batch x token count; ")
        + "; ".join(parts)
        + f") for the {c.latent_shapes} latent shapes / {c.token_counts} token counts training can draw"
        + (f" (static shapes: {static.graphs})" if c.dynamic_tokens else "")
    )
    if cfg.model.compile:
        return f"compiles: {what}"
    refused = f" (refused with {cfg.parallel.engine})" if engine_traits(cfg.parallel.engine).compiles else ""
    return f"compiles: none ([model] compile = false); compile = true{refused} would make {what}"


# ----------------------------------------------------------------------------------------------------
# The plan


@dataclass
class Row:
    bucket: Bucket
    micro_batch: int
    tokens: int
    states: float
    encoders: float
    activations: float
    buffers: float
    peak: float
    fits: bool
    peak_while: str = "training"  # or "encoding (umT5)": low_vram's largest encoder outweighs the step


def step_peak(states: float, training: float, encoders: dict[str, int], low_vram: bool) -> tuple[float, float, str]:
    """(peak bytes, encoder bytes on the GPU at that peak, what drives it) for a step holding
    `training` bytes of activations and buffers over its model states. With low_vram the encoders
    reach the GPU one at a time while encoding, when the step's activations are gone."""
    if not encoders:  # from a cache
        return states + training + CUDA_CONTEXT, 0, "training"
    if not low_vram:
        on_gpu = sum(encoders.values())
        return states + on_gpu + training + CUDA_CONTEXT, on_gpu, "training"
    name = max(encoders, key=encoders.get)
    if encoders[name] > training:
        return states + encoders[name] + CUDA_CONTEXT, encoders[name], f"encoding ({name})"
    return states + training + CUDA_CONTEXT, 0, "training"


def plan(cfg: RunConfig, gpus: int, gpu_memory: int, headroom: float = 0.1) -> tuple[list[Row], dict]:
    config, source = dit_config(cfg)
    sp = cfg.parallel.sp
    if gpus % sp or config["num_heads"] % sp:
        raise ValueError(f"[parallel] sp = {sp} must divide the {gpus} GPUs and the DiT's {config['num_heads']} heads")
    counts = param_counts(cfg, config)
    states = model_state_bytes(cfg, counts, gpus)
    debug = not cfg.model.pretrained_model_name_or_path and cfg.model.preset.startswith("debug")
    # Training from a precomputed cache ([data] latent_cache_dir) loads no encoder to train.
    from train.models import uses_wan22_vae

    encoders = (
        {} if cfg.data.latent_cache_dir else encoder_bytes(debug, has_image_branch(config), uses_wan22_vae(config))
    )
    state_total = sum(v for k, v in states.items() if k != "host")
    limit = gpu_memory * (1 - headroom)
    # The clips' known frame counts (metadata, or the probe cache of an earlier start) cap the frames.
    frame_cap, frame_source = longest_step_frames(cfg.data, cfg.train.output_dir)
    rows = []
    for bucket in data_buckets(cfg, frame_cap):
        batch = cfg.train.train_batch_size * bucket.repeats
        acts = activation_bytes(cfg, config, counts, batch, bucket.latent())
        buffers = sum(buffer_bytes(cfg, counts, acts).values())
        peak, on_gpu, driver = step_peak(state_total, acts.saved + buffers, encoders, cfg.model.low_vram)
        rows.append(
            Row(bucket, batch, acts.detail["tokens"], state_total, on_gpu, acts.saved, buffers, peak, peak <= limit,
                driver)
        )  # fmt: skip
    info = {"config": config, "source": source, "counts": counts, "states": states, "encoders": encoders,
            "experts": trained_experts(cfg),
            "limit": limit, "gpus": gpus, "gpu_memory": gpu_memory, "frame_cap": frame_cap,
            "frame_source": frame_source, "compiles": count_compiles(cfg, frame_cap=frame_cap),
            "compiles_static": count_compiles(cfg, dynamic_tokens=False, frame_cap=frame_cap)}  # fmt: skip
    return rows, info


def advice(cfg: RunConfig, rows: list[Row], info: dict) -> list[str]:
    """What to change when a bucket does not fit, most effective first."""
    if all(r.fits for r in rows):
        return []
    m, p = cfg.model, cfg.parallel
    out = []
    policy = m.checkpoint_policy
    if policy.mode != "full" or policy.every != 1:
        out.append('[model] gradient_checkpointing = "full" with gradient_checkpointing_every = 1 (least activations)')
    traits = engine_traits(p.engine)
    if not traits.shards_parameters:
        sharding = " or ".join(f'"{t.name}"' for t in REGISTRY.values() if t.shards_parameters)
        out.append(f"[parallel] engine = {sharding} (shards the parameters too)")
    if not p.offload_optimizer and "optimizer" in traits.offloads:
        out.append("[parallel] offload_optimizer = true (master weights and AdamW state in host memory)")
    if not p.offload_param and "param" in traits.offloads:
        out.append("[parallel] offload_param = true (parameter shards in host memory)")
    if not m.low_vram:
        out.append("[model] low_vram = true (encoders on the GPU only while encoding)")
    if cfg.train.train_batch_size > 1:
        out.append("[train] train_batch_size = 1 with gradient_accumulation_steps for the same global batch")
    if any(r.bucket.repeats > 1 and not r.fits for r in rows):
        out.append("training_with_video_token_length repeats small batches 2x/4x: a larger token_sample_size "
                   "budget or a smaller video_sample_n_frames changes it")  # fmt: skip
    sp = next((n for n in sequence_parallel_choices(info) if n > p.sp and all(plan_at_sp(cfg, info, n))), None)
    if sp is not None:
        out.append(f"[parallel] sp = {sp} (sequence parallel: each sample's activations over {sp} GPUs; "
                   f"every bucket fits)")  # fmt: skip
    worst = max((r for r in rows if not r.fits and r.bucket.kind == "video"), key=lambda r: r.peak, default=None)
    if worst is not None:
        frames = fewest_fitting_frames(cfg, worst, info)
        what = f"at most {frames} frames" if frames else "no frame count fits"
        out.append(f"at size {worst.bucket.size:.4g} ({worst.bucket.height}x{worst.bucket.width}): {what} "
                   "(video_sample_n_frames, or a token budget)")  # fmt: skip
    return out


def sequence_parallel_choices(info: dict) -> list[int]:
    """The sp values the planned run allows: dividing both the GPUs and the DiT's heads."""
    heads = info["config"]["num_heads"]
    return [n for n in range(1, info["gpus"] + 1) if info["gpus"] % n == 0 and heads % n == 0]


def plan_at_sp(cfg: RunConfig, info: dict, sp: int) -> list[bool]:
    """Whether each bucket fits with [parallel] sp = `sp` (the rest of the config as it is)."""
    other = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, sp=sp))
    return [r.fits for r in plan(other, info["gpus"], info["gpu_memory"], 1 - info["limit"] / info["gpu_memory"])[0]]


def fewest_fitting_frames(cfg: RunConfig, row: Row, info: dict) -> int:
    """The most pixel frames (4k+1) of row's bucket that fit, 0 when none does."""
    config, counts = info["config"], info["counts"]
    for frames in range(row.bucket.frames, 0, -4):
        b = dataclasses.replace(row.bucket, frames=frames, ratios=1)
        acts = activation_bytes(cfg, config, counts, row.micro_batch, b.latent())
        training = acts.saved + sum(buffer_bytes(cfg, counts, acts).values())
        peak, _, _ = step_peak(row.states, training, info["encoders"], cfg.model.low_vram)
        if peak <= info["limit"]:
            return frames
    return 0


def report(cfg: RunConfig, rows: list[Row], info: dict) -> str:
    c, counts, states = info["config"], info["counts"], info["states"]
    m, p = cfg.model, cfg.parallel
    lines = [
        f"DiT {info['source']}: dim {c['dim']}, {c['num_layers']} blocks, {counts['total'] / 1e9:.2f} B parameters, "
        f"{counts['trainable'] / 1e9:.2f} B trainable"
        + (f" (a LoRA adapter of rank {cfg.lora.rank}; the base frozen)" if cfg.lora.enabled else "")
        + (f"; x {info['experts']} Wan2.2 A14B experts, each with its engine" if info["experts"] > 1 else ""),
        f"engine {p.engine} on {info['gpus']} GPUs of {info['gpu_memory'] / GB:.0f} GB "
        f"(limit {info['limit'] / GB:.1f} GB with headroom), {cfg.train.mixed_precision}, checkpointing "
        f"{m.checkpoint_policy.describe()}, micro-batch {cfg.train.train_batch_size}"
        + (f", sequence parallel over {p.sp} GPUs (activations per GPU: 1/{p.sp} of the tokens)" if p.sp > 1 else ""),
        "model states per GPU: " + ", ".join(f"{k} {v / GB:.2f} GB" for k, v in states.items() if k != "host")
        + (f" (+ {states['host'] / GB:.1f} GB in host memory)" if states["host"] else ""),
        "frozen encoders: " + ", ".join(f"{k} {v / GB:.2f} GB" for k, v in info["encoders"].items())
        + (" (low_vram: on the GPU only while encoding)" if m.low_vram else " (on every GPU)"),
        f"video frames: at most {info['frame_cap']}: {info['frame_source']}" if info.get("frame_cap")
        else f"video frames: as the options draw them (clip lengths unknown: {info.get('frame_source')})",
        "",
        "| kind | size | frames | bucket HxW (of n) | micro-batch | tokens | states GB | encoders GB | activations GB "
        "| buffers GB | peak GB | peak while | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for r in rows:
        b = r.bucket
        rep = f" (x{b.repeats} repeats)" if b.repeats > 1 else ""
        lines.append(
            f"| {b.kind} | {b.size:.4g} | {b.frames} | {b.height}x{b.width} ({b.ratios}) | {r.micro_batch}{rep} | "
            f"{r.tokens * r.micro_batch:,} | {r.states / GB:.1f} | {r.encoders / GB:.1f} | {r.activations / GB:.1f} | "
            f"{r.buffers / GB:.1f} | {r.peak / GB:.1f} | {r.peak_while} | {'fits' if r.fits else 'DOES NOT FIT'} |"
        )
    lines += ["", compile_line(cfg, info)]
    tips = advice(cfg, rows, info)
    if tips:
        lines += ["", "does not fit everywhere; what would help:"] + [f"  - {t}" for t in tips]
    else:
        lines += ["", "every bucket fits."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--gpu_memory", default="80GB", help="per GPU: 80GB, 141GB, 24GiB, ...")
    parser.add_argument("--headroom", type=float, default=0.1, help="fraction kept free (fragmentation)")
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(rest)
        rows, info = plan(cfg, args.gpus, parse_bytes(args.gpu_memory), args.headroom)
    except ValueError as err:  # ConfigError too
        sys.exit(str(err))
    print(report(cfg, rows, info))


if __name__ == "__main__":
    main()
