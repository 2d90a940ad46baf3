"""Gradient checkpointing changes memory, never the numbers; what each mode keeps is measured exactly."""

import contextlib
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from wan import WanModel, dit_preset
from wan.modules.checkpointing import ActivationCheckpointing, saved_activation_bytes
from wan.modules.model import WanAttentionBlock, saved_bytes_per_block, saved_bytes_per_token_per_block

MODES = [("full", False), ("selective", False), ("selective", True)]
SDPA = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func] += 1
        return func(*args, **(kwargs or {}))


def loss_and_grads(model: WanModel, bf16: bool = False, seed: int = 0):
    """Loss, gradients, and the ops backward ran (recomputation included)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 16, 3, 4, 6, generator=gen)
    context = torch.randn(2, 11, 64, generator=gen)
    target = torch.randn(2, 16, 3, 4, 6, generator=gen)
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
        out = model(x, torch.tensor([20.0, 870.0]), context)
    loss = torch.nn.functional.mse_loss(out.float(), target)
    with OpCounter() as counter:
        loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, counter.ops


@pytest.fixture(scope="module")
def model_and_reference():
    torch.manual_seed(0)
    model = WanModel(**dict(dit_preset("debug"), num_layers=4))
    # The reference zero-inits the head, which would make every upstream gradient zero.
    torch.nn.init.normal_(model.head.head.weight, std=0.02)
    model.train()
    model.set_gradient_checkpointing("none")
    return model, {bf16: loss_and_grads(model, bf16) for bf16 in (False, True)}


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("every", [1, 2])
@pytest.mark.parametrize("mode,save_matmuls", MODES, ids=["full", "selective", "selective+matmuls"])
def test_checkpointing_gives_the_same_loss_and_gradients(model_and_reference, mode, save_matmuls, every, bf16):
    """Bitwise equal in float32 and under bf16 autocast alike: the recomputation reruns the same
    kernels on the same inputs (and the kept outputs are the very tensors of the forward)."""
    model, reference = model_and_reference
    loss_plain, grads_plain, ops_plain = reference[bf16]
    model.set_gradient_checkpointing(mode, every=every, save_matmuls=save_matmuls)
    try:
        checkpointed = model.checkpointed_blocks
        assert checkpointed == set(range(0, 4, every))
        loss_ckpt, grads_ckpt, ops = loss_and_grads(model, bf16)
    finally:
        model.set_gradient_checkpointing("none")
    assert torch.equal(loss_plain, loss_ckpt)
    assert grads_plain.keys() == grads_ckpt.keys()
    for name in grads_plain:
        assert grads_plain[name].abs().sum() > 0, name
        assert torch.equal(grads_ckpt[name], grads_plain[name]), name
    # What backward recomputed: full reruns both attentions of each checkpointed block, selective
    # none of them; with save_matmuls no forward matmul (addmm) reruns either.
    assert ops_plain[SDPA] == 0
    assert ops[SDPA] == (2 * len(checkpointed) if mode == "full" else 0)
    addmm = torch.ops.aten.addmm.default
    assert (ops[addmm] == ops_plain[addmm]) == save_matmuls


def test_activation_checkpointing_value():
    assert ActivationCheckpointing(True) == ActivationCheckpointing("full") != ActivationCheckpointing(False)
    assert list(ActivationCheckpointing("selective", every=3).checkpointed_blocks(7)) == [0, 3, 6]
    assert ActivationCheckpointing().count(40) == 0 and ActivationCheckpointing("full", every=3).count(40) == 14
    assert ActivationCheckpointing("selective", 2, True).describe() == "selective every 2 + matmuls"
    assert ActivationCheckpointing("full").describe() == "full"
    with pytest.raises(ValueError, match="every"):
        ActivationCheckpointing("none", every=0)


def test_checkpointing_arguments():
    model = WanModel(**dit_preset("debug"))
    with pytest.raises(ValueError, match="every"):
        model.set_gradient_checkpointing(True, every=0)
    with pytest.raises(ValueError, match="mode must be one of"):
        model.set_gradient_checkpointing("some")
    with pytest.raises(ValueError, match="save_matmuls needs selective"):
        model.set_gradient_checkpointing("full", save_matmuls=True)
    model.set_gradient_checkpointing(True)
    assert model.gradient_checkpointing_settings == dict(mode="full", every=1, save_matmuls=False)
    assert model.checkpointed_blocks == {0, 1}
    model.set_gradient_checkpointing(False)
    assert model.checkpointed_blocks == set() and model.checkpoint_policy == ActivationCheckpointing()
    other = WanModel(**dit_preset("debug"))
    model.set_gradient_checkpointing("selective", every=2, save_matmuls=True)
    other.set_gradient_checkpointing(**model.gradient_checkpointing_settings)  # how ZeRO-3 copies them
    assert other.checkpoint_policy == ActivationCheckpointing("selective", 2, True) and other.checkpointed_blocks == {0}
    other.set_gradient_checkpointing(ActivationCheckpointing("full", every=2))  # as DiTRecipe.build passes it
    assert other.gradient_checkpointing_settings == dict(mode="full", every=2, save_matmuls=False)
    assert other.checkpointed_blocks == {0} and not any(b.selective_checkpoint for b in other.blocks)
    with pytest.raises(TypeError, match="in the policy"):
        other.set_gradient_checkpointing(ActivationCheckpointing("full"), every=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_saved_bytes_on_fake_tensors_equal_the_real_count(dtype):
    """The shapes-only measurement equals the count on real CPU tensors, and the modes order as
    none > selective+matmuls > selective > full; full and selective match their formulas."""
    cfg = dit_preset("debug")
    dim, heads, tokens = cfg["dim"], cfg["num_heads"], 24
    torch.manual_seed(0)
    block = WanAttentionBlock(dim, cfg["ffn_dim"], heads, cfg["eps"], with_image=False)
    inputs = (
        torch.randn(1, tokens, dim, requires_grad=True),
        torch.randn(1, 6, dim, requires_grad=True),
        torch.randn(1, cfg["text_len"], dim, requires_grad=True),
        None,
        (torch.randn(tokens, 1, dim // heads // 2), torch.randn(tokens, 1, dim // heads // 2)),
    )
    autocast = None if dtype == torch.float32 else dtype
    measured = {}
    for mode, save_matmuls in [("none", False), *MODES]:
        real = saved_activation_bytes(block, inputs, mode, save_matmuls, autocast)
        fake = saved_bytes_per_block(cfg, mode, save_matmuls, tokens=tokens, dtype=dtype)
        assert fake == real, (mode, save_matmuls)
        measured[mode, save_matmuls] = fake
    assert (
        measured["none", False] > measured["selective", True] > measured["selective", False] > measured["full", False]
    )
    # full: the float32 input x; selective: also each attention's output (attention dtype) and its
    # float32 logsumexp, for self- and cross-attention.
    assert measured["full", False] == tokens * dim * 4
    assert measured["selective", False] == tokens * (dim * 4 + 2 * (dim * dtype.itemsize + heads * 4))
    assert saved_bytes_per_token_per_block(cfg, "full", tokens=tokens, dtype=dtype) == dim * 4
