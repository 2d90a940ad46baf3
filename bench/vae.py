"""Encode and decode time and peak memory of our Wan2.1 VAE against diffusers' AutoencoderKLWan.

Same config, same input size; each (implementation, operation, measurement) runs in its own process
so that peak memory is its own. Prints a table with ratios ours/diffusers, then peak memory as the
clip grows (with streaming it should stay nearly flat, apart from the input and output themselves).

    python bench/vae.py                                   # CPU, release widths (96), 17 frames at 64x64
    python bench/vae.py --repeats 2 --scaling-impls ours,diffusers   # + diffusers' memory as clips grow
    python bench/vae.py --dim 32 --height 128 --width 128 --memory-frames 9,17,33
    python bench/vae.py --device cuda --height 480 --width 832 --frames 81 --memory-frames 17,33,81

Both run in float32 with their default (untiled) streaming. Weights are each library's default
init (values do not change the work done). Peak memory: on CUDA, max_memory_allocated above the
level before the call; on CPU, the peak resident set above the level before the call (glibc is told
to return freed blocks at once, so the resident set follows live tensors). Input and output tensors
are included: the input sits in the base level, the output in the peak.
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


def build(args):
    cfg = dict(dim=args.dim, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, temporal_downsample=[False, True, True])
    torch.manual_seed(0)
    if args.impl == "ours":
        from wan.modules.vae import WanVAE

        model = WanVAE(**cfg)
        return model.to(args.device).eval(), model.encode, model.decode
    from diffusers import AutoencoderKLWan

    model = AutoencoderKLWan(base_dim=args.dim, z_dim=16).to(args.device).eval()
    return model, lambda x: model.encode(x).latent_dist.mean, lambda z: model.decode(z).sample


def make_input(args, frames: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    if args.op == "encode":
        x = torch.rand(1, 3, frames, args.height, args.width, generator=gen) * 2 - 1
    else:
        x = torch.randn(1, 16, 1 + (frames - 1) // 4, args.height // 8, args.width // 8, generator=gen)
    return x.to(args.device)


def worker(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    _, encode, decode = build(args)
    fn = encode if args.op == "encode" else decode

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    with torch.no_grad():
        if args.measure == "memory":
            fn(make_input(args, 5))  # warm-up on a short clip: first and later chunks, same frame size
            sync()
            x = make_input(args, args.frames)
            peak, out = measure_peak(lambda: fn(x), device)
            print(json.dumps({"peak": peak, "out_bytes": out.numel() * out.element_size()}))
            return
        x = make_input(args, args.frames)
        for _ in range(args.warmup):
            fn(x)
        sync()
        times, cpu_times = [], []
        for _ in range(args.repeats):
            start, cpu_start = time.perf_counter(), time.process_time()
            fn(x)
            sync()
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
    print(json.dumps({"times": times, "cpu_times": cpu_times}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dim", type=int, default=96, help="base width (96 in Wan2.1)")
    parser.add_argument("--frames", type=int, default=17, help="pixel frames (1 + 4k) for the timing comparison")
    parser.add_argument("--height", type=int, default=64, help="pixels, a multiple of 8")
    parser.add_argument("--width", type=int, default=64, help="pixels, a multiple of 8")
    parser.add_argument("--memory-frames", default="9,17,33,65", help="clip lengths for the memory scaling table")
    parser.add_argument("--scaling-impls", default="ours", help="implementations in the scaling table: ours,diffusers")
    parser.add_argument("--threads", type=int, default=0, help="torch threads in the workers (0: torch's default)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2, help="timing processes per implementation, alternating")
    parser.add_argument("--impl", choices=["ours", "diffusers"], help=argparse.SUPPRESS)
    parser.add_argument("--op", choices=["encode", "decode"], help=argparse.SUPPRESS)
    parser.add_argument("--measure", choices=["time", "memory"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.impl:
        worker(args)
        return
    if (args.frames - 1) % 4 or args.height % 8 or args.width % 8:
        sys.exit("frames must be 1 + 4k and height, width multiples of 8")
    memory_frames = [int(f) for f in args.memory_frames.split(",") if f]
    scaling_impls = [i for i in args.scaling_impls.split(",") if i]

    print(
        f"Wan2.1 VAE dim={args.dim}, {args.frames} frames {args.height}x{args.width} "
        f"(latent {1 + (args.frames - 1) // 4}x{args.height // 8}x{args.width // 8}), float32 on {args.device} "
        f"({args.threads or torch.get_num_threads()} threads), median of {args.rounds}x{args.repeats} calls after "
        f"{args.warmup} warm-up"
    )

    def worker_result(impl: str, op: str, measure: str, frames: int) -> dict:
        # The last --frames wins.
        args_ = [*sys.argv[1:], "--impl", impl, "--op", op, "--measure", measure, "--frames", str(frames)]
        return run_worker(__file__, args_, measure == "memory")

    results = {}
    for op in ("encode", "decode"):
        for impl in ("diffusers", "ours"):
            results[op, impl] = dict(worker_result(impl, op, "memory", args.frames), times=[], cpu_times=[])
        for round_ in range(args.rounds):  # alternate who goes first: drift hits both alike
            for impl in ("diffusers", "ours") if round_ % 2 == 0 else ("ours", "diffusers"):
                timed = worker_result(impl, op, "time", args.frames)
                results[op, impl]["times"] += timed["times"]
                results[op, impl]["cpu_times"] += timed["cpu_times"]

    # CPU seconds (all threads of the process) are steadier than wall time on a shared machine.
    print("\n| op     | impl      | median s | min s  | median CPU s | peak MiB | output MiB |")
    print("|--------|-----------|----------|--------|--------------|----------|------------|")
    for (op, impl), r in results.items():
        print(
            f"| {op:<6} | {impl:<9} | {statistics.median(r['times']):8.3f} | {min(r['times']):6.3f} | "
            f"{statistics.median(r['cpu_times']):12.3f} | {r['peak'] / 2**20:8.1f} | {r['out_bytes'] / 2**20:10.1f} |"
        )
    for op in ("encode", "decode"):
        ours, ref = results[op, "ours"], results[op, "diffusers"]
        wall = statistics.median(ours["times"]) / statistics.median(ref["times"])
        cpu = statistics.median(ours["cpu_times"]) / statistics.median(ref["cpu_times"])
        print(
            f"ours / diffusers, {op}: time {wall:.3f} (CPU time {cpu:.3f}), "
            f"peak memory {ours['peak'] / max(ref['peak'], 1):.3f}"
        )

    if memory_frames:
        print(f"\npeak memory (MiB) above the input as the clip grows, {args.height}x{args.width}:")
        cols = " | ".join(f"{f:>6}" for f in memory_frames)
        print(f"| op     | impl      | {cols} |")
        print(f"|--------|-----------|{'|'.join('-' * 8 for _ in memory_frames)}|")
        for op in ("encode", "decode"):
            for impl in scaling_impls:
                peaks = [worker_result(impl, op, "memory", f)["peak"] / 2**20 for f in memory_frames]
                print(f"| {op:<6} | {impl:<9} | " + " | ".join(f"{p:6.1f}" for p in peaks) + " |")


if __name__ == "__main__":
    main()
