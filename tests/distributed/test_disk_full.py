"""A save that fills the disk says "disk full", and the free space it states is the free space the disk
has once every writer of the failed save has closed its files: measured independently after they
have, on a private tmpfs (unshare -rm) where nothing else writes, so the figures must agree exactly.

The other rank is simulated in-process: a part that opens a file in the save's folder, writes to it and
keeps it open (as a rank still inside DCP's or DeepSpeed's save does when rank 0 fails), then the
next part's write runs out of room. The removal unlinks that file, but its blocks stay taken until it
is closed: a free-space figure measured then is short by them.

    python tests/distributed/test_disk_full.py OUT   the worker, run inside the mount namespace
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from ranks import private_tmpfs

REPO = Path(__file__).resolve().parents[2]
HELD = 256 * 1024  # bytes the "other rank" holds open when the disk fills


def worker(out: Path) -> None:
    import shutil

    import torch

    from train.checkpoint import Checkpointer
    from train.checkpoint_io import write_safetensors

    class Held:
        """Another rank's file of the save, still open for writing when the save fails."""

        def save(self, folder: Path) -> list[str]:
            self.file = open(folder / "other_rank.bin", "wb")  # noqa: SIM115 - kept open on purpose
            self.file.write(b"x" * HELD)
            self.file.flush()
            return []

        def load(self, folder: Path) -> None:
            pass

    class Big:
        def save(self, folder: Path) -> list[str]:
            write_safetensors(folder / "big.safetensors", {"x": torch.ones(512, 512)}, {"format": "pt"})
            return ["big.safetensors"]

        def load(self, folder: Path) -> None:
            pass

    Checkpointer(out, config_text="seed = 1\n").save(1)
    checkpointer, held = Checkpointer(out, config_text="seed = 1\n"), Held()
    checkpointer.register_files("held", held)
    checkpointer.register_files("big", Big())
    report: dict = {}
    try:
        checkpointer.save(2)
    except OSError as err:
        report.update(error=str(err), errno=err.errno)
    report["free_while_held"] = shutil.disk_usage(out).free
    held.file.close()  # the other rank lets go (fails, or torchrun stops it)
    report["free_after"] = shutil.disk_usage(out).free
    print(json.dumps(report))


@pytest.mark.slow
def test_a_full_disk_says_so_and_states_the_free_space_after_every_writer_let_go(tmp_path):
    mnt, namespace = private_tmpfs(tmp_path, "768k")
    cmd = [*namespace, sys.executable, __file__, str(mnt / "out")]
    env = {"PYTHONPATH": f"{REPO}:{REPO / 'tests'}", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])

    error = report["error"]
    assert report["errno"] == 28 and error.startswith("[Errno 28] disk full: saving "), error
    # The test is not trivial: while the file was held, the disk had HELD bytes (and more) less.
    assert report["free_after"] - report["free_while_held"] >= HELD
    stated = re.search(r"(\d+) bytes are free in (\S+)", error)
    assert stated and stated.group(2) == str(mnt / "out"), error
    assert int(stated.group(1)) == report["free_after"], (error, report)


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
