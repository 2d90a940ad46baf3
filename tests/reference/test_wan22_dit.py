"""Wan2.2 DiTs against diffusers' WanTransformer3DModel (test-only reference), same random weights,
float32 on the CPU: TI2V-5B's shape with per-token timesteps (diffusers' timestep [B, seq_len], as its
pipelines pass them with expand_timesteps) and I2V-A14B's (36 input channels, no CLIP branch).

Tiny configs: head_dim 32, so the RoPE pairs split unevenly (6, 5, 5) as the release's 128 do (22, 21,
21); grids not square. Tolerance: relative error <= 1e-5. Measured: TI2V 0 .. 3.4e-6, I2V-A14B 3.6e-6 ..
3.7e-6 (the largest near t = 999, where diffusers computes the sinusoid in float32 and we, as the
release, in float64).
"""

import pytest
import torch
from dit_reference import build_pair, reference_forward, rel_err

from wan import dit_preset

PARITY_RTOL = 1e-5
TINY = dict(dim=128, num_heads=4, ffn_dim=160, num_layers=2, text_dim=48)
GRIDS = [(3, 4, 6), (2, 6, 2), (1, 2, 8)]  # latent (F, H, W): tokens (F, H/2, W/2)


@pytest.fixture(scope="module")
def ti2v():
    return build_pair(dict(dit_preset("debug-ti2v"), **TINY), seed=5)


@pytest.fixture(scope="module")
def i2v_a14b():
    return build_pair(dict(dit_preset("debug-i2v-A14B"), **TINY), seed=6)


def first_frame_timesteps(t: list[float], fhw) -> torch.Tensor:
    """[B, S]: 0 on the first latent frame's tokens, t[b] on the rest (diffusers: mask[:, ::2, ::2] * t)."""
    f, h, w = fhw
    mask = torch.ones(f, h // 2, w // 2)
    mask[0] = 0
    return torch.stack([mask.flatten() * v for v in t])


@pytest.mark.parametrize("fhw", GRIDS)
@pytest.mark.parametrize("kind", ["first_frame", "random", "scalar"])
def test_ti2v_per_token_timesteps_match_diffusers(ti2v, fhw, kind):
    ref, ours = ti2v
    gen = torch.Generator().manual_seed(sum(fhw))
    b, tokens = 2, fhw[0] * (fhw[1] // 2) * (fhw[2] // 2)
    if kind == "first_frame":
        t = first_frame_timesteps([999.0, 431.0], fhw)
    elif kind == "random":
        t = torch.randint(0, 1000, (b, tokens), generator=gen).float()
    else:
        t = torch.tensor([999.0, 12.0])
    x = torch.randn(b, 48, *fhw, generator=gen)
    context = torch.randn(b, 9, 48, generator=gen)
    with torch.no_grad():
        out = ours(x, t, context)
        expected = reference_forward(ref, x, t, context, text_len=ours.text_len)
    assert out.shape == (b, 48, *fhw)
    assert rel_err(out, expected) <= PARITY_RTOL


def test_per_token_timesteps_all_equal_are_the_scalar_timestep(ti2v):
    """A row of equal per-token timesteps is the sample's timestep (TI2V text-only), up to the
    rounding of a matmul over S rows instead of one."""
    _, ours = ti2v
    gen = torch.Generator().manual_seed(1)
    fhw = (3, 4, 6)
    x, context = torch.randn(2, 48, *fhw, generator=gen), torch.randn(2, 5, 48, generator=gen)
    t = torch.tensor([700, 3])
    with torch.no_grad():
        scalar = ours(x, t, context)
        per_token = ours(x, t[:, None].expand(2, 3 * 2 * 3), context)
    assert rel_err(per_token, scalar) <= 1e-6


def test_first_frame_tokens_at_zero_change_only_through_attention(ti2v):
    """Per-token timesteps act per token: giving frame 0's tokens t = 0 changes the prediction (the
    modulation of those tokens), and differs from giving every token 0."""
    _, ours = ti2v
    gen = torch.Generator().manual_seed(2)
    fhw = (3, 4, 6)
    x, context = torch.randn(1, 48, *fhw, generator=gen), torch.randn(1, 5, 48, generator=gen)
    with torch.no_grad():
        plain = ours(x, torch.tensor([500]), context)
        first = ours(x, first_frame_timesteps([500.0], fhw), context)
        zero = ours(x, torch.tensor([0]), context)
    assert not torch.allclose(first[:, :, 0], plain[:, :, 0]) and not torch.allclose(first, zero)


@pytest.mark.parametrize("fhw", GRIDS[:2])
def test_i2v_a14b_without_clip_matches_diffusers(i2v_a14b, fhw):
    ref, ours = i2v_a14b
    assert ours.image_dim is None and not hasattr(ours, "img_emb")
    assert ref.config.image_dim is None and ref.config.added_kv_proj_dim is None
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(2, 16, *fhw, generator=gen), torch.randn(2, 20, *fhw, generator=gen)
    context, t = torch.randn(2, 17, 48, generator=gen), torch.tensor([950.0, 80.0])
    with torch.no_grad():
        out = ours(x, t, context, y=y)
        expected = reference_forward(ref, x, t, context, text_len=ours.text_len, y=y)
    assert rel_err(out, expected) <= PARITY_RTOL


def test_wan22_inputs_are_checked(ti2v, i2v_a14b):
    _, ours = ti2v
    x, context = torch.zeros(1, 48, 3, 4, 6), torch.zeros(1, 5, 48)
    with pytest.raises(ValueError, match=r"per-token timesteps must be \[B, S\] = \[1, 18\]"):
        ours(x, torch.zeros(1, 17), context)
    _, i2v = i2v_a14b
    with pytest.raises(ValueError, match="an i2v WanModel needs y"):
        i2v(torch.zeros(1, 16, 1, 2, 2), torch.zeros(1), torch.zeros(1, 5, 48))
    with pytest.raises(ValueError, match="without an image embedding"):
        i2v(torch.zeros(1, 16, 1, 2, 2), torch.zeros(1), torch.zeros(1, 5, 48), clip_fea=torch.zeros(1, 257, 64),
            y=torch.zeros(1, 20, 1, 2, 2))  # fmt: skip
