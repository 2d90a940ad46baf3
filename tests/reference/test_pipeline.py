"""Sampling (wan/pipeline.py) against diffusers' WanPipeline and WanImageToVideoPipeline (test-only
references) holding the same tiny random weights, plus the pipeline's own guarantees.

Shared with the reference: the weights (umT5, DiT, VAE, CLIP tower), the tokenizer vocabulary
(checked id for id), the starting noise (`latents=`) and the scheduler: diffusers' own
UniPCMultistepScheduler(flow_prediction, use_flow_sigmas, flow_shift), fed the release's unshifted
grid because its own set_timesteps(N) grid is not the release's (tests/reference/pipeline_reference.py).
Everything else is the reference's own code: prompt cleaning, tokenization to 512, zero padding,
the CFG loop (two DiT passes), int64 timesteps, latent de-normalisation, decoding, postprocessing.
For I2V the pipeline's CLIPImageProcessor (PIL resize + center crop) is swapped for the release's
preprocessing (bicubic resize of the [-1, 1] image, no crop), which ours implements; the pipeline
still runs its own CLIPVisionModel (hidden_states[-2]), VAE conditioning and mask.

Tolerance 1e-4 relative, fp32. Measured: T2V latents 2.1e-6, video 5.4e-7; I2V latents 2.1e-6,
video 7.3e-7 (the DiT alone differs from diffusers' by up to 6e-6 near t = 999: diffusers computes
the timestep sinusoid in float32, the release and we in float64).
"""

import pytest
import torch
from diffusers.pipelines.wan.pipeline_wan import prompt_clean
from pipeline_reference import build_bundle, rel_err

from wan.encoders import encode_i2v_condition
from wan.pipeline import (
    DEFAULT_NEGATIVE_PROMPT,
    SamplingOptions,
    decode,
    denoise,
    encode_prompts,
    generate,
    i2v_condition,
    initial_noise,
    resize_images,
)
from wan.samplers import build_sampler, sampling_timesteps

PARITY_RTOL = 1e-4
PROMPTS = ["A cat walks along the beach at sunset, waves &amp;amp; foam.", "  rain\non a window  "]
OPTIONS = dict(num_frames=9, height=32, width=48, num_inference_steps=4, guidance_scale=5.0, shift=3.0, seed=7)


@pytest.fixture(scope="module")
def t2v(tmp_path_factory):
    return build_bundle(tmp_path_factory.mktemp("t2v"), i2v=False, shift=OPTIONS["shift"])


@pytest.fixture(scope="module")
def i2v(tmp_path_factory):
    return build_bundle(tmp_path_factory.mktemp("i2v"), i2v=True, shift=OPTIONS["shift"])


def image01(h: int, w: int, seed: int = 5) -> torch.Tensor:
    return torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(seed))


def reference_run(bundle, options: SamplingOptions, noise: torch.Tensor, **extra):
    """The diffusers pipeline's latents and its video ([B, F, 3, H, W] in [0, 1], output_type='pt')."""
    kw = dict(
        prompt=PROMPTS, negative_prompt=options.negative_prompt, height=options.height, width=options.width,
        num_frames=options.num_frames, num_inference_steps=options.num_inference_steps,
        guidance_scale=options.guidance_scale, latents=noise.clone(), **extra,
    )  # fmt: skip
    bundle.ref.set_progress_bar_config(disable=True)
    seen = {}

    def last_latents(pipe, i, t, tensors):
        seen["latents"] = tensors["latents"]
        return {}

    with torch.no_grad():
        video = bundle.ref(**kw, output_type="pt", callback_on_step_end=last_latents).frames
    return seen["latents"], video


def as_pt_frames(video: torch.Tensor) -> torch.Tensor:
    """Our video [B, 3, F, H, W] in [-1, 1] -> diffusers' output_type='pt' layout and range."""
    return (video * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4)


def our_run(bundle, options: SamplingOptions, noise: torch.Tensor, monkeypatch, **extra):
    """generate() (of extra["dit"], default the bundle's DiT), also catching the latents it decodes."""
    import wan.pipeline as pipeline

    seen = {}

    def spy(vae, latents, *args, **kwargs):
        seen["latents"] = latents
        return decode(vae, latents, *args, **kwargs)

    monkeypatch.setattr(pipeline, "decode", spy)
    dit = extra.pop("dit", bundle.dit)
    video = generate(dit, bundle.text, bundle.vae, PROMPTS, options, latents=noise, **extra)
    return seen["latents"], video


def test_tokenizers_agree(t2v):
    """The reference's cleaning + transformers tokenizer and ours give the same ids and masks."""
    texts = [*PROMPTS, DEFAULT_NEGATIVE_PROMPT, ""]
    ref = t2v.ref.tokenizer(
        [prompt_clean(t) for t in texts], padding="max_length", max_length=512, truncation=True,
        add_special_tokens=True, return_attention_mask=True, return_tensors="pt",
    )  # fmt: skip
    ids, mask = t2v.text.tokenizer(texts)
    assert torch.equal(ref.input_ids, ids) and torch.equal(ref.attention_mask, mask)
    assert (ids != t2v.text.tokenizer.unk_id).logical_and(mask.bool()).sum(1)[:2].min() > 3  # real words


def test_t2v_matches_wan_pipeline(t2v, monkeypatch):
    options = SamplingOptions(**OPTIONS)
    noise = initial_noise([7, 8], options.latent_shape())
    ref_latents, ref_video = reference_run(t2v, options, noise)
    latents, video = our_run(t2v, options, noise, monkeypatch)
    assert video.shape == (2, 3, 9, 32, 48) and video.dtype == torch.float32
    assert rel_err(latents, ref_latents) <= PARITY_RTOL  # measured 2.1e-6
    assert rel_err(as_pt_frames(video), ref_video) <= PARITY_RTOL  # measured 5.4e-7
    # The default noise is initial_noise with seeds seed + i.
    assert torch.equal(generate(t2v.dit, t2v.text, t2v.vae, PROMPTS, options), video)


def test_i2v_matches_wan_i2v_pipeline(i2v, monkeypatch):
    options = SamplingOptions(**OPTIONS)
    noise = initial_noise([7, 8], options.latent_shape())
    img01 = image01(options.height, options.width)
    # The pipeline takes [0, 1] images and maps them to [-1, 1] by 2x - 1; ours takes [-1, 1].
    ref_latents, ref_video = reference_run(i2v, options, noise, image=img01)
    latents, video = our_run(i2v, options, noise, monkeypatch, clip=i2v.clip, images=2.0 * img01 - 1.0)
    assert rel_err(latents, ref_latents) <= PARITY_RTOL  # measured 2.1e-6
    assert rel_err(as_pt_frames(video), ref_video) <= PARITY_RTOL  # measured 7.3e-7


def test_prompt_alone_equals_the_same_prompt_in_a_batch(t2v):
    options = SamplingOptions(**OPTIONS)
    batch = generate(t2v.dit, t2v.text, t2v.vae, ["a red kite", *PROMPTS], options)
    alone = generate(t2v.dit, t2v.text, t2v.vae, PROMPTS[1], SamplingOptions(**dict(OPTIONS, seed=options.seed + 2)))
    assert rel_err(alone[0], batch[2]) <= 1e-5  # measured 1.9e-6: float rounding of other batch sizes
    assert rel_err(batch[1], batch[2]) > 0.01


class CountingDit:
    """A DiT callable that records each call's batch size and timesteps."""

    def __init__(self, dit):
        self.dit, self.calls = dit, []

    def __call__(self, x, t, context, **kwargs):
        self.calls.append((x.shape[0], t.clone()))
        return self.dit(x, t, context, **kwargs)


def test_guidance_one_is_a_single_conditional_pass(t2v):
    options = SamplingOptions(**dict(OPTIONS, guidance_scale=1.0))
    context, negative = encode_prompts(t2v.text, PROMPTS, None, "cpu")
    assert negative is None
    noise = initial_noise([1, 2], options.latent_shape())
    dit = CountingDit(t2v.dit)
    out = denoise(dit, noise, context, None, options)
    assert [b for b, _ in dit.calls] == [2] * options.num_inference_steps
    timesteps = sampling_timesteps(options.num_inference_steps, options.shift)
    assert all(
        t.dtype == torch.int64 and torch.equal(t, ts.expand(2)) for (_, t), ts in zip(dit.calls, timesteps, strict=True)
    )
    sampler, x = build_sampler("unipc", options.num_inference_steps, options.shift), noise
    with torch.no_grad():
        for t in sampler.timesteps:
            x = sampler.step(t2v.dit(x, t.expand(2), context), x)
    assert torch.equal(out, x)


def test_batched_cfg_equals_two_passes(i2v):
    options = SamplingOptions(**OPTIONS)
    context, negative = encode_prompts(i2v.text, PROMPTS, options.negative_prompt, "cpu")
    y, clip_fea = i2v_condition(i2v.vae, i2v.clip, (2 * image01(32, 48) - 1).expand(2, -1, -1, -1), 9)
    noise = initial_noise([3, 4], options.latent_shape())
    batched, split = CountingDit(i2v.dit), CountingDit(i2v.dit)
    a = denoise(batched, noise, context, negative, options, clip_fea, y)
    b = denoise(split, noise, context, negative, options, clip_fea, y, batch_cfg=False)
    assert [n for n, _ in batched.calls] == [4] * 4 and [n for n, _ in split.calls] == [2] * 8
    assert rel_err(a, b) <= 1e-5  # measured 1.1e-6
    with pytest.raises(ValueError, match="needs a negative context"):
        denoise(i2v.dit, noise, context, None, options, clip_fea, y)


def test_offload_equals_resident(i2v):
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    options = SamplingOptions(**dict(OPTIONS, num_inference_steps=2))
    images = 2 * image01(40, 40) - 1  # resized to 32 x 48 for the VAE
    modules = [i2v.dit, i2v.text.model, i2v.vae, i2v.clip]
    for device in devices:
        for m in modules:
            m.to(device)
        resident = generate(i2v.dit, i2v.text, i2v.vae, PROMPTS, options, clip=i2v.clip, images=images, device=device)
        where = []

        def progress(done, total, where=where):
            where.append([next(m.parameters()).device.type for m in modules])

        offloaded = generate(
            i2v.dit, i2v.text, i2v.vae, PROMPTS, options, clip=i2v.clip, images=images, device=device,
            offload=True, progress=progress,
        )  # fmt: skip
        assert offloaded.device.type == "cpu" and resident.device.type == "cpu"
        assert rel_err(offloaded, resident) <= 1e-6  # CPU: identical
        assert where == [[device, "cpu", "cpu", "cpu"]] * 2  # only the DiT on the device while it works
        assert all(next(m.parameters()).device.type == "cpu" for m in modules)


def test_i2v_resizes_for_the_vae_and_clip_sees_the_image_as_given(i2v):
    image = 2 * image01(24, 40) - 1
    y, clip_fea = i2v_condition(i2v.vae, i2v.clip, [image[0]], 5, size=(32, 48))
    resized = resize_images(image, 32, 48)
    assert resized.shape == (1, 3, 32, 48)
    y_ref, _ = encode_i2v_condition(i2v.vae, i2v.clip, resized, 5)
    assert torch.equal(y, y_ref)
    assert torch.equal(clip_fea, i2v.clip.encode_image(image))
    assert resize_images(resized, 32, 48) is resized


def test_initial_noise_and_progress(t2v):
    noise = initial_noise([5, 9], (16, 2, 4, 6))
    assert noise.shape == (2, 16, 2, 4, 6) and noise.dtype == torch.float32 and noise.device.type == "cpu"
    assert torch.equal(noise[1], initial_noise([9], (16, 2, 4, 6))[0])
    assert torch.equal(noise[0], torch.randn(16, 2, 4, 6, generator=torch.Generator().manual_seed(5)))
    seen = []
    options = SamplingOptions(**dict(OPTIONS, num_frames=1, height=16, width=16, num_inference_steps=3))
    video = generate(t2v.dit, t2v.text, t2v.vae, "waves", options, progress=lambda i, n: seen.append((i, n)))
    assert seen == [(1, 3), (2, 3), (3, 3)] and video.shape == (1, 3, 1, 16, 16)
    assert video.abs().max() <= 1


def test_euler_sampler_runs(t2v):
    options = SamplingOptions(**dict(OPTIONS, sampler="euler"))
    video = generate(t2v.dit, t2v.text, t2v.vae, PROMPTS, options)
    assert video.shape == (2, 3, 9, 32, 48) and torch.isfinite(video).all()


def test_options_and_bad_input(t2v, i2v):
    assert SamplingOptions().problems() == []
    assert SamplingOptions().latent_shape() == (16, 21, 60, 104)
    bad = SamplingOptions(num_frames=8, height=40, width=0, num_inference_steps=0, guidance_scale=-1.0, shift=0.0,
                          sampler="ddim", negative_prompt=None, seed=-1)  # fmt: skip
    problems = bad.problems()
    assert len(problems) == 9, problems
    assert any("num_frames must be 4k + 1" in p for p in problems)
    assert any("sampler must be one of unipc, euler" in p for p in problems)
    with pytest.raises(ValueError, match="invalid sampling options: num_frames"):
        generate(t2v.dit, t2v.text, t2v.vae, PROMPTS, bad)
    options = SamplingOptions(**OPTIONS)
    with pytest.raises(ValueError, match=r"latents must be \[2, 16, 3, 4, 6\]"):
        generate(t2v.dit, t2v.text, t2v.vae, PROMPTS, options, latents=torch.zeros(2, 16, 3, 4, 4))
    with pytest.raises(ValueError, match="needs both `images` and `clip`"):
        generate(i2v.dit, i2v.text, i2v.vae, PROMPTS, options, images=image01(32, 48))
    with pytest.raises(ValueError, match="one first-frame image"):
        generate(i2v.dit, i2v.text, i2v.vae, PROMPTS, options, clip=i2v.clip, images=torch.zeros(3, 3, 32, 48))
    with pytest.raises(ValueError, match="prompts must be"):
        generate(t2v.dit, t2v.text, t2v.vae, [], options)
