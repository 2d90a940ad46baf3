"""Start-up errors: every problem of a command line listed in one go, by `python -m train.config` exactly as
by train.main (one shared check); did-you-mean for VideoX-Fun's misspelt options; a setup error and --help
printed once under torchrun, not once per rank; the resume refusal naming the checkpoint's global batch."""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train.distributed
from train import config
from train.config import ConfigError, load_config
from train.data.sampler import DistributedBucketBatchSampler

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def run(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)


def stage2_file(tmp_path) -> str:
    path = tmp_path / "zero_stage2_config.json"  # VideoX-Fun's shape: "auto" where the launcher decides
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto"}))
    return str(path)


@pytest.mark.slow
def test_every_problem_of_a_command_line_is_listed_at_once(tmp_path):
    proc = run(
        "-m", "train.config", "--cfg", str(REPO / "configs" / "debug.toml"),
        f"--config_path={tmp_path / 'wan_civitai.yaml'}", "--deepspeed_multinode_launcherr", "standard",
        f"--train_data_dir={tmp_path / 'videos'}", f"--train_data_meta={tmp_path / 'meta.json'}",
        "--zero_stage", "3", "--deepspeed_config_file", stage2_file(tmp_path),
    )  # fmt: skip
    assert proc.returncode != 0
    (header,) = re.findall(r"invalid run configuration \((\d+) problems\)", proc.stderr)
    listed = [line.strip() for line in proc.stderr.split("problems):\n")[1].splitlines()]
    assert int(header) == len(listed) == 5, proc.stderr
    wanted = [
        ("--deepspeed_multinode_launcherr: unknown option", "did you mean deepspeed_multinode_launcher?"),
        ("wan_civitai.yaml", "cannot read it"),
        ("train_data_dir", "videos: no such folder"),
        ("train_data_meta", "meta.json: no such file"),
        ("zero_optimization.stage = 2 conflicts with the run's 3",),
    ]
    for parts in wanted:
        assert any(all(p in line for p in parts) for line in listed), (parts, proc.stderr)


@pytest.mark.slow
def test_train_config_refuses_a_zero_stage_mismatch_as_train_main_does(tmp_path):
    """--zero_stage 3 with a stage-2 DeepSpeed file: the check mode and the trainer say the same thing."""
    (tmp_path / "videos").mkdir()
    (tmp_path / "meta.json").write_text(json.dumps([{"file_path": "a.mp4", "text": "a clip", "type": "video"}]))
    out = tmp_path / "out"
    args = [
        "--cfg", str(REPO / "configs" / "debug.toml"), f"--train_data_dir={tmp_path / 'videos'}",
        f"--train_data_meta={tmp_path / 'meta.json'}", f"--output_dir={out}", "--zero_stage", "3",
        "--deepspeed_config_file", stage2_file(tmp_path),
    ]  # fmt: skip
    check, trainer = run("-m", "train.config", *args), run("-m", "train.main", *args)
    assert check.returncode == trainer.returncode == 2, (check.stderr, trainer.stderr)

    def refusals(text: str) -> list[str]:
        return [line.strip() for line in text.splitlines() if "zero_optimization.stage" in line]

    assert (
        refusals(check.stderr)
        == refusals(trainer.stderr)
        == [
            f"deepspeed_config {args[-1]}: zero_optimization.stage = 2 conflicts with the run's 3; "
            "set [parallel] engine (zero2 or zero3) instead"
        ]
    ), (check.stderr, trainer.stderr)
    assert not out.exists()  # refused before the run wrote anything
    # Without the CLI's stage the file's stage picks the engine, and the same check passes.
    cfg = config.load_run_config([*args[:-4], *args[-2:]], [], torch.device("cpu"), None, read_data=True)
    assert cfg.parallel.engine == "zero2"


def test_the_check_mode_reads_the_data_listing_too(tmp_path):
    """`python -m train.config` also reads the metadata as the loader will, listing its problems with the rest."""
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps([{"file_path": "a.mp4", "text": "a clip", "type": "video"}, {"text": "no file"}]))
    args = [f"--train_data_meta={meta}", f"--vae_path={tmp_path / 'vae.pth'}", "--bogus_option=1"]
    with pytest.raises(ConfigError) as info:
        config.load_run_config(args, [], torch.device("cpu"), None, read_data=True)
    found = info.value.problems
    assert len(found) == 3, found
    assert "bogus_option" in found[0] and "vae.pth: no such file" in found[1]
    assert found[2].startswith(f"{meta}: 1 problem(s)") and "file_path" in found[2], found


def test_a_misspelt_videox_fun_option_gets_a_did_you_mean():
    def problem(flag: str) -> str:
        with pytest.raises(ConfigError) as info:
            load_config(["--train_data_dir=/data", flag, "x"])
        (found,) = [p for p in info.value.problems if flag in p]
        return found

    assert problem("--deepspeed_multinode_launcherr").endswith("(did you mean deepspeed_multinode_launcher?)")
    assert problem("--zero3_save_16bit_modle").endswith("(did you mean zero3_save_16bit_model?)")
    assert problem("--learning_rat").endswith("(did you mean learning_rate?)")  # ours first
    assert "did you mean" not in problem("--fsdp_sync_module_states")  # not close to any


def test_a_rank_that_is_not_local_rank_0_waits_then_says_its_own_error(monkeypatch, capsys):
    """The others wait for torchrun to end them (local rank 0 speaks); when nothing does, the problem was
    theirs alone, and they say it."""
    monkeypatch.setattr(train.distributed, "SETUP_ERROR_WAIT_S", 0.0)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("RANK", "3")
    handler = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as info:
            train.distributed.fail_setup("error: only here")
    finally:
        signal.signal(signal.SIGTERM, handler)
    assert info.value.code == 2
    assert capsys.readouterr().err == "rank 3: error: only here\n"


@pytest.mark.slow
def test_a_setup_error_and_help_print_once_under_torchrun(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(f'[data]\ntrain_data_dir = "{tmp_path / "videos"}"\n[train]\noutput_dir = "{tmp_path / "out"}"\n')
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "train.main"]
    failed = run(*torchrun, "--cfg", str(bad), timeout=300)
    output = failed.stdout + failed.stderr
    assert failed.returncode != 0
    assert output.count("videos: no such folder") == 1, output
    assert output.count("error:") == 1, output
    # Both ranks exit with the trainer's code for a setup error (rank 1 on the agent's SIGTERM).
    assert sorted(re.findall(r"rank\s*: (\d) \(local_rank: \d\)\n\s+exitcode\s*: 2 ", output)) == ["0", "1"], output
    helped = run(*torchrun, "--help", timeout=300)
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.count("usage: torchrun") == 1, helped.stdout[:2000]
    assert helped.stdout.count("\n[optim]\n") == 1


def test_the_global_batch_refusal_names_the_checkpoints_product():
    """A DDP run of 2 ranks x batch 1 resumed on 1 rank: the product to keep is the checkpoint's 2."""
    keys = [("video", 1.0)] * 16
    saved = DistributedBucketBatchSampler(keys, 1, rank=0, world_size=2, seed=5)
    state = json.loads(json.dumps(saved.state_dict()))
    with pytest.raises(ValueError) as info:
        DistributedBucketBatchSampler(keys, 1, rank=0, world_size=1, seed=5).load_state_dict(state)
    assert f"keep the product ({1 * 2 * 1}) equal" in str(info.value), info.value
