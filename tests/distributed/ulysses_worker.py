"""Subprocess side of tests/distributed/test_ulysses.py: one rank of a 2-process gloo group. For each
case the debug DiT (same weights on both ranks) runs a forward and backward on the same inputs twice:
whole (the reference) and split over the two ranks (wan.modules.ulysses). Reported per case: the largest
difference of the outputs, and of the gradients once the two ranks' shares are summed, relative to the
reference's largest value; and the bytes one block saves for backward, whole and split."""

import torch
import torch.distributed as dist
from ranks import gloo_worker_main

from wan import WanModel, dit_preset
from wan.modules.checkpointing import ActivationCheckpointing, saved_activation_bytes
from wan.modules.ulysses import SequenceParallel, all_to_all_bytes

# (name, preset, latent grid F x H x W, checkpointing mode): 3 x 8 x 10 latents are 3 x 4 x 5 = 60
# tokens (even); 1 x 6 x 6 are 9 tokens: padded to 10.
CASES = [
    ("t2v", "debug", (3, 8, 10), "none"),
    ("odd_tokens", "debug", (1, 6, 6), "none"),
    ("i2v", "debug-i2v", (2, 6, 10), "none"),
    ("full_checkpointing", "debug", (3, 8, 10), "full"),
    ("selective_checkpointing", "debug", (3, 8, 10), "selective"),
    # Wan2.2 TI2V: per-token timesteps (frame 0 at t = 0), 3 x 3 x 5 = 45 tokens: padded to 46.
    ("ti2v_per_token", "debug-ti2v", (3, 6, 10), "none"),
]
# Bytes one block saves for backward (wan.modules.checkpointing.saved_activation_bytes, what train.plan
# counts), whole and split: 2 x 16 x 32 latents = 256 tokens per sample.
MEMORY_GRID = (2, 16, 32)


def inputs(config: dict, grid: tuple[int, int, int]) -> dict:
    g = torch.Generator().manual_seed(1)
    f, h, w = grid
    x = {"x": torch.randn(2, config["out_dim"], f, h, w, generator=g), "t": torch.tensor([100.0, 700.0]),
         "context": torch.randn(2, 7, config["text_dim"], generator=g)}  # fmt: skip
    if config["model_type"] == "ti2v":
        per_frame = (h // 2) * (w // 2)
        x["t"] = x["t"][:, None].repeat(1, f * per_frame)
        x["t"][:, :per_frame] = 0
    if config["model_type"] == "i2v":
        x["y"] = torch.randn(2, config["in_dim"] - 16, f, h, w, generator=g)
        x["clip_fea"] = torch.randn(2, 257, config["image_dim"], generator=g)
    return x


def forward_backward(model: WanModel, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The output and the parameter gradients."""
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    weights = torch.linspace(-1, 1, out.numel()).reshape(out.shape)  # a loss every output entry feeds
    (out * weights).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def random_model(config: dict) -> WanModel:
    """Every parameter random (the release's init zeroes the head: a zero output would compare nothing)."""
    torch.manual_seed(0)
    model = WanModel(**config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model


def run(out, rank: int) -> dict:
    group = dist.new_group([0, 1])
    results = {}
    for name, preset, grid, mode in CASES:
        config = dit_preset(preset)
        model = random_model(config)
        model.set_gradient_checkpointing(ActivationCheckpointing(mode=mode))
        batch = inputs(config, grid)
        ref_out, ref_grads = forward_backward(model, batch)
        sp = SequenceParallel(group)
        model.set_sequence_parallel(sp)
        sp_out, sp_grads = forward_backward(model, batch)
        f, h, w = grid
        tokens, recomputed = f * h * w // 4, config["num_layers"] if mode != "none" else 0
        analytic = all_to_all_bytes(2, tokens, config["dim"], config["num_layers"], 2, False, recomputed)
        for g in sp_grads.values():
            dist.all_reduce(g, group=group)  # the shares of the two ranks
        scale = max(g.abs().max().item() for g in ref_grads.values())
        results[name] = {
            "out": ((sp_out - ref_out).abs().max() / ref_out.abs().max()).item(),
            "grads": max((sp_grads[n] - g).abs().max().item() for n, g in ref_grads.items()) / scale,
            "all_to_all_bytes": [sp.traffic.sent_bytes, analytic],
        }
    config = dit_preset("debug")
    model = random_model(config)
    f, h, w = MEMORY_GRID
    x = torch.randn(1, f * h * w // 4, config["dim"])  # a batch of one: the slice of x is contiguous
    # 8 text rows: cross-attention's text keys and values are whole on every rank (512 rows against
    # 75,600 video tokens at 720p; here they would outweigh the 256).
    e0, context = torch.randn(1, 6, config["dim"]), torch.randn(1, 8, config["dim"])
    rope = model.rope((f, h // 2, w // 2))
    sp = SequenceParallel(group)
    x_local, rope_local = sp.shard(x, rope)
    block = model.blocks[0]
    for mode in ("none", "full", "selective"):
        whole = saved_activation_bytes(block, (x, e0, context, None, rope), mode)
        block.self_attn.sequence_parallel = sp
        split = saved_activation_bytes(block, (x_local, e0, context, None, rope_local), mode)
        block.self_attn.sequence_parallel = None
        results[f"memory_{mode}"] = {"saved_bytes": [whole, split]}
    results["sampling"] = sampling_difference(group)
    return results


def sampling_difference(group) -> dict:
    """wan.pipeline.generate (validation's sampler: UniPC, batched guidance) with the DiT whole and split
    over the two ranks: the largest difference of the decoded videos (values in [-1, 1]), t2v and i2v."""
    from train.config import ModelConfig
    from train.models import build_models
    from wan.pipeline import SamplingOptions, generate

    out = {}
    for preset, mode in (("debug", "normal"), ("debug-i2v", "i2v")):
        models = build_models(ModelConfig(preset=preset, train_mode=mode), torch.device("cpu"), seed=0)
        dit = random_model(dit_preset(preset))
        options = SamplingOptions(num_frames=9, height=48, width=80, num_inference_steps=4, seed=7)  # 45 tokens
        image = torch.rand(3, 40, 96) * 2 - 1 if models.clip is not None else None
        kwargs = {"clip": models.clip, "images": [image]} if image is not None else {}
        prompts = ["a red circle moves left to right", "a blue square"]
        whole = generate(dit, models.text, models.vae, prompts, options, **kwargs)
        sp = SequenceParallel(group)
        dit.set_sequence_parallel(sp)
        split = generate(dit, models.text, models.vae, prompts, options, **kwargs)
        out[mode] = (split - whole).abs().max().item()
        out[f"{mode}_exchanged"] = sp.traffic.sent_bytes
    return out


if __name__ == "__main__":
    gloo_worker_main(run)
