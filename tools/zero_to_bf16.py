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

What each engine leaves, and how it is read (one small reader per engine, see `READERS`):
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
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

import torch

if __package__ in (None, ""):  # run as a script: python tools/zero_to_bf16.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.torch_zip import LazyTensor, Stub, load_torch_zip  # noqa: E402
from train.checkpoint import CONFIG_FILE, DCP_METADATA_FILE, MARKER_FILE, load_dcp, read_dcp_metadata, read_marker  # noqa: E402
from train.models import DiTWeights  # noqa: E402
from wan import WanModel, dit_preset  # noqa: E402
from wan.modules.dit_weights import (  # noqa: E402
    CONFIG_NAME,
    WEIGHTS_NAME,
    diffusers_config,
    diffusers_to_official_key,
    official_to_diffusers_key,
    read_dit_folder,
)
from wan.modules.safetensors_io import (  # noqa: E402
    _DTYPES,
    ShardItem,
    index_name,
    parse_size,
    plan_shards,
    read_header,
    read_tensor,
    write_safetensors_streaming,
)

# The engines' file names, repeated here rather than imported: train/engine_deepspeed.py imports
# DeepSpeed, which the merger must not need.
DEEPSPEED_TAG = "deepspeed"  # engine_deepspeed.py: engine.save_checkpoint(folder, tag="deepspeed")
DCP_DIR = "dcp"  # engine_fsdp.py: dcp.save(..., checkpoint_id=folder / "dcp")
DDP_MODEL_FILE = "model.safetensors"  # engine.py DDPEngine
DCP_MODEL_PREFIX = "model."  # dcp.save({"model": get_model_state_dict(m), ...}) flattens to "model.<name>"
OUT_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


# ----------------------------------------------------------------------------------------------------
# The tensors a checkpoint holds: one reader per engine


@dataclass
class Source:
    """One full tensor of the checkpoint: shape and stored dtype known up front, data read on demand."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    read: Callable[[], torch.Tensor]
    where: str  # for --debug and error messages


def read_ddp(ckpt: Path, world_size: int, tag: str | None) -> dict[str, Source]:
    """DDP: model.safetensors holds the trainable weights by official name."""
    path = ckpt / DDP_MODEL_FILE
    if not path.is_file():
        raise ValueError(f"{path}: missing (a ddp checkpoint keeps its trainable weights there)")
    header, data_start = read_header(path)

    def reader(info: dict) -> Callable[[], torch.Tensor]:
        def read() -> torch.Tensor:
            with open(path, "rb") as f:
                return read_tensor(f, info, data_start)

        return read

    return {
        key: Source(tuple(info["shape"]), _DTYPES[info["dtype"]], reader(info), DDP_MODEL_FILE)
        for key, info in header.items()
    }


def _ds_files(folder: Path, world_size: int, kind: str) -> list[Path]:
    """The `kind` (model or optim) states files of ranks 0..W-1; optimizer files may carry DeepSpeed's
    bf16_ prefix (its BF16_Optimizer wrote them)."""
    files = []
    for rank in range(world_size):
        name = f"zero_pp_rank_{rank}_mp_rank_00_{kind}_states.pt"
        found = [p for p in (folder / name, folder / f"bf16_{name}") if p.is_file()]
        if not found:
            raise ValueError(f"{folder / name}: missing (rank {rank} of {world_size}; the save is incomplete)")
        if len(found) > 1:
            raise ValueError(f"{folder}: both {found[0].name} and {found[1].name} exist; cannot tell which is current")
        files.append(found[0])
    return files


def _as_int(value: Any, what: str, path: Path) -> int:
    if isinstance(value, Stub) and value.args:  # an Enum stub: ZeroStageEnum(2)
        value = value.args[0]
    if isinstance(value, list) and value:  # ZeRO-2 keeps one partition count per param group
        value = max(value)
    if not isinstance(value, int):
        raise ValueError(f"{path}: {what} is {value!r}, not a number")
    return value


def _read_flat(groups: list[LazyTensor], start: int, dst: torch.Tensor) -> None:
    """Fill dst with elements [start, start + len(dst)) of the concatenation of flat `groups`."""
    pos = 0
    for group in groups:
        end = pos + group.numel
        if start < end and pos < start + dst.numel():
            lo, hi = max(start, pos), min(start + dst.numel(), end)
            group.read_into(dst[lo - start : hi - start], lo - pos)
        pos = end
    if start + dst.numel() > pos:
        raise ValueError(f"{groups[0].storage.path}: a parameter reaches past the end of the flat partitions")


def _model_states(data: Any, path: Path) -> dict:
    if not isinstance(data, dict) or "param_shapes" not in data or "module" not in data:
        raise ValueError(f"{path}: not a DeepSpeed model-states file (no param_shapes / module)")
    return data


def _optim_state(data: Any, path: Path) -> dict:
    state = data.get("optimizer_state_dict") if isinstance(data, dict) else None
    if not isinstance(state, dict) or "zero_stage" not in state:
        raise ValueError(f"{path}: not a DeepSpeed ZeRO optimizer-states file (no optimizer_state_dict.zero_stage)")
    return state


def _check_stage(state: dict, path: Path, expected: int, world_size: int) -> None:
    stage = _as_int(state["zero_stage"], "zero_stage", path)
    if (stage == 3) != (expected == 3):
        raise ValueError(f"{path}: a ZeRO stage {stage} file, but the checkpoint says zero{expected}")
    count = _as_int(state.get("partition_count"), "partition_count", path)
    if count != world_size:
        raise ValueError(f"{path}: partitioned over {count} ranks, but COMPLETE says world_size {world_size}")


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(int(n) for n in value)


def read_deepspeed(ckpt: Path, world_size: int, tag: str | None, stage: int) -> dict[str, Source]:
    folder = ckpt / (tag or DEEPSPEED_TAG)
    if not folder.is_dir():
        raise ValueError(f"{folder}: missing (a zero{stage} checkpoint keeps DeepSpeed's files there)")
    if stage == 3:
        model_files = _ds_files(folder, world_size, "model")
    else:
        model_files = [folder / "mp_rank_00_model_states.pt"]
        if not model_files[0].is_file():
            raise ValueError(f"{model_files[0]}: missing")
    optim_files = _ds_files(folder, world_size, "optim")
    models = [_model_states(load_torch_zip(p), p) for p in model_files]
    optims = [_optim_state(load_torch_zip(p), p) for p in optim_files]
    for state, path in zip(optims, optim_files, strict=True):
        _check_stage(state, path, stage, world_size)
    if models[0].get("shared_params"):
        raise ValueError(f"{model_files[0]}: tied parameters ({list(models[0]['shared_params'])}); a WanModel has none")
    read = _zero3_sources if stage == 3 else _zero2_sources
    sources = read(models, optims, optim_files, model_files, world_size)
    # Whatever else the module state holds whole (ZeRO-2 keeps every parameter and buffer there, in
    # the training dtype; ZeRO-3 keeps empty placeholders) fills in what the optimizer and the frozen
    # fragments lack: persistent buffers, and frozen weights of older DeepSpeed versions.
    for name, tensor in models[0]["module"].items():
        if name not in sources and isinstance(tensor, LazyTensor) and tensor.numel:
            sources[name] = Source(tensor.shape, tensor.dtype, tensor.read, f"{model_files[0].name} module")
    return sources


def _zero2_sources(models, optims, optim_files, model_files, world_size) -> dict[str, Source]:
    """Per param group, the ranks' fp32 partitions concatenated in rank order hold the parameters in
    param_shapes order, each followed by its alignment padding."""
    sources: dict[str, Source] = {}
    param_shapes = models[0]["param_shapes"]
    partitions = [state.get("single_partition_of_fp32_groups") for state in optims]
    for path, groups in zip(optim_files, partitions, strict=True):
        if (
            not isinstance(groups, list)
            or len(groups) != len(param_shapes)
            or not all(isinstance(t, LazyTensor) for t in groups)
        ):
            raise ValueError(
                f"{path}: expected {len(param_shapes)} fp32 partition groups (single_partition_of_fp32_groups)"
            )
    paddings = optims[0].get("param_alignment_paddings")
    for g, shapes in enumerate(param_shapes):
        ranks = [groups[g] for groups in partitions]  # each rank's flat partition of group g
        available = sum(part.numel for part in ranks)
        offset = 0
        for j, (name, shape) in enumerate(shapes.items()):
            shape = _shape(shape)
            numel = math.prod(shape)

            def read(start=offset, shape=shape, numel=numel, ranks=ranks) -> torch.Tensor:
                out = torch.empty(numel, dtype=ranks[0].dtype)
                _read_flat(ranks, start, out)
                return out.view(shape)

            sources[name] = Source(shape, ranks[0].dtype, read, f"{optim_files[0].parent.name} zero2 group {g}")
            offset += numel + (paddings[g][j] if paddings else 0)
        # DeepSpeed pads each group to a multiple of 2 * world_size elements (zero_to_fp32's check).
        align = 2 * world_size
        if math.ceil(offset / align) * align != math.ceil(available / align) * align:
            raise ValueError(
                f"{optim_files[0]}: param group {g} has {available} fp32 elements over {world_size} ranks, but its "
                f"parameters take {offset}; the layout is not one this merger understands"
            )
        _check_slice_mappings(optims, optim_files, g, shapes, ranks, paddings)
    frozen = models[0].get("frozen_param_fragments") or {}
    for name, shape in (models[0].get("frozen_param_shapes") or {}).items():
        tensor = frozen.get(name)
        if not isinstance(tensor, LazyTensor) or _shape(shape) != tensor.shape:
            raise ValueError(f"{model_files[0]}: frozen parameter {name} has no whole fragment")
        sources[name] = Source(tensor.shape, tensor.dtype, tensor.read, f"{model_files[0].name} frozen")
    return sources


def _check_slice_mappings(optims, optim_files, g, shapes, ranks, paddings) -> None:
    """Where DeepSpeed also records each rank's slice of each parameter (param_slice_mappings), it
    must agree with the layout computed from param_shapes: a cheap guard against a format change."""
    starts, offset = {}, 0
    for j, (name, shape) in enumerate(shapes.items()):
        starts[name] = (offset, math.prod(_shape(shape)))
        offset += starts[name][1] + (paddings[g][j] if paddings else 0)
    base = 0
    for state, path, part in zip(optims, optim_files, ranks, strict=True):
        mappings = state.get("param_slice_mappings")
        if not isinstance(mappings, list) or len(mappings) <= g:
            return
        for name, address in mappings[g].items():
            start, numel = starts.get(name, (None, None))
            if start is None:
                raise ValueError(f"{path}: param_slice_mappings names {name}, which param_shapes does not")
            lo, hi = max(start, base), min(start + numel, base + part.numel)
            if (getattr(address, "start", None), getattr(address, "numel", None)) != (lo - base, hi - lo):
                raise ValueError(
                    f"{path}: {name} is at {address!r} in this rank's partition, the layout from param_shapes "
                    f"puts it at start={lo - base}, numel={hi - lo}; this DeepSpeed layout is not understood"
                )
        base += part.numel


def _zero3_sources(models, optims, optim_files, model_files, world_size) -> dict[str, Source]:
    """Each rank holds ceil(numel / W) elements of every parameter, one after another in param_shapes
    order through its flat groups; a parameter is its ranks' pieces concatenated, cut to numel."""
    sources: dict[str, Source] = {}
    groups = [state.get("fp32_flat_groups") for state in optims]
    for path, flat in zip(optim_files, groups, strict=True):
        if not isinstance(flat, list) or not flat or not all(isinstance(t, LazyTensor) for t in flat):
            raise ValueError(f"{path}: no fp32_flat_groups (a ZeRO-3 optimizer file has them)")
    param_shapes = {name: _shape(s) for shapes in models[0]["param_shapes"] for name, s in shapes.items()}
    offset = 0
    for name, shape in param_shapes.items():
        numel = math.prod(shape)
        part = math.ceil(numel / world_size)

        def read(start=offset, shape=shape, numel=numel, part=part) -> torch.Tensor:
            out = torch.empty(part * world_size, dtype=groups[0][0].dtype)
            for rank, flat in enumerate(groups):
                _read_flat(flat, start, out[rank * part : (rank + 1) * part])
            return out[:numel].view(shape)

        sources[name] = Source(shape, groups[0][0].dtype, read, f"{optim_files[0].parent.name} zero3")
        offset += part
    for path, flat in zip(optim_files, groups, strict=True):
        if sum(t.numel for t in flat) != offset:
            raise ValueError(
                f"{path}: holds {sum(t.numel for t in flat)} fp32 elements, the parameters of param_shapes take "
                f"{offset} per rank; the layout is not one this merger understands"
            )
    shapes = models[0].get("frozen_param_shapes") or {}
    for name, shape in shapes.items():
        shape = _shape(shape)
        numel, part = math.prod(shape), math.ceil(math.prod(shape) / world_size)
        pieces = []
        for model, path in zip(models, model_files, strict=True):
            piece = (model.get("frozen_param_fragments") or {}).get(name)
            if not isinstance(piece, LazyTensor) or piece.numel != part:
                raise ValueError(f"{path}: frozen parameter {name} has no fragment of {part} elements")
            pieces.append(piece)

        def read(shape=shape, numel=numel, part=part, pieces=pieces) -> torch.Tensor:
            out = torch.empty(part * world_size, dtype=pieces[0].dtype)
            for rank, piece in enumerate(pieces):
                piece.read_into(out[rank * part : (rank + 1) * part])
            return out[:numel].view(shape)

        sources[name] = Source(shape, pieces[0].dtype, read, f"{model_files[0].parent.name} zero3 frozen")
    return sources


def read_zero2(ckpt: Path, world_size: int, tag: str | None) -> dict[str, Source]:
    return read_deepspeed(ckpt, world_size, tag, 2)


def read_zero3(ckpt: Path, world_size: int, tag: str | None) -> dict[str, Source]:
    return read_deepspeed(ckpt, world_size, tag, 3)


def read_fsdp(ckpt: Path, world_size: int, tag: str | None) -> dict[str, Source]:
    """FSDP: a DCP folder; each "model.<name>" key is read alone (dcp.load into one empty tensor, no
    process group), which reads only that key's chunks."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    folder = ckpt / DCP_DIR
    meta_path = folder / DCP_METADATA_FILE
    if not meta_path.is_file():
        raise ValueError(f"{meta_path}: missing (an fsdp checkpoint is a DCP save in {DCP_DIR}/)")
    metadata = read_dcp_metadata(folder)  # a pickle: read by the restricted unpickler, once
    # Every file the metadata points into must be there and long enough.
    ends: dict[str, int] = {}
    for info in metadata.storage_data.values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    for name, end in sorted(ends.items()):
        path = folder / name
        if not path.is_file():
            raise ValueError(f"{path}: missing (named by {meta_path}; the save is incomplete)")
        if path.stat().st_size < end:
            raise ValueError(f"{path}: {path.stat().st_size} bytes, {meta_path} needs {end} (truncated)")

    sources = {}
    for key, md in metadata.state_dict_metadata.items():
        if not key.startswith(DCP_MODEL_PREFIX) or not isinstance(md, TensorStorageMetadata):
            continue
        name = key[len(DCP_MODEL_PREFIX) :]
        shape, dtype = _shape(md.size), md.properties.dtype

        def read(name=name, shape=shape, dtype=dtype) -> torch.Tensor:
            tensor = torch.empty(shape, dtype=dtype)
            with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
                warnings.filterwarnings("ignore", message=".*single process", category=UserWarning)
                load_dcp({"model": {name: tensor}}, folder, metadata, no_dist=True)
            return tensor

        sources[name] = Source(shape, dtype, read, f"{DCP_DIR}/ {key}")
    if not sources:
        keys = list(metadata.state_dict_metadata)[:5]
        raise ValueError(f"{meta_path}: no '{DCP_MODEL_PREFIX}*' tensors (keys look like {keys})")
    return sources


READERS: dict[str, Callable[[Path, int, str | None], dict[str, Source]]] = {
    "ddp": read_ddp,
    "zero2": read_zero2,
    "zero3": read_zero3,
    "fsdp": read_fsdp,
}


# ----------------------------------------------------------------------------------------------------
# The checkpoint folder, the run's config and the base model


@dataclass
class Checkpoint:
    path: Path
    step: int
    world_size: int
    engine: str
    run_config: dict  # config.toml, parsed ({} when absent)


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
    if engine not in READERS:
        raise ValueError(f"{path / MARKER_FILE}: engine {engine!r} is not one of {', '.join(READERS)}")
    return Checkpoint(path, marker["step"], marker["world_size"], engine, run_config)


def _detect_engine(path: Path) -> str:
    # Markers written before the engine field: tell the engine by its files.
    if (path / DCP_DIR).is_dir():
        return "fsdp"
    if (path / DEEPSPEED_TAG).is_dir():
        return "zero3" if list((path / DEEPSPEED_TAG).glob("zero_pp_rank_*_model_states.pt")) else "zero2"
    return "ddp"


class Base:
    """The model the run started from: its config (always needed) and, only when the checkpoint lacks
    a tensor, its weights (train/models.py DiTWeights, built on first use)."""

    def __init__(self, ckpt: Checkpoint, base: str | None):
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


def fitting_model(ckpt_dir: Path, base_model: Base, sources: dict[str, Source]) -> WanModel:
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
) -> Summary:
    """Merge checkpoint `ckpt_dir` into a DiT folder `out_dir`; see the module docstring."""
    start = time.monotonic()
    ckpt_dir, out_dir = Path(ckpt_dir), Path(out_dir)
    if dtype not in OUT_DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(OUT_DTYPES)}, got {dtype!r}")
    if fmt not in ("official", "diffusers"):
        raise ValueError(f"--format must be official or diffusers, got {fmt!r}")
    limit = parse_size(max_shard_size)
    if out_dir.resolve() == ckpt_dir.resolve():
        raise ValueError(f"{out_dir}: the output folder must not be the checkpoint folder")
    ckpt = open_checkpoint(ckpt_dir)
    base_model = Base(ckpt, base)
    log(f"{ckpt_dir}: step {ckpt.step}, engine {ckpt.engine}, world size {ckpt.world_size}")
    sources = READERS[ckpt.engine](ckpt_dir, ckpt.world_size, tag)

    model = fitting_model(ckpt_dir, base_model, sources)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
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
    from_base = [name for name in expected if name not in sources]
    if from_base:
        base_model.check(model)
        log(f"{len(from_base)} of {len(expected)} tensors are not in the checkpoint: taken from {base_model.describe}")

    upcast: list[str] = []

    def produce(item: ShardItem) -> torch.Tensor:
        source = sources.get(item.name)
        if source is None:
            if debug:
                log(f"  {item.key}: base")
            return base_model.read(item.name)
        tensor = source.read()
        if debug:
            log(f"  {item.key}: {source.where} ({source.dtype})")
        if tensor.is_floating_point() and tensor.dtype.itemsize < item.dtype.itemsize:
            # Stored only in the training dtype (a frozen weight under bf16): the base holds it exactly
            # when it is the same weight, which a frozen weight is; otherwise the upcast is all there is.
            try:
                exact = base_model.read(item.name)
            except (ValueError, OSError, KeyError):
                exact = None
            if exact is not None and torch.equal(exact.to(tensor.dtype), tensor):
                return exact
            upcast.append(item.name)
        return tensor

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
    parser.add_argument("-d", "--debug", action="store_true", help="print where each tensor comes from")
    args = parser.parse_args(argv)
    if args.exclude_frozen_parameters:
        print("note: --exclude_frozen_parameters is ignored: the output is a whole DiT, frozen weights included")
    try:
        merge(
            args.checkpoint_dir, args.output_dir, args.max_shard_size, args.dtype, args.format, args.base,
            args.tag, args.debug, log=lambda line: print(line, flush=True),
        )  # fmt: skip
    except (ValueError, OSError) as err:  # bad input, or the disk (full, permissions): the message says which
        print(f"zero_to_bf16: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
