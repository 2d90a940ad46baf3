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

`saved_bytes_per_block` measures what one block keeps, exactly, on fake (shapes-only) tensors, so it
costs nothing at release sizes; a compiled block keeps the same (tests/test_selective_compile.py).
Imports nothing distributed.
"""

import contextlib
import functools
import math

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

CHECKPOINTING_MODES = ("full", "selective", "none")
RELEASE_TOKENS = 21 * 30 * 52  # 81 frames of 480x832: 32,760 tokens

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
class _StorageCounter:
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
    counter = _StorageCounter(exclude=[*block.parameters(), *shared])

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


def saved_bytes_per_block(
    config: dict,
    mode: str | bool = "full",
    save_matmuls: bool = False,
    tokens: int = RELEASE_TOKENS,
    dtype: torch.dtype = torch.bfloat16,
    batch: int = 1,
) -> int:
    """Exact bytes one DiT block of `config` (WanModel keyword arguments) keeps for backward for
    `batch` samples of `tokens` video tokens (and text_len text tokens), under `mode`, with float32
    weights and `dtype` autocast (float32: none), as the trainer runs it.

    Runs one block on fake tensors (shapes only, no memory, no compute; the CPU's kernels' output
    shapes: SDPA is flash_attention_for_cpu, which keeps the output and a float32 logsumexp, as the
    CUDA flash/cuDNN kernels do). Counts as `saved_activation_bytes`: the block's input x (the
    previous block's output), the text k/v and, under autocast, the bf16 weight copies included."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from wan.modules.model import WanAttentionBlock

    dim, heads, text_len = config["dim"], config["num_heads"], config.get("text_len", 512)
    with_image = config.get("model_type", "t2v") == "i2v"
    with FakeTensorMode(), torch.device("cpu"):
        block = WanAttentionBlock(dim, config["ffn_dim"], heads, config.get("eps", 1e-6), with_image)
        block.train()
        x = torch.empty(batch, tokens, dim, requires_grad=True)
        e0 = torch.empty(batch, 6, dim, requires_grad=True)
        context = torch.empty(batch, text_len, dim, requires_grad=True)
        image_context = torch.empty(batch, 257, dim, requires_grad=True) if with_image else None
        half = dim // heads // 2
        rope = (torch.empty(tokens, 1, half), torch.empty(tokens, 1, half))
        autocast_dtype = None if dtype == torch.float32 else dtype
        return saved_activation_bytes(block, (x, e0, context, image_context, rope), mode, save_matmuls, autocast_dtype)


def saved_bytes_per_token_per_block(
    config: dict,
    mode: str | bool = "full",
    save_matmuls: bool = False,
    tokens: int = RELEASE_TOKENS,
    dtype: torch.dtype = torch.bfloat16,
) -> int:
    """`saved_bytes_per_block` for one sample of `tokens` tokens, divided by tokens, rounded up: the
    per-token cost with the block's fixed part (text k/v, autocast weight copies) spread over tokens."""
    return math.ceil(saved_bytes_per_block(config, mode, save_matmuls, tokens, dtype) / tokens)
