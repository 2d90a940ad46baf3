"""The attention kernel choice (wan/modules/attention.py) and [model] compile (compiled DiT blocks).

Compiling is slow on the CPU (~20-30 s per new shape for the tiny debug DiT, forward and backward):
the compile test uses one shape it compiles, then a second one, and inductor's on-disk cache makes
later runs of the same graphs quicker.
"""

import copy
import re

import pytest
import torch
from train_runs import data, torchrun  # noqa: F401  (data: the synthetic dataset fixture)

import wan.modules.attention as attn
from train.config import ConfigError, load_config
from train.models import CompileWatch, compile_dit
from wan import WanModel, dit_preset


@pytest.fixture
def restore_backend():
    saved = attn._choice
    yield
    attn._choice = saved


def qkv(seed: int = 0, dtype=torch.float32) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(2, 37, 4, 32, generator=g, dtype=dtype) for _ in range(3))  # [B, S, H, D]


def test_math_and_auto_give_the_outputs_of_before(restore_backend):
    q, k, v = qkv()
    before = attn.attention(q, k, v)  # torch's own choice, as before backends existed
    assert attn.attention_backend() == "default"
    # The reference: softmax(q k^T / sqrt(D)) v per head, in float64.
    ref = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / 32**0.5, -1)
    ref = torch.einsum("bhqk,bkhd->bqhd", ref, v.double()).flatten(2)
    for name, expect in (("auto", "default"), ("math", "math"), ("flash", "flash")):  # flash: torch's CPU kernel
        assert attn.set_attention_backend(name, "cpu") == expect
        out = attn.attention(q, k, v)
        torch.testing.assert_close(out, before, rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6, msg=name)
    # bf16 autocast still runs attention in bf16 under an explicit kernel.
    attn.set_attention_backend("math", "cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert attn.attention(q, k, v).dtype == torch.bfloat16


@pytest.mark.parametrize(
    "name, missing",
    [
        ("cudnn", "cuDNN attention runs on CUDA GPUs only"),
        ("efficient", "memory-efficient attention runs on CUDA GPUs only"),
        ("fa3", "FlashAttention-3 runs on CUDA GPUs only"),
        ("fast", "attention_backend must be one of"),
    ],
)
def test_a_backend_this_machine_lacks_is_refused(restore_backend, name, missing):
    with pytest.raises(ValueError, match=re.escape(missing)):
        attn.set_attention_backend(name, "cpu")
    assert attn.attention_backend() == "default"  # the choice is unchanged


def test_a_single_kernel_raises_rather_than_falling_back(restore_backend):
    # What the explicit choice buys: SDPA with one allowed kernel refuses a call that kernel cannot take.
    attn._choice = attn._Choice("efficient", (attn.SDPBackend.EFFICIENT_ATTENTION,), None)
    with pytest.raises(RuntimeError, match="No viable backend"):
        attn.attention(*qkv())


def test_compile_is_refused_with_zero3():
    with pytest.raises(ConfigError, match="compile = true does not work with .parallel. engine = 'zero3'"):
        load_config(["--compile", "--engine=zero3", "--train_data_dir=x"])
    assert load_config(["--compile", "--engine=fsdp", "--train_data_dir=x"]).model.compile


def loss_and_grads(model: WanModel, shape: tuple[int, ...], checkpointing: str) -> tuple[torch.Tensor, dict]:
    model.set_gradient_checkpointing(checkpointing)
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(*shape, generator=g)
    t = torch.full((shape[0],), 500.0)
    context = torch.randn(shape[0], 5, 64, generator=g)
    model.zero_grad(set_to_none=True)
    loss = model(x, t, context).square().mean()
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.slow  # two inductor compiles, forward and backward: ~50 s with a cold cache; inductor spawns processes
@pytest.mark.heavy
def test_compiled_blocks_match_eager_and_compile_once_per_micro_batch_class():
    torch.manual_seed(0)
    eager = WanModel(**dit_preset("debug"))
    torch.nn.init.normal_(eager.head.head.weight, std=0.02)  # the init's zero head would give zero gradients
    compiled = copy.deepcopy(eager)
    torch._dynamo.reset()  # graphs an earlier test compiled for the same block code would serve this model too
    compile_dit(compiled)
    assert list(compiled.state_dict()) == list(eager.state_dict())  # official names, in place
    watch = CompileWatch()
    shape = (1, 16, 3, 8, 8)  # the debug config's latents: tests/distributed/test_train.py runs share inductor's cache
    for checkpointing in ("none", "full", "none"):  # the same shape again: no new graph
        got = loss_and_grads(compiled, shape, checkpointing)
        want = loss_and_grads(eager, shape, checkpointing)
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
        for name, grad in want[1].items():
            torch.testing.assert_close(got[1][name], grad, rtol=1e-5, atol=1e-5, msg=name)
    assert watch.new() == 1  # one graph serves both blocks, with and without checkpointing
    loss_and_grads(compiled, (1, 16, 2, 8, 16), "none")  # a new token count: the same graph
    assert watch.new() == 0
    loss_and_grads(compiled, (2, 16, 2, 8, 16), "none")  # micro-batch 2+: one more graph (1 is specialised)
    assert watch.new() == 1
    loss_and_grads(compiled, (4, 16, 1, 8, 8), "none")
    assert watch.new() == 0


@pytest.mark.slow
def test_a_compiled_run_trains_and_logs_its_compiles(data, tmp_path):  # noqa: F811
    proc = torchrun(data, tmp_path / "out", "--compile", "--max_train_steps=2")
    assert "attention: torch default (cpu)" in proc.stdout
    compiles = re.findall(r"torch\.compile: (\d+) new graph\(s\) of the DiT blocks for latents", proc.stdout)
    assert compiles and all(int(n) >= 1 for n in compiles), proc.stdout[-3000:]
