"""Our DiT against diffusers' WanTransformer3DModel (test-only reference), same random weights.

Tolerance: relative error ||ours - ref|| / ||ref|| <= 1e-4 in float32. Measured here: about 2e-7
at small timesteps and 6e-6 near t=999, where diffusers computes the timestep sinusoid in float32
and the reference (and we) in float64.
"""

import pytest
import torch
from dit_reference import build_pair, reference_forward, rel_err

from wan import WanModel, dit_preset
from wan.modules.model import ROPE_MAX_POSITIONS, rope_axis_pairs

PARITY_RTOL = 1e-4
# Small widths keep this fast; text_len stays 512 because diffusers' i2v attention hard-codes it.
TINY = dict(dim=96, num_heads=4, ffn_dim=160, num_layers=2, text_dim=48)
CASES = [  # (F, H, W) latent size, timesteps, text length < text_len
    ((1, 4, 6), [0.0, 1.0], 7),
    ((3, 6, 4), [999.0, 998.0], 30),
    ((5, 2, 8), [500.0, 37.0], 1),
    ((2, 10, 2), [3.0, 990.0], 512),
]


@pytest.fixture(scope="module", params=["t2v", "i2v"])
def pair(request):
    preset = "debug" if request.param == "t2v" else "debug-i2v"
    return build_pair(dict(dit_preset(preset), **TINY), seed=3)


def make_inputs(model: WanModel, fhw, timesteps, text_tokens, seed=0):
    gen = torch.Generator().manual_seed(seed)
    b = len(timesteps)
    i2v = model.model_type == "i2v"
    return dict(
        x=torch.randn(b, 16, *fhw, generator=gen),
        t=torch.tensor(timesteps),
        context=torch.randn(b, text_tokens, model.config["text_dim"], generator=gen),
        clip_fea=torch.randn(b, 257, model.image_dim, generator=gen) if i2v else None,
        y=torch.randn(b, model.in_dim - 16, *fhw, generator=gen) if i2v else None,
    )


@pytest.mark.parametrize("fhw,timesteps,text_tokens", CASES)
def test_matches_diffusers(pair, fhw, timesteps, text_tokens):
    ref, ours = pair
    inputs = make_inputs(ours, fhw, timesteps, text_tokens)
    with torch.no_grad():
        out = ours(**inputs)
        expected = reference_forward(ref, text_len=ours.text_len, **inputs)
    assert out.shape == (len(timesteps), 16, *fhw) and out.dtype == torch.float32
    assert rel_err(out, expected) <= PARITY_RTOL


def test_bf16_autocast_keeps_reference_precision_policy(pair):
    """Under bf16 autocast the residual stream, modulation and head stay float32, and the output
    stays close to the float32 reference."""
    ref, ours = pair
    inputs = make_inputs(ours, (3, 6, 4), [999.0, 10.0], 20)
    dtypes = []
    hooks = [
        b.register_forward_hook(lambda m, args, out: dtypes.append((args[0].dtype, args[1].dtype, out.dtype)))
        for b in ours.blocks
    ]
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            out = ours(**inputs)
    finally:
        for h in hooks:
            h.remove()
    with torch.no_grad():
        expected = reference_forward(ref, text_len=ours.text_len, **inputs)
    assert dtypes == [(torch.float32, torch.float32, torch.float32)] * len(ours.blocks)
    assert out.dtype == torch.float32
    assert rel_err(out, expected) < 3e-2


def test_bf16_weights_run_under_autocast_and_keep_exact_rope(pair):
    ref, ours = pair
    fresh = WanModel(**ours.config)
    bf16 = WanModel(**ours.config)
    bf16.load_state_dict(ours.state_dict())
    bf16.to(torch.bfloat16)
    # A cast must not round the RoPE tables (the complex-buffer trap).
    assert bf16.rope.cos.dtype == torch.float32
    assert torch.equal(bf16.rope.cos, fresh.rope.cos) and torch.equal(bf16.rope.sin, fresh.rope.sin)
    inputs = make_inputs(ours, (3, 6, 4), [999.0, 10.0], 20)
    with torch.no_grad():
        out = bf16(**inputs)
        expected = reference_forward(ref, text_len=ours.text_len, **inputs)
    assert out.dtype == torch.float32
    assert rel_err(out, expected) < 5e-2


def test_rope_tables_match_complex_reference():
    """The official code builds complex float64 tables with torch.polar; ours are real cos/sin."""
    head_dim = 128
    model_rope = WanModel(**dict(dit_preset("debug"), dim=256, num_heads=2)).rope
    assert rope_axis_pairs(head_dim) == (22, 21, 21)
    parts = []
    for width in (head_dim - 4 * (head_dim // 6), 2 * (head_dim // 6), 2 * (head_dim // 6)):
        freqs = torch.outer(
            torch.arange(ROPE_MAX_POSITIONS), 1.0 / 10000 ** (torch.arange(0, width, 2).double() / width)
        )
        parts.append(torch.polar(torch.ones_like(freqs), freqs))
    table = torch.cat(parts, dim=1)
    torch.testing.assert_close(model_rope.cos, table.real.float(), rtol=0, atol=1e-7)
    torch.testing.assert_close(model_rope.sin, table.imag.float(), rtol=0, atol=1e-7)


def test_meta_construction_then_init_weights():
    cfg = dit_preset("debug-i2v")
    with torch.device("meta"):
        model = WanModel(**cfg)
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    model.init_weights()
    fresh = WanModel(**cfg)
    assert torch.equal(model.rope.cos, fresh.rope.cos) and torch.equal(model.rope.sin, fresh.rope.sin)
    assert torch.count_nonzero(model.head.head.weight) == 0  # zero head, as the reference inits it
    assert all(torch.isfinite(p).all() for p in model.parameters())
    inputs = make_inputs(model, (3, 4, 4), [5.0, 700.0], 9)
    with torch.no_grad():
        out = model(**inputs)
    assert torch.isfinite(out).all()


def test_bad_inputs_are_refused_with_a_message():
    model = WanModel(**dit_preset("debug"))
    good = make_inputs(model, (1, 4, 4), [1.0], 5)
    with pytest.raises(ValueError, match="input channels"):
        model(**dict(good, x=torch.randn(1, 36, 1, 4, 4)))
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        model(**dict(good, x=torch.randn(1, 16, 1, 5, 4)))
    with pytest.raises(ValueError, match="text_len"):
        model(**dict(good, context=torch.randn(1, 513, 64)))
    with pytest.raises(ValueError, match="clip_fea"):
        WanModel(**dit_preset("debug-i2v"))(**good)
    i2v_inputs = make_inputs(WanModel(**dit_preset("debug-i2v")), (1, 4, 4), [1.0], 5)
    with pytest.raises(ValueError, match=r"clip_fea must be \[B, 257, 64\]"):
        WanModel(**dit_preset("debug-i2v"))(**dict(i2v_inputs, clip_fea=torch.randn(1, 257, 1280)))
    with pytest.raises(ValueError, match="num_heads"):
        WanModel(**dict(dit_preset("debug"), num_heads=5))
