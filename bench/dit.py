"""Forward+backward time and peak memory of our DiT against diffusers' WanTransformer3DModel.

Same config, same weights, same input; each (implementation, checkpointing) runs in its own
process so that peak memory is its own. Prints a table, ratios ours/diffusers, analytic FLOPs per
step and the achieved FLOP/s.

    python bench/dit.py                        # CPU, fp32, a small model at 9 frames 256x256
    python bench/dit.py --device cuda --dtype bf16 --dim 1536 --heads 12 --layers 30 --ffn 8960 \
        --frames 21 --height 60 --width 104    # 1.3B at 81 frames 480x832 on a GPU

Peak memory: above the level before the step; see bench/common.py.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import measure_peak, run_worker  # noqa: E402
from train.flops import forward_flops  # noqa: E402


def build_config(args) -> dict:
    return dict(
        model_type="t2v", patch_size=[1, 2, 2], text_len=512, in_dim=16, dim=args.dim, ffn_dim=args.ffn,
        freq_dim=256, text_dim=4096, out_dim=16, num_heads=args.heads, num_layers=args.layers, eps=1e-6,
    )  # fmt: skip


def step_flops(cfg: dict, batch: int, frames: int, height: int, width: int) -> float:
    """Matmul FLOPs of one forward pass (2 per multiply-add; backward is twice that): train/flops.py."""
    return forward_flops(cfg, batch, (frames, height, width))


def worker(args) -> None:
    torch.manual_seed(0)
    device = torch.device(args.device)
    cfg = build_config(args)
    if args.impl == "ours":
        from wan import WanModel

        model = WanModel(**cfg)
        torch.nn.init.normal_(model.head.head.weight, std=0.02)
        if args.checkpointing:
            model.set_gradient_checkpointing(args.checkpoint_mode)
    else:
        from diffusers import WanTransformer3DModel

        model = WanTransformer3DModel(
            num_attention_heads=cfg["num_heads"], attention_head_dim=cfg["dim"] // cfg["num_heads"],
            in_channels=16, out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=cfg["ffn_dim"],
            num_layers=cfg["num_layers"], cross_attn_norm=True, eps=1e-6,
        )  # fmt: skip
        if args.checkpointing:
            model.enable_gradient_checkpointing()
    model.to(device).train()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 16, args.frames, args.height, args.width, generator=gen).to(device)
    t = torch.tensor([500.0] * args.batch, device=device)
    context = torch.randn(args.batch, 512, 4096, generator=gen).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")

    def step() -> None:
        model.zero_grad(set_to_none=True)
        with autocast:
            if args.impl == "ours":
                out = model(x, t, context)
            else:
                out = model(x, t, context, return_dict=False)[0]
        out.float().pow(2).mean().backward()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
    sync()
    if args.measure == "memory":
        model.zero_grad(set_to_none=True)
        peak, _ = measure_peak(step, device)
        print(json.dumps({"peak": peak}))
        return
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    print(json.dumps({"times": times}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16 = bf16 autocast, fp32 weights")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--ffn", type=int, default=1536)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--frames", type=int, default=3, help="latent frames (pixel frames = 4*(n-1)+1)")
    parser.add_argument("--height", type=int, default=32, help="latent height (pixels / 8)")
    parser.add_argument("--width", type=int, default=32, help="latent width (pixels / 8)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="timing processes per implementation, alternating")
    parser.add_argument("--checkpoint_mode", choices=["full", "selective"], default="full",
                        help="our DiT's mode in the checkpointing rows (diffusers' is always full)")  # fmt: skip
    parser.add_argument("--impl", choices=["ours", "diffusers"], help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--measure", choices=["time", "memory"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.impl:
        worker(args)
        return

    cfg = build_config(args)
    flops = 3 * step_flops(cfg, args.batch, args.frames, args.height, args.width)
    tokens = args.frames * (args.height // 2) * (args.width // 2)
    print(
        f"DiT dim={args.dim} heads={args.heads} ffn={args.ffn} layers={args.layers}, batch {args.batch}, "
        f"latent {args.frames}x{args.height}x{args.width} ({tokens} tokens), text 512x4096, {args.dtype} on "
        f"{args.device} ({torch.get_num_threads()} threads), median of {args.rounds}x{args.repeats} steps "
        f"after {args.warmup} warm-up"
    )

    def worker_result(impl: str, checkpointing: bool, measure: str) -> dict:
        extra = ["--checkpointing"] if checkpointing else []
        return run_worker(__file__, ["--impl", impl, "--measure", measure, *sys.argv[1:], *extra], measure == "memory")

    results = {}
    for checkpointing in (False, True):
        for impl in ("diffusers", "ours"):
            results[impl, checkpointing] = dict(worker_result(impl, checkpointing, "memory"), times=[])
        # Alternate which goes first, so drift of a shared machine hits both alike.
        for round_ in range(args.rounds):
            for impl in ("diffusers", "ours") if round_ % 2 == 0 else ("ours", "diffusers"):
                results[impl, checkpointing]["times"] += worker_result(impl, checkpointing, "time")["times"]

    print(f"\nmodel FLOPs per step (forward + backward, no recompute): {flops / 1e9:.1f} GFLOP")
    print(f"| {'impl':<9} | ckpt | median s | min s  | peak MiB | model TFLOP/s |")
    print(f"|{'-' * 11}|------|----------|--------|----------|---------------|")
    for (impl, ckpt), r in results.items():
        med = statistics.median(r["times"])
        print(
            f"| {impl:<9} | {'on ' if ckpt else 'off'}  | {med:8.3f} | {min(r['times']):6.3f} | "
            f"{r['peak'] / 2**20:8.0f} | {flops / med / 1e12:13.3f} |"
        )
    for ckpt in (False, True):
        ours, ref = results["ours", ckpt], results["diffusers", ckpt]
        print(
            f"ours / diffusers, checkpointing {'on ' if ckpt else 'off'}: time "
            f"{statistics.median(ours['times']) / statistics.median(ref['times']):.3f}, "
            f"peak memory {ours['peak'] / max(ref['peak'], 1):.3f}"
        )


if __name__ == "__main__":
    main()
