"""Sequence parallel training ([parallel] sp, wan/modules/ulysses.py) through train.main: sp = 2 on 2
ranks trains what sp = 1 on 1 rank trains with the same global batch (losses and the merged weights
within 1e-6) on ddp, zero3 and fsdp, with a token count that needs padding, an i2v run with
VideoX-Fun's token-length sizes, and compile among them;
4 ranks as 2 data x 2 sequence equal 2 ranks of sp 1; a checkpoint resumes at another sp; validation
samples, and the eval loss measures, what sp 1 does. A DiT whose heads do not divide by sp, or a world size that does not, is
refused before any model is built."""

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from train_runs import base_args, data, engine_run_args, losses, torchrun

from tools.zero_to_bf16 import merge
from train.checkpoint_verify import find_latest
from train.config import check_run, load_config
from train.eval_loss import EVAL_LOSS_FILE
from wan import WanModel

__all__ = ["data"]  # a fixture

# 48 x 48 frames are 3 x 3 tokens a latent frame: 27 tokens, padded to 28 for sp 2.
ODD_TOKENS = ["--video_sample_size=48", "--image_sample_size=48"]
I2V = ["--train_mode=i2v", "--preset=debug-i2v"]
# VideoX-Fun's token-length sizes: grids of many shapes, small batches repeated x2 / x4 (micro-batches of 2+).
TOKEN_LENGTH = ["--random_hw_adapt=true", "--training_with_video_token_length=true", "--token_sample_size=64"]
# zero2 shares zero3's DeepSpeed path (sp touches no engine code); the suite's time goes to what differs.
CASES = {"ddp": [], "zero3": [], "fsdp": ODD_TOKENS, "ddp_i2v_token_length": [*I2V, *TOKEN_LENGTH],
         "ddp_compile": ["--compile"]}  # fmt: skip
HEAVY = {"ddp_compile", "zero3", "ddp_i2v_token_length"}  # compiles (~80 s), ~20 s each: CI's heavy tier, for time


def merged(out, tmp_path, name: str) -> dict[str, torch.Tensor]:
    merge(find_latest(out), tmp_path / name, dtype="fp32", log=lambda _: None)
    return dict(WanModel.from_pretrained(tmp_path / name, dtype=None).state_dict())


def assert_same_training(a, b, tmp_path) -> None:
    la, lb = losses(a), losses(b)
    assert sorted(la) == sorted(lb) == list(range(1, 7))
    for step in la:
        assert la[step] == pytest.approx(lb[step], rel=1e-6, abs=0), step
    wa, wb = merged(a, tmp_path, "a"), merged(b, tmp_path, "b")
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-6, atol=1e-6, msg=name)
    assert la[1] != la[6]  # it trained


@pytest.mark.slow
@pytest.mark.parametrize("case", [pytest.param(c, marks=[pytest.mark.heavy] if c in HEAVY else []) for c in CASES])
def test_two_sequence_ranks_train_what_one_rank_trains(data, tmp_path, case):
    engine = case.split("_")[0]
    args = engine_run_args(engine, *CASES[case])
    torchrun(data, tmp_path / "sp1", *args, nproc=1)
    proc = torchrun(data, tmp_path / "sp2", *args, "--sp=2", nproc=2)
    assert "1 data-parallel rank(s) x batch 1 x 1 micro-steps on cpu, each sample on 2 ranks" in proc.stdout
    assert_same_training(tmp_path / "sp1", tmp_path / "sp2", tmp_path)
    if "--compile" in args:  # the exchanges inside the compiled blocks: a graph or two, not one per token count
        graphs = [int(n) for n in re.findall(r"graph\(s\) of the DiT blocks .*?, (\d+) so far", proc.stdout)]
        assert graphs and graphs[-1] <= 3, proc.stdout


@pytest.mark.slow
@pytest.mark.heavy  # CI's heavy tier, for time
def test_two_data_by_two_sequence_ranks_equal_two_ranks(data, tmp_path):
    args = engine_run_args("ddp")
    torchrun(data, tmp_path / "dp2", *args, nproc=2)
    proc = torchrun(data, tmp_path / "dp2sp2", *args, "--sp=2", nproc=4)
    assert "2 data-parallel rank(s)" in proc.stdout
    assert_same_training(tmp_path / "dp2", tmp_path / "dp2sp2", tmp_path)


def test_sp_that_does_not_divide_the_heads_or_the_ranks_is_refused(data, tmp_path):
    cfg = load_config([*base_args(data, tmp_path / "out"), "--sp=3"])
    problems = check_run(cfg, torch.device("cpu"), world_size=4)
    assert "[parallel] sp = 3 does not divide the 4 ranks" in problems
    assert "[parallel] sp = 3: the DiT's 4 heads (preset debug) do not divide by it; sp can be 1, 2, 4" in problems
    assert not (tmp_path / "out").exists()  # refused before anything was written or built


@pytest.mark.slow
@pytest.mark.parametrize(("engine", "sp_before", "sp_after"), [("fsdp", 2, 1)])
def test_a_checkpoint_resumes_at_another_sp(data, tmp_path, engine, sp_before, sp_after):
    """Same global batch (1 data-parallel rank either way): steps 4-6 after the resume are the
    uninterrupted run's."""
    args = engine_run_args(engine)
    torchrun(data, tmp_path / "a", *args, f"--sp={sp_before}", nproc=sp_before)
    resume = f"--resume_from_checkpoint={tmp_path / 'a' / 'checkpoint-3'}"
    proc = torchrun(data, tmp_path / "b", *args, f"--sp={sp_after}", resume, nproc=sp_after)
    assert "resumed from" in proc.stdout
    la, lb = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(lb) == [4, 5, 6]
    for step in lb:
        assert lb[step] == pytest.approx(la[step], rel=1e-6, abs=0), step


VALIDATION = ["--validation_steps=3", "--validation_inference_steps=3", "--validation_num_frames=9",
              "--validation_height=48", "--validation_width=80", "--validation_seed=7",
              "--validation_prompts", "a red circle moves left to right", "a blue square moves down"]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["fsdp"])
def test_validation_and_the_eval_loss_at_sp_2_are_sp_1s(data, tmp_path, engine):
    """Both prompts on the one data-parallel rank, sampled by the sequence group together (9 frames of
    48 x 80: 45 tokens, padded), the group's first rank writing them; 3 held-out clips evaluated at steps
    0, 3 and 6 by the group, one of its ranks filling the table. The float videos are compared in
    tests/distributed/test_ulysses.py; here the files a user gets, and eval_loss.jsonl's numbers."""
    args = [*engine_run_args(engine), *VALIDATION, "--eval_holdout=3", "--eval_steps=3"]
    torchrun(data, tmp_path / "sp1", *args, nproc=1)
    proc = torchrun(data, tmp_path / "sp2", *args, "--sp=2", nproc=2)
    for step in (3, 6):
        assert f"validation at step {step}: 2 of 2 videos" in proc.stdout
        one, two = tmp_path / "sp1" / "samples" / f"step-{step}", tmp_path / "sp2" / "samples" / f"step-{step}"
        names = sorted(p.name for p in one.iterdir())
        assert names == sorted(p.name for p in two.iterdir()) and len(names) == 4  # 2 x (mp4, png)
        for name in names:
            if name.endswith(".png"):
                a = np.asarray(Image.open(one / name), dtype=int)
                b = np.asarray(Image.open(two / name), dtype=int)
                assert np.abs(a - b).max() <= 1, name
    one, two = ([json.loads(line) for line in (tmp_path / run / EVAL_LOSS_FILE).read_text().splitlines()]
                for run in ("sp1", "sp2"))  # fmt: skip
    assert [e["step"] for e in one] == [e["step"] for e in two] == [0, 3, 6]
    for a, b in zip(one, two, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6, abs=0), (a, b)
        torch.testing.assert_close(torch.tensor(b["per_clip"]), torch.tensor(a["per_clip"]), rtol=1e-6, atol=0)
