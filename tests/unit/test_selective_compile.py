"""Selective checkpointing in compiled blocks ([model] compile = true). The checkpoint runs inside each
block's call, so dynamo traces it with the block: the policy sees the traced mm/addmm and attention
ops and AOTAutograd's partitioner keeps what it marks. (Around the compiled call, as before, the policy
saw only the compiled code's `addmm.out` calls: save_matmuls kept nothing.) Measured with inductor on
CPU against the planner's and flops.py's own figures."""

import copy
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from train.flops import step_flops
from train.models import compile_dit
from wan import WanModel, dit_preset
from wan.modules.checkpointing import ActivationCheckpointing
from wan.modules.model import saved_bytes_per_block

LATENT = (1, 16, 3, 8, 8)  # [B, C, F, H, W]: 3 x 4 x 4 = 48 tokens
SDPA = "aten._scaled_dot_product_flash_attention_for_cpu.default"


class BackwardOps(TorchDispatchMode):
    """Every op backward runs (a compiled backward's kernel calls included), and the FLOPs of its
    addmm calls: the recomputed forward matmuls (every linear layer has a bias; gradients are mm)."""

    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()
        self.addmm_flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        if func.overloadpacket == torch.ops.aten.addmm:
            (m, k), n = args[1].shape, args[2].shape[1]
            self.addmm_flops += 2 * m * k * n
        return func(*args, **(kwargs or {}))


def train_step(model: WanModel):
    """Loss, gradients and the ops of backward, for fixed inputs."""
    gen = torch.Generator().manual_seed(0)
    x, context = torch.randn(*LATENT, generator=gen), torch.randn(1, 11, 64, generator=gen)
    model.zero_grad(set_to_none=True)
    loss = model(x, torch.tensor([400.0]), context).square().mean()
    with BackwardOps() as ops:
        loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, ops


def saved_bytes(block: torch.nn.Module, cfg: dict, tokens: int) -> int:
    """Bytes one call of `block` keeps for backward, by storage, as saved_bytes_per_block counts them:
    not the parameters, nor the inputs every block shares (time projection, text context, RoPE)."""
    dim, half = cfg["dim"], cfg["dim"] // cfg["num_heads"] // 2
    x = torch.randn(1, tokens, dim, requires_grad=True)
    shared = [torch.randn(1, 6, dim, requires_grad=True), torch.randn(1, cfg["text_len"], dim, requires_grad=True)]
    rope = (torch.randn(tokens, 1, half), torch.randn(tokens, 1, half))
    excluded = {t.untyped_storage()._cdata for t in [*block.parameters(), *shared, *rope]}
    kept: dict[int, torch.UntypedStorage] = {}

    def pack(t):
        if t.untyped_storage()._cdata not in excluded:
            kept.setdefault(t.untyped_storage()._cdata, t.untyped_storage())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = block(x, shared[0], shared[1], None, rope)
    del out
    return sum(s.nbytes() for s in kept.values())


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow  # inductor compiles (in worker processes)
@pytest.mark.heavy  # ~20 s each
@pytest.mark.parametrize("save_matmuls", [False, True], ids=["selective", "selective+matmuls"])
def test_a_compiled_selective_block_keeps_and_recomputes_what_is_counted(save_matmuls):
    cfg = dit_preset("debug")
    torch.manual_seed(0)
    eager = WanModel(**cfg)
    torch.nn.init.normal_(eager.head.head.weight, std=0.02)  # the init's zero head gives zero gradients
    eager.set_gradient_checkpointing("selective", save_matmuls=save_matmuls)
    compiled = copy.deepcopy(eager)
    compile_dit(compiled)
    _, f, h, w = LATENT[1:]
    tokens = f * (h // 2) * (w // 2)

    # What a compiled block keeps: the planner's figure (its input, the attention outputs and their
    # logsumexps, with save_matmuls also every linear layer's output).
    assert saved_bytes(compiled.blocks[0], cfg, tokens) == saved_bytes_per_block(
        cfg, "selective", save_matmuls, tokens=tokens, dtype=torch.float32
    )

    loss, grads, ops = train_step(compiled)
    want_loss, want_grads, _ = train_step(eager)
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-5)
    for name, grad in want_grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-5, msg=name)
    # Backward ran each attention's backward, never its forward (the outputs were kept), and reran the
    # matmul FLOPs flops.py counts as recompute: every block's linear layers, or none with save_matmuls.
    layers = cfg["num_layers"]
    assert ops.ops[SDPA.replace(".default", "_backward.default")] == 2 * layers
    assert ops.ops[SDPA] == 0
    recompute = step_flops(cfg, 1, (f, h, w), ActivationCheckpointing("selective", save_matmuls=save_matmuls)).recompute
    assert ops.addmm_flops == recompute
    assert (recompute == 0) == save_matmuls
