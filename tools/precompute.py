"""Precompute the DiT's inputs once: `python -m tools.precompute --cfg X.toml [--variants K] [--key=value ...]`,
alone or under `torchrun --nproc_per_node N -m tools.precompute ...`; then train with the same config
and `[data] latent_cache_dir` set (the folder written here): no VAE, umT5 or CLIP is loaded to train.

For every sample of the metadata (the samples training would use, in its order): the VAE latents of K
variants at every size the run's options may train it at (train/data/cache.py), the umT5 embedding
of its caption, for i2v the conditioning y and the CLIP features; once, the empty prompt's embedding.
Samples go in shards of --shard_size, shard j to rank j mod N: each shard's files depend on its
samples alone, so 1 and N ranks write the same bytes. A killed precompute run again keeps every
finished shard. Bad media are skipped, named and counted, and training from the cache meets them as
online training does (replaced and counted).
"""

# A rank ties itself to the torchrun agent before the heavy imports (as train.main does).
# ruff: noqa: E402

import argparse
import logging
import math
import os
import sys
import time
from pathlib import Path

from train import guard

guard.tie_rank_to_launcher()  # a killed torchrun takes its ranks along, none goes on writing alone

import torch
import torch.distributed as dist

from train.config import ConfigError, RunConfig, load_config
from train.data.buckets import bucket_table, decoded_mean_side
from train.data.cache import (
    CACHE_FORMAT,
    EMPTY_PROMPT_FILE,
    INDEX_FILE,
    Variant,
    differences,
    fingerprint,
    read_json,
    remove_temporaries,
    sample_key,
    sample_variants,
    shard_name,
    size_name,
    start_rng,
    text_digest,
    token_length_fallback,
    write_json,
    write_tensors,
)
from train.data.dataset import SizeOptions, VideoDataset, _time_limit, pixels_to_model
from train.data.loader import load_samples, training_keys
from train.data.metadata import Sample
from train.data.video import MediaError
from train.models import Models, build_models
from wan.encoders import encode_i2v_condition, encode_latents
from wan.pipeline import VAE_STRIDE

log = logging.getLogger("precompute")


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--variants", type=int, default=1, help="K: start frames drawn per sample and size")
    parser.add_argument("--shard_size", type=int, default=32, help="samples per shard file")
    parser.add_argument("--device", default="", help="cpu or cuda (default: cuda when there is one)")
    args, rest = parser.parse_known_args(argv)
    if args.variants < 1 or args.shard_size < 1:
        parser.error("--variants and --shard_size must be >= 1")
    return args, rest


class Plan:
    """What the cache will hold: the samples, their buckets and variants, the shards and the fingerprint."""

    def __init__(self, cfg: RunConfig, samples: list[Sample], skipped: list, num_variants: int, shard_size: int):
        d = cfg.data
        self.cfg, self.samples, self.skipped = cfg, samples, skipped
        self.options = SizeOptions.of(d)
        self.keys = training_keys(samples, d)
        self.names = [sample_key(s.path, d.train_data_dir) for s in samples]
        any_size: dict = {}
        if self.options.random_hw_adapt and self.options.training_with_video_token_length:
            cap = max(d.image_sample_size, d.video_sample_size)
            means: dict = {}
            for s, key in zip(samples, self.keys, strict=True):
                if s.kind == "video":
                    means.setdefault(key, []).append(decoded_mean_side(s.height, s.width, cap))
            any_size = {key: token_length_fallback(self.options, m) for key, m in means.items()}
        self.variants = [
            sample_variants(self.options, s, any_size.get(key, False))
            for s, key in zip(samples, self.keys, strict=True)
        ]
        self.num_variants, self.shard_size = num_variants, shard_size
        self.num_shards = math.ceil(len(samples) / shard_size)
        self.fingerprint = fingerprint(d, cfg.model, cfg.train.seed)

    def shard(self, j: int) -> range:
        return range(j * self.shard_size, min((j + 1) * self.shard_size, len(self.samples)))

    def listing(self, j: int) -> list[list[str]]:
        """What shard j must hold: (name, caption digest) per sample."""
        return [[self.names[i], text_digest(self.samples[i].text)] for i in self.shard(j)]

    def shape(self, i: int, variant: Variant) -> tuple[int, int, int, int]:
        """[F, H, W, 3] of sample i's pixels at a variant."""
        height, width = bucket_table(variant.size, self.cfg.data.bucket_side_multiple)[self.keys[i][1]]
        return (variant.frames, height, width, 3)

    def estimated_bytes(self, z_dim: int, i2v: bool) -> int:
        """The cache's size before a sample is read: latents (and y) in float32; captions and CLIP features
        are small beside them and left out."""
        total = 0
        for i, variants in enumerate(self.variants):
            for v in variants:
                f, h, w, _ = self.shape(i, v)
                t, s = 1 + (f - 1) // VAE_STRIDE[0], VAE_STRIDE[1]
                total += (z_dim + (z_dim + 4 if i2v else 0)) * t * (h // s) * (w // s) * 4 * self.num_variants
        return total

    def finished(self, folder: Path, j: int) -> bool:
        """Shard j is on disk, from this fingerprint and K, with these samples."""
        manifest = read_json(folder / f"{shard_name(j)}.json")
        return (
            manifest is not None and (folder / f"{shard_name(j)}.safetensors").exists()
            and manifest.get("fingerprint") == self.fingerprint and manifest.get("variants") == self.num_variants
            and manifest.get("listing") == self.listing(j)
        )  # fmt: skip


class Encoder:
    """The frozen encoders on the device, one sample at a time (batches of one: what the trainer's
    default vae_mini_batch = 1 computes, so the numbers are the online path's)."""

    def __init__(self, models: Models, device: torch.device, cfg: RunConfig, plan: Plan):
        self.models, self.device, self.cfg, self.plan = models, device, cfg, plan
        self.loader = VideoDataset(
            plan.samples, keys=plan.keys, video_sample_stride=cfg.data.video_sample_stride, caption_dropout=0.0,
            seed=cfg.train.seed, max_retries=0, decode_timeout=cfg.data.decode_timeout,
        )  # fmt: skip
        self.text_dtype = next(models.text.model.parameters()).dtype

    def caption(self, text: str) -> torch.Tensor:
        """The umT5 embedding [tokens, dim] in the encoder's dtype (the trainer's float32 copy of it is exact)."""
        _, mask = self.models.text.tokenizer([text])
        context = self.models.text([text], device=self.device)[0]
        tokens = int(mask.sum())
        assert not context[tokens:].any(), "the text encoder left values past the prompt's tokens"
        return context[:tokens].to("cpu", self.text_dtype)

    def pixels(self, i: int, variant: Variant, k: int) -> torch.Tensor:
        """Sample i's frames at a variant, [F, H, W, 3] uint8, from variant k's start frame."""
        sample = self.plan.samples[i]
        out = torch.empty(self.plan.shape(i, variant), dtype=torch.uint8)
        rng = start_rng(self.cfg.train.seed, self.plan.names[i], variant.size, k)
        with _time_limit(self.cfg.data.decode_timeout, str(sample.path)):
            self.loader._load(sample, {}, rng, out)
        return out

    @torch.no_grad()
    def variant(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        m = self.models
        video = pixels_to_model(pixels[None].to(self.device))  # [1, 3, F, H, W]
        out = {"latents": encode_latents(m.vae, video, 1)[0]}
        if m.clip is not None:
            y, clip_fea = encode_i2v_condition(m.vae, m.clip, video[:, :, 0], video.shape[2])
            out.update(y=y[0], clip_fea=clip_fea[0])
        return {name: t.cpu() for name, t in out.items()}

    def shard(self, j: int) -> tuple[dict[str, torch.Tensor], dict]:
        """Shard j's tensors and manifest."""
        tensors, entries = {}, []
        for n, i in enumerate(self.plan.shard(j)):
            s = self.plan.samples[i]
            entry = {"key": self.plan.names[i], "kind": s.kind, "width": s.width, "height": s.height,
                     "num_frames": s.num_frames, "text": text_digest(s.text), "bad": None, "variants": {}}  # fmt: skip
            mine = {}
            try:
                for v in self.plan.variants[i]:
                    for k in range(self.plan.num_variants):
                        for name, t in self.variant(self.pixels(i, v, k)).items():
                            mine[f"{n}/{size_name(v.size)}/{k}/{name}"] = t
                    entry["variants"][size_name(v.size)] = v.frames
            except MediaError as err:
                entry["bad"], entry["variants"], mine = err.reason, {}, {}
                log.warning("skipping %s: %s", err.path, err.reason)
            mine[f"{n}/context"] = self.caption(s.text)
            tensors.update(mine)
            entries.append(entry)
        manifest = {"fingerprint": self.plan.fingerprint, "variants": self.plan.num_variants,
                    "listing": self.plan.listing(j), "samples": entries}  # fmt: skip
        return tensors, manifest


def progress_line(done: int, total: int, samples: int, started: float, world: int) -> str:
    """A bar for this rank's shards with the rate and time left (ranks work alike: one speaks)."""
    width = 30
    filled = round(width * done / max(total, 1))
    elapsed = time.perf_counter() - started
    rate = samples / elapsed if elapsed > 0 else 0.0
    left = elapsed / done * (total - done) if done else float("nan")
    eta = "?" if math.isnan(left) else f"{int(left // 60)}m{int(left % 60):02d}s"
    return (
        f"precompute [{'#' * filled}{'.' * (width - filled)}] {done}/{total} shards of rank 0 "
        f"({world} rank(s)), {rate * world:.2f} samples/s, {eta} left"
    )


def check_existing(folder: Path, plan: Plan) -> bool:
    """True when a finished cache of this plan is already there; a finished cache of another plan is
    refused (it is never overwritten), naming what differs."""
    index = read_json(folder / INDEX_FILE)
    if index is None:
        return False
    problems = differences(index.get("fingerprint", {}), plan.fingerprint)
    if index.get("variants") != plan.num_variants:
        problems.append(f"variants: the cache has {index.get('variants')}, this precompute {plan.num_variants}")
    if not problems and (  # same options: the samples' listing then tells
        index.get("shards") != list(range(plan.num_shards))
        or not all(plan.finished(folder, j) for j in range(plan.num_shards))
    ):
        problems.append("the samples: the metadata lists other samples or captions than the cache holds")
    if problems:
        raise ValueError(
            f"{folder} holds a finished cache of other options ({folder / INDEX_FILE}):\n  "
            + "\n  ".join(problems)
            + "\ngive another latent_cache_dir, or delete it to write this one"
        )
    return True


def write_index(folder: Path, plan: Plan, shapes: dict) -> dict:
    """index.json from the shards' manifests (rank 0, once every shard is written)."""
    bad, total_bytes = [], 0
    for j in range(plan.num_shards):
        manifest = read_json(folder / f"{shard_name(j)}.json")
        bad += [(e["key"], e["bad"]) for e in manifest["samples"] if e["bad"]]
        total_bytes += (folder / f"{shard_name(j)}.safetensors").stat().st_size
    index = {
        "format": CACHE_FORMAT, "fingerprint": plan.fingerprint, "variants": plan.num_variants,
        "seed": plan.cfg.train.seed, "shards": list(range(plan.num_shards)), "samples": len(plan.samples),
        "bad": len(bad), "bytes": total_bytes, "shapes": shapes,
        "refused": [[sample_key(Path(path), plan.cfg.data.train_data_dir), reason] for path, reason in plan.skipped],
    }  # fmt: skip
    write_json(folder / INDEX_FILE, index)
    return {"bad": bad, "bytes": total_bytes}


def shapes_of(models: Models, cfg: RunConfig, encoder: Encoder) -> dict:
    """The tensor shapes a reader needs for padding and empty slots, from a tiny encode."""
    probe = encoder.variant(torch.zeros(1, 16, 16, 3, dtype=torch.uint8))
    shapes = {
        "variant": sorted(probe), "vae_stride": list(VAE_STRIDE), "latent_channels": probe["latents"].shape[0],
        "mask_channels": VAE_STRIDE[0], "text_len": cfg.model.tokenizer_max_length,
        "text_dim": encoder.caption("").shape[1],
    }  # fmt: skip
    if "clip_fea" in probe:
        shapes["clip_fea"] = list(probe["clip_fea"].shape)
    return shapes


def precompute(cfg: RunConfig, num_variants: int, shard_size: int, device: torch.device, rank: int, world: int) -> None:
    if not cfg.data.latent_cache_dir:
        raise ValueError("set [data] latent_cache_dir (or --latent_cache_dir=DIR): the folder the cache is written to")
    folder = Path(cfg.data.latent_cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    skipped: list = []
    samples = load_samples(cfg.data, skipped, folder, rank)  # sizes probed once and kept in the folder
    plan = Plan(cfg, samples, skipped, num_variants, shard_size)
    for path, reason in skipped:
        if rank == 0:
            log.warning("refused %s: %s", path, reason)
    if check_existing(folder, plan):
        if rank == 0:
            print(f"precompute: {folder} already holds this cache ({len(samples)} samples): nothing to do", flush=True)
        return
    if rank == 0:
        remove_temporaries(folder)
    if world > 1:
        dist.barrier()
    todo = [j for j in range(rank, plan.num_shards, world) if not plan.finished(folder, j)]
    kept = len(range(rank, plan.num_shards, world)) - len(todo)
    models = build_models(cfg.model, device, cfg.train.seed)
    encoder = Encoder(models, device, cfg, plan)
    shapes = shapes_of(models, cfg, encoder)
    if rank == 0:
        gib = plan.estimated_bytes(shapes["latent_channels"], models.clip is not None) / 2**30
        print(
            f"precompute: {len(samples)} samples ({len(skipped)} refused) x {sum(map(len, plan.variants))} sizes "
            f"in all x {num_variants} variant(s) in {plan.num_shards} shards to {folder}: about {gib:.2f} GiB of "
            f"latents; {world} rank(s); {kept} of this rank's shards already done",
            flush=True,
        )
        # Always (a few ms): one left by a killed precompute of other encoders must not stay.
        write_tensors(folder / EMPTY_PROMPT_FILE, {"context": encoder.caption("")})
    started, samples_done = time.perf_counter(), 0
    for done, j in enumerate(todo, 1):
        tensors, manifest = encoder.shard(j)
        write_tensors(folder / f"{shard_name(j)}.safetensors", tensors)
        write_json(folder / f"{shard_name(j)}.json", manifest)  # last: the shard counts as finished from here
        samples_done += len(plan.shard(j))
        if rank == 0:
            print(progress_line(done, len(todo), samples_done, started, world), flush=True)
    if world > 1:
        dist.barrier()
    if rank == 0:
        summary = write_index(folder, plan, shapes)
        for key, reason in summary["bad"]:
            print(f"  bad: {key}: {reason}", flush=True)
        print(
            f"precompute: wrote {folder / INDEX_FILE}: {len(samples)} samples, {len(summary['bad'])} bad, "
            f"{len(skipped)} refused up front, {summary['bytes'] / 2**30:.3f} GiB; train with --latent_cache_dir={folder}",
            flush=True,
        )


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args, rest = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(rest)
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from None
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    cuda = torch.cuda.is_available() and args.device != "cpu"
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("gloo")  # barriers and the probe's gathers only: no tensor crosses ranks
    try:
        precompute(cfg, args.variants, args.shard_size, device, rank, world)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
