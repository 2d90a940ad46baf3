"""Bad data in a real 2-rank run (torchrun, gloo, the debug models): a bucket whose files are all
broken does not stop the run; the bad fraction is summed over the ranks, so bad files on one rank's
share stop both ranks at the same step, or neither; rank 0 lists every rank's bad files, each once
with its failed loads, at the end and at a stop."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from train_runs import REPO, base_args, losses

from tools.make_demo_data import make_demo_data
from train.data.loader import DataConfig, build_dataloader
from train.data.synthetic import write_image

SEED = 42  # configs/debug.toml's train.seed: the data plan below is the run's
BATCH = 4  # per rank
IMAGES = 256  # one bucket of 32 global batches of 2 x 4


def run(data: Path, meta: Path, out: Path, *overrides: str) -> subprocess.CompletedProcess:
    """train.main on 2 ranks. The agent looks at its ranks every 5 s, not 0.1 s: a rank that stops
    then has time to exit on its own, so its exit code and error are its own, not the agent's SIGTERM."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--monitor-interval=5"]
    cmd += ["-m", "train.main", *base_args(data, out), f"--train_data_meta={meta}", "--checkpointing_steps=0"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd + list(overrides), cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def listed(output: str) -> dict[str, tuple[int, str]]:
    """Rank 0's listing: file name -> (failed loads, ranks), from lines '  PATH: reason (N failed loads; rank R)'."""
    found = re.findall(r"^  (\S+): .* \((\d+) failed loads?; rank ([\d, ]+)\)$", output, re.MULTILINE)
    names = [Path(path).name for path, _, _ in found]
    assert len(names) == len(set(names)), f"a file listed twice: {names}"
    return {Path(path).name: (int(count), ranks) for path, count, ranks in found}


@pytest.mark.slow
def test_a_bucket_of_broken_images_does_not_stop_the_run(tmp_path):
    data = tmp_path / "data"
    entries = json.loads(make_demo_data(data).read_text())
    broken = [f"images/long_{i}.png" for i in range(4)]  # height / width 0.25: a bucket of their own
    for relative in broken:
        (data / relative).write_bytes(b"\x89PNG\r\n\x1a\n but nothing after the signature")
        entries.append({"file_path": relative, "text": "a long strip", "type": "image", "width": 256, "height": 64})
    meta = data / "with_broken_images.json"
    meta.write_text(json.dumps(entries))

    proc = run(data, meta, tmp_path / "out", "--max_train_steps=0", "--num_train_epochs=1", "--train_batch_size=1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "batch slot" not in proc.stdout + proc.stderr
    bad = listed(proc.stdout)
    # The 3 broken demo videos and the 4 broken images, each once, every one with its failed loads.
    assert set(bad) == {Path(b).name for b in broken} | {"truncated_000.mp4", "empty_001.mp4", "not_a_video_002.mp4"}
    assert all(count >= 1 for count, _ in bad.values())
    summary = re.search(r"(\d+) samples served on 2 rank\(s\); (\d+) failed loads", proc.stdout)
    served, failed = int(summary[1]), int(summary[2])
    assert failed == sum(count for count, _ in bad.values())
    assert failed / (served + failed) < 0.5  # debug.toml's max_bad_fraction
    assert len(losses(tmp_path / "out")) == served // 2  # every step of the epoch trained, 2 samples each


def one_bucket_of_images(root: Path) -> Path:
    root.mkdir()
    entries = []
    for i in range(IMAGES):
        relative = f"img_{i:03d}.png"
        write_image(root / relative, np.full((32, 32, 3), i % 251, np.uint8))
        entries.append({"file_path": relative, "text": f"grey {i}", "type": "image", "width": 32, "height": 32})
    meta = root / "metadata.json"
    meta.write_text(json.dumps(entries))
    return meta


def shares(meta: Path) -> list[list[list[str]]]:
    """The run's plan of epoch 0: per step, per rank, the file names that rank loads first."""
    config = DataConfig(train_data_meta=str(meta), dataloader_num_workers=0)
    loader, sampler, _ = build_dataloader(config, batch_size=BATCH, rank=0, world_size=2, seed=SEED)
    samples = loader.dataset.samples
    plan = [[[samples[i].path.name for i in entries[r * BATCH : (r + 1) * BATCH]] for r in (0, 1)]
            for _, entries in sampler.global_batches()]  # fmt: skip
    assert len(plan) == IMAGES // (2 * BATCH) and all(len(set(s[0]) | set(s[1])) == 2 * BATCH for s in plan)
    return plan


def break_files(root: Path, plan, rank: int, steps: range, every: int) -> dict[str, int]:
    """Break every `every`-th file of `rank`'s share in `steps`; each broken name -> its step."""
    names = [(step, name) for step in steps for name in plan[step][rank]][::every]
    for _, name in names:
        (root / name).write_bytes(b"corrupt")
    return {name: step for step, name in names}


@pytest.mark.slow
def test_bad_files_on_one_ranks_share_below_the_global_fraction_finish(tmp_path):
    data = tmp_path / "data"
    meta = one_bucket_of_images(data)
    plan = shares(meta)
    broken = break_files(data, plan, rank=1, steps=range(len(plan)), every=3)  # 43 of rank 1's 128
    proc = run(data, meta, tmp_path / "out", f"--max_train_steps={len(plan)}", f"--train_batch_size={BATCH}",
               "--max_bad_fraction=0.2")  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    bad = listed(proc.stdout)
    assert set(bad) == set(broken) and {ranks for _, ranks in bad.values()} == {"1"}
    failed = sum(count for count, _ in bad.values())
    assert failed / (IMAGES // 2 + failed) > 0.2  # rank 1 alone is above the limit, and has over 100 loads
    assert IMAGES // 2 + failed > 100 and failed / (IMAGES + failed) < 0.2  # all ranks together are below
    assert len(losses(tmp_path / "out")) == len(plan)


@pytest.mark.slow
def test_above_the_global_fraction_both_ranks_stop_at_one_step(tmp_path):
    data = tmp_path / "data"
    meta = one_bucket_of_images(data)
    plan = shares(meta)
    broken = break_files(data, plan, rank=1, steps=range(len(plan)), every=3)
    broken |= break_files(data, plan, rank=0, steps=range(3), every=6)  # 2 on rank 0, early
    proc = run(data, meta, tmp_path / "out", f"--max_train_steps={len(plan)}", f"--train_batch_size={BATCH}",
               "--max_bad_fraction=0.1")  # fmt: skip
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-3000:]
    # Each rank exits by itself (exit code 1, not the agent's SIGTERM) with the same error at the same step,
    # and no other error (no gloo error from a rank left in a collective).
    # train.main prints the stop as one "error:" line per rank (no traceback).
    errors = re.findall(r"^error: (bad data at step (\d+): .*)$", output, re.M)
    assert len(errors) == 2 and errors[0] == errors[1], output[-6000:]
    assert sorted(re.findall(r"rank\s*: (\d) \(local_rank: \d\)\n\s+exitcode\s*: 1 ", output)) == ["0", "1"], output
    assert set(re.findall(r"(\w+(?:Error|Exception)): ", output)) == {"ChildFailedError"}
    step = int(errors[0][1])
    assert 10 <= step < len(plan)  # past 100 loads, well before the end
    # Rank 0's one listing: the bad files of both ranks met so far (plan steps 0 .. step - 1), each once, with
    # the ranks that met them.
    assert output.count("stopping for bad data") == 1
    bad = listed(output.split("stopping for bad data")[1])  # its lines only: a stop prints no final listing
    assert set(bad) <= set(broken)
    assert {name for name, at in broken.items() if at < step} <= set(bad)
    assert {ranks for _, ranks in bad.values()} == {"0", "1"}
    assert sum(ranks == "0" for _, ranks in bad.values()) == 2
