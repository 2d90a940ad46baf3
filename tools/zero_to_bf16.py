"""Merge a training checkpoint of any engine (DDP, DeepSpeed ZeRO-2 / ZeRO-3, FSDP2) into a Wan2.1 DiT
folder, on a machine without a GPU and without starting torch.distributed.

    python tools/zero_to_bf16.py CKPT_DIR OUT_DIR [--max_shard_size 80GB] [--safe_serialization]
    python -m tools.zero_to_bf16 CKPT_DIR OUT_DIR [--dtype bf16|fp32] [--format official|diffusers] [--base FOLDER]

CKPT_DIR is a complete `output_dir/checkpoint-N/` (its COMPLETE marker names the engine and world
size). OUT_DIR gets config.json and diffusion_pytorch_model.safetensors, or numbered shards of at most
--max_shard_size with diffusion_pytorch_model.safetensors.index.json: the official layout
(`_class_name` WanModel, official names) or, with --format diffusers, a WanTransformer3DModel folder.
VideoX-Fun's flags are accepted unchanged (--safe_serialization: safetensors is the only format
written; -t/--tag; --exclude_frozen_parameters, -d/--debug).

What each engine leaves, and how it is read (its traits' checkpoint_reader, train/engines/):
  ddp    model.safetensors: the trainable weights, official names, fp32.
  zero2  deepspeed/mp_rank_00_model_states.pt and W x {bf16_,}zero_pp_rank_{r}_mp_rank_00_optim_states.pt:
         the fp32 master weights are the optimizer's flat partitions, concatenated per param group in
         rank order and cut in `param_shapes` order (with `param_alignment_paddings`); frozen weights
         are `frozen_param_fragments` (whole tensors), else the module state.
  zero3  deepspeed/zero_pp_rank_{r}_mp_rank_00_model_states.pt and the optimizer files: each rank holds
         ceil(numel / W) elements of each parameter, in `param_shapes` order through its flat groups;
         frozen weights are per-rank `frozen_param_fragments` split the same way.
  fsdp   dcp/: a torch.distributed.checkpoint save of {"model": ..., "optimizer": ...}; the weights
         are the keys "model.<official name>" (fp32, every parameter), read one key at a time.
Tensors the checkpoint does not hold (DDP keeps only the trainable ones; DeepSpeed saved with
exclude_frozen_parameters) come from the base model: --base, else the run's config.toml ([model]
transformer_path or pretrained_model_name_or_path, or the seeded random init of [model] preset with
[train] seed), as train/models.py built it. With --dtype fp32, weights the checkpoint holds only in bf16
(frozen ones under DeepSpeed bf16) are taken from the base when it holds the same values, so they stay
exact; otherwise they are upcast, with a warning.

--ema writes the run's exponential moving average of the trainable weights (train/ema.py: assembled from
every rank's ema/ file) in place of the trained ones; the frozen ones as always.

Wan2.2 A14B (a run of both experts, or of one: the marker lists them): each expert's engine saved into
CKPT_DIR/high/ and CKPT_DIR/low/; OUT_DIR gets the release's layout, high_noise_model/ and
low_noise_model/ (with --format diffusers: transformer/ and transformer_2/), each a DiT folder as above,
and a folder that [model] transformer_path or tools/sample.py --transformer take whole.

A LoRA run's checkpoint holds its adapters only: the output is the base DiT with each adapter merged
into the weight it adapts (W + lora_scale x network_alpha / rank x B @ A, in float32), i.e. the model
the run validated. tools/export_lora.py writes the adapter alone instead.

Memory: the shards are planned from shapes alone, then each file is written tensor by tensor, each
tensor read with plain file reads of exactly its bytes (the rest of a DeepSpeed partition, and the
optimizer moments, are never read), so host memory peaks at about one tensor in fp32 plus its cast,
never the whole model. Nothing is unpickled blindly: DeepSpeed's .pt files and DCP's .metadata are
pickles, read by a restricted unpickler that builds only torch sizes and dtypes, lazy tensor
references and inert stand-ins for DeepSpeed's own classes (so DeepSpeed need not be installed, and no
code from the file runs); DCP's tensor data is read by torch.load(weights_only=True).
"""

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

import torch

if __package__ in (None, ""):  # run as a script: python tools/zero_to_bf16.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train.checkpoint import CONFIG_FILE  # noqa: E402
from train.checkpoint_verify import MARKER_FILE, read_marker  # noqa: E402
from train.ema import ema_sources  # noqa: E402
from train.engines import REGISTRY  # noqa: E402
from train.engines.base import TensorSource  # noqa: E402
from train.engines.deepspeed_reader import TAG as DEEPSPEED_TAG  # noqa: E402
from train.models import DiTWeights  # noqa: E402
from wan import WanModel, dit_preset  # noqa: E402
from wan.configs import EXPERTS  # noqa: E402
from wan.modules.dit_weights import (  # noqa: E402
    CONFIG_NAME,
    EXPERT_FOLDERS,
    WEIGHTS_NAME,
    diffusers_config,
    diffusers_to_official_key,
    expert_folders,
    official_to_diffusers_key,
    read_dit_folder,
)
from wan.modules.lora import is_adapter_name, lora_delta  # noqa: E402
from wan.modules.safetensors_io import (  # noqa: E402
    ShardItem,
    index_name,
    parse_size,
    plan_shards,
    write_safetensors_streaming,
)

OUT_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


# ----------------------------------------------------------------------------------------------------
# The checkpoint folder, the run's config and the base model


@dataclass
class Checkpoint:
    path: Path
    step: int
    world_size: int
    engine: str
    run_config: dict  # config.toml, parsed ({} when absent)
    experts: tuple[str, ...] = ()  # a Wan2.2 A14B run's trained experts (their sub-folders)

    def expert(self, name: str) -> "Checkpoint":
        """The checkpoint of one A14B expert: its engine's files are in path/<expert>/."""
        if name not in self.experts:
            raise ValueError(f"{self.path}: holds the experts {list(self.experts)}, not {name!r}")
        return Checkpoint(self.path / name, self.step, self.world_size, self.engine, self.run_config, ())


def open_checkpoint(path: Path) -> Checkpoint:
    """A complete checkpoint folder, or ValueError saying why not."""
    marker = read_marker(path)
    run_config: dict = {}
    if (path / CONFIG_FILE).is_file():
        try:
            run_config = tomllib.loads((path / CONFIG_FILE).read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path / CONFIG_FILE}: not valid TOML: {err}") from None
    engine = marker.get("engine") or run_config.get("parallel", {}).get("engine") or _detect_engine(path)
    if engine not in REGISTRY or REGISTRY[engine].checkpoint_reader is None:
        readable = [name for name, traits in REGISTRY.items() if traits.checkpoint_reader is not None]
        raise ValueError(f"{path / MARKER_FILE}: engine {engine!r} is not one of {', '.join(readable)}")
    experts = tuple(marker.get("experts", ()))
    return Checkpoint(path, marker["step"], marker["world_size"], engine, run_config, experts)


def checkpoint_sources(ckpt: Checkpoint, tag: str | None) -> dict[str, TensorSource]:
    """The DiT tensors the checkpoint holds, by official name, read by its engine's reader."""
    return REGISTRY[ckpt.engine].checkpoint_reader(ckpt.path, ckpt.world_size, tag)


def _detect_engine(path: Path) -> str:
    """Markers written before the engine field: the engine whose files the folder holds."""
    owners = [name for name, traits in REGISTRY.items() if traits.owns_checkpoint(path)]
    if len(owners) != 1:
        raise ValueError(
            f"{path / MARKER_FILE}: names no engine, and its files are {'no' if not owners else 'more than one'} engine's"
        )
    return owners[0]


class Base:
    """The model the run started from: its config (always needed) and, only when the checkpoint lacks
    a tensor, its weights (train/models.py DiTWeights, built on first use)."""

    def __init__(self, ckpt: Checkpoint, base: str | None, expert: str | None = None):
        if base is None and not ckpt.run_config:
            raise ValueError(
                f"{ckpt.path / CONFIG_FILE}: missing, so the DiT the run trained is unknown; "
                "pass --base FOLDER (the DiT folder the run started from)"
            )
        model_cfg = ckpt.run_config.get("model", {})
        self.seed = int(ckpt.run_config.get("train", {}).get("seed", 42))
        # As train/models.py build_dit_recipe picks the run's DiT: a merged folder, else the release's.
        key = next((k for k in ("transformer_path", "pretrained_model_name_or_path") if model_cfg.get(k)), None)
        self.folder = base or (model_cfg[key] if key else "")
        if base is not None and not Path(base).is_dir():
            raise ValueError(f"--base {base}: not a folder")
        if expert is not None:  # an A14B expert: its folder of the run's base, its seed of the random init
            self.seed += EXPERTS.index(expert)
            experts = expert_folders(self.folder) if self.folder and Path(self.folder).is_dir() else None
            if experts is not None:
                self.folder = str(experts[expert])
        if self.folder:
            if not Path(self.folder).is_dir():
                raise ValueError(
                    f"{ckpt.path / CONFIG_FILE}: the run started from [model] {key} = {self.folder}, which is not "
                    "here; pass --base FOLDER (a copy of that DiT folder; its config.json alone does when the "
                    "checkpoint holds every weight)"
                )
            _, self.config, _ = read_dit_folder(self.folder)
            self.describe = self.folder
        else:
            preset = model_cfg.get("preset", "debug")  # the [model] default
            try:
                self.config = dit_preset(preset)
            except (KeyError, ValueError):
                raise ValueError(f"{ckpt.path / CONFIG_FILE}: unknown [model] preset {preset!r}") from None
            self.describe = f"the random init of preset {preset!r}, seed {self.seed}"
        self._weights = None

    def weights(self) -> DiTWeights:
        if self._weights is None:
            self._weights = DiTWeights(self.folder, self.config, self.seed)
        return self._weights

    def check(self, model: WanModel) -> None:
        """Before anything is written: the base folder holds every tensor of `model` with its shape."""
        try:
            self.weights().check(model)
        except ValueError as err:
            raise ValueError(f"the checkpoint lacks tensors that the base must give, but: {err}") from None

    def read(self, name: str) -> torch.Tensor:
        return self.weights().read(name)


# ----------------------------------------------------------------------------------------------------
# Output: names, config, shard plan, streaming safetensors writer


# ----------------------------------------------------------------------------------------------------
# The merge


def fitting_model(ckpt_dir: Path, base_model: Base, sources: dict[str, TensorSource]) -> WanModel:
    """The run's DiT on the meta device, after checking that every tensor the checkpoint holds is one
    of its tensors with its shape (ValueError listing what does not fit)."""
    try:
        with torch.device("meta"):
            model = WanModel(**base_model.config)
    except (TypeError, ValueError) as err:
        raise ValueError(f"the DiT config of {base_model.describe} is not a WanModel: {err}") from None
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    problems = [f"unexpected tensor {name}" for name in sources if name not in expected]
    problems += [
        f"{name} has shape {list(s.shape)} in the checkpoint, the model has {list(expected[name])}"
        for name, s in sources.items()
        if name in expected and s.shape != expected[name]
    ]
    if problems:
        shown = problems[:20] + ([f"and {len(problems) - 20} more"] if len(problems) > 20 else [])
        raise ValueError(f"{ckpt_dir} does not fit the DiT of {base_model.describe}:\n  " + "\n  ".join(shown))
    return model


class CheckpointDiT:
    """The whole DiT a checkpoint stands for, one full tensor at a time by official name: the checkpoint's
    tensors, the base model's where it holds none, and a LoRA run's adapters folded into the weights
    they adapt (W + lora_scale x alpha / r x B @ A, in float32). Everything is checked up front."""

    def __init__(
        self,
        ckpt_dir: Path,
        base: str | None,
        tag: str | None = None,
        lora_scale: float = 1.0,
        ema: bool = False,
        expert: str | None = None,
    ):
        self.ckpt = open_checkpoint(ckpt_dir)
        if self.ckpt.experts and expert is None:
            raise ValueError(f"{ckpt_dir}: a Wan2.2 A14B checkpoint of the experts {list(self.ckpt.experts)}: name one")
        if expert is not None:
            self.ckpt = self.ckpt.expert(expert)
            ckpt_dir = self.ckpt.path
        self.base = Base(self.ckpt, base, expert)
        sources = checkpoint_sources(self.ckpt, tag)
        if ema:  # the average of the trainable weights (a LoRA run's: of its adapters) in their place
            sources.update(ema_sources(ckpt_dir))
        self.adapters = {name: s for name, s in sources.items() if is_adapter_name(name)}
        self.sources = {name: s for name, s in sources.items() if name not in self.adapters}
        self.model = fitting_model(ckpt_dir, self.base, self.sources)
        self.expected = {name: tuple(t.shape) for name, t in self.model.state_dict().items()}
        self.adapted: dict[str, float] = {}  # weight name -> its adapter's scale
        if self.adapters:
            lora = self.ckpt.run_config.get("lora", {})
            if not lora.get("network_alpha"):
                raise ValueError(
                    f"{ckpt_dir / CONFIG_FILE}: the checkpoint holds a LoRA adapter but no [lora] network_alpha"
                )
            for name, source in self.adapters.items():
                if name.endswith(".lora_A.weight"):
                    layer = name.removesuffix(".lora_A.weight")
                    if f"{layer}.weight" not in self.expected or f"{layer}.lora_B.weight" not in self.adapters:
                        raise ValueError(f"{ckpt_dir}: adapter {name} has no {layer}.weight or lora_B to go with it")
                    self.adapted[f"{layer}.weight"] = lora_scale * float(lora["network_alpha"]) / source.shape[0]
        self.from_base = [name for name in self.expected if name not in self.sources]
        if self.from_base:
            self.base.check(self.model)
        self.upcast: list[str] = []

    def read(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """The full tensor `name` for output in `dtype` (the caller casts)."""
        source = self.sources.get(name)
        if source is None:
            tensor = self.base.read(name)
        else:
            tensor = source.read()
            if tensor.is_floating_point() and tensor.dtype.itemsize < dtype.itemsize:
                # Stored only in the training dtype (a frozen weight under bf16): the base holds it exactly
                # when it is the same weight, which a frozen weight is; otherwise the upcast is all there is.
                try:
                    exact = self.base.read(name)
                except (ValueError, OSError, KeyError):
                    exact = None
                if exact is not None and torch.equal(exact.to(tensor.dtype), tensor):
                    tensor = exact
                else:
                    self.upcast.append(name)
        if name in self.adapted:
            module = name.removesuffix(".weight")
            down = self.adapters[f"{module}.lora_A.weight"].read()
            up = self.adapters[f"{module}.lora_B.weight"].read()
            tensor = tensor.float() + lora_delta(down, up, self.adapted[name])
        return tensor

    def where(self, name: str) -> str:
        source = self.sources.get(name)
        where = "base" if source is None else f"{source.where} ({source.dtype})"
        return where + (" + LoRA adapter" if name in self.adapted else "")


@dataclass
class Summary:
    files: list[Path]
    tensors: int
    params: int
    nbytes: int
    from_base: list[str]
    upcast: list[str]
    seconds: float


def merge(
    ckpt_dir: str | Path,
    out_dir: str | Path,
    max_shard_size: int | str = "80GB",
    dtype: str = "bf16",
    fmt: str = "official",
    base: str | None = None,
    tag: str | None = None,
    debug: bool = False,
    log: Callable[[str], None] = print,
    lora_scale: float = 1.0,
    require_lora: bool = False,
    ema: bool = False,
    expert: str | None = None,
) -> Summary:
    """Merge checkpoint `ckpt_dir` into a DiT folder `out_dir`; see the module docstring. A14B: one folder
    per expert under out_dir (expert: the one to write now)."""
    start = time.monotonic()
    ckpt_dir, out_dir = Path(ckpt_dir), Path(out_dir)
    if expert is None and open_checkpoint(ckpt_dir).experts:
        layout = 0 if fmt == "official" else 1
        parts = [
            merge(ckpt_dir, out_dir / EXPERT_FOLDERS[e][layout], max_shard_size, dtype, fmt, base, tag, debug, log,
                  lora_scale, require_lora, ema, expert=e)
            for e in open_checkpoint(ckpt_dir).experts
        ]  # fmt: skip
        return Summary(
            [f for p in parts for f in p.files], sum(p.tensors for p in parts), sum(p.params for p in parts),
            sum(p.nbytes for p in parts), [n for p in parts for n in p.from_base], [n for p in parts for n in p.upcast],
            time.monotonic() - start,
        )  # fmt: skip
    if dtype not in OUT_DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(OUT_DTYPES)}, got {dtype!r}")
    if fmt not in ("official", "diffusers"):
        raise ValueError(f"--format must be official or diffusers, got {fmt!r}")
    limit = parse_size(max_shard_size)
    if out_dir.resolve() == ckpt_dir.resolve():
        raise ValueError(f"{out_dir}: the output folder must not be the checkpoint folder")
    dit = CheckpointDiT(ckpt_dir, base, tag, lora_scale, ema, expert)
    ckpt, model, expected = dit.ckpt, dit.model, dit.expected
    if require_lora and not dit.adapted:
        raise ValueError(f"{ckpt_dir}: --lora, but the checkpoint holds no LoRA adapter (a run without [lora])")
    log(
        f"{ckpt.path}: step {ckpt.step}, engine {ckpt.engine}, world size {ckpt.world_size}"
        + (f", the {expert}-noise expert" if expert else "")
        + (", the EMA weights" if ema else "")
    )
    out_dtype = OUT_DTYPES[dtype]
    rename = official_to_diffusers_key if fmt == "diffusers" else (lambda name: name)
    items = [ShardItem(rename(name), name, shape, out_dtype) for name, shape in expected.items()]
    if fmt == "diffusers":
        bad = [i.name for i in items if diffusers_to_official_key(i.key) != i.name]
        if bad:
            raise ValueError(f"--format diffusers: no diffusers name for {', '.join(bad)}")
        config = diffusers_config(model)
    else:
        config = {"_class_name": "WanModel", **model.config}
    shards = plan_shards(items, limit, WEIGHTS_NAME)
    from_base, upcast = dit.from_base, dit.upcast
    if from_base:
        log(f"{len(from_base)} of {len(expected)} tensors are not in the checkpoint: taken from {dit.base.describe}")
    if dit.adapted:
        log(f"the LoRA adapters of {len(dit.adapted)} layers merged into their weights (scale x{lora_scale:g})")

    def produce(item: ShardItem) -> torch.Tensor:
        if debug:
            log(f"  {item.key}: {dit.where(item.name)}")
        return dit.read(item.name, item.dtype)

    out_dir.mkdir(parents=True, exist_ok=True)
    # Never mix two merges in one folder; config.json is written last, so an interrupted merge leaves a
    # folder that no loader takes for a model.
    stem, ext = WEIGHTS_NAME.rsplit(".", 1)
    for old in [*out_dir.glob(f"{stem}*.{ext}*"), out_dir / CONFIG_NAME]:
        old.unlink(missing_ok=True)
    files = []
    for k, (file_name, shard_items) in enumerate(shards):
        t0 = time.monotonic()
        write_safetensors_streaming(out_dir / file_name, shard_items, produce)
        files.append(out_dir / file_name)
        size, seconds = sum(i.nbytes for i in shard_items), time.monotonic() - t0
        log(f"[{k + 1}/{len(shards)}] {file_name}: {len(shard_items)} tensors, {size / 1e9:.2f} GB ({seconds:.1f} s)")
    total = sum(i.nbytes for i in items)
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": total},
            "weight_map": {i.key: name for name, shard_items in shards for i in shard_items},
        }
        index_path = out_dir / index_name(WEIGHTS_NAME)
        index_path.with_name(index_path.name + ".tmp").write_text(json.dumps(index, indent=2) + "\n")
        os.replace(index_path.with_name(index_path.name + ".tmp"), index_path)
    (out_dir / "config.json.tmp").write_text(json.dumps(config, indent=2) + "\n")
    os.replace(out_dir / "config.json.tmp", out_dir / CONFIG_NAME)
    if upcast:
        log(f"warning: {len(upcast)} tensors were stored in a lower precision only and upcast: {', '.join(upcast[:5])}")
    summary = Summary(
        files, len(items), sum(math.prod(i.shape) for i in items), total, from_base, upcast, time.monotonic() - start
    )
    log(
        f"wrote {summary.tensors} tensors ({summary.params / 1e9:.3f} B parameters, {total / 1e9:.2f} GB {dtype}) "
        f"in {len(files)} file{'s' if len(files) > 1 else ''} to {out_dir} ({fmt} layout, {summary.seconds:.1f} s)"
    )
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="zero_to_bf16",
        description="Merge a training checkpoint (ddp, zero2, zero3 or fsdp) into a Wan2.1 DiT folder.",
    )
    parser.add_argument("checkpoint_dir", help="a complete checkpoint folder, e.g. output_dir/checkpoint-1000")
    parser.add_argument("output_dir", help="the DiT folder to write, e.g. output_dir/checkpoint-1000-outputs")
    parser.add_argument(
        "--max_shard_size", default="80GB", help="largest weight file, e.g. 10GB, 500MiB (default 80GB)"
    )
    parser.add_argument(
        "--safe_serialization", action="store_true", help="accepted for VideoX-Fun; safetensors is always written"
    )
    parser.add_argument("--dtype", default="bf16", choices=sorted(OUT_DTYPES), help="weight dtype (default bf16)")
    parser.add_argument(
        "--format", default="official", choices=["official", "diffusers"], help="official WanModel or diffusers layout"
    )
    parser.add_argument(
        "--base", default=None, help="the DiT folder the run started from (default: from the checkpoint's config.toml)"
    )
    parser.add_argument("-t", "--tag", default=None, help=f"DeepSpeed tag folder (default {DEEPSPEED_TAG})")
    parser.add_argument(
        "--exclude_frozen_parameters", action="store_true", help="accepted for VideoX-Fun; the output is always whole"
    )
    parser.add_argument(
        "--lora", action="store_true",
        help="the checkpoint is a LoRA run's: merge its adapter into the base weights (done for any LoRA "
        "checkpoint; with the flag a checkpoint without one is an error)",
    )  # fmt: skip
    parser.add_argument(
        "--lora_scale", type=float, default=1.0, help="multiply the adapter's update by this (default 1.0)"
    )
    parser.add_argument(
        "--ema", action="store_true", help="write the run's EMA of the trainable weights ([ema]) instead of the weights"
    )
    parser.add_argument("-d", "--debug", action="store_true", help="print where each tensor comes from")
    args = parser.parse_args(argv)
    if args.exclude_frozen_parameters:
        print("note: --exclude_frozen_parameters is ignored: the output is a whole DiT, frozen weights included")
    try:
        merge(
            args.checkpoint_dir, args.output_dir, args.max_shard_size, args.dtype, args.format, args.base,
            args.tag, args.debug, log=lambda line: print(line, flush=True), lora_scale=args.lora_scale,
            require_lora=args.lora, ema=args.ema,
        )  # fmt: skip
    except (ValueError, OSError) as err:  # bad input, or the disk (full, permissions): the message says which
        print(f"zero_to_bf16: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
