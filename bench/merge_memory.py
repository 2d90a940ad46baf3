"""Peak host memory of tools/zero_to_bf16.py: it streams tensor by tensor, so it should stay near one
tensor (fp32 plus its cast), far below the fp32 model.

    python bench/merge_memory.py [--dim 1024 --ffn_dim 4096 --num_heads 16 --num_layers 4 --text_dim 4096]
    python bench/merge_memory.py probe CKPT_DIR OUT_DIR [merge options]   (one measured merge, prints JSON)
    python bench/merge_memory.py probe-load DIT_DIR     (control: a whole fp32 model loaded, measured alike)

Trains a DiT of that size for one step over 2 gloo processes under ZeRO-3 and FSDP2 (the test worker
tests/distributed/zero_to_bf16_worker.py, saving as the engines do), then merges each checkpoint in a fresh
process and reports the growth of its peak resident set (VmHWM, reset just before the merge) against
the fp32 model size. The control, loading the merged folder as an fp32 WanModel, shows that the
measurement sees a whole model when one is in memory (~1x).
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def sharded_engines() -> list[str]:
    """The engines whose checkpoints hold the weights in shards: the merges worth measuring."""
    sys.path.insert(0, str(REPO))
    from train.engines import REGISTRY

    return [t.name for t in REGISTRY.values() if t.shards_parameters]


def probe(argv: list[str]) -> None:
    """Merge once in this process; print {"growth": peak bytes above the level before, "seconds": ...}."""
    sys.path.insert(0, str(REPO))
    import torch
    import torch.distributed.checkpoint  # noqa: F401  (imported before the baseline, as the merge needs it)

    from bench.common import measure_peak
    from tools.zero_to_bf16 import main

    start = time.monotonic()
    growth, rc = measure_peak(lambda: main(argv), torch.device("cpu"))
    if rc:
        sys.exit(f"merge failed with exit code {rc}")
    print(json.dumps({"growth": growth, "seconds": time.monotonic() - start}))


def probe_load(folder: str) -> None:
    """The control: one whole fp32 model in memory, measured the same way."""
    sys.path.insert(0, str(REPO))
    import torch

    from bench.common import measure_peak
    from wan import WanModel

    growth, _ = measure_peak(lambda: WanModel.from_pretrained(folder), torch.device("cpu"))
    print(json.dumps({"growth": growth}))


def measure(mode: str, *args: str) -> dict:
    """Run a probe (probe: a merge, args CKPT OUT [options]; probe-load: the control, args DIT_DIR) in a
    fresh process whose freed memory goes straight back to the OS; its JSON report."""
    from bench.common import MEMORY_ENV

    env = {**MEMORY_ENV, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(Path(__file__).resolve()), mode, *map(str, args)]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode:
        raise RuntimeError(f"probe failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def model_config(dim: int, ffn_dim: int, num_heads: int, num_layers: int, text_dim: int) -> dict:
    from wan import dit_preset

    return dict(
        dit_preset("debug"), dim=dim, ffn_dim=ffn_dim, num_heads=num_heads, num_layers=num_layers, text_dim=text_dim
    )


def fp32_bytes(config: dict) -> int:
    import torch

    from wan import WanModel

    with torch.device("meta"):
        model = WanModel(**config)
    return sum(t.numel() * 4 for t in model.state_dict().values())


def main() -> None:
    if sys.argv[1:2] == ["probe"]:
        return probe(sys.argv[2:])
    if sys.argv[1:2] == ["probe-load"]:
        return probe_load(sys.argv[2])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--ffn_dim", type=int, default=4096)
    parser.add_argument("--num_heads", type=int, default=16)
    parser.add_argument("--num_layers", type=int, default=4)
    parser.add_argument("--text_dim", type=int, default=4096)
    parser.add_argument("--max_shard_size", default="80GB")
    args = parser.parse_args()
    sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "tests" / "distributed")]
    from zero_to_bf16_worker import train_checkpoint

    config = model_config(args.dim, args.ffn_dim, args.num_heads, args.num_layers, args.text_dim)
    model_bytes = fp32_bytes(config)
    spec = {"config": config, "seed": 0, "mixed_precision": "fp32", "trainable_modules": ["."], "steps": 1}
    results = {"params": model_bytes // 4, "fp32_bytes": model_bytes}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        base.mkdir()
        (base / "config.json").write_text(json.dumps({"_class_name": "WanModel", **config}))
        for engine in sharded_engines():
            ckpt = train_checkpoint(Path(tmp) / engine / "checkpoint-1", engine, spec)
            out = Path(tmp) / engine / "out"
            report = measure("probe", ckpt, out, "--base", base, "--max_shard_size", args.max_shard_size)
            results[engine] = report
            growth, mib = report["growth"], 2**20
            print(
                f"{engine}: merge peak growth {growth / mib:.0f} MiB = {growth / model_bytes:.3f} x the fp32 model "
                f"({model_bytes / mib:.0f} MiB, {model_bytes // 4 / 1e6:.1f} M params), {report['seconds']:.1f} s"
            )
        control = measure("probe-load", out)
        results["control_load_fp32"] = control
        print(f"control: loading the merged model in fp32 grows the peak by {control['growth'] / model_bytes:.3f} x")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
