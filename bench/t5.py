"""Forward time and peak memory of our umT5 encoder against transformers' UMT5EncoderModel.

Same config, same weights (written once to a temporary official-layout .pth, mapped to HF names for
HF), same input: a batch of prompts padded to 512 tokens. Two inputs: 'captions' (rows of
caption-like lengths, mostly padding, as Wan encodes prompts) and 'full' (every row 512 real
tokens, where dropping the padding cannot help). Peak memory is measured in a process per
implementation and input, so that it is its own; timing runs both implementations in one process,
alternating calls, so that the load of a shared machine hits both alike. Prints a table and ratios
ours/HF.

    python bench/t5.py                                   # CPU, fp32, dim 1024, 4 layers
    python bench/t5.py --device cuda --dtype bf16 --dim 4096 --heads 64 --ffn 10240 --layers 24 \
        --vocab 256384 --batch 16                        # umT5-XXL on a GPU

Peak memory: on CUDA, max_memory_allocated above the level before the forward; on CPU, the peak
resident set above the level before the forward (glibc is told to return freed blocks at once, so
the resident set follows live tensors).
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import measure_peak, run_worker  # noqa: E402

TEXT_LEN = 512
CAPTION_LENGTHS = [120, 64, 230, 90, 150, 40, 300, 100]  # cycled over the batch


def build_config(args) -> dict:
    return dict(
        vocab=args.vocab, dim=args.dim, dim_attn=args.dim, dim_ffn=args.ffn, num_heads=args.heads,
        num_layers=args.layers, num_buckets=32,
    )  # fmt: skip


def make_input(args) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, args.vocab, (args.batch, TEXT_LEN), generator=gen)
    mask = torch.zeros(args.batch, TEXT_LEN, dtype=torch.long)
    for row in range(args.batch):
        n = TEXT_LEN if args.input == "full" else CAPTION_LENGTHS[row % len(CAPTION_LENGTHS)]
        mask[row, :n] = 1
        ids[row, n:] = 0
    return ids, mask


def build_runner(impl: str, args, device: torch.device):
    """-> a function (ids, mask) -> [B, L, dim] for one implementation, weights from args.weights."""
    from wan.modules.t5 import UMT5Encoder, hf_to_official_key

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    if impl == "ours":
        return UMT5Encoder.from_pretrained(args.weights, dtype=dtype, device=device)
    from transformers import UMT5Config, UMT5EncoderModel

    cfg = build_config(args)
    hf_cfg = UMT5Config(
        vocab_size=cfg["vocab"], d_model=cfg["dim"], d_kv=cfg["dim_attn"] // cfg["num_heads"],
        d_ff=cfg["dim_ffn"], num_heads=cfg["num_heads"], num_layers=cfg["num_layers"],
        relative_attention_num_buckets=32, feed_forward_proj="gated-gelu", dropout_rate=0.0,
    )  # fmt: skip
    with torch.device("meta"):
        model = UMT5EncoderModel(hf_cfg)
    state = torch.load(args.weights, map_location="cpu", weights_only=True, mmap=True)
    hf_state = {key: state[hf_to_official_key(key)].to(dtype) for key in model.state_dict()}
    model.load_state_dict(hf_state, assign=True)
    model.to(device).eval()
    return lambda ids, mask: model(input_ids=ids, attention_mask=mask).last_hidden_state


def worker(args) -> None:
    """measure=memory: one implementation, its peak over one forward. measure=time: both
    implementations in one process, called alternately, so that the load of a shared machine
    hits both alike (separate processes a minute apart saw 2x swings)."""
    device = torch.device(args.device)
    impls = [args.impl] if args.measure == "memory" else ["hf", "ours"]
    runners = {impl: build_runner(impl, args, device) for impl in impls}
    ids, mask = (t.to(device) for t in make_input(args))

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    with torch.no_grad():
        for run in runners.values():
            for _ in range(args.warmup):
                run(ids, mask)
        sync()
        if args.measure == "memory":
            run = runners[args.impl]
            peak, _ = measure_peak(lambda: run(ids, mask), device)
            print(json.dumps({"peak": peak}))
            return
        times = {impl: [] for impl in impls}
        for i in range(args.repeats):
            for impl in impls if i % 2 == 0 else impls[::-1]:
                start = time.perf_counter()
                runners[impl](ids, mask)
                sync()
                times[impl].append(time.perf_counter() - start)
    print(json.dumps({"times": times}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="weight dtype of both models")
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--ffn", type=int, default=2816)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32128, help="umT5 has 256384; smaller keeps the CPU run light")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2, help="timing processes (each times both, alternating)")
    parser.add_argument("--impl", choices=["ours", "hf"], help=argparse.SUPPRESS)
    parser.add_argument("--input", choices=["captions", "full"], help=argparse.SUPPRESS)
    parser.add_argument("--measure", choices=["time", "memory"], help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:  # a worker process
        worker(args)
        return

    from wan.modules.t5 import UMT5Encoder

    print(
        f"umT5 encoder dim={args.dim} heads={args.heads} ffn={args.ffn} layers={args.layers} vocab={args.vocab}, "
        f"batch {args.batch} x {TEXT_LEN} tokens, {args.dtype} on {args.device} ({torch.get_num_threads()} threads), "
        f"median of {args.rounds}x{args.repeats} forwards after {args.warmup} warm-up; 'captions' rows hold "
        f"{[CAPTION_LENGTHS[i % len(CAPTION_LENGTHS)] for i in range(args.batch)]} real tokens"
    )
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "t5.pth"
        torch.manual_seed(0)
        torch.save(UMT5Encoder(**build_config(args)).state_dict(), weights)

        def worker_result(impl: str | None, input_: str, measure: str) -> dict:
            args_ = ["--input", input_, "--measure", measure, *(["--impl", impl] if impl else [])]
            return run_worker(__file__, [*args_, "--weights", str(weights), *sys.argv[1:]], measure == "memory")

        results = {}
        for input_ in ("captions", "full"):
            for impl in ("hf", "ours"):
                results[impl, input_] = dict(worker_result(impl, input_, "memory"), times=[])
            for _ in range(args.rounds):
                for impl, times in worker_result(None, input_, "time")["times"].items():
                    results[impl, input_]["times"] += times

    print("\n| impl | input    | median s | min s  | peak MiB |")
    print("|------|----------|----------|--------|----------|")
    for (impl, input_), r in results.items():
        print(
            f"| {impl:<4} | {input_:<8} | {statistics.median(r['times']):8.3f} | {min(r['times']):6.3f} | "
            f"{r['peak'] / 2**20:8.0f} |"
        )
    for input_ in ("captions", "full"):
        ours, ref = results["ours", input_], results["hf", input_]
        print(
            f"ours / HF, {input_:<8}: time {statistics.median(ours['times']) / statistics.median(ref['times']):.3f} "
            f"(min {min(ours['times']) / min(ref['times']):.3f}), peak memory {ours['peak'] / max(ref['peak'], 1):.3f}"
        )


if __name__ == "__main__":
    main()
