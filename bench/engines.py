"""The engines side by side at 2 ranks on a mid-size DiT loaded from a release folder: load time and
peak host memory of the load, step time, per-rank model-state bytes, checkpoint save and load time and
size, and the time and peak memory of merging the checkpoint with tools/zero_to_bf16.py.

    python bench/engines.py                                  # ddp, zero2, zero3, fsdp; dim 1024, 4 blocks
    python bench/engines.py --engines zero3,fsdp --layers 8 --json out.json
    python bench/engines.py --engines zero3,fsdp --precision bf16 --lora_rank 64   # a LoRA run's bytes

Each engine runs under its own torchrun (2 gloo processes on this CPU, nccl on GPUs). The load is
measured as the peak resident set of a rank while the engine builds the DiT and reads the release
weights (VmHWM above the level before), against the size of one full float32 copy: under zero3 and
fsdp no rank may ever hold the whole model. Model-state bytes are the tensors each engine holds
(parameters, gradients, optimizer state), measured, not computed from formulas; beside them, what
train.plan's formula for the engine says (the same run's parameter counts), and the bytes [ema]'s
average of the trainable weights holds per rank as a share of one float32 copy of them (1/2 on 2 ranks
under every engine). --lora_rank trains a LoRA adapter (targets q,k,v,o,ffn.0,ffn.2, alpha = rank) on
the frozen DiT instead.
"""

import argparse
import importlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import MEMORY_ENV, rss_bytes  # noqa: E402
from train.engines import DEFAULT_ENGINE, engine_names  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MIB = 2**20


def dit_config(args: argparse.Namespace) -> dict:
    from wan import dit_preset

    return dict(
        dit_preset("debug"), dim=args.dim, ffn_dim=args.ffn, num_heads=args.heads, num_layers=args.layers,
        text_dim=args.text_dim,
    )  # fmt: skip


LORA_TARGETS = "q,k,v,o,ffn.0,ffn.2"


def lora_spec(args: argparse.Namespace):
    from wan.modules.lora import LoRASpec

    return LoRASpec(args.lora_rank, float(args.lora_rank), tuple(LORA_TARGETS.split(","))) if args.lora_rank else None


def planned_state_bytes(engine: str, args: argparse.Namespace, config: dict) -> float:
    """train.plan's per-rank model-state bytes for this run (the engine's memory formula), on the GPU."""
    from train.config import ParallelConfig
    from train.distributed import ParallelLayout
    from train.engines import engine_traits
    from train.engines.base import ModelStates
    from train.models import DiTRecipe, DiTWeights

    recipe = DiTRecipe(config=config, weights=DiTWeights("", config, 0), lora=lora_spec(args))
    trainable, total = recipe.parameter_counts()
    states = ModelStates(
        total=total, trainable=trainable, fp32=args.precision == "fp32", layout=ParallelLayout.planned(2, 1),
        parallel=ParallelConfig(engine=engine), low_precision_frozen=bool(args.lora_rank) and args.precision != "fp32",
    )  # fmt: skip
    return sum(v for k, v in engine_traits(engine).memory(states).items() if k != "host")


def trainable_fp32_bytes(args: argparse.Namespace, config: dict) -> float:
    from train.models import DiTRecipe, DiTWeights

    return 4 * DiTRecipe(config=config, weights=DiTWeights("", config, 0), lora=lora_spec(args)).parameter_counts()[0]


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


# ----------------------------------------------------------------------------------------------------
# One rank (under torchrun)


def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    from train.checkpoint import Checkpointer
    from train.config import OptimConfig, ParallelConfig, RunConfig, config_to_toml
    from train.distributed import ParallelLayout
    from train.engines import EngineSetup, build_engine
    from train.models import DiTRecipe, DiTWeights
    from wan.modules.checkpointing import ActivationCheckpointing

    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    config = json.loads((Path(args.release) / "config.json").read_text())
    config.pop("_class_name")

    def recipe() -> DiTRecipe:
        return DiTRecipe(
            config=config,
            weights=DiTWeights(args.release, config, 0),
            checkpoint_policy=ActivationCheckpointing(args.checkpointing),
            lora=lora_spec(args),
            frozen_dtype=torch.bfloat16 if args.lora_rank and args.precision != "fp32" else torch.float32,
        )

    parallel = ParallelConfig(engine=args.engine, reduce_bucket_size=args.bucket, allgather_bucket_size=args.bucket)
    setup = EngineSetup(
        parallel=parallel, optim=OptimConfig(), mixed_precision=args.precision, micro_batch_size=1,
        accumulation_steps=1, total_steps=1000, layout=ParallelLayout.of_process_group(device),
    )  # fmt: skip
    # The runtime's first-use allocations and the engine's imports come before the baseline.
    torch.ones(64, 64) @ torch.ones(64, 64)
    importlib.import_module("train.engines")
    dist.barrier()
    Path("/proc/self/clear_refs").write_text("5")
    base = rss_bytes("VmRSS")
    t0 = time.perf_counter()
    engine = build_engine(recipe(), setup)
    load_s = time.perf_counter() - t0
    load_peak = rss_bytes("VmHWM") - base
    load_kept = rss_bytes("VmRSS") - base  # what the engine holds once built; the rest was transient

    g = torch.Generator().manual_seed(rank)
    f, h, w = args.frames, args.size, args.size
    x = torch.randn(1, 16, f, h, w, generator=g).to(device)
    context = torch.randn(1, 64, config["text_dim"], generator=g).to(device)
    times = []
    for _ in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        with engine.micro_step(last=True):
            pred = engine.forward(x, torch.tensor([500.0], device=device), context)
            engine.backward(pred.float().square().mean())
        engine.step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    states = engine.model_state_bytes()
    from train.ema import EMA, EMAConfig

    ema = EMA(EMAConfig(enabled=True), engine, rank, dist.get_world_size())  # what [ema] would hold here
    ema.after_step(1, True)
    ema_bytes = ema.nbytes()
    del ema

    out = Path(args.out)
    cfg = RunConfig()
    cfg.model.pretrained_model_name_or_path, cfg.parallel.engine = args.release, args.engine
    cfg.lora.rank, cfg.lora.network_alpha, cfg.lora.target_name = args.lora_rank, max(args.lora_rank, 1), LORA_TARGETS
    checkpointer = Checkpointer(
        out, rank=rank, world_size=dist.get_world_size(), config_text=config_to_toml(cfg),
        marker_info={"engine": args.engine},
    )  # fmt: skip
    checkpointer.register_files("engine", engine)
    dist.barrier()
    t0 = time.perf_counter()
    path = checkpointer.save(1)
    save_s = time.perf_counter() - t0
    dist.barrier()
    t0 = time.perf_counter()
    checkpointer.load(path)
    reload_s = time.perf_counter() - t0

    result = {
        "engine": args.engine, "load_s": load_s, "load_peak": load_peak, "load_kept": load_kept, "step_s": statistics.median(times[args.warmup:]),
        "states": states, "save_s": save_s, "reload_s": reload_s, "ema_bytes": ema_bytes,
    }  # fmt: skip
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, result)
    if rank == 0:
        (out / "result.json").write_text(json.dumps(every))
    dist.barrier()
    # Leave without tearing the process group and DeepSpeed's threads down (as train.main does): a rank
    # whose peer had already gone was seen waiting forever in that teardown (gloo, CPU), its results written.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# ----------------------------------------------------------------------------------------------------
# The driver


def run_engine(engine: str, args: argparse.Namespace, release: Path, out: Path) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
           "--worker", engine, "--release", str(release), "--out", str(out)]  # fmt: skip
    cmd += [f"--{k}={v}" for k, v in vars(args).items() if k in ("dim", "ffn", "heads", "layers", "text_dim",
                                                                  "checkpointing", "frames", "size", "steps", "warmup", "precision", "bucket", "lora_rank")]  # fmt: skip
    env = {**MEMORY_ENV, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{engine} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return json.loads((out / "result.json").read_text())


def merge(checkpoint: Path, out: Path) -> tuple[float, int]:
    """(seconds, peak resident bytes) of tools/zero_to_bf16.py in a process of its own."""
    code = (
        "import sys, runpy; sys.argv = ['zero_to_bf16', sys.argv[1], sys.argv[2]]; "
        "from bench.common import rss_bytes\n"
        "try:\n    runpy.run_path('tools/zero_to_bf16.py', run_name='__main__')\n"
        "except SystemExit as e:\n    assert not e.code, e.code\n"
        "print(rss_bytes('VmHWM'))"
    )
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", code, str(checkpoint), str(out)], cwd=REPO, env={**MEMORY_ENV, "PYTHONPATH": str(REPO)},
        capture_output=True, text=True,
    )  # fmt: skip
    if proc.returncode:
        sys.exit(f"merging {checkpoint} failed:\n{proc.stderr[-4000:]}")
    return time.perf_counter() - t0, int(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", default=",".join(engine_names()))
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--ffn", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--text_dim", type=int, default=4096)
    parser.add_argument("--frames", type=int, default=3, help="latent frames of the step's input")
    parser.add_argument("--size", type=int, default=16, help="latent height and width")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--checkpointing", default="full", choices=("full", "selective", "none"),
                        help="the DiT's gradient checkpointing mode")  # fmt: skip
    parser.add_argument("--bucket", type=int, default=500_000_000, help="DeepSpeed reduce/allgather bucket elements")
    parser.add_argument("--lora_rank", type=int, default=0, help="train a LoRA adapter of this rank instead (0: off)")
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--no-merge", action="store_true")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--release", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--engine", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.engine = args.worker
        return worker(args)

    from wan import WanModel

    work = Path(tempfile.mkdtemp(prefix="bench_engines_"))
    try:
        torch.manual_seed(0)
        release = work / "release"
        dit = WanModel(**dit_config(args))
        full_bytes = sum(p.numel() for p in dit.parameters()) * 4
        dit.save_pretrained(release)
        del dit
        print(f"DiT: dim {args.dim}, ffn {args.ffn}, {args.layers} blocks, text_dim {args.text_dim}: "
              f"{full_bytes / 4 / 1e6:.1f} M parameters, {full_bytes / MIB:.0f} MiB in fp32; 2 ranks, "
              f"{args.precision}, {args.frames}x{args.size}x{args.size} latents"
              + (f"; LoRA rank {args.lora_rank} on {LORA_TARGETS}, the DiT frozen" if args.lora_rank else ""))  # fmt: skip
        rows = []
        for engine in args.engines.split(","):
            ranks = run_engine(engine, args, release, work / engine)
            checkpoint = work / engine / "checkpoint-1"
            row = {
                "engine": engine,
                "load_s": max(r["load_s"] for r in ranks),
                "load_peak_of_full": max(r["load_peak"] for r in ranks) / full_bytes,
                "load_transient_of_full": max(r["load_peak"] - r["load_kept"] for r in ranks) / full_bytes,
                "step_s": max(r["step_s"] for r in ranks),
                # Parameters, gradients, master weights and optimizer state; DeepSpeed's reduce buckets apart.
                "state_mib": max(sum(v for k, v in r["states"].items() if k != "buffers") for r in ranks) / MIB,
                "planned_mib": planned_state_bytes(engine, args, dit_config(args)) / MIB,
                "buffer_mib": max(r["states"].get("buffers", 0) for r in ranks) / MIB,
                "optim_mib": max(r["states"]["optimizer"] for r in ranks) / MIB,
                # [ema]'s average per rank, against one float32 copy of the trainable weights.
                "ema_of_copy": max(r["ema_bytes"] for r in ranks) / trainable_fp32_bytes(args, dit_config(args)),
                "save_s": max(r["save_s"] for r in ranks),
                "reload_s": max(r["reload_s"] for r in ranks),
                "ckpt_mib": folder_bytes(checkpoint) / MIB,
            }
            if not args.no_merge:
                seconds, peak = merge(checkpoint, work / engine / "merged")
                row.update(merge_s=seconds, merge_peak_mib=peak / MIB)
            rows.append(row)
            shutil.rmtree(work / engine)
        print_table(rows)
        if args.json:
            Path(args.json).write_text(json.dumps({"full_bytes": full_bytes, "rows": rows}, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def print_table(rows: list[dict]) -> None:
    heads = ["engine", "load s", "load peak / fp32 copy", "of it transient", "step s", "model states MiB/rank",
             "train.plan MiB/rank", "buckets MiB/rank", "optim MiB/rank", "EMA / fp32 copy",
             "save s", "load ckpt s", "ckpt MiB", "merge s", "merge process peak RSS MiB"]  # fmt: skip
    keys = ["engine", "load_s", "load_peak_of_full", "load_transient_of_full", "step_s", "state_mib", "planned_mib",
            "buffer_mib", "optim_mib", "ema_of_copy", "save_s", "reload_s",
            "ckpt_mib", "merge_s", "merge_peak_mib"]  # fmt: skip
    print("| " + " | ".join(heads) + " |")
    print("|" + "---|" * len(heads))
    for row in rows:
        cells = [row.get(k) for k in keys]
        print("| " + " | ".join(c if isinstance(c, str) else "" if c is None else f"{c:.2f}" for c in cells) + " |")
    ddp = next((r for r in rows if r["engine"] == DEFAULT_ENGINE), None)
    if ddp:
        print("ratios to ddp (same run): " + ", ".join(
            f"{r['engine']}: step {r['step_s'] / ddp['step_s']:.2f}x, states {r['state_mib'] / ddp['state_mib']:.2f}x"
            for r in rows if r is not ddp))  # fmt: skip


if __name__ == "__main__":
    main()
