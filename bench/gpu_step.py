"""One training step of our DiT against diffusers' WanTransformer3DModel (the same shapes), per
checkpointing mode and compile setting: s/step, peak memory, activation memory, model TFLOP/s and MFU.

    python bench/gpu_step.py                      # CPU, toy widths and sizes (about a minute)
    python bench/gpu_step.py --quick              # CPU, fewer rows (the test runs this)
    python bench/gpu_step.py --device cuda        # the issue's table: 1.3B (30 blocks) and 14B (4 of 40
                                                  # blocks) widths at 480p and 720p, 81 frames, bf16
    python bench/gpu_step.py --device cuda --rows 1.3B:480p:ours:selective:on,14B:720p:ours:selective:on
                                                  # chosen rows only (bench/gpu_check.py runs them so)

Rows: ours under checkpointing none / full / selective / selective + matmuls, compile off and on;
diffusers under none and full (its enable_gradient_checkpointing(): whole blocks, like our "full"),
compile off and on (block-wise, as ours). Like is compared with like: same shapes, bf16 autocast over
fp32 weights, the same loss, the same attention kernel. A row's key is width:size:impl:checkpointing:
compile (1.3B or 14B : 480p or 720p : ours or diffusers : none, full, selective or selective+matmuls :
off or on; the CPU's toy widths and sizes answer to the same keys); --rows takes keys, "*" matching any
field and missing trailing fields matching all.

Attention: ours runs the kernel the trainer would ([model] attention_backend, default "auto", resolved
by wan/modules/attention.py exactly as train.main does: cuDNN on Hopper, FlashAttention-3 when
installed, ...); diffusers' SDPA calls run under the same single SDPA kernel (under FA3, or the CPU's
"auto", they keep torch's own choice). Without this a benchmark measures torch's default priority
(flash before cuDNN in torch 2.13), not what training runs.

FLOPs are train/flops.py's model FLOPs (forward x 3, recompute excluded); MFU divides by the GPU's
dense bf16 peak (train/flops.py peak_tflops; --peak_tflops overrides; none on the CPU). Peak memory
is CUDA max allocated above the level before the step; activations are the memory allocated at the
end of the forward above the level before it (CUDA), on the CPU the bytes of the tensors autograd
saved that the hooks see (a checkpointed block's own saves are invisible there: inputs only). The
weights are random (built on the device: speed does not depend on their values); --json writes the
rows measured so far after each row, so a run stopped by a time limit keeps them.
"""

import argparse
import contextlib
import gc
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "reference"))

from train.flops import device_peak_tflops, step_flops  # noqa: E402
from wan import WanModel, dit_preset  # noqa: E402
from wan.modules.attention import ATTENTION_BACKENDS, device_label, set_attention_backend  # noqa: E402

# (key, name, preset, blocks run) and (key, name, latent frames, height, width); the CPU's toy widths and
# sizes answer to the GPU ones' keys.
GPU_WIDTHS = [("1.3B", "1.3B", "1.3B", 30), ("14B", "14B (4/40 blocks)", "14B", 4)]
GPU_SIZES = [("480p", "480p", 21, 60, 104), ("720p", "720p", 21, 90, 160)]
CPU_WIDTHS = [
    ("1.3B", "toy-1.3B", dict(dim=128, ffn_dim=384, num_heads=4), 2),
    ("14B", "toy-14B", dict(dim=256, ffn_dim=640, num_heads=4), 2),
]
CPU_SIZES = [("480p", "toy-480p", 3, 8, 14), ("720p", "toy-720p", 3, 12, 20)]
# (impl, checkpointing, save_matmuls); diffusers first: its rows are the peers of ours
ALL_ROWS = [("diffusers", "none", False), ("diffusers", "full", False)] + [
    ("ours", mode, matmuls)
    for mode, matmuls in [("none", False), ("full", False), ("selective", False), ("selective", True)]
]
QUICK_ROWS = [("diffusers", "full", False), ("ours", "none", False), ("ours", "selective", False)]
# The single SDPA kernel diffusers' attention runs under, for ours' resolved backend (none: torch's choice).
DIFFUSERS_KERNELS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH,
}  # fmt: skip


@dataclass
class Row:
    """One measured row (--json writes a list of these)."""

    key: str
    width: str
    size: str
    impl: str
    checkpointing: str
    compile: str
    status: str  # "ok", "OOM" or "error: <what was raised>"
    s_per_step: float | None = None
    vs_diffusers: float | None = None
    peak_gib: float | None = None
    activations_gib: float | None = None
    tflops: float | None = None
    mfu: float | None = None  # a fraction of the peak; None where the peak is unknown (CPU)


def model_config(preset, layers: int) -> dict:
    if isinstance(preset, str):
        return dict(dit_preset(preset), num_layers=layers)
    return dict(dit_preset("1.3B"), **preset, num_layers=layers, text_dim=64)


def row_key(width: str, size: str, impl: str, mode: str, matmuls: bool, compiled: bool) -> str:
    return ":".join([width, size, impl, mode + ("+matmuls" if matmuls else ""), "on" if compiled else "off"])


def parse_rows(spec: str) -> list[list[str]]:
    """--rows "1.3B:480p:ours:selective:on,14B:*:ours" -> patterns; ValueError naming a bad field."""
    fields = [
        ("width", [w[0] for w in GPU_WIDTHS]), ("size", [s[0] for s in GPU_SIZES]), ("impl", ["ours", "diffusers"]),
        ("checkpointing", ["none", "full", "selective", "selective+matmuls"]), ("compile", ["off", "on"]),
    ]  # fmt: skip
    patterns = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        parts = item.split(":")
        if len(parts) > len(fields):
            raise ValueError(f"--rows {item!r}: at most {len(fields)} fields (width:size:impl:checkpointing:compile)")
        for value, (name, known) in zip(parts, fields, strict=False):
            if value != "*" and value not in known:
                raise ValueError(f"--rows {item!r}: {name} must be one of {', '.join(known)} or *, got {value!r}")
        patterns.append(parts + ["*"] * (len(fields) - len(parts)))
    if not patterns:
        raise ValueError("--rows is empty")
    return patterns


def selected(key: str, patterns: list[list[str]] | None) -> bool:
    if patterns is None:
        return True
    fields = key.split(":")
    return any(all(p in ("*", f) for p, f in zip(pattern, fields, strict=True)) for pattern in patterns)


def build_model(impl: str, cfg: dict, device: torch.device) -> torch.nn.Module:
    """A randomly initialised model built on `device` (no CPU copy, no weight transfer)."""
    torch.manual_seed(0)
    with torch.device(device):
        if impl == "ours":
            model = WanModel(**cfg)
            # A non-zero head: the init's zero head would make every block gradient exactly zero.
            torch.nn.init.normal_(model.head.head.weight, std=0.02)
            return model
        from diffusers import WanTransformer3DModel
        from dit_reference import diffusers_kwargs

        return WanTransformer3DModel(**diffusers_kwargs(cfg))


def run_row(impl: str, cfg: dict, latent, mode: str, matmuls: bool, compiled: bool, args, device) -> dict:
    if impl == "diffusers":  # diffusers is needed for its rows only
        from dit_reference import reference_forward

    torch._dynamo.reset()  # each compiled row compiles afresh, as a run would
    model = build_model(impl, cfg, device).train()
    if impl == "ours":
        model.set_gradient_checkpointing(mode, save_matmuls=matmuls)
        if compiled:
            compile_ours(model, args.compile_backend)
    else:
        if mode == "full":
            model.enable_gradient_checkpointing()
        if compiled:
            for block in model.blocks:
                block.compile(dynamic=False, backend=args.compile_backend)
    kernel = DIFFUSERS_KERNELS.get(args.resolved_attention) if impl == "diffusers" else None
    kernels = sdpa_kernel([kernel]) if kernel is not None else contextlib.nullcontext()
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
        with torch.autocast(device.type, dtype=torch.bfloat16), hooks, kernels:
            out = model(x, t, context) if impl == "ours" else reference_forward(model, x, t, context, cfg["text_len"])
        activations = torch.cuda.memory_allocated() - base if cuda else 0
        with kernels:
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
    return {"s": statistics.median(times), "peak": peak, "activations": activations}


def compile_ours(model: WanModel, backend: str) -> None:
    """Compile the blocks as the trainer does (train.models.compile_dit); another backend (aot_eager: a
    quick CPU check of the tracing) goes to WanModel.compile_blocks directly."""
    if backend == "inductor":
        from train.models import compile_dit

        compile_dit(model)
    else:
        model.compile_blocks(dynamic=False, backend=backend)


def free_device_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="CPU smoke run: one width, one size, no compile")
    parser.add_argument("--compile", choices=["off", "on", "both"], help="default: both on CUDA, off on the CPU")
    parser.add_argument("--rows", help="comma-separated row keys width:size:impl:checkpointing:compile ('*' any)")
    parser.add_argument("--attention_backend", default="auto", choices=ATTENTION_BACKENDS,
                        help="the trainer's [model] attention_backend (default auto, resolved as train.main does)")  # fmt: skip
    parser.add_argument("--compile_backend", default="inductor", help="torch.compile backend (aot_eager: CPU check)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--peak_tflops", type=float, default=0.0)
    parser.add_argument("--json", metavar="FILE", help="also write the rows measured so far here, after each row")
    args = parser.parse_args(argv)
    try:
        patterns = parse_rows(args.rows) if args.rows else None
    except ValueError as err:
        parser.error(str(err))
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    try:
        args.resolved_attention = set_attention_backend(args.attention_backend, device)
    except ValueError as err:
        parser.error(str(err))
    widths, sizes = (GPU_WIDTHS, GPU_SIZES) if cuda else (CPU_WIDTHS, CPU_SIZES)
    rows = ALL_ROWS
    if args.quick:
        widths, sizes, args.repeats, args.warmup, rows = widths[:1], sizes[:1], 1, 1, QUICK_ROWS
    # An explicit row selection may ask for compiled rows: both settings are then candidates.
    compile_choice = args.compile or ("both" if cuda or patterns else "off")
    compiles = {"off": [False], "on": [True], "both": [False, True]}[compile_choice]
    peak = device_peak_tflops(device, args.peak_tflops)
    name = torch.cuda.get_device_name(device) if cuda else f"CPU ({torch.get_num_threads()} threads)"
    print(f"{name}, bf16 autocast over fp32 weights, batch 1, text 512 tokens; median of {args.repeats} steps "
          f"after {args.warmup} warm-up; peak {peak or 'unknown'} TFLOP/s")  # fmt: skip
    diffusers_attention = args.resolved_attention if args.resolved_attention in DIFFUSERS_KERNELS else "torch's choice"
    print(f"attention: {args.resolved_attention} ({device_label(device)}; attention_backend = "
          f"{args.attention_backend!r}); diffusers: {diffusers_attention}; compile backend: {args.compile_backend}")  # fmt: skip
    # "vs diffusers": our s/step over diffusers' in the same run, same width, size and compile setting;
    # no checkpointing against its none, every checkpointing mode against its whole-block checkpointing.
    print("| width | size | impl | checkpointing | compile | s/step | vs diffusers | peak GiB | activations GiB "
          "| TFLOP/s | MFU |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
    measured: list[Row] = []
    for wkey, width, preset, layers in widths:
        cfg = model_config(preset, layers)
        for skey, size, f, h, w in sizes:
            flops = step_flops(cfg, 1, (f, h, w)).model
            for compiled in compiles:
                peers: dict[str, float] = {}  # diffusers' s/step by checkpointing ("none" / "full")
                for impl, mode, matmuls in rows:
                    key = row_key(wkey, skey, impl, mode, matmuls, compiled)
                    if not selected(key, patterns):
                        continue
                    label = mode + (" + matmuls" if matmuls else "")
                    on = "on" if compiled else "off"
                    r, failure = None, ""
                    try:
                        r = run_row(impl, cfg, (f, h, w), mode, matmuls, compiled, args, device)
                    except torch.cuda.OutOfMemoryError:
                        failure = "OOM"
                    except Exception as err:  # one broken row (a kernel refusing a shape) must not end the table
                        failure = f"error: {type(err).__name__}: {' '.join(str(err).split())[:300]}"
                    free_device_memory(device)  # after the except: its traceback held the row's tensors
                    if r is None:
                        measured.append(Row(key, width, size, impl, label, on, failure))
                        print(f"| {width} | {size} | {impl} | {label} | {on} | {failure} | | | | | |", flush=True)
                        write_json(args.json, measured)
                        continue
                    peer = peers.get("none" if mode == "none" else "full")
                    if impl == "diffusers":
                        peers[mode] = r["s"]
                    ratio = r["s"] / peer if impl == "ours" and peer else None
                    tflops = flops / r["s"] / 1e12
                    mfu = tflops / peak if peak else None
                    measured.append(Row(
                        key, width, size, impl, label, on, "ok", r["s"], ratio, r["peak"] / 2**30 if cuda else None,
                        r["activations"] / 2**30, tflops, mfu,
                    ))  # fmt: skip
                    write_json(args.json, measured)
                    mem = f"{r['peak'] / 2**30:.2f}" if cuda else "-"
                    print(f"| {width} | {size} | {impl} | {label} | {on} | {r['s']:.4g} | "
                          f"{f'{ratio:.2f}' if ratio else '-'} | {mem} | {r['activations'] / 2**30:.3f} | "
                          f"{tflops:.3g} | {f'{100 * mfu:.1f}%' if mfu else '-'} |", flush=True)  # fmt: skip
    if patterns is not None and not measured:
        raise SystemExit(f"--rows {args.rows!r} matched no row of this table")
    if any(r.status.startswith("error") for r in measured):
        raise SystemExit("some rows failed (error in their s/step cell)")


def write_json(path: str | None, rows: list[Row]) -> None:
    if path:
        Path(path).write_text(json.dumps([asdict(r) for r in rows], indent=1) + "\n")


if __name__ == "__main__":
    main()
