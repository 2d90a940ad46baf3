import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# Tests in every folder import the shared helpers here (train_runs, ranks) and the reference models
# (tests/reference: dit_reference, ...); a worker beside its tests is found from its own folder.
sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parent / "reference")]

# The processes tests start write unbuffered, as under CI: `print` then writes a line's text and its
# newline apart, and two ranks on one pipe would interleave mid-line unless train.main writes whole lines.
os.environ["PYTHONUNBUFFERED"] = "1"


# What libraries run in-process to probe the machine (inductor's compiler check, DeepSpeed's NUMA query).
_LIBRARY_PROBES = {"g++", "gcc", "c++", "cc", "clang", "numactl", "lscpu", "nvidia-smi", "ldconfig", "uname", "which"}


@pytest.fixture(autouse=True)
def _spawning_tests_are_marked_slow(request, monkeypatch):
    """WAN_TESTS_CHECK_SLOW=1: a test not marked slow that starts a process (subprocess.Popen, which
    torchrun, subprocess.run and the rank helpers go through) fails, so `-m "not slow"` stays in-process.
    Processes a module- or session-scoped fixture starts are not seen (slow tests use those), nor a
    library's probes of the machine (_LIBRARY_PROBES)."""
    if os.environ.get("WAN_TESTS_CHECK_SLOW") != "1" or request.node.get_closest_marker("slow"):
        yield
        return
    started = []
    real_init = subprocess.Popen.__init__

    def init(self, args, *rest, **kwargs):
        program = Path(str(args if isinstance(args, (str, os.PathLike)) else args[0]).split()[0]).name
        if program not in _LIBRARY_PROBES:
            started.append(args)
        real_init(self, args, *rest, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "__init__", init)
    yield
    if started:
        pytest.fail(f"started {len(started)} process(es) but is not marked slow: {started[0]}", pytrace=False)


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    """tools/make_demo_data's data set, made once for the whole session (tests/train_runs.py's `data`
    fixture hands it to each module). Read-only: a test that changes files copies it first."""
    from tools.make_demo_data import make_demo_data

    folder = tmp_path_factory.mktemp("demo")
    make_demo_data(folder)
    return folder


@pytest.fixture(scope="session")
def release_folder(tmp_path_factory) -> Path:
    """A tiny Wan2.1-T2V release folder (tests/train_runs.write_release_folder, seed 7), written once for
    the session. Read-only: a test that removes or edits files uses `copy_release`."""
    from train_runs import write_release_folder

    folder = tmp_path_factory.mktemp("release") / "Wan2.1-T2V-tiny"
    write_release_folder(folder)
    return folder


@pytest.fixture
def copy_release(release_folder, tmp_path):
    """copy_release(name) -> a private copy of the session's release folder under tmp_path."""

    def copy(name: str = "release") -> Path:
        return Path(shutil.copytree(release_folder, tmp_path / name))

    return copy


@pytest.fixture(scope="session")
def engine_runs(demo_data, tmp_path_factory):
    """engine_runs(engine) -> the output folder of one uninterrupted 2-rank run of that engine
    (tests/train_runs.py engine_run_args: 6 steps, checkpoints 3 and 6, consolidated weights), run on
    first use and shared by every module of the session. Read-only: copy a checkpoint to change it."""
    from train_runs import engine_run_args, torchrun

    root = tmp_path_factory.mktemp("engine_runs")
    done: dict[str, Path] = {}

    def get(engine: str) -> Path:
        if engine not in done:
            torchrun(demo_data, root / engine, *engine_run_args(engine), "--save_consolidated_weights", nproc=2)
            done[engine] = root / engine
        return done[engine]

    return get
