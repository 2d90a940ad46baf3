"""Where a training step's time goes: data wait, encoding (VAE + umT5 [+ CLIP]), forward, backward,
optimizer, logging, and the rest (noise draws, bookkeeping), on the debug config (1 rank).

    python bench/train_step.py                      # debug preset, 64 px, 9 frames
    python bench/train_step.py --steps 60 --workers 2 --size 128 --frames 17

Three runs in this process: encoders live (what `make demo` does); encoders cached (each batch's
VAE latents and text embeddings computed on its first use, then reused: a run on pre-encoded data);
and cached encodings with warm data (every batch decoded before the run, so the DataLoader never
makes the step wait: on this 2-core machine one worker cannot keep up with a 40 ms step, which a
real model's seconds-long step hides). Prints the median seconds per section over the steps after
--warmup and its share of the step; the target is everything outside forward, backward and optimizer
under 5% of the step with cached or warm data.
"""

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.make_demo_data import make_demo_data  # noqa: E402
from train.config import load_config  # noqa: E402
from train.main import Trainer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("data_wait", "encode", "forward", "backward", "optimizer", "logging")


class WarmLoader:
    """The run's batches decoded ahead, epoch by epoch, served in the sampler's order."""

    def __init__(self, trainer: Trainer, steps: int):
        self.sampler, self.batches, total, epoch = trainer.sampler, {}, 0, 0
        while total < steps:
            self.sampler.set_epoch(epoch)
            self.batches[epoch] = [dict(b, pixels=b["pixels"].clone()) for b in trainer.loader]
            total, epoch = total + len(self.batches[epoch]), epoch + 1
        self.sampler.set_epoch(0)

    def __iter__(self):
        return iter(self.batches[self.sampler.epoch])


def run(data: Path, out: Path, args, cached: bool, warm: bool) -> list[dict[str, float]]:
    cfg = load_config([
        "--cfg", str(REPO / "configs" / "debug.toml"), f"--train_data_dir={data}",
        f"--train_data_meta={data / 'metadata.json'}", f"--output_dir={out}", f"--max_train_steps={args.steps}",
        "--checkpointing_steps=0", "--resume_from_checkpoint=", "--progress_bar=false", f"--log_every={args.steps}",
        f"--dataloader_num_workers={args.workers}", f"--video_sample_size={args.size}",
        f"--image_sample_size={args.size}", f"--video_sample_n_frames={args.frames}", f"--preset={args.preset}",
        f"--mixed_precision={args.precision}", "--max_bad_fraction=1.0",
    ])  # fmt: skip
    trainer = Trainer(cfg)
    if cached:
        live, cache = trainer.encode, {}

        def encode(batch: dict) -> dict:
            key = (tuple(batch["index"].tolist()), tuple(batch["text"]))
            if key not in cache:
                cache[key] = live(batch)
            return cache[key]

        trainer.encode = encode
    if warm:
        trainer.loader = WarmLoader(trainer, args.steps * trainer.accumulation)
    steps = []
    log_step = trainer.metrics.log_step

    def record(step, stats):
        sections = dict(stats.sections, data_wait=stats.data_wait)
        sections["other"] = stats.step_time - sum(sections.values())
        steps.append({"step": stats.step_time, **sections})
        log_step(step, stats)

    trainer.metrics.log_step = record
    trainer.train()
    return steps[args.warmup :]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--warmup", type=int, default=30, help="steps left out (start-up, cache filling)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--frames", type=int, default=9)
    parser.add_argument("--preset", default="debug")
    parser.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        make_demo_data(data)
        modes = {"live": (False, False), "cached": (True, False), "warm": (True, True)}
        results = {name: run(data, Path(tmp) / name, args, *mode) for name, mode in modes.items()}
    print(f"\n{args.preset} preset, {args.size} px, {args.frames} frames, {args.precision}, {args.workers} worker(s), "
          f"median of {args.steps - args.warmup} steps")  # fmt: skip
    print("| section | encoders live: s | share | encoders cached: s | share | cached + warm data: s | share |")
    print("|---|---|---|---|---|---|---|")
    medians = {name: {k: statistics.median(s[k] for s in steps) for k in steps[0]} for name, steps in results.items()}
    for key in (*SECTIONS, "other", "step"):
        cells = []
        for name in results:
            m = medians[name]
            cells.append(f"{m[key]:.4f} | {100 * m[key] / m['step']:.1f}%")
        print(f"| {key} | " + " | ".join(cells) + " |")
    for name, steps in results.items():
        # Per step, then the median: the share of the step outside forward, backward and optimizer.
        outside = [1 - (s["forward"] + s["backward"] + s["optimizer"]) / s["step"] for s in steps]
        print(f"{name}: outside forward+backward+optimizer: median {100 * statistics.median(outside):.1f}% of the step")


if __name__ == "__main__":
    main()
