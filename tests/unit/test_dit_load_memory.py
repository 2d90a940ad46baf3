"""from_pretrained holds one copy of the model in host memory, not two.

Measured in a fresh process, as the growth of its peak resident set during the load. A naive load (a materialised model, then
load_state_dict of the whole file) is measured the same way as a control, so the test shows that
the measurement can see a second copy. The measure is the kernel's peak resident set (VmHWM),
which counts mmapped file pages as well as tensors.
"""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from wan import WanModel, dit_preset

PROBE = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from safetensors.torch import load_file
    from wan import WanModel

    def status(field):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

    folder, mode = sys.argv[1], sys.argv[2]
    cfg = json.loads((Path(folder) / "config.json").read_text())
    cfg.pop("_class_name")
    WanModel(**dict(cfg, num_layers=1)).state_dict()  # one-time lazy initialisation of torch
    Path("/proc/self/clear_refs").write_text("5")  # peak resident set := current
    base = status("VmRSS")
    if mode == "ours":
        model = WanModel.from_pretrained(folder)
    else:
        model = WanModel(**cfg)
        model.load_state_dict(load_file(str(Path(folder) / "diffusion_pytorch_model.safetensors")))
    print(json.dumps({"growth": status("VmHWM") - base}))
    """
)


def peak_growth(folder: Path, mode: str) -> int:
    env = {"PYTHONPATH": str(Path(__file__).resolve().parents[2]), "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "PATH": "/usr/bin:/bin"}  # fmt: skip
    out = subprocess.run([sys.executable, "-c", PROBE, str(folder), mode], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])["growth"]


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_load_holds_one_copy(tmp_path):
    model = WanModel(**dict(dit_preset("debug"), dim=512, ffn_dim=2048, num_layers=8, text_dim=512))
    model.save_pretrained(tmp_path)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert model_bytes > 100 * 2**20
    naive = peak_growth(tmp_path, "naive")
    ours = peak_growth(tmp_path, "ours")
    assert naive > 1.8 * model_bytes, (naive, model_bytes)  # the control sees two copies
    assert ours < 1.25 * model_bytes, (ours, model_bytes)
