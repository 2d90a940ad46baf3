"""Optimizer state keyed by parameter name, not index, as safetensors tensors plus JSON metadata:
a checkpoint any world size and any parameter order can read back (the ddp engine's)."""

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from train.checkpoint_io import check_json


def _named_params(optimizer: torch.optim.Optimizer, names_by_param: Mapping[torch.Tensor, str]) -> list[list[str]]:
    """The parameter names of each param group, in the optimizer's order (the order its state_dict()
    numbers them in)."""
    groups: list[list[str]] = []
    seen: set[str] = set()
    for g, group in enumerate(optimizer.param_groups):
        names = []
        for p in group["params"]:
            if p not in names_by_param:
                raise ValueError(
                    f"param group {g} holds a parameter of shape {list(p.shape)} that names_by_param does not name"
                )
            name = names_by_param[p]
            if name in seen:
                raise ValueError(f"names_by_param gives the name {name!r} to two parameters of the optimizer")
            seen.add(name)
            names.append(name)
        groups.append(names)
    return groups


def optimizer_state_to_named(
    optimizer: torch.optim.Optimizer, names_by_param: Mapping[torch.Tensor, str]
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The optimizer state as (tensors, safetensors metadata), keyed by parameter name, not index.

    Tensors are "{param_name}.{state_key}" (AdamW: step, exp_avg, exp_avg_sq), as held (not copied).
    The metadata holds JSON strings: "param_groups" (hyperparameters, `params` as lists of names) and
    "state" ({name: {"tensors": [state keys], "values": {key: non-tensor value}}}), so that names
    with dots parse unambiguously and parameters without state yet are explicit.
    """
    groups = _named_params(optimizer, names_by_param)
    state_dict = optimizer.state_dict()
    names = [name for group in groups for name in group]  # state_dict() numbers params in this order
    tensors: dict[str, torch.Tensor] = {}
    state_index: dict[str, dict[str, Any]] = {}
    for index, param_state in state_dict["state"].items():
        name = names[index]
        entry: dict[str, Any] = {"tensors": [], "values": {}}
        for key, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{name}.{key}"] = value
                entry["tensors"].append(key)
            else:
                check_json(value, f"optimizer state of {name!r}: {key!r}")
                entry["values"][key] = value
        state_index[name] = entry
    param_groups = []
    for g, (group, group_names) in enumerate(zip(state_dict["param_groups"], groups, strict=True)):
        group = {k: v for k, v in group.items() if k != "params"}
        check_json(group, f"optimizer param group {g}")
        param_groups.append({**group, "params": group_names})
    meta = {"format": "pt", "param_groups": json.dumps(param_groups), "state": json.dumps(state_index)}
    return tensors, meta


def load_named_optimizer_state(
    optimizer: torch.optim.Optimizer,
    names_by_param: Mapping[torch.Tensor, str],
    tensors: Mapping[str, torch.Tensor],
    meta: Mapping[str, str],
    source: str | Path = "optimizer state",
) -> None:
    """Load a state written by optimizer_state_to_named into `optimizer`, whose param groups must hold
    the same names (in any order within a group); shapes must agree. Refuses with every problem
    listed, naming `source` (the file)."""
    try:
        saved_groups = json.loads(meta["param_groups"])
        saved_state = json.loads(meta["state"])
    except (KeyError, json.JSONDecodeError) as err:
        raise ValueError(f"{source}: no optimizer state metadata (param_groups, state): {err}") from None
    groups = _named_params(optimizer, names_by_param)
    problems: list[str] = []
    if len(saved_groups) != len(groups):
        problems.append(f"it has {len(saved_groups)} param groups, the optimizer has {len(groups)}")
    for g, (saved, current) in enumerate(zip(saved_groups, groups, strict=False)):  # counts checked above
        missing = sorted(set(current) - set(saved["params"]))
        unexpected = sorted(set(saved["params"]) - set(current))
        if missing:
            problems.append(f"param group {g} lacks {_shorten(missing)}")
        if unexpected:
            problems.append(f"param group {g} has parameters the optimizer does not: {_shorten(unexpected)}")

    all_names = [name for group in groups for name in group]  # state_dict() numbers params in this order
    params = dict(zip(all_names, [p for group in optimizer.param_groups for p in group["params"]], strict=True))
    listed = {f"{name}.{key}" for name, entry in saved_state.items() for key in entry["tensors"]}
    if set(tensors) != listed:
        problems.append(f"tensors and metadata disagree: {_shorten(sorted(set(tensors) ^ listed))}")
    in_groups = {name for saved in saved_groups for name in saved["params"]}
    stray = sorted(set(saved_state) - in_groups)
    if stray:
        problems.append(f"it has state for parameters in no param group: {_shorten(stray)}")
    for name, entry in saved_state.items():
        if name not in params:
            continue  # reported above
        for key in entry["tensors"]:
            tensor = tensors.get(f"{name}.{key}")
            # Scalars (step) aside, the state of Adam-like optimizers has the parameter's shape.
            if tensor is not None and tensor.dim() > 0 and tensor.shape != params[name].shape:
                problems.append(
                    f"{name}.{key} has shape {list(tensor.shape)}, the parameter {list(params[name].shape)}"
                )
    if problems:
        raise ValueError(f"cannot load the optimizer state of {source}:\n  " + "\n  ".join(problems))

    # Rebuild the index-based state dict for the current parameter order; load_state_dict casts and
    # moves state tensors to each parameter's dtype and device (keeping `step` as it is).
    index = {name: i for i, name in enumerate(all_names)}
    state = {
        index[name]: {**entry["values"], **{key: tensors[f"{name}.{key}"] for key in entry["tensors"]}}
        for name, entry in saved_state.items()
    }
    param_groups = []
    for saved, current_group, names in zip(saved_groups, optimizer.param_groups, groups, strict=True):
        group = {k: v for k, v in saved.items() if k != "params"}
        for key, value in group.items():  # JSON gave lists where the optimizer keeps tuples (betas)
            if isinstance(current_group.get(key), tuple) and isinstance(value, list):
                group[key] = tuple(value)
        param_groups.append({**group, "params": [index[name] for name in names]})
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})


def _shorten(names: list[str], limit: int = 20) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")
