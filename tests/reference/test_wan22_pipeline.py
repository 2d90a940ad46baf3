"""Wan2.2 sampling (wan/pipeline.py) against diffusers' pipelines (test-only references) over the
same tiny random weights, float32:
- A14B: two experts switched at the boundary, a guidance scale each (WanPipeline /
  WanImageToVideoPipeline with transformer, transformer_2, boundary_ratio);
- TI2V-5B: the Wan2.2 VAE (48 channels, 16x), per-token timesteps (expand_timesteps=True): text
  only through WanPipeline, with an image through WanImageToVideoPipeline.
The shared parts and the scheduler are tests/reference/test_pipeline.py's.

Tolerance 1e-4 relative. Measured: T2V-A14B latents 1.9e-6, video 4.1e-7; I2V-A14B latents 1.9e-6,
video 4.1e-7; TI2V text latents 2.6e-6, video 4.9e-7; TI2V image latents 2.5e-6, video 3.0e-7.
"""

import pytest
import torch
from pipeline_reference import build_a14b_bundle, build_ti2v_bundle, rel_err
from test_pipeline import PROMPTS, as_pt_frames, image01, our_run, reference_run

from wan.pipeline import Experts, SamplingOptions, initial_noise
from wan.samplers import sampling_timesteps

PARITY_RTOL = 1e-4
# Shift 3 over 6 steps: timesteps 999, 937, 856, 749, 599, 374, so both boundaries (875 t2v, 900 i2v)
# give the high-noise expert two steps and the low-noise one four.
OPTIONS = dict(num_frames=9, height=32, width=48, num_inference_steps=6, shift=3.0, seed=7)
BOUNDARY = {"t2v": 0.875, "i2v": 0.900}


@pytest.fixture(scope="module")
def t2v(tmp_path_factory):
    return build_a14b_bundle(tmp_path_factory.mktemp("a14b"), i2v=False, shift=3.0, boundary=BOUNDARY["t2v"])


@pytest.fixture(scope="module")
def i2v(tmp_path_factory):
    return build_a14b_bundle(tmp_path_factory.mktemp("a14b_i2v"), i2v=True, shift=3.0, boundary=BOUNDARY["i2v"])


class Recording:
    """A DiT callable that records the timesteps it is called with."""

    def __init__(self, dit):
        self.dit, self.timesteps, self.model_type, self.image_dim = dit, [], dit.model_type, dit.image_dim

    def __call__(self, x, t, context, **kwargs):
        self.timesteps.append(int(t[0]))
        return self.dit(x, t, context, **kwargs)


def test_t2v_a14b_matches_wan_pipeline(t2v, monkeypatch):
    # The release's t2v guidance is (low 3.0, high 4.0); diffusers' guidance_scale is the high-noise one's.
    options = SamplingOptions(**OPTIONS, guidance_scale=4.0, guidance_scale_low=3.0)
    noise = initial_noise([7, 8], options.latent_shape())
    ref_latents, ref_video = reference_run(t2v, options, noise, guidance_scale_2=3.0)
    high, low = Recording(t2v.dit), Recording(t2v.low)
    experts = Experts(high, low, BOUNDARY["t2v"])
    latents, video = our_run(t2v, options, noise, monkeypatch, dit=experts)
    assert rel_err(latents, ref_latents) <= PARITY_RTOL
    assert rel_err(as_pt_frames(video), ref_video) <= PARITY_RTOL
    steps = sampling_timesteps(6, 3.0).tolist()
    assert high.timesteps == [t for t in steps if t >= 875] == [999, 937]  # one batched CFG call a step
    assert low.timesteps == [t for t in steps if t < 875]


def test_i2v_a14b_matches_wan_i2v_pipeline(i2v, monkeypatch):
    options = SamplingOptions(**OPTIONS, guidance_scale=3.5, guidance_scale_low=3.5)
    noise = initial_noise([7, 8], options.latent_shape())
    img01 = image01(options.height, options.width)
    ref_latents, ref_video = reference_run(i2v, options, noise, image=img01, guidance_scale_2=3.5)
    experts = Experts(i2v.dit, i2v.low, BOUNDARY["i2v"])
    latents, video = our_run(i2v, options, noise, monkeypatch, dit=experts, images=2.0 * img01 - 1.0)
    assert rel_err(latents, ref_latents) <= PARITY_RTOL
    assert rel_err(as_pt_frames(video), ref_video) <= PARITY_RTOL


def test_expert_guidance_is_per_expert(t2v):
    """Guidance 1 on the low-noise expert: its steps run one conditional pass, the high-noise ones two."""
    from wan.pipeline import denoise, encode_prompts

    options = SamplingOptions(**OPTIONS, guidance_scale=4.0, guidance_scale_low=1.0)
    context, negative = encode_prompts(t2v.text, PROMPTS, options.negative_prompt, "cpu")
    calls = []

    def counting(model, name):
        def call(x, t, c, **kw):
            calls.append((name, x.shape[0]))
            return model(x, t, c, **kw)

        return call

    denoise(Experts(counting(t2v.dit, "high"), counting(t2v.low, "low"), 0.875), initial_noise([1, 2],
            options.latent_shape()), context, negative, options)  # fmt: skip
    assert calls == [("high", 4)] * 2 + [("low", 2)] * 4
    with pytest.raises(ValueError, match="boundary must be in"):
        Experts(t2v.dit, t2v.low, 1.5)


# TI2V-5B: shift 5, 4 steps, 1 + 4k frames at 16x spatial compression: 64 x 96 pixels = 4 x 6 latents.
TI2V_OPTIONS = dict(num_frames=9, height=64, width=96, num_inference_steps=4, shift=5.0, guidance_scale=5.0, seed=3)


@pytest.fixture(scope="module")
def ti2v(tmp_path_factory):
    return build_ti2v_bundle(tmp_path_factory.mktemp("ti2v"), image=False, shift=5.0)


@pytest.fixture(scope="module")
def ti2v_image(tmp_path_factory):
    return build_ti2v_bundle(tmp_path_factory.mktemp("ti2v_image"), image=True, shift=5.0)


def test_ti2v_text_matches_wan_pipeline_with_expanded_timesteps(ti2v, monkeypatch):
    options = SamplingOptions(**TI2V_OPTIONS)
    shape = options.latent_shape(ti2v.vae)
    assert shape == (48, 3, 4, 6)
    noise = initial_noise([7, 8], shape)
    ref_latents, ref_video = reference_run(ti2v, options, noise)
    latents, video = our_run(ti2v, options, noise, monkeypatch)
    assert video.shape == (2, 3, 9, 64, 96)
    assert rel_err(latents, ref_latents) <= PARITY_RTOL
    assert rel_err(as_pt_frames(video), ref_video) <= PARITY_RTOL


def test_ti2v_image_matches_wan_i2v_pipeline_with_expanded_timesteps(ti2v_image, monkeypatch):
    """The image's latent is the first latent frame of every DiT input, its tokens at t = 0 (recorded)."""
    options = SamplingOptions(**TI2V_OPTIONS)
    noise = initial_noise([7, 8], options.latent_shape(ti2v_image.vae))
    img01 = image01(options.height, options.width)
    ref_latents, ref_video = reference_run(ti2v_image, options, noise, image=img01)
    seen = []

    def recording(x, t, context, **kwargs):
        seen.append((x[:, :, 0].clone(), t.clone()))
        return ti2v_image.dit(x, t, context, **kwargs)

    latents, video = our_run(ti2v_image, options, noise, monkeypatch, dit=recording, images=2.0 * img01 - 1.0,
                             model_type="ti2v")  # fmt: skip
    # The reference's last callback sees frame 0 before it is replaced by the image's latent (after the loop).
    assert rel_err(latents[:, :, 1:], ref_latents[:, :, 1:]) <= PARITY_RTOL
    assert rel_err(as_pt_frames(video), ref_video) <= PARITY_RTOL
    # The image's latent (encoded here alone; in a batch of 2 there: float rounding apart).
    first = torch.cat([ti2v_image.vae.encode(2.0 * img01.unsqueeze(2) - 1.0)[:, :, 0]] * 4)
    per_frame = 2 * 3  # tokens of a latent frame: (4 / 2) x (6 / 2)
    for x0, t in seen:
        assert rel_err(x0, first) <= 1e-5 and t.shape == (4, 3 * per_frame)  # batched CFG: 2 x 2 prompts
        assert (t[:, :per_frame] == 0).all() and (t[:, per_frame:] == t[0, -1]).all() and t[0, -1] > 0
    assert torch.equal(latents[:, :, 0], seen[0][0][:2])


def test_i2v_a14b_condition_without_clip_resizes_for_the_vae(i2v):
    """No CLIP (Wan2.2 I2V-A14B): y alone, from the image resized to the video's size."""
    from wan.encoders import encode_i2v_condition
    from wan.pipeline import i2v_condition, resize_images

    image = 2 * image01(24, 40) - 1
    y, clip_fea = i2v_condition(i2v.vae, None, [image[0]], 5, size=(32, 48))
    assert clip_fea is None
    assert torch.equal(y, encode_i2v_condition(i2v.vae, None, resize_images(image, 32, 48), 5)[0])
