"""Training from a precomputed cache (`[data] latent_cache_dir`, tools/precompute.py) against online training:
step time and peak memory, each run in its own process, on the demo data (1 rank, CPU or one GPU).

    python bench/cache.py                       # the debug preset, then a mid-size DiT (CPU sizes)
    python bench/cache.py --setups debug --steps 60
    python bench/cache.py --setups 1.3B --size 640 --frames 81 --clips 2 --steps 4 --warmup 1 --precision bf16
                                                # the GPU check's row: 480 x 832 x 81 clips

Setups: "debug" (the debug preset: tiny DiT, VAE and umT5); "mid" (a DiT of 8 blocks of width 768 and
the release-size VAE with random weights, the debug umT5: the umT5-xxl does not fit a CPU run);
"1.3B" (the 1.3B DiT, the release-size VAE and umT5-xxl with random weights: GPU only).
--clips N writes N clips of 832 x 480 and --frames frames (the training size 640 makes them 480 x 832)
instead of the demo data. Prints per setup the median seconds per step (after --warmup steps), its encode and data-wait
sections, the process's peak memory (CPU: resident set; CUDA: the most allocated) and the ratios
online / cached measured in the same run, plus the precompute's seconds per sample.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]
MID_DIT = dict(dim=768, ffn_dim=3072, num_heads=12, num_layers=8)


def write_mid_release(root: Path) -> None:
    """A release folder in the official layout: the mid-size DiT, the release-size VAE, the debug umT5."""
    import torch

    from train.models import T5_FILE, TOKENIZER_DIR, VAE_FILE
    from wan import T5_PRESETS, UMT5Encoder, WanModel, WanVAE, dit_preset, vae_preset
    from wan.modules.tokenizer import DEBUG_TOKENIZER

    torch.manual_seed(0)
    WanModel(**{**dit_preset("debug"), **MID_DIT}).save_pretrained(root)
    torch.save(WanVAE(**vae_preset("wan2.1")).state_dict(), root / VAE_FILE)
    t5 = UMT5Encoder(**T5_PRESETS["debug"])
    torch.save({k: v.to(torch.bfloat16) for k, v in t5.state_dict().items()}, root / T5_FILE)
    (root / TOKENIZER_DIR).mkdir(parents=True)
    (root / TOKENIZER_DIR / "spiece.model").write_bytes(Path(DEBUG_TOKENIZER).read_bytes())
    (root / TOKENIZER_DIR / "tokenizer_config.json").write_text('{"tokenizer_class": "T5Tokenizer", "extra_ids": 0}')


def write_clips(folder: Path, count: int, frames: int) -> None:
    """`count` 832 x 480 clips of `frames` frames with captions: one 480 x 832 bucket at size 640."""
    from tools.make_demo_data import scene_frames
    from train.data.synthetic import write_video

    folder.mkdir(parents=True)
    entries = []
    for i in range(count):
        name = f"clip_{i}.mp4"
        write_video(folder / name, scene_frames(832, 480, frames, "circle", "red", "blue", "left to right"), 16)
        entries.append({"file_path": name, "text": f"a red circle crosses a blue field, take {i}", "type": "video",
                        "width": 832, "height": 480, "num_frames": frames})  # fmt: skip
    (folder / "metadata.json").write_text(json.dumps(entries))


def options(setup: str, data: Path, tmp: Path, args) -> list[str]:
    model = {"debug": ["--preset=debug"], "mid": [f"--pretrained_model_name_or_path={tmp / 'mid'}"],
             "1.3B": ["--preset=1.3B"]}[setup]  # fmt: skip
    return [
        "--cfg", str(REPO / "configs" / "debug.toml"), *model, f"--train_data_dir={data}",
        f"--train_data_meta={data / 'metadata.json'}", f"--video_sample_size={args.size}",
        f"--image_sample_size={args.size}", f"--video_sample_n_frames={args.frames}", "--video_sample_stride=1",
        f"--mixed_precision={args.precision}", "--max_bad_fraction=1.0", "--validation_prompts=[]",
        "--eval_holdout=0", f"--dataloader_num_workers={args.workers}", f"--latent_cache_dir={tmp / ('cache-' + setup)}",
    ]  # fmt: skip


def worker(argv: list[str]) -> None:
    """One training run in this process; prints a JSON line: median step, sections, peak memory."""
    import torch

    from bench.common import rss_bytes
    from train.config import load_config
    from train.main import Trainer

    steps, warmup, cached = int(argv[0]), int(argv[1]), argv[2] == "cached"
    rest = argv[3:]
    if not cached:
        rest = [a for a in rest if not a.startswith("--latent_cache_dir=")]
    cfg = load_config([*rest, f"--max_train_steps={steps}", "--checkpointing_steps=0", "--resume_from_checkpoint=",
                       "--progress_bar=false", f"--log_every={steps}"])  # fmt: skip
    trainer = Trainer(cfg)
    if trainer.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    records = []
    log_step = trainer.metrics.log_step

    def record(step, stats):
        records.append(
            {"step": stats.step_time, "data_wait": stats.data_wait, "encode": stats.sections.get("encode", 0.0)}
        )
        log_step(step, stats)

    trainer.metrics.log_step = record
    trainer.train()
    kept = records[warmup:]
    peak = torch.cuda.max_memory_allocated() if trainer.device.type == "cuda" else rss_bytes("VmHWM")
    medians = {k: statistics.median(r[k] for r in kept) for k in kept[0]}
    print(json.dumps({**medians, "peak_gib": peak / 2**30}))


def run(mode: str, opts: list[str], args) -> dict:
    cmd = [sys.executable, __file__, "--worker", str(args.steps), str(args.warmup), mode, *opts]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode:
        sys.exit(f"{mode} run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setups", nargs="+", default=["debug", "mid"], choices=("debug", "mid", "1.3B"))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--frames", type=int, default=9)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--precision", default="fp32", choices=("bf16", "fp32"))
    parser.add_argument("--clips", type=int, default=0, help="write this many long clips instead of the demo data")
    args = parser.parse_args()
    from tools.make_demo_data import make_demo_data

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "data"
        if args.clips:
            write_clips(data, args.clips, args.frames)
        else:
            make_demo_data(data)
        for setup in args.setups:
            if setup == "mid":
                write_mid_release(tmp / "mid")
            opts = options(setup, data, tmp, args)
            started = time.perf_counter()
            pre = subprocess.run(
                [sys.executable, "-m", "tools.precompute", *opts], capture_output=True, text=True, cwd=REPO
            )
            if pre.returncode:
                sys.exit(f"precompute failed:\n{pre.stderr[-4000:]}")
            precompute_s = time.perf_counter() - started
            samples = json.loads((tmp / f"cache-{setup}" / "index.json").read_text())["samples"]
            online, cached = run("online", opts, args), run("cached", opts, args)
            rows.append((setup, online, cached, precompute_s / samples))
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"\n{args.size} px x {args.frames} frames, {args.precision}, {args.workers} DataLoader worker(s), {device}; "
          f"median of {args.steps - args.warmup} steps after {args.warmup}")  # fmt: skip
    print("| setup | online s/step | cached s/step | speed-up | online encode s | online data wait s | cached data wait s "
          "| online peak GiB | cached peak GiB | memory ratio | precompute s/sample |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for setup, o, c, pre in rows:
        print(f"| {setup} | {o['step']:.4f} | {c['step']:.4f} | {o['step'] / c['step']:.2f}x | {o['encode']:.4f} | "
              f"{o['data_wait']:.4f} | {c['data_wait']:.4f} | {o['peak_gib']:.3f} | {c['peak_gib']:.3f} | "
              f"{o['peak_gib'] / c['peak_gib']:.2f}x | {pre:.3f} |")  # fmt: skip


if __name__ == "__main__":
    main()
