"""Seconds per denoising step of our sampler (wan/pipeline.py denoise with our WanModel) against
diffusers' WanPipeline (its WanTransformer3DModel holding the same weights), classifier-free guidance
on, the same starting latents and text embeddings, UniPC on the release's sigma grid for both.

    python bench/sample.py              # CPU: the debug DiT at 9x64x64 and a mid-size DiT at 17x256x256
    python bench/sample.py --preset 1.3B --size 832x480 --frames 81 --device cuda   # bf16 on a GPU

Ours runs guidance two ways: one DiT call on a batch of 2 (conditional and unconditional together, the
default of wan.pipeline) and two calls of 1 (as diffusers does). Each implementation runs `--steps`
steps per round, `--rounds` rounds alternating which goes first; the first step of each round is a
warm-up and not counted; the table gives the median and the minimum of the rest. Text embeddings are
random (the text encoder is not part of a denoising step); the VAE decode is not timed. The final
latents of ours and of diffusers are compared (relative error) to show both did the same work.
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "reference"))  # the diffusers reference helpers

from wan import dit_preset  # noqa: E402
from wan.pipeline import SamplingOptions, denoise, initial_noise  # noqa: E402

# bench/dit.py's default model: a DiT big enough for matmuls to dominate on a CPU, small enough to run.
MID = dict(
    model_type="t2v", patch_size=[1, 2, 2], text_len=512, in_dim=16, dim=512, ffn_dim=1536, freq_dim=256,
    text_dim=4096, out_dim=16, num_heads=4, num_layers=4, eps=1e-6,
)  # fmt: skip
DEFAULT_CASES = [("debug", 64, 64, 9), ("mid", 256, 256, 17)]  # (preset, width, height, frames)


def model_config(preset: str) -> dict:
    return dict(MID) if preset == "mid" else dit_preset(preset)


def build(cfg: dict, device: torch.device, dtype: torch.dtype):
    """diffusers' pipeline and our DiT over the same random weights (tests/reference/dit_reference.py build_pair)."""
    from diffusers import WanPipeline
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # its note on casting a model with .to(dtype): handled below
    from dit_reference import build_pair
    from pipeline_reference import release_scheduler

    ref, ours = build_pair(cfg, seed=0)
    ref, ours = ref.to(device, dtype), ours.to(device, dtype).eval()
    # As diffusers' from_pretrained(torch_dtype=...) loads it: some modules stay float32.
    keep = getattr(ref, "_keep_in_fp32_modules", None) or []
    for name, tensor in [*ref.named_parameters(), *ref.named_buffers()]:
        if tensor.is_floating_point() and any(k in name.split(".") for k in keep):
            tensor.data = tensor.data.float()
    ours.rope.reset_tables(device)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=release_scheduler(5.0), transformer=ref)
    pipe.set_progress_bar_config(disable=True)
    return pipe, ours


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class StepClock:
    """Times between consecutive step callbacks (the first, which includes the set-up, is dropped)."""

    def __init__(self, device: torch.device):
        self.device, self.marks = device, []

    def start(self) -> None:
        sync(self.device)
        self.marks = [time.perf_counter()]

    def __call__(self) -> None:
        sync(self.device)
        self.marks.append(time.perf_counter())

    def steps(self) -> list[float]:
        return [b - a for a, b in zip(self.marks[1:-1], self.marks[2:], strict=True)]


def run_case(preset: str, width: int, height: int, frames: int, args) -> None:
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    cfg = model_config(preset)
    pipe, ours = build(cfg, device, dtype)
    options = SamplingOptions(num_frames=frames, height=height, width=width, num_inference_steps=args.steps,
                              guidance_scale=5.0, shift=5.0, sampler="unipc", seed=0)  # fmt: skip
    latents = initial_noise([0], options.latent_shape()).to(device)
    gen = torch.Generator().manual_seed(1)
    context = torch.randn(1, 512, cfg["text_dim"], generator=gen).to(device)
    negative = torch.randn(1, 512, cfg["text_dim"], generator=gen).to(device)
    tokens = options.latent_shape()[1] * options.latent_shape()[2] * options.latent_shape()[3] // 4
    print(
        f"\n{preset} DiT (dim {cfg['dim']}, {cfg['num_layers']} layers), {frames} frames {width}x{height} "
        f"({tokens} tokens), CFG 5.0, {args.steps} UniPC steps, {args.dtype} on {device} "
        f"({torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}), {args.rounds} rounds"
    )

    def diffusers_run(clock: StepClock) -> torch.Tensor:
        def on_step(pipeline, i, t, callback_kwargs):
            clock()
            return callback_kwargs

        clock.start()
        return pipe(
            prompt_embeds=context.to(dtype), negative_prompt_embeds=negative.to(dtype), height=height, width=width,
            num_frames=frames, num_inference_steps=args.steps, guidance_scale=5.0, latents=latents.clone(),
            output_type="latent", callback_on_step_end=on_step,
        ).frames  # fmt: skip

    def ours_run(clock: StepClock, batch_cfg: bool) -> torch.Tensor:
        clock.start()
        return denoise(ours, latents.clone(), context, negative, options, progress=lambda done, total: clock(),
                       batch_cfg=batch_cfg)  # fmt: skip

    runs = {
        "diffusers WanPipeline": lambda c: diffusers_run(c),
        "ours, CFG batched (2B)": lambda c: ours_run(c, True),
        "ours, CFG two passes": lambda c: ours_run(c, False),
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    peaks: dict[str, int] = {}
    finals: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for r in range(args.rounds):
            order = list(runs) if r % 2 == 0 else list(reversed(runs))
            for name in order:
                clock = StepClock(device)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                finals[name] = runs[name](clock).float().cpu()
                if device.type == "cuda":
                    peaks[name] = max(peaks.get(name, 0), torch.cuda.max_memory_allocated())
                times[name] += clock.steps()

    ref = finals["diffusers WanPipeline"]
    base = statistics.median(times["diffusers WanPipeline"])
    mem = " peak GiB |" if peaks else ""
    print(f"| {'implementation':<24} | median s/step | min s/step | vs diffusers | final rel. err |{mem}")
    print(f"|{'-' * 26}|---------------|------------|--------------|----------------|{'----------|' if peaks else ''}")
    for name, ts in times.items():
        med = statistics.median(ts)
        err = ((finals[name].double() - ref.double()).norm() / ref.double().norm()).item()
        peak = f" {peaks[name] / 2**30:8.2f} |" if peaks else ""
        print(f"| {name:<24} | {med:13.4f} | {min(ts):10.4f} | {med / base:12.3f} | {err:14.2e} |{peak}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", help="DiT size: debug, mid (bench/dit.py's), 1.3B, 14B (default: debug and mid)")
    parser.add_argument("--size", help="WxH in pixels (default: 64x64 for debug, 256x256 for mid, else 832x480)")
    parser.add_argument("--frames", type=int, help="frames, 4k+1 (default: 9 debug, 17 mid, else 81)")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps per round, the first not counted")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per implementation, alternating order")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], help="DiT weights (default: bf16 on CUDA, else fp32)")
    args = parser.parse_args()
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    if args.steps < 2:
        parser.error("--steps must be >= 2 (the first step of a round is a warm-up)")
    if args.preset is None and args.size is None and args.frames is None:
        cases = DEFAULT_CASES
    else:
        preset = args.preset or "debug"
        defaults = {c[0]: c[1:] for c in DEFAULT_CASES}.get(preset, (832, 480, 81))
        width, height = map(int, args.size.lower().split("x")) if args.size else defaults[:2]
        cases = [(preset, width, height, args.frames or defaults[2])]
    for case in cases:
        run_case(*case, args)


if __name__ == "__main__":
    main()
