"""The trainer-facing encoders on the debug models: shapes, chunking, and the I2V conditioning."""

import torch

from wan import CLIP_PRESETS, CLIPVision, WanModel, dit_preset
from wan.encoders import TextEncoder, encode_i2v_condition, encode_latents, i2v_mask
from wan.modules.t5 import T5_PRESETS, UMT5Encoder
from wan.modules.tokenizer import WanTokenizer
from wan.modules.vae import WanVAE, vae_preset


def reference_mask(num_frames: int, h: int, w: int) -> torch.Tensor:
    """The official I2V mask construction, transcribed step by step."""
    msk = torch.ones(1, num_frames, h, w)
    msk[:, 1:] = 0
    msk = torch.concat([torch.repeat_interleave(msk[:, 0:1], repeats=4, dim=1), msk[:, 1:]], dim=1)
    msk = msk.view(1, msk.shape[1] // 4, 4, h, w)
    return msk.transpose(1, 2)[0]


def test_i2v_mask_matches_the_reference_construction():
    for frames in (1, 5, 17, 81):
        mask = i2v_mask(frames, 3, 5, batch=2)
        assert mask.shape == (2, 4, 1 + (frames - 1) // 4, 3, 5)
        assert torch.equal(mask[1], reference_mask(frames, 3, 5))


def test_text_encoder_gives_dit_context():
    torch.manual_seed(0)
    tokenizer = WanTokenizer.debug()
    model = UMT5Encoder(**T5_PRESETS["debug"])
    encode = TextEncoder(tokenizer, model)
    prompts = ["a cat walks across a sunny garden", "waves"]
    context = encode(prompts)
    ids, mask = tokenizer(prompts)
    assert context.shape == (2, 512, 64) and context.dtype == torch.float32
    assert torch.equal(context, model(ids, mask))
    lengths = mask.sum(1)
    assert lengths[0] > lengths[1]
    assert context[1, lengths[1] :].abs().sum() == 0 and context[1, : lengths[1]].abs().sum() > 0
    # It feeds the debug DiT directly.
    dit = WanModel(**dit_preset("debug"))
    out = dit(torch.randn(2, 16, 1, 4, 4), torch.tensor([10.0, 900.0]), context)
    assert out.shape == (2, 16, 1, 4, 4)
    assert encode(prompts, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_latents_in_mini_batches_equal_one_batch():
    torch.manual_seed(0)
    vae = WanVAE(**vae_preset("debug")).eval()
    clips = torch.rand(3, 3, 5, 16, 24) * 2 - 1
    whole = encode_latents(vae, clips, mini_batch=3)
    assert whole.shape == (3, 16, 2, 2, 3)
    torch.testing.assert_close(encode_latents(vae, clips, mini_batch=1), whole, rtol=1e-5, atol=1e-6)


def test_i2v_condition_feeds_the_i2v_dit():
    torch.manual_seed(0)
    vae = WanVAE(**vae_preset("debug")).eval()
    clip = CLIPVision(**CLIP_PRESETS["debug"]).eval()
    first = torch.rand(2, 3, 16, 16) * 2 - 1
    y, clip_fea = encode_i2v_condition(vae, clip, first, num_frames=9)
    assert y.shape == (2, 20, 3, 2, 2)
    assert torch.equal(y[:, :4], i2v_mask(9, 2, 2, batch=2))
    # The latent half is the VAE of (first frame, then zeros), as the reference builds it.
    video = torch.cat([first[:, :, None], torch.zeros(2, 3, 8, 16, 16)], dim=2)
    torch.testing.assert_close(y[:, 4:], vae.encode(video))
    torch.testing.assert_close(clip_fea, clip.encode_image(first))
    dit = WanModel(**dit_preset("debug-i2v"))
    out = dit(torch.randn(2, 16, 3, 2, 2), torch.tensor([1.0, 500.0]), torch.randn(2, 7, 64), clip_fea=clip_fea, y=y)
    assert out.shape == (2, 16, 3, 2, 2)
