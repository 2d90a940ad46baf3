"""One training step of our DiT against diffusers' WanTransformer3DModel (the same weights), per
checkpointing mode and compile setting: s/step, peak memory, activation memory, model TFLOP/s and MFU.

    python bench/gpu_step.py                      # CPU, toy widths and sizes (about a minute)
    python bench/gpu_step.py --quick              # CPU, fewer rows (the test runs this)
    python bench/gpu_step.py --device cuda        # the issue's table: 1.3B (30 blocks) and 14B (4 of 40
                                                  # blocks) widths at 480p and 720p, 81 frames, bf16

Rows: ours under checkpointing none / full / selective / selective + matmuls, compile off and on;
diffusers under none and full (its enable_gradient_checkpointing(): whole blocks, like our "full"),
compile off and on (block-wise, as ours). Like is compared with like: same weights (tests/
dit_reference.py build_pair), same input, bf16 autocast over fp32 weights, the same loss.

FLOPs are train/flops.py's model FLOPs (forward x 3, recompute excluded); MFU divides by the GPU's
dense bf16 peak (train/flops.py peak_tflops; --peak_tflops overrides; none on the CPU). Peak memory
is CUDA max allocated above the level before the step; activations are the memory allocated at the
end of the forward above the level before it (CUDA), on the CPU the bytes of the tensors autograd
saved that the hooks see (a checkpointed block's own saves are invisible there: inputs only).
"""

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from train.flops import device_peak_tflops, step_flops  # noqa: E402
from wan import dit_preset  # noqa: E402

# (name, preset, blocks run) and (name, latent frames, height, width)
GPU_WIDTHS = [("1.3B", "1.3B", 30), ("14B (4/40 blocks)", "14B", 4)]
GPU_SIZES = [("480p", 21, 60, 104), ("720p", 21, 90, 160)]
CPU_WIDTHS = [
    ("toy-1.3B", dict(dim=128, ffn_dim=384, num_heads=4), 2),
    ("toy-14B", dict(dim=256, ffn_dim=640, num_heads=4), 2),
]
CPU_SIZES = [("toy-480p", 3, 8, 14), ("toy-720p", 3, 12, 20)]
OURS_MODES = [("none", False), ("full", False), ("selective", False), ("selective", True)]


def model_config(preset, layers: int) -> dict:
    if isinstance(preset, str):
        return dict(dit_preset(preset), num_layers=layers)
    return dict(dit_preset("1.3B"), **preset, num_layers=layers, text_dim=64)


def run_row(impl: str, cfg: dict, latent, mode: str, matmuls: bool, compiled: bool, args, device) -> dict:
    from dit_reference import build_pair, reference_forward

    ref, ours = build_pair(cfg, seed=0)
    model = ours if impl == "ours" else ref
    del ref, ours
    model.to(device).train()
    if impl == "ours":
        model.set_gradient_checkpointing(mode, save_matmuls=matmuls)
        if compiled:
            model.compile_blocks(dynamic=False)
    else:
        if mode == "full":
            model.enable_gradient_checkpointing()
        if compiled:
            for block in model.blocks:
                block.compile(dynamic=False)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, *latent, generator=g).to(device)
    t = torch.tensor([500.0], device=device)
    context = torch.randn(1, cfg["text_len"], cfg["text_dim"], generator=g).to(device)
    cuda = device.type == "cuda"
    saved: dict[int, int] = {}

    def pack(tensor):
        s = tensor.untyped_storage()
        saved.setdefault(s._cdata, s.nbytes())
        return tensor

    def step(measure: bool = False) -> tuple[int, int]:
        model.zero_grad(set_to_none=True)
        base = torch.cuda.memory_allocated() if cuda else 0
        hooks = (
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
            if measure and not cuda
            else contextlib.nullcontext()
        )
        with torch.autocast(device.type, dtype=torch.bfloat16), hooks:
            out = model(x, t, context) if impl == "ours" else reference_forward(model, x, t, context, cfg["text_len"])
        activations = torch.cuda.memory_allocated() - base if cuda else 0
        out.float().square().mean().backward()
        return activations, base

    def sync():
        if cuda:
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
    sync()
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    activations, base = step(measure=True)
    sync()
    peak = torch.cuda.max_memory_allocated() - base if cuda else 0
    if not cuda:
        activations = sum(n for k, n in saved.items() if k not in params)
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    if cuda:
        torch.cuda.empty_cache()
    return {"s": statistics.median(times), "peak": peak, "activations": activations}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="CPU smoke run: one width, one size, no compile")
    parser.add_argument("--compile", choices=["off", "on", "both"], help="default: both on CUDA, off on the CPU")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--peak_tflops", type=float, default=0.0)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    widths, sizes = (GPU_WIDTHS, GPU_SIZES) if cuda else (CPU_WIDTHS, CPU_SIZES)
    if args.quick:
        widths, sizes, args.repeats, args.warmup = widths[:1], sizes[:1], 1, 1
    compile_choice = args.compile or ("both" if cuda else "off")
    compiles = {"off": [False], "on": [True], "both": [False, True]}[compile_choice]
    peak = device_peak_tflops(device, args.peak_tflops)
    name = torch.cuda.get_device_name(device) if cuda else f"CPU ({torch.get_num_threads()} threads)"
    print(f"{name}, bf16 autocast over fp32 weights, batch 1, text 512 tokens; median of {args.repeats} steps "
          f"after {args.warmup} warm-up; peak {peak or 'unknown'} TFLOP/s")  # fmt: skip
    # "vs diffusers": our s/step over diffusers' in the same run, same width, size and compile setting;
    # no checkpointing against its none, every checkpointing mode against its whole-block checkpointing.
    print("| width | size | impl | checkpointing | compile | s/step | vs diffusers | peak GiB | activations GiB "
          "| TFLOP/s | MFU |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    # diffusers first: its rows are the peers of ours
    rows = [("diffusers", "none", False), ("diffusers", "full", False)] + [("ours", m, mm) for m, mm in OURS_MODES]
    if args.quick:
        rows = [("diffusers", "full", False), ("ours", "none", False), ("ours", "selective", False)]
    for width, preset, layers in widths:
        cfg = model_config(preset, layers)
        for size, f, h, w in sizes:
            flops = step_flops(cfg, 1, (f, h, w)).model
            for compiled in compiles:
                peers: dict[str, float] = {}  # diffusers' s/step by checkpointing ("none" / "full")
                for impl, mode, matmuls in rows:
                    try:
                        r = run_row(impl, cfg, (f, h, w), mode, matmuls, compiled, args, device)
                    except torch.cuda.OutOfMemoryError:
                        torch.cuda.empty_cache()
                        print(f"| {width} | {size} | {impl} | {mode} | {'on' if compiled else 'off'} | OOM | | | | | |")
                        continue
                    peer = peers.get("none" if mode == "none" else "full")
                    if impl == "diffusers":
                        peers[mode] = r["s"]
                    ratio = f"{r['s'] / peer:.2f}" if impl == "ours" and peer else "-"
                    tflops = flops / r["s"] / 1e12
                    label = mode + (" + matmuls" if matmuls else "")
                    mem = f"{r['peak'] / 2**30:.2f}" if cuda else "-"
                    mfu = f"{100 * tflops / peak:.1f}%" if peak else "-"
                    print(f"| {width} | {size} | {impl} | {label} | {'on' if compiled else 'off'} | {r['s']:.4g} | "
                          f"{ratio} | {mem} | {r['activations'] / 2**30:.3f} | {tflops:.3g} | {mfu} |",
                          flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
