"""How many graphs [model] compile builds over a run (train/plan.py count_compiles), against the shapes
the sampler itself draws, and against a real compile on the CPU (one compile, ~20-40 s)."""

import copy
import random
from pathlib import Path

import pytest
import torch

from train.config import load_config
from train.data.buckets import ASPECT_RATIOS_512, bucket_table
from train.data.dataset import SizeOptions, make_choose
from train.models import CompileWatch, compile_dit
from train.plan import count_compiles, step_shapes
from wan import WanModel, dit_preset

REPO = Path(__file__).resolve().parents[2]
SHIPPED_14B = ["14b_zero3.toml", "14b_zero2.toml", "14b_fsdp.toml", "14b_i2v_zero3.toml"]


def drawn_shapes(cfg, draws_per_bucket: int = 200) -> set[tuple[int, tuple[int, int, int]]]:
    """(micro-batch, latent) of steps drawn by the sampler's own choice (make_choose) for every bucket
    key, the micro-batch by VideoX-Fun's token-length tiling restated here."""
    d = cfg.data
    options = SizeOptions.of(d)
    choose = make_choose(options)
    rng = random.Random(0)
    ratios = list(ASPECT_RATIOS_512) if d.enable_bucket else [1.0]
    out = set()
    for kind in ("video", "image"):
        for ratio in ratios:
            for _ in range(draws_per_bucket):
                step = choose(rng, (kind, ratio), ())
                frames = step["num_frames"]
                h, w = bucket_table(step["size"])[ratio]
                repeats = 1
                if d.training_with_video_token_length:  # VideoX-Fun's loop: torch.tile x4 / x2 below the budget
                    budget = d.video_sample_n_frames * d.token_sample_size * d.token_sample_size
                    repeats = 4 if budget // 16 >= frames * h * w else 2 if budget // 4 >= frames * h * w else 1
                out.add((cfg.train.train_batch_size * repeats, (1 + (frames - 1) // 4, h // 8, w // 8)))
    return out


@pytest.mark.parametrize("name", SHIPPED_14B)
def test_the_shipped_14b_options_compile_twice_not_once_per_token_count(name):
    cfg = load_config(["--cfg", str(REPO / "configs" / name)])
    drawn = drawn_shapes(cfg)
    assert step_shapes(cfg) == drawn  # the planner lists exactly what the sampler draws
    latents = {latent for _, latent in drawn}
    tokens = {f * (h // 2) * (w // 2) for _, (f, h, w) in drawn}  # patch (1, 2, 2)
    assert (len(latents), len(tokens)) == (480, 184)  # the count of the bucketed options

    static = count_compiles(cfg, dynamic_tokens=False)
    assert (static.latent_shapes, static.token_counts) == (len(latents), len(tokens))
    # Before: a graph per (micro-batch, token count) the blocks see.
    assert static.graphs == len({(b, f * (h // 2) * (w // 2)) for b, (f, h, w) in drawn}) >= len(tokens)
    # After: one per micro-batch class; images and the 256 videos train x2 / x4 (VideoX-Fun's tiling).
    dynamic = count_compiles(cfg, dynamic_tokens=True)
    assert {b for b, _ in drawn} == {1, 2, 4}
    assert dynamic.graphs == 2 and dynamic.by_mode == {"training": {(1, "plain"), (2, "plain")}, "no_grad": set()}
    assert count_compiles(cfg) == dynamic  # compile_dit's policy
    # Selective checkpointing of every other block: its blocks and the others are two graphs each.
    every_other = load_config(["--cfg", str(REPO / "configs" / name), "--engine=fsdp",
                               "--gradient_checkpointing=selective", "--gradient_checkpointing_every=2"])  # fmt: skip
    assert count_compiles(every_other).graphs == 4
    assert count_compiles(every_other, dynamic_tokens=False).graphs == 2 * static.graphs


def test_the_plan_prints_the_compiles(capsys):
    from train.plan import main

    flags = ["--cfg", str(REPO / "configs/debug.toml"), "--random_hw_adapt", "--train_batch_size=2"]
    drawn = drawn_shapes(load_config(flags))
    latents = {latent for _, latent in drawn}
    tokens = {f * (h // 2) * (w // 2) for f, h, w in latents}
    main([*flags, "--compile"])
    out = capsys.readouterr().out
    # Training at micro-batch 2; no_grad: the eval loss's forwards of 2 of its 9 quantiles and of the
    # one left, and validation's conditional + unconditional pair.
    assert "compiles: 3 graphs of the DiT blocks over a run (token counts dynamic; training: micro-batch 2+; " in out
    assert f"no_grad: micro-batch 1, micro-batch 2+) for the {len(latents)} latent shapes / {len(tokens)} token" in out
    main(flags)
    assert "compiles: none ([model] compile = false); compile = true would make 3 graphs" in capsys.readouterr().out


@pytest.mark.slow  # inductor compiles (in worker processes): ~45 s cold
def test_compiled_blocks_build_the_predicted_graphs_over_every_bucket_and_match_eager():
    # The debug options at random_hw_adapt: 13 aspect buckets of videos and images, 10 token counts.
    cfg = load_config(["--cfg", str(REPO / "configs/debug.toml"), "--random_hw_adapt", "--eval_holdout=0",
                       "--validation_steps=0"])  # fmt: skip
    shapes = sorted(step_shapes(cfg), key=lambda s: s[1])
    predicted = count_compiles(cfg)
    assert predicted.token_counts >= 5 and predicted.graphs == 1

    torch.manual_seed(0)
    eager = WanModel(**dit_preset("debug"))
    torch.nn.init.normal_(eager.head.head.weight, std=0.02)  # the init's zero head would give zero gradients
    compiled = copy.deepcopy(eager)
    torch._dynamo.reset()  # graphs an earlier test compiled for the same block code would serve this model too
    compile_dit(compiled)
    watch = CompileWatch()

    def step(model: WanModel, batch: int, latent: tuple[int, int, int]) -> tuple[torch.Tensor, dict]:
        g = torch.Generator().manual_seed(sum(latent))
        x = torch.randn(batch, 16, *latent, generator=g)
        context = torch.randn(batch, 5, 64, generator=g)
        model.zero_grad(set_to_none=True)
        loss = model(x, torch.full((batch,), 500.0), context).square().mean()
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters()}

    for batch, latent in shapes:
        step(compiled, batch, latent)
    assert watch.new() == predicted.graphs
    # Loss and gradients equal eager's at the smallest and largest token counts.
    for batch, latent in (shapes[0], shapes[-1]):
        got, want = step(compiled, batch, latent), step(eager, batch, latent)
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
        for name, grad in want[1].items():
            torch.testing.assert_close(got[1][name], grad, rtol=1e-5, atol=1e-5, msg=name)
    assert watch.new() == 0
