"""Sequence parallel (wan/modules/ulysses.py) on 2 CPU ranks (gloo, fp32), a mid-size DiT:

    python bench/sequence_parallel.py [--dim 1024 --heads 16 --layers 4 --latent 4x32x32 --steps 3]

1. Bytes one block saves for backward per rank (wan.modules.checkpointing.saved_activation_bytes, what
   train.plan counts) at sp 1 and sp 2, without, with full and with selective checkpointing.
2. All-to-all bytes a rank hands over in one training forward and backward, counted (Traffic) against
   the analytic count (all_to_all_bytes), per checkpointing mode.
3. Seconds per sample of a DiT forward + backward: sp 1 (each of the 2 ranks its own sample, the
   gradients all-reduced as DDP would) against sp 2 (one sample over both ranks, the same all-reduce).
   On CPU the exchanges go through gloo over loopback; on GPUs NCCL over NVLink.

It starts itself under torchrun (2 processes); rank 0 prints the tables.
"""

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wan import WanModel  # noqa: E402
from wan.modules.checkpointing import ActivationCheckpointing, saved_activation_bytes  # noqa: E402
from wan.modules.ulysses import SequenceParallel, all_to_all_bytes  # noqa: E402

MODES = ("none", "full", "selective")


def model(args) -> WanModel:
    torch.manual_seed(0)
    return WanModel(dim=args.dim, ffn_dim=4 * args.dim, num_heads=args.heads, num_layers=args.layers, text_dim=512,
                    text_len=64)  # fmt: skip


def latent(args) -> tuple[int, int, int]:
    f, h, w = (int(v) for v in args.latent.split("x"))
    return f, h, w


def block_bytes(args, dit: WanModel, sp: SequenceParallel) -> dict[str, tuple[int, int]]:
    f, h, w = latent(args)
    x = torch.randn(1, f * h * w // 4, args.dim)
    e0, context = torch.randn(1, 6, args.dim), torch.randn(1, 64, args.dim)
    rope = dit.rope((f, h // 2, w // 2))
    x_local, rope_local = sp.shard(x, rope)
    block, out = dit.blocks[0], {}
    for mode in MODES:
        whole = saved_activation_bytes(block, (x, e0, context, None, rope), mode)
        block.self_attn.sequence_parallel = sp
        split = saved_activation_bytes(block, (x_local, e0, context, None, rope_local), mode)
        block.self_attn.sequence_parallel = None
        out[mode] = (whole, split)
    return out


def batch(args, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    f, h, w = latent(args)
    return {"x": torch.randn(1, 16, f, h, w, generator=g), "t": torch.tensor([500.0]),
            "context": torch.randn(1, 64, 512, generator=g)}  # fmt: skip


def step(dit: WanModel, inputs: dict, scale: float) -> None:
    dit.zero_grad(set_to_none=True)
    (dit(**inputs).square().mean() * scale).backward()
    for p in dit.parameters():  # DDP's gradient average, in one bucket per parameter
        dist.all_reduce(p.grad)


def traffic(args, dit: WanModel, group) -> dict[str, tuple[int, int]]:
    f, h, w = latent(args)
    out = {}
    for mode in MODES:
        dit.set_gradient_checkpointing(ActivationCheckpointing(mode=mode))
        sp = SequenceParallel(group)
        dit.set_sequence_parallel(sp)
        step(dit, batch(args, 0), 2.0)
        recomputed = args.layers if mode != "none" else 0
        out[mode] = (
            sp.traffic.sent_bytes,
            all_to_all_bytes(1, f * h * w // 4, args.dim, args.layers, 2, False, recomputed),
        )
        dit.set_sequence_parallel(None)
    dit.set_gradient_checkpointing(ActivationCheckpointing())
    return out


def seconds_per_sample(args, dit: WanModel, group) -> dict[str, float]:
    rank = dist.get_rank()
    times = {}
    for name, sp in (("sp 1 (a sample per rank)", None), ("sp 2 (a sample over 2 ranks)", SequenceParallel(group))):
        dit.set_sequence_parallel(sp)
        samples_per_step = 2 if sp is None else 1
        seed = rank if sp is None else 0  # sp 1: each rank its own sample; sp 2: the same one
        runs = []
        for i in range(args.steps + 1):
            dist.barrier()
            start = time.perf_counter()
            step(dit, batch(args, seed), 1.0 if sp is None else 2.0)
            dist.barrier()
            if i:  # the first step warms up
                runs.append((time.perf_counter() - start) / samples_per_step)
        times[name] = statistics.median(runs)
    dit.set_sequence_parallel(None)
    return times


def worker(args) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    group = dist.new_group([0, 1])
    dit = model(args)
    memory = block_bytes(args, dit, SequenceParallel(group))
    exchanged = traffic(args, dit, group)
    times = seconds_per_sample(args, dit, group)
    if dist.get_rank() == 0:
        f, h, w = latent(args)
        tokens = f * h * w // 4
        print(f"DiT dim {args.dim}, {args.heads} heads, {args.layers} blocks; latents {args.latent} = {tokens} tokens "
              f"a sample; fp32, 2 CPU ranks (gloo), 1 thread each\n")  # fmt: skip
        print("| checkpointing | block saves, sp 1 | sp 2, per rank | ratio |\n|---|---|---|---|")
        for mode, (whole, split) in memory.items():
            print(f"| {mode} | {whole / 2**20:.2f} MiB | {split / 2**20:.2f} MiB | {split / whole:.3f} |")
        print(
            "\n| checkpointing | all-to-all bytes a rank sends, one step (counted) | analytic | ratio |\n|---|---|---|---|"
        )
        for mode, (counted, analytic) in exchanged.items():
            print(f"| {mode} | {counted:,} | {analytic:,} | {counted / analytic:.3f} |")
        (n1, t1), (n2, t2) = times.items()
        print("\n| run | seconds per sample (forward + backward + gradient all-reduce) |\n|---|---|")
        print(f"| {n1} | {t1:.3f} |\n| {n2} | {t2:.3f} |\n| ratio sp 2 / sp 1 | {t2 / t1:.2f} |")
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--latent", default="4x32x32", help="latent frames x height x width (patches of 1x2x2)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
           "--worker", *sys.argv[1:]]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    sys.exit(subprocess.run(cmd, env=env).returncode)


if __name__ == "__main__":
    main()
