"""Write a LoRA run's adapter as one .safetensors file that ComfyUI and diffusers load.

    python -m tools.export_lora CKPT_DIR OUT.safetensors [--dtype bf16|fp32] [--expert high|low]

CKPT_DIR is a complete checkpoint-N of a run with a [lora] section, of any engine (read as
tools/zero_to_bf16.py reads it: no GPU, no torch.distributed). The file holds, for each adapted layer
of the official DiT (names as in the release's state dict):

    diffusion_model.blocks.0.self_attn.q.lora_A.weight   [rank, in]   (down)
    diffusion_model.blocks.0.self_attn.q.lora_B.weight   [out, rank]  (up)
    diffusion_model.blocks.0.self_attn.q.alpha           []           network_alpha (float32)

the layout of Wan LoRAs trained by the official and diffusers-style trainers: ComfyUI's LoRA loader maps
`diffusion_model.<layer>` to the layer's weight and applies W + strength x alpha / rank x up @ down;
diffusers' WanPipeline.load_lora_weights converts it (its non-diffusers Wan path, which folds
alpha / rank into the two matrices). Its metadata records rank, alpha, targets and the checkpoint.

A Wan2.2 A14B run trains an adapter per expert: --expert high or low writes that expert's (one file
each, as A14B LoRAs are published: the high-noise one for the high_noise_model, the other for the low).
"""

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: python tools/export_lora.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.zero_to_bf16 import OUT_DTYPES, checkpoint_sources, open_checkpoint  # noqa: E402
from train.checkpoint_io import write_safetensors  # noqa: E402
from wan.modules.lora import is_adapter_name, lora_file_tensors  # noqa: E402


def export_lora(ckpt_dir: str | Path, out: str | Path, dtype: str = "bf16", expert: str | None = None) -> dict:
    """Write checkpoint `ckpt_dir`'s adapter (an A14B run's: `expert`'s) to `out` (see the module docstring);
    returns the tensors."""
    ckpt_dir, out = Path(ckpt_dir), Path(out)
    if dtype not in OUT_DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(OUT_DTYPES)}, got {dtype!r}")
    if out.suffix != ".safetensors":
        raise ValueError(f"{out}: the output is a .safetensors file")
    # The adapter alone: no base weights are read (nor need to be on this machine).
    ckpt = open_checkpoint(ckpt_dir)
    if ckpt.experts and expert is None:
        raise ValueError(f"{ckpt_dir}: a Wan2.2 A14B run's, an adapter per expert: give --expert "
                         f"{' or '.join(ckpt.experts)}")  # fmt: skip
    if expert is not None:
        ckpt = ckpt.expert(expert)
    sources = {name: s for name, s in checkpoint_sources(ckpt, None).items() if is_adapter_name(name)}
    lora = ckpt.run_config.get("lora", {})
    if not sources:
        raise ValueError(f"{ckpt_dir}: holds no LoRA adapter (the run had no [lora] section); nothing to export")
    if not lora.get("network_alpha"):
        raise ValueError(f"{ckpt_dir}: holds a LoRA adapter but its config.toml has no [lora] network_alpha")
    alpha = float(lora["network_alpha"])
    tensors = lora_file_tensors({name: s.read().to(OUT_DTYPES[dtype]) for name, s in sources.items()}, alpha)
    model = ckpt.run_config.get("model", {})
    metadata = {
        "format": "pt",
        "lora_rank": str(next(iter(sources.values())).shape[0]),
        "lora_alpha": f"{alpha:g}",
        "target_name": str(lora.get("target_name", "")),
        "source": json.dumps({
            "checkpoint": str(ckpt_dir.resolve()), "step": ckpt.step, **({"expert": expert} if expert else {}),
            "base": model.get("transformer_path") or model.get("pretrained_model_name_or_path") or model.get("preset", ""),
        }),
    }  # fmt: skip
    write_safetensors(out, tensors, metadata)
    return tensors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="export_lora", description="Write a LoRA run's adapter as a ComfyUI / diffusers .safetensors file."
    )
    parser.add_argument("checkpoint_dir", help="a complete checkpoint folder of a LoRA run, e.g. output/checkpoint-500")
    parser.add_argument("out", help="the .safetensors file to write")
    parser.add_argument("--dtype", default="bf16", choices=sorted(OUT_DTYPES), help="tensor dtype (default bf16)")
    parser.add_argument(
        "--expert", choices=("high", "low"), help="a Wan2.2 A14B run's: the expert whose adapter to write"
    )
    args = parser.parse_args(argv)
    try:
        tensors = export_lora(args.checkpoint_dir, args.out, args.dtype, args.expert)
    except (ValueError, OSError) as err:
        print(f"export_lora: error: {err}", file=sys.stderr)
        return 1
    layers = sum(name.endswith(".alpha") for name in tensors)
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    print(f"wrote {args.out}: the adapters of {layers} layers, {size / 1e6:.1f} MB {args.dtype}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
