"""The eval loss (train/eval_loss.py): the quantile sigmas match the training density, held-out samples
never train, and the measured loss is exact: bit for bit on a rerun and on a second evaluation of the
same weights, the same under ddp and fsdp, and on 1 rank and 2 ranks (the debug preset, 2 gloo ranks
through train.main as a user runs it, sharing three runs between the tests)."""

import json
import math
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from train_runs import base_args, data, one_thread, torchrun

from train.checkpoint import KILL_ENV
from train.config import load_config
from train.data.loader import DataConfig, build_dataloader
from train.eval_loss import EVAL_CLIPS_FILE, EVAL_LOSS_FILE, EvalLoss
from train.flow import FlowMatching
from train.guard import release_output_dir
from train.main import Trainer

__all__ = ["data", "one_thread"]  # fixtures

STEPS, EVERY, HOLDOUT = 4, 2, 3
EVAL_STEPS = [0, 2, 4]  # the baseline, every EVERY steps; the last is also the end of training
# Runs of different engines differ by float summation order only (as in test_engines.py).
RTOL = 1e-6


def run_args(*extra: str) -> list[str]:
    return [
        f"--max_train_steps={STEPS}", f"--checkpointing_steps={EVERY}", f"--eval_steps={EVERY}",
        f"--eval_holdout={HOLDOUT}", "--validation_prompts=[]", *extra,
    ]  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")  # several threads per op made a 4 s test take 30 s


def evaluations(out: Path) -> dict[int, dict]:
    """eval_loss.jsonl by step: the exact float64 numbers rank 0 logged."""
    lines = [json.loads(line) for line in (out / EVAL_LOSS_FILE).read_text().splitlines()]
    return {line["step"]: line for line in lines}


# --- unit ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {},  # logit-normal, shift 5 (the default)
        {"logit_mean": 0.7, "logit_std": 1.8, "shift": 1.0},
        {"weighting_scheme": "mode", "mode_scale": 1.29, "shift": 3.0},
        {"weighting_scheme": "mode", "mode_scale": -1.0},
        {"weighting_scheme": "cosmap", "shift": 2.0},  # uniform density
        {"uniform_sampling": True},
    ],
    ids=["logit_normal", "logit_normal_1.8", "mode", "mode_negative", "uniform", "stratified"],
)
def test_sigma_quantile_matches_the_empirical_quantiles_of_the_training_draws(options):
    """The fraction of training draws (sample_sigmas, 8000 positions) at or below sigma_q is q, within
    the DKW bound (0.03 is about 4.5 sigma of the empirical CDF's error; for stratified draws, 1/8000)."""
    flow = FlowMatching(**options)
    n = 8000
    drawn = flow.sample_sigmas(seed=3, step=11, positions=list(range(n)), global_size=n).double()
    quantiles = [0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99]
    sigmas = [flow.sigma_quantile(q) for q in quantiles]
    assert sigmas == sorted(sigmas) and len(set(sigmas)) == len(sigmas)
    tolerance = 2 / n if flow.uniform_sampling else 0.03
    for q, sigma in zip(quantiles, sigmas, strict=True):
        assert (drawn <= sigma).double().mean().item() == pytest.approx(q, abs=tolerance), (q, sigma)
        empirical = torch.quantile(drawn, q).item()
        assert sigma == pytest.approx(empirical, abs=0.03), q
    # Closed forms at known points: the median of logit-normal(0, 1) is u = 1/2, shifted by 5: 5/6.
    assert FlowMatching(shift=5.0).sigma_quantile(0.5) == pytest.approx(5 / 6, rel=1e-15)
    assert FlowMatching(weighting_scheme="uniform", shift=1.0).sigma_quantile(0.3) == pytest.approx(0.3, rel=1e-15)
    with pytest.raises(ValueError, match="quantile"):
        flow.sigma_quantile(1.0)


def test_held_out_samples_never_train_and_are_the_same_on_every_rank_and_rerun(data):
    """eval_holdout = 4 on the demo data: the held-out files are not in the training dataset at all (so
    no plan index and no bad file's replacement can serve them), for every rank, over several epochs;
    the choice depends on holdout_seed only (not on the rank, the world size or the training seed)."""
    config = DataConfig(
        train_data_meta=str(data / "metadata.json"), video_sample_n_frames=9, video_sample_size=64,
        image_sample_size=64, dataloader_num_workers=0,
    )  # fmt: skip
    everything, _, _ = build_dataloader(config, batch_size=1)
    usable = {s.path for s in everything.dataset.samples}

    def build(rank=0, world_size=2, seed=1, holdout_seed=5):
        held = []
        loader, sampler, _ = build_dataloader(
            config, batch_size=1, rank=rank, world_size=world_size, seed=seed, holdout=4,
            holdout_seed=holdout_seed, held_out=held,
        )  # fmt: skip
        return loader, sampler, held

    loader, sampler, held = build()
    held_paths = {s.path for s in held}
    assert len(held_paths) == 4 and held_paths <= usable
    training = loader.dataset.samples
    assert {s.path for s in training} == usable - held_paths
    for epoch in range(3):
        sampler.set_epoch(epoch)
        planned = {training[i].path for _, indices in sampler.global_batches() for i in indices}
        assert planned and not planned & held_paths, epoch
        for batch in sampler:  # this rank's own batches too
            assert not {training[i].path for i, _ in batch} & held_paths

    for other in (build(rank=1), build(world_size=1), build(seed=99), build()):
        assert other[2] == held
    assert {s.path for s in build(holdout_seed=6)[2]} != held_paths
    with pytest.raises(ValueError, match="leave nothing to train on"):
        build_dataloader(config, batch_size=1, holdout=len(usable))


def test_a_broken_clip_is_left_out_and_a_failing_encode_turns_the_eval_off(data, tmp_path, capsys):
    """One rank in this process, i2v (y and CLIP features cached too), validation_data_meta of two good
    clips around a broken file: the broken one is listed and left out (NaN row), the others give finite
    losses that repeat exactly on a second evaluation. An encoder that raises turns the eval loss off
    with one line, and run() returns instead of raising."""
    entries = json.loads((data / "metadata.json").read_text())
    pick = [
        next(e for e in entries if e["type"] == "video" and "broken" not in e["file_path"]),
        next(e for e in entries if "broken" in e["file_path"]),
        next(e for e in entries if e["type"] == "image"),
    ]
    meta = tmp_path / "held.json"
    meta.write_text(json.dumps(pick))
    cfg = load_config([
        *base_args(data, tmp_path / "out"), "--preset=debug-i2v", "--train_mode=i2v", "--validation_prompts=[]",
        f"--validation_data_meta={meta}", f"--validation_data_dir={data}", "--eval_steps=1",
        "--eval_quantiles=0.2,0.8", "--train_batch_size=2",
    ])  # fmt: skip
    trainer = Trainer(cfg)
    try:
        evaluator = trainer.eval_loss
        first, second = evaluator.run(0), evaluator.run(0)
        assert evaluator.loaded == [True, False, True]
        assert torch.isnan(first.per_clip[1]).all() and torch.isfinite(first.per_clip[[0, 2]]).all()
        assert torch.equal(first.per_clip[[0, 2]], second.per_clip[[0, 2]]) and first.loss == second.loss
        assert first.loss == pytest.approx(first.per_clip[[0, 2]].mean().item(), rel=1e-12)
        assert first.forwards == 2  # 2 clips x 2 quantiles in forwards of batch 2
        assert "encoded once" in capsys.readouterr().out

        def broken_encoder(pixels, text):
            raise RuntimeError("out of memory (pretend)")

        failing = EvalLoss(
            evaluator.samples, data=cfg.data, flow=trainer.flow, quantiles=[0.5], seed=0, every=1, batch_size=1,
            encode=broken_encoder, engine=trainer.engine, collective=False, layout=trainer.layout,
            metrics=trainer.metrics,
        )  # fmt: skip
        assert failing.run(1) is None and failing.disabled and failing.run(2) is None
        said = capsys.readouterr().out
        assert "no eval loss for the rest of this run" in said and "out of memory (pretend)" in said
    finally:
        trainer.metrics.close()
        release_output_dir()


# --- through train.main -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ddp_runs(data, tmp_path_factory) -> tuple[Path, Path]:
    """The same 2-rank ddp run twice (fp32, 4 steps, 3 clips held out, evaluated at steps 0, 2, 4); the
    second is killed inside its save of step 4 and resumed from checkpoint-2, so its step 4 comes from
    a resume (which holds out the same clips and evaluates them with the same noise)."""
    root = tmp_path_factory.mktemp("eval_ddp")
    torchrun(data, root / "a", *run_args(), nproc=2)
    killed = torchrun(data, root / "b", *run_args(), nproc=2, env={KILL_ENV: str(STEPS)}, check=False)
    assert killed.returncode != 0 and sorted(evaluations(root / "b")) == EVAL_STEPS[:-1]
    resumed = torchrun(data, root / "b", *run_args(), nproc=2)
    assert "resumed from" in resumed.stdout and "checkpoint-2" in resumed.stdout
    return root / "a", root / "b"


@pytest.mark.slow
def test_a_rerun_and_a_resume_log_identical_eval_losses(ddp_runs):
    a, b = ddp_runs
    ea, eb = evaluations(a), evaluations(b)
    assert sorted(ea) == EVAL_STEPS
    for step in EVAL_STEPS:
        for key in ("loss", "per_quantile", "per_clip"):
            assert ea[step][key] == eb[step][key], (step, key)
    assert ea[0]["loss"] != ea[STEPS]["loss"]  # it measured training
    assert len(ea[0]["per_clip"]) == HOLDOUT and len(ea[0]["per_quantile"]) == 9
    assert all(math.isfinite(v) for row in ea[STEPS]["per_clip"] for v in row)
    assert (a / EVAL_CLIPS_FILE).read_text() == (b / EVAL_CLIPS_FILE).read_text()
    # TensorBoard: eval/loss and one curve per quantile, at the same steps.
    events = EventAccumulator(str(a / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"eval/loss", "eval/loss_q0.1", "eval/loss_q0.5", "eval/loss_q0.9", "eval/seconds"} <= set(tags)
    logged = {e.step: e.value for e in events.Scalars("eval/loss")}
    assert sorted(logged) == EVAL_STEPS
    assert logged[STEPS] == pytest.approx(ea[STEPS]["loss"], rel=1e-7)  # float32 in TensorBoard


@pytest.mark.slow
def test_fsdp_gives_ddp_eval_loss(data, ddp_runs, tmp_path):
    """fsdp measures what ddp does for clip 0 (the same 3 clips held out, so the same training; only the
    first evaluated, eval_max_samples = 1): the same weights at step 0 bit for bit, then within the
    engines' float agreement. Rank 1 owns no clip, yet runs rank 0's 9 collective forwards on clip 0's
    inputs, which rank 0 broadcast to it."""
    run = torchrun(data, tmp_path, *run_args("--engine=fsdp", "--eval_max_samples=1"), nproc=2)
    assert "3 samples held out of training (eval_holdout), the first 1 evaluated" in run.stdout
    ddp, fsdp = evaluations(ddp_runs[0]), evaluations(tmp_path)
    assert sorted(fsdp) == EVAL_STEPS
    assert fsdp[0]["per_clip"] == ddp[0]["per_clip"][:1]
    for step in EVAL_STEPS:
        for got, expected in zip(fsdp[step]["per_clip"][0], ddp[step]["per_clip"][0], strict=True):
            assert got == pytest.approx(expected, rel=RTOL), step


@pytest.mark.slow
def test_one_rank_gives_the_two_rank_eval_loss_and_repeats_it(data, ddp_runs, tmp_path):
    """1 rank accumulating 2 micro-batches of 1 (the 2-rank run's global batch, so the same training) in
    this process: the same held-out clips, the 2-rank values at step 0 bit for bit (the same weights),
    then within float agreement; evaluating the final weights again repeats the last value exactly."""
    cfg = load_config([*base_args(data, tmp_path), *run_args("--gradient_accumulation_steps=2")])
    trainer = Trainer(cfg)
    try:
        trainer.train()
        results = {r.step: r for r in trainer.eval_loss.results}
        again = trainer.eval_loss.run(STEPS)
    finally:
        trainer.metrics.close()
        release_output_dir()
    two = evaluations(ddp_runs[0])
    assert (tmp_path / EVAL_CLIPS_FILE).read_text() == (ddp_runs[0] / EVAL_CLIPS_FILE).read_text()
    assert sorted(results) == EVAL_STEPS
    assert results[0].per_clip.tolist() == two[0]["per_clip"] and results[0].loss == two[0]["loss"]
    for step in EVAL_STEPS:
        assert results[step].loss == pytest.approx(two[step]["loss"], rel=RTOL), step
    assert torch.equal(again.per_clip, results[STEPS].per_clip) and again.loss == results[STEPS].loss


def test_a_resume_with_another_holdout_is_refused_naming_it(data, tmp_path):
    """The held-out clips are not in the training data, so changing eval_holdout changes the data order:
    the resume is refused before any model is built, and the message names eval_holdout."""
    out = tmp_path / "out"
    args = [*base_args(data, out), "--max_train_steps=1", "--checkpointing_steps=1", "--validation_prompts=[]"]
    trainer = Trainer(load_config([*args, "--eval_holdout=2", "--eval_steps=0"]))
    trainer.train()
    del trainer
    release_output_dir()
    with pytest.raises(ValueError, match="eval_holdout 2 / validation_seed 0 in the checkpoint, 3 / 0 now"):
        Trainer(load_config([*args, "--eval_holdout=3", "--max_train_steps=2"]))
