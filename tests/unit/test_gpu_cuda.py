"""CUDA checks (`pytest -m gpu`; bench/gpu_check.py runs them as its pytest-gpu section): every attention
kernel at the model's shapes against the math kernel in float32, validation sampling on the device
with its outcomes gathered over nccl, and sequence parallel's exchanges over a 1-rank nccl group. They skip without CUDA, except under the gpu check's CPU dry run
(WAN_GPU_TESTS_ON_CPU=1), which runs them on the CPU at tiny shapes.

Each attention case prints a line `GPU_CHECK {json}` with its errors (the check's table shows the worst).
"""

import json
import os
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import wan.modules.attention as attn
from train.config import ModelConfig, OptimConfig, ParallelConfig
from train.distributed import ParallelLayout
from train.engines import EngineSetup, build_engine
from train.metrics import Metrics
from train.models import build_dit_recipe, build_models
from train.validation import ValidationConfig, ValidationSampler, sampling_options

CUDA = torch.cuda.is_available()
ON_CPU = os.environ.get("WAN_GPU_TESTS_ON_CPU") == "1"
DEVICE = torch.device("cuda") if CUDA else torch.device("cpu")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (CUDA or ON_CPU), reason="needs CUDA (WAN_GPU_TESTS_ON_CPU=1: tiny shapes on the CPU)"),
]


@dataclass(frozen=True)
class Case:
    """One attention call: q [B, Sq, H, D], k and v [B, Sk, H, D]."""

    batch: int
    q_len: int
    k_len: int
    heads: int
    head_dim: int


# The 1.3B DiT at 480p81 (21 x 30 x 52 = 32,760 tokens, 12 heads of 128): self-attention, cross-attention
# to the 512 text tokens and to the 257 CLIP image tokens (i2v); CLIP ViT-H/14 itself (257 tokens, 16
# heads of 80). The CPU dry run keeps the head_dims and shrinks the rest.
CASES = {
    "self": Case(1, 32760, 32760, 12, 128),
    "cross-text": Case(1, 32760, 512, 12, 128),
    "cross-image": Case(1, 32760, 257, 12, 128),
    "clip": Case(2, 257, 257, 16, 80),
}
TINY_CASES = {
    "self": Case(1, 96, 96, 2, 128),
    "cross-text": Case(1, 96, 24, 2, 128),
    "cross-image": Case(1, 96, 13, 2, 128),
    "clip": Case(2, 17, 17, 2, 80),
}
# bf16 kernels against float32: rounding alone is ~4e-3 here; a wrong layout or scale is ~1.
BF16_TOLERANCE = 2e-2
FP32_TOLERANCE = 1e-3
# Heads compared with the float32 reference where its Sq x Sk scores would not fit (4.3 GB a head at
# 32,760 tokens; attention is independent per head, so a subset checks the same kernel call).
REFERENCE_SCORES_LIMIT = 2**28


@pytest.fixture
def restore_backend():
    saved = attn._choice
    yield
    attn._choice = saved


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def attention_errors(name: str, case: Case, autocast: bool) -> dict:
    """attention() under backend `name` (as the model calls it: float32 q, k, v, bf16 autocast unless
    `autocast` is False) forward and backward, against SDPA's math kernel in float32 on the same
    (rounded) inputs: relative errors of the output and of the three input gradients."""
    resolved = attn.set_attention_backend(name, DEVICE)
    g = torch.Generator(DEVICE).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=DEVICE)

    q = randn(case.batch, case.q_len, case.heads, case.head_dim).requires_grad_()
    k = randn(case.batch, case.k_len, case.heads, case.head_dim).requires_grad_()
    v = randn(case.batch, case.k_len, case.heads, case.head_dim).requires_grad_()
    grad = randn(case.batch, case.q_len, case.heads * case.head_dim)
    # The math kernel in bf16 keeps every head's Sq x Sk scores and probabilities: 100 GB at the 1.3B
    # self-attention shape. It runs on the heads the reference compares.
    heads = case.heads
    if case.q_len * case.k_len > REFERENCE_SCORES_LIMIT:
        heads = 1
    if resolved == "math" and heads < case.heads:
        q, k, v = (t.detach()[:, :, :heads].clone().requires_grad_() for t in (q, k, v))
        grad = grad.view(case.batch, case.q_len, case.heads, case.head_dim)[:, :, :heads].flatten(2)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=autocast):
        out = attn.attention(q, k, v)
    out.float().backward(grad)  # cast to the kernel's dtype on the way back, as in the model
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()

    # The reference: the same inputs as the kernel saw them (rounded to bf16 under autocast), float32.
    def ref_input(t: torch.Tensor) -> torch.Tensor:
        t = t.detach()[:, :, :heads]
        return (t.bfloat16().float() if autocast else t.clone()).transpose(1, 2).requires_grad_()

    rq, rk, rv = (ref_input(t) for t in (q, k, v))
    with sdpa_kernel([SDPBackend.MATH]):
        ref = F.scaled_dot_product_attention(rq, rk, rv)  # [B, heads, Sq, D]
    n = q.shape[2]
    ref_grad = grad.view(case.batch, case.q_len, n, case.head_dim)[:, :, :heads].transpose(1, 2).float()
    ref.backward(ref_grad)
    out = out.view(case.batch, case.q_len, n, case.head_dim)[:, :, :heads]
    errors = {
        "out": relative_error(out, ref.transpose(1, 2)),
        "dq": relative_error(q.grad[:, :, :heads], rq.grad.transpose(1, 2)),
        "dk": relative_error(k.grad[:, :, :heads], rk.grad.transpose(1, 2)),
        "dv": relative_error(v.grad[:, :, :heads], rv.grad.transpose(1, 2)),
    }
    return {"resolved": resolved, "heads_compared": heads, **errors}


@pytest.mark.parametrize("case_name", list(CASES))
@pytest.mark.parametrize("name", list(attn.ATTENTION_BACKENDS))
def test_attention_backend_matches_float32_math(restore_backend, name, case_name):
    """Every backend this device has, at the model's shapes, forward and backward, equals the float32 math
    kernel within bf16 rounding; a backend the device lacks skips with the resolver's reason."""
    try:
        attn.resolve_attention_backend(name, DEVICE)
    except ValueError as err:
        pytest.skip(str(err))
    case = (CASES if CUDA else TINY_CASES)[case_name]
    result = attention_errors(name, case, autocast=True)
    worst = max(result[k] for k in ("out", "dq", "dk", "dv"))
    print("GPU_CHECK " + json.dumps({"backend": name, "case": case_name, **result, "max_error": worst}))
    assert worst < BF16_TOLERANCE, (name, case_name, result)


@pytest.mark.parametrize("case_name", list(CASES))
def test_auto_backend_in_float32(restore_backend, case_name):
    """mixed_precision = "fp32": "auto" takes float32 inputs as they are (the memory-efficient kernel on
    CUDA, which has no bf16 rounding: errors of float32 arithmetic)."""
    case = (CASES if CUDA else TINY_CASES)[case_name]
    result = attention_errors("auto", case, autocast=False)
    worst = max(result[k] for k in ("out", "dq", "dk", "dv"))
    if CUDA:  # auto's float32 kernel on every CUDA device (attention.py)
        result["resolved"] = "efficient"
    print("GPU_CHECK " + json.dumps({"backend": "auto-fp32", "case": case_name, **result, "max_error": worst}))
    assert worst < FP32_TOLERANCE, (case_name, result)


@pytest.fixture
def process_group():
    """A 1-rank process group on the device's backend (nccl on CUDA): one GPU cannot hold two nccl ranks."""
    made = not dist.is_initialized()
    if made:
        if CUDA:
            torch.cuda.set_device(0)
        dist.init_process_group("nccl" if CUDA else "gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    if made:
        dist.destroy_process_group()


def test_validation_samples_on_the_device_and_gathers_over_nccl(tmp_path, process_group):
    """The fsdp engine's collective inference forward samples two validation prompts on the device (bf16),
    writes their videos, and the outcomes rank 0 would gather (small uint8 contact sheets) cross the
    process group's backend intact."""
    config = ModelConfig(preset="debug")
    setup = EngineSetup(
        parallel=ParallelConfig(engine="fsdp"), optim=OptimConfig(), mixed_precision="bf16", micro_batch_size=1,
        accumulation_steps=1, total_steps=10, layout=ParallelLayout.single(DEVICE),
    )  # fmt: skip
    engine = build_engine(build_dit_recipe(config, seed=0), setup)
    models = build_models(config, DEVICE, seed=0)
    cfg = ValidationConfig(validation_prompts=["a red ball", "a blue cube"], validation_inference_steps=2)
    metrics = Metrics(tmp_path, total_steps=10, progress_bar=False)
    sampler = ValidationSampler(
        cfg, sampling_options(cfg, 32, 5, 5.0), models=models, engine=engine, collective=True,
        dit_config=build_dit_recipe(config, seed=0).config, layout=ParallelLayout.single(DEVICE),
        output_dir=tmp_path, metrics=metrics,
    )  # fmt: skip
    report = sampler.run(3)
    metrics.close()
    assert [o.index for o in report.outcomes] == [0, 1] and not report.failed, report.outcomes
    for o in report.outcomes:
        assert os.path.getsize(o.video) > 0 and o.sheet.dtype == np.uint8
    gathered = [None]
    dist.gather_object(report.outcomes, gathered, dst=0)
    assert [(o.index, o.prompt, o.seed, o.video) for o in gathered[0]] == [
        (o.index, o.prompt, o.seed, o.video) for o in report.outcomes
    ]
    assert all(np.array_equal(a.sheet, b.sheet) for a, b in zip(gathered[0], report.outcomes, strict=True))


def test_sequence_parallel_exchanges_run_on_the_device(process_group):
    """wan/modules/ulysses.py on the device's backend (nccl on CUDA), over a 1-rank sequence group: one GPU
    cannot hold the 2-rank groups the CPU suite tests (gloo), so this is its code path (the all-to-alls,
    the gather and their backwards through autograd) at world size 1, bf16 autocast as training runs it.
    At one rank every exchange is a copy: the output and gradients equal the model's without it."""
    from wan import WanModel, dit_preset
    from wan.modules.ulysses import SequenceParallel

    torch.manual_seed(0)
    model = WanModel(**dit_preset("debug")).to(DEVICE)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, 3, 6, 10, generator=g).to(DEVICE)
    t, context = torch.tensor([300.0], device=DEVICE), torch.randn(1, 7, 64, generator=g).to(DEVICE)

    def run() -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            out = model(x, t, context)
        out.float().square().mean().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()]

    whole, whole_grads = run()
    sp = SequenceParallel(dist.new_group([0]))
    model.set_sequence_parallel(sp)
    split, split_grads = run()
    assert sp.traffic.sent_bytes > 0
    assert torch.equal(split, whole)
    assert all(torch.equal(a, b) for a, b in zip(split_grads, whole_grads, strict=True))
