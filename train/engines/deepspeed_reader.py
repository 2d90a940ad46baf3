"""DeepSpeed ZeRO-2 / ZeRO-3 checkpoints read without DeepSpeed and without unpickling code: the
full DiT tensors, each assembled from the ranks' flat fp32 partitions on demand (tools/zero_to_bf16.py
reads them through the engines' traits; train/torch_zip.py reads the pickles' structure)."""

import math
from pathlib import Path
from typing import Any

import torch

from train.engines.base import TensorSource
from train.torch_zip import LazyTensor, Stub, load_torch_zip

TAG = "deepspeed"
"""The sub-folder of a checkpoint DeepSpeed writes in (engine.save_checkpoint(folder, tag=TAG))."""


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


def read_deepspeed(ckpt: Path, world_size: int, tag: str | None, stage: int) -> dict[str, TensorSource]:
    folder = ckpt / (tag or TAG)
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
            sources[name] = TensorSource(tensor.shape, tensor.dtype, tensor.read, f"{model_files[0].name} module")
    return sources


def _zero2_sources(models, optims, optim_files, model_files, world_size) -> dict[str, TensorSource]:
    """Per param group, the ranks' fp32 partitions concatenated in rank order hold the parameters in
    param_shapes order, each followed by its alignment padding."""
    sources: dict[str, TensorSource] = {}
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

            sources[name] = TensorSource(shape, ranks[0].dtype, read, f"{optim_files[0].parent.name} zero2 group {g}")
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
        sources[name] = TensorSource(tensor.shape, tensor.dtype, tensor.read, f"{model_files[0].name} frozen")
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


def _zero3_sources(models, optims, optim_files, model_files, world_size) -> dict[str, TensorSource]:
    """Each rank holds ceil(numel / W) elements of every parameter, one after another in param_shapes
    order through its flat groups; a parameter is its ranks' pieces concatenated, cut to numel."""
    sources: dict[str, TensorSource] = {}
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

        sources[name] = TensorSource(shape, groups[0][0].dtype, read, f"{optim_files[0].parent.name} zero3")
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

        sources[name] = TensorSource(shape, pieces[0].dtype, read, f"{model_files[0].parent.name} zero3 frozen")
    return sources


def read_zero2(ckpt: Path, world_size: int, tag: str | None) -> dict[str, TensorSource]:
    return read_deepspeed(ckpt, world_size, tag, 2)


def read_zero3(ckpt: Path, world_size: int, tag: str | None) -> dict[str, TensorSource]:
    return read_deepspeed(ckpt, world_size, tag, 3)
