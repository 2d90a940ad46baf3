"""Activation checkpointing of the DiT blocks, and what each mode keeps for backward.

Modes (per checkpointed block; `every` = k checkpoints blocks 0, k, 2k, ... and runs the rest plainly):
- "full": keep the block's inputs only and recompute the whole block in backward.
- "selective": keep the block's inputs and the outputs of the attention kernels (what attention's
  backward needs: the output and its logsumexp), recompute the rest: the projections and FFN matmuls
  and the cheap float32 elementwise work (norms, modulation, RoPE, gates, casts). With save_matmuls
  the large matmul outputs (mm/addmm/bmm) are kept too, so only the elementwise work is recomputed.
- "none": autograd keeps whatever each op saves.

The attention kernels are matched by name: every `aten._scaled_dot_product_*` forward (flash,
efficient, cuDNN, flash_attention_for_cpu, ...), the `*_attention_forward` kernels, FlashAttention-3's
`flash_attn*` ops, and the math path's pieces (`_safe_softmax`/`_softmax` and `bmm`: in this model
only the math attention path produces a bmm; linear layers run as mm/addmm).

Where the selective checkpoint sits: inside the block's call (WanAttentionBlock.forward checkpoints
its body), because the policy replays the forward op by op and must see the block's own ops only.
- An engine's module hooks stay outside it. ZeRO-3 gathers parameters in its hooks with a number of
  ops that differs between the forward and the recompute once it prefetches; under ZeRO-3 a
  selectively checkpointed block is a DeepSpeed leaf module (train/engines/deepspeed.py), so its
  submodules have no hooks inside it either.
- In a compiled block dynamo traces the checkpoint with the block: the policy runs on the traced
  ops (mm/addmm/bmm and the attention kernels, `.default` overloads) and AOTAutograd's partitioner
  keeps what it marks. Around a compiled call instead, the policy would only see the compiled code's
  kernel calls (`addmm.out` into buffers that inductor reuses), which it cannot keep: a matmul `.out`
  overload reaching it is an error, not a silent recompute. Dynamo takes the policy only as a
  constant: the module-level functions below.

`saved_activation_bytes` measures what a block keeps, exactly, on real or fake (shapes-only) tensors;
wan/modules/model.py `saved_bytes_per_block` runs it on a fake DiT block, so it costs nothing at
release sizes; a compiled block keeps the same (tests/unit/test_selective_compile.py). Imports nothing
distributed, nor the model (which imports this module).
"""

import contextlib
import functools
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

CHECKPOINTING_MODES = ("full", "selective", "none")

_aten = torch.ops.aten
MATMUL_OPS = frozenset({_aten.mm.default, _aten.addmm.default, _aten.bmm.default})
_MATMUL_PACKETS = frozenset(op.overloadpacket for op in MATMUL_OPS)
MATH_ATTENTION_OPS = frozenset({_aten._safe_softmax.default, _aten._softmax.default, _aten.bmm.default})


def normalize_mode(mode: str | bool) -> str:
    """True / False -> "full" / "none"; a mode name is checked."""
    if isinstance(mode, bool):
        return "full" if mode else "none"
    if mode not in CHECKPOINTING_MODES:
        raise ValueError(f"gradient checkpointing mode must be one of {', '.join(CHECKPOINTING_MODES)}, got {mode!r}")
    return mode


@dataclass(frozen=True)
class ActivationCheckpointing:
    """Which DiT blocks recompute in backward, and how: the [model] section's gradient_checkpointing,
    gradient_checkpointing_every and selective_checkpoint_matmuls as one value, so the model, the FLOP
    count and the memory plan read the same three settings. (Not torch's CheckpointPolicy, which
    decides op by op inside one selective checkpoint.)"""

    mode: str = "none"
    """"full", "selective" or "none" (True / False are taken as "full" / "none")."""
    every: int = 1
    """Checkpoint blocks 0, every, 2 every, ... and run the others plainly."""
    save_matmuls: bool = False
    """With "selective": also keep the mm/addmm/bmm outputs."""

    def __post_init__(self) -> None:
        # Checked here rather than where a model applies it, so that a FLOP count or a memory plan
        # never describes a setting no model would take.
        object.__setattr__(self, "mode", normalize_mode(self.mode))
        if self.every < 1:
            raise ValueError(f"gradient checkpointing 'every' must be >= 1, got {self.every}")
        if self.save_matmuls and self.mode != "selective":
            raise ValueError(f"save_matmuls needs selective gradient checkpointing, got mode {self.mode!r}")

    def checkpointed_blocks(self, num_layers: int) -> range:
        """Indices of the blocks that recompute in backward (none under "none")."""
        return range(0, num_layers if self.mode != "none" else 0, self.every)

    def count(self, num_layers: int) -> int:
        """How many of num_layers blocks recompute in backward."""
        return len(self.checkpointed_blocks(num_layers))

    def describe(self) -> str:
        """A short label: "full", "selective every 2 + matmuls", ..."""
        every = f" every {self.every}" if self.every > 1 else ""
        return f"{self.mode}{every}" + (" + matmuls" if self.save_matmuls else "")


def is_attention_op(op) -> bool:
    """Whether op is an attention kernel's forward (its outputs are what attention's backward needs)."""
    if op in MATH_ATTENTION_OPS:
        return True
    name = str(op)
    if "backward" in name:
        return False
    return "scaled_dot_product" in name or "attention" in name or "flash_attn" in name


def selective_decision(op, save_matmuls: bool) -> CheckpointPolicy:
    """MUST_SAVE the attention kernels' outputs (and with save_matmuls the mm/addmm/bmm outputs),
    PREFER_RECOMPUTE everything else."""
    if is_attention_op(op):
        return CheckpointPolicy.MUST_SAVE
    if save_matmuls and getattr(op, "overloadpacket", None) in _MATMUL_PACKETS:
        if op not in MATMUL_OPS:
            raise RuntimeError(
                f"selective checkpointing with save_matmuls saw {op}: a compiled region runs inside the checkpoint, "
                "whose matmul outputs it cannot keep; checkpoint inside the compiled call (WanAttentionBlock.forward)"
            )
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def selective_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return selective_decision(op, save_matmuls=False)


def selective_matmuls_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return selective_decision(op, save_matmuls=True)


_SELECTIVE_CONTEXTS = {
    False: functools.partial(create_selective_checkpoint_contexts, selective_policy),
    True: functools.partial(create_selective_checkpoint_contexts, selective_matmuls_policy),
}


class SelectivePolicy:
    """The selective policy calling `observer` with each output kept (to measure what is kept; eager
    only: dynamo would not take it as a constant)."""

    def __init__(self, save_matmuls: bool, observer):
        self.save_matmuls = save_matmuls
        self.observer = observer

    def __call__(self, ctx, op, *args, **kwargs) -> CheckpointPolicy:
        decision = selective_decision(op, self.save_matmuls)
        if decision == CheckpointPolicy.MUST_SAVE:
            self.observer(ctx.op_output)
        return decision


def checkpoint_block(block, *args, mode: str = "full", save_matmuls: bool = False, observer=None):
    """block(*args) under `mode` ("full" or "selective"; "none" just calls it). `block` is any callable:
    the model checkpoints a selective block's body from inside its call (see the module docstring)."""
    if mode == "none":
        return block(*args)
    if mode == "full":
        return checkpoint(block, *args, use_reentrant=False)
    if mode == "selective":
        if observer is None:
            context_fn = _SELECTIVE_CONTEXTS[save_matmuls]
        else:
            context_fn = functools.partial(
                create_selective_checkpoint_contexts, SelectivePolicy(save_matmuls, observer)
            )
        return checkpoint(block, *args, use_reentrant=False, context_fn=context_fn)
    raise ValueError(f"unknown gradient checkpointing mode {mode!r}")


# --------------------------------------------------------------------------------------------------
class StorageCounter:
    """Unique storages seen, by identity of the storage (views of one tensor count once)."""

    def __init__(self, exclude: list[torch.Tensor]):
        self.storages: dict[int, torch.UntypedStorage] = {}  # kept alive: no address reuse
        self.excluded = {t.untyped_storage()._cdata for t in exclude}

    def add(self, value) -> None:
        for t in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                if storage._cdata not in self.excluded:
                    self.storages.setdefault(storage._cdata, storage)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self.storages.values())


def saved_activation_bytes(
    block: torch.nn.Module,
    inputs: tuple,
    mode: str | bool = "none",
    save_matmuls: bool = False,
    autocast_dtype: torch.dtype | None = None,
) -> int:
    """Bytes `block(*inputs)` keeps for backward under `mode`: the unique storages autograd saves (for
    a checkpointed block: its inputs, and under "selective" the outputs the policy keeps), excluding
    the block's parameters and the storages of every input but the first (the residual stream x; the
    time projection, text context and RoPE tables are shared by all blocks). Autocast's low-precision
    weight copies count (they live as long as the activations). Real or fake tensors (CPU device)."""
    mode = normalize_mode(mode)
    # A block set to checkpoint itself would keep its outputs in its own checkpoint's storage, unseen.
    assert not getattr(block, "selective_checkpoint", False), "measure a block with its own checkpointing off"
    x = inputs[0]
    shared = [t for t in inputs[1:] if isinstance(t, torch.Tensor)]
    shared += [t for v in inputs[1:] if isinstance(v, (tuple, list)) for t in v if isinstance(t, torch.Tensor)]
    counter = StorageCounter(exclude=[*block.parameters(), *shared])

    def pack(t):
        counter.add(t)
        return t

    device_type = x.device.type
    autocast = (
        torch.autocast(device_type, dtype=autocast_dtype) if autocast_dtype is not None else contextlib.nullcontext()
    )
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        out = checkpoint_block(block, *inputs, mode=mode, save_matmuls=save_matmuls, observer=counter.add)
    nbytes = counter.nbytes
    del out
    return nbytes
