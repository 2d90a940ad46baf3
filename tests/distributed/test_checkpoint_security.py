"""A crafted fsdp checkpoint (a pickle in DCP's index or among DCP's values whose unpickling would run
code), its COMPLETE marker updated to match, is refused by every reader -- verify, resume (the
trainer's checkpoint search and the engine's load), merge and sample -- with an error naming the file,
and its code never runs. An untouched copy, re-pickled the same way without the payload, still passes
every reader: the refusals come from the payload, not from the crafting."""

import io
import json
import pickle
import re
import shutil
import zlib
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from tools.sample import load_checkpoint_dit
from tools.sample import main as sample_main
from tools.zero_to_bf16 import merge
from train.checkpoint import Checkpointer
from train.checkpoint_verify import find_latest, resolve_resume, verify_main
from train.config import OptimConfig, ParallelConfig
from train.distributed import ParallelLayout
from train.engines import EngineSetup
from train.engines.fsdp import FSDPEngine
from train.models import DiTRecipe, DiTWeights
from wan import dit_preset

RUN_CONFIG = '[model]\npreset = "debug"\n\n[train]\nseed = 42\n'


class Touch:
    """Unpickled blindly, this creates `path`: the proof that code from the checkpoint ran."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def build_engine() -> FSDPEngine:
    recipe = DiTRecipe(config=dit_preset("debug"), weights=DiTWeights("", dit_preset("debug"), seed=42))
    optim = OptimConfig(learning_rate=1e-3)
    setup = EngineSetup(
        ParallelConfig(engine="fsdp"), optim, "fp32", 1, 1, 4, ParallelLayout.single(torch.device("cpu"))
    )
    return FSDPEngine(recipe, setup)


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory):
    """(a clean fsdp checkpoint-1 saved as the trainer saves it, the engine that saved it); the engine
    holds a private 1-rank gloo group, destroyed at the end."""
    had = dist.is_initialized()
    engine = build_engine()
    out = tmp_path_factory.mktemp("fsdp")
    checkpointer = Checkpointer(out, config_text=RUN_CONFIG, marker_info={"engine": "fsdp"})
    checkpointer.register_files("engine", engine)
    yield checkpointer.save(1), engine
    if not had and dist.is_initialized():
        dist.destroy_process_group()


def clean_index(ckpt: Path):
    # torch's own (blind) reader, on a copy of the checkpoint this module saved: trusted bytes.
    return dcp.FileSystemReader(str(ckpt / "dcp")).read_metadata()


def update_marker(ckpt: Path, *names: str) -> None:
    """COMPLETE re-listing `names` with their new sizes and crc32s, as an attacker would."""
    marker = json.loads((ckpt / "COMPLETE").read_text())
    for name in names:
        data = (ckpt / name).read_bytes()
        marker["files"][name] = {"size": len(data), "crc32": f"{zlib.crc32(data):08x}"}
    (ckpt / "COMPLETE").write_text(json.dumps(marker))


def crafted_index(clean: Path, dest: Path, payload: Path | None) -> Path:
    """A copy of `clean` whose dcp/.metadata is the real index, re-pickled plainly with `Touch(payload)`
    in a field a plain unpickle ignores (None: re-pickled unchanged)."""
    ckpt = shutil.copytree(clean, dest / clean.name)
    metadata = clean_index(ckpt)
    if payload is not None:
        metadata.planner_data = Touch(payload)
    (ckpt / "dcp" / ".metadata").write_bytes(pickle.dumps(metadata))
    update_marker(ckpt, "dcp/.metadata")
    return ckpt


def crafted_value(clean: Path, dest: Path, payload: Path) -> tuple[Path, str]:
    """A copy of `clean` where one non-tensor value (an optimizer hyperparameter, which DCP stores as a
    torch.save'd pickle) is replaced by torch.save(Touch(payload)): the bytes appended to rank 0's data
    file and the index pointed at them. Returns (checkpoint, the key)."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    ckpt = shutil.copytree(clean, dest / clean.name)
    metadata = clean_index(ckpt)
    key = next(k for k, v in metadata.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata))
    index = next(i for i in metadata.storage_data if i.fqn == key)
    info = metadata.storage_data[index]
    buffer = io.BytesIO()
    torch.save(Touch(payload), buffer)
    data_file = ckpt / "dcp" / info.relative_path
    offset = data_file.stat().st_size
    with open(data_file, "ab") as f:
        f.write(buffer.getvalue())
    info.offset, info.length = offset, len(buffer.getvalue())
    (ckpt / "dcp" / ".metadata").write_bytes(pickle.dumps(metadata))
    update_marker(ckpt, "dcp/.metadata", f"dcp/{info.relative_path}")
    return ckpt, key


def sample(ckpt: Path, out: Path) -> int:
    return sample_main(["--checkpoint", str(ckpt), "--prompt", "a cat", "--frames", "1", "--size", "32x32",
                        "--steps", "1", "--out", str(out)])  # fmt: skip


REFUSED = r"dcp/\.metadata: cannot read: refusing to unpickle pathlib\.Path\.touch"


def verify_cli(ckpt: Path, capsys) -> None:
    assert verify_main(["verify", str(ckpt)]) == 1
    assert (
        f"{ckpt}: DAMAGED\n  dcp/.metadata: cannot read: refusing to unpickle pathlib.Path.touch"
        in capsys.readouterr().out
    )


def resume_latest(ckpt: Path, capsys) -> None:  # the trainer's resume_from_checkpoint = "latest"
    assert find_latest(ckpt.parent) is None
    with pytest.raises(ValueError, match=f"(?s)no checkpoint in .* verifies:.*{REFUSED}"):
        resolve_resume(ckpt.parent, "latest")


def resume_path(ckpt: Path, capsys) -> None:  # resume_from_checkpoint = the folder
    with pytest.raises(ValueError, match=f"does not verify: .*{REFUSED}"):
        resolve_resume(ckpt.parent, str(ckpt))


def engine_load(ckpt: Path, capsys) -> None:  # the engine's own load, for a caller that skips verification
    with pytest.raises(ValueError, match=REFUSED):
        build_engine().load(ckpt)


def merge_it(ckpt: Path, capsys) -> None:
    with pytest.raises(ValueError, match=REFUSED):
        merge(ckpt, ckpt.parent.parent / "merged", log=lambda line: None)


def sample_dit(ckpt: Path, capsys) -> None:
    with pytest.raises(ValueError, match=REFUSED):
        load_checkpoint_dit(ckpt, torch.float32)


def sample_cli(ckpt: Path, capsys) -> None:
    out = ckpt.parent.parent / "samples"
    assert sample(ckpt, out) == 2
    assert re.search(REFUSED, capsys.readouterr().err)
    assert sample(ckpt.parent, out) == 2  # an output_dir: its newest checkpoint that verifies
    assert "no checkpoint-N in it verifies" in capsys.readouterr().err


@pytest.mark.parametrize(
    "reader", [verify_cli, resume_latest, resume_path, engine_load, merge_it, sample_dit, sample_cli]
)
def test_a_planted_index_is_refused_and_never_runs(fsdp, tmp_path, capsys, reader):
    payload = tmp_path / "PAYLOAD_RAN"
    ckpt = crafted_index(fsdp[0], tmp_path / "out", payload)
    reader(ckpt, capsys)
    assert not payload.exists()


def test_a_planted_value_is_refused_at_resume_and_never_runs(fsdp, tmp_path):
    clean, _ = fsdp
    payload = tmp_path / "PAYLOAD_RAN"
    ckpt, key = crafted_value(clean, tmp_path / "out", payload)
    assert verify_main(["verify", str(ckpt)]) == 0  # the index itself is DCP's own
    engine = build_engine()  # a fresh one: the refused load may have filled some of its tensors
    with pytest.raises(ValueError, match=rf"dcp/__0_0\.distcp: cannot read {key}: .*Weights only load failed"):
        engine.load(ckpt)
    assert not payload.exists()


def test_the_crafting_alone_breaks_nothing(fsdp, tmp_path):
    """The same copies without the payload pass every reader, so the refusals above are the payload's."""
    clean, engine = fsdp
    ckpt = crafted_index(clean, tmp_path / "out", None)
    assert verify_main(["verify", str(ckpt)]) == 0
    assert resolve_resume(ckpt.parent, "latest") == ckpt
    engine.load(ckpt)
    merge(ckpt, tmp_path / "merged", log=lambda line: None)
    dit = load_checkpoint_dit(ckpt, torch.float32)
    trained = engine.trainable_state()
    assert all(torch.equal(dit.state_dict()[name], tensor) for name, tensor in trained.items())
