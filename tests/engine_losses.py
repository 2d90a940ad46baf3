"""The per-step losses of the four engines, written down once and compared later: the record that a
move of the engine code (issue 18) changed no arithmetic.

Each engine trains 6 steps on 2 ranks in fp32 (tests/train_runs.py engine_run_args: checkpoints at 3
and 6), then a second run resumes from the first run's checkpoint-3 and trains steps 4-6. Losses are
written as float.hex, so "equal" means bit for bit.

    python tests/engine_losses.py record tests/data/engine_losses.json --keep /tmp/runs
    python tests/engine_losses.py compare tests/data/engine_losses.json [--resume_from /tmp/runs]

`--keep` leaves the runs' folders (their checkpoints) behind; `--resume_from` resumes from such a
folder written by the code of the record, which shows those checkpoints still load after a change.
"""

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from train_runs import ENGINES, engine_run_args, losses, torchrun  # noqa: E402

from tools.make_demo_data import make_demo_data  # noqa: E402


def run_engine(data: Path, root: Path, engine: str, resume_from: Path | None) -> dict[str, dict[int, str]]:
    straight = root / engine / "straight"
    torchrun(data, straight, *engine_run_args(engine), nproc=2)
    source = (resume_from or root) / engine / "straight" / "checkpoint-3"
    resumed = root / engine / "resumed"
    torchrun(data, resumed, *engine_run_args(engine), f"--resume_from_checkpoint={source}", nproc=2)
    return {
        run: {step: loss.hex() for step, loss in losses(out).items()}
        for run, out in (("straight", straight), ("resumed", resumed))
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("record", "compare"))
    parser.add_argument("file", type=Path)
    parser.add_argument("--keep", type=Path, help="leave the runs here (record)")
    parser.add_argument("--resume_from", type=Path, help="resume from the checkpoints of a kept record")
    args = parser.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="engine_losses_"))
    data = make_demo_data(root / "data").parent
    found = {engine: run_engine(data, root, engine, args.resume_from) for engine in ENGINES}
    if args.action == "record":
        args.file.write_text(json.dumps(found, indent=1) + "\n")
        print(f"wrote {args.file}")
    else:
        recorded = json.loads(args.file.read_text())
        failed = 0
        for engine, runs in found.items():
            for run, steps in runs.items():
                expected = {int(k): v for k, v in recorded[engine][run].items()}
                same = steps == expected
                failed += not same
                print(f"{engine:6} {run:8} {'bit-identical' if same else f'DIFFERS: {steps} vs {expected}'}")
        raise SystemExit(1 if failed else 0)
    if args.keep is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
