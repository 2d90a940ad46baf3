"""Our plain-read safetensors loader against the safetensors library's own reader."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from wan.modules.safetensors_io import load_into_module, read_header


class Holder(torch.nn.Module):
    def __init__(self, tensors: dict[str, torch.Tensor]):
        super().__init__()
        for name, t in tensors.items():
            self.register_buffer(name, torch.empty(t.shape, dtype=t.dtype, device="meta"))


def sample_tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(3, 5, generator=gen),
        "bf16": torch.randn(7, generator=gen).bfloat16(),
        "f16": torch.randn(2, 2, 2, generator=gen).half(),
        "f64": torch.randn(4, generator=gen).double(),
        "i64": torch.arange(-3, 6),
        "u8": torch.arange(250, 256, dtype=torch.uint8),
        "flag": torch.tensor([True, False, True]),
        "f8": torch.randn(5, generator=gen).to(torch.float8_e4m3fn),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
    }


def test_reads_what_the_safetensors_library_reads(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file(sample_tensors(), str(path))
    expected = load_file(str(path))
    holder = Holder(expected)
    load_into_module(holder, [path])
    for name, t in expected.items():
        got = getattr(holder, name)
        assert got.dtype == t.dtype and got.shape == t.shape, name
        assert torch.equal(got.reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), name  # bitwise
        assert got.data_ptr() % 64 == 0 or got.numel() == 0, name


def test_casts_floating_tensors_only(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file({"w": torch.randn(3), "i": torch.arange(3)}, str(path))
    holder = Holder({"w": torch.zeros(3, dtype=torch.bfloat16), "i": torch.zeros(3, dtype=torch.int64)})
    load_into_module(holder, [path], dtype=torch.bfloat16)
    assert holder.w.dtype == torch.bfloat16 and holder.i.dtype == torch.int64


def test_truncated_file_names_file_and_key(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file({"a": torch.randn(10), "b": torch.randn(1000)}, str(path))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"t\.safetensors: key 'b' is truncated or corrupt"):
        read_header(path)
    path.write_bytes(b"\x00" * 4)
    with pytest.raises(ValueError, match="not a safetensors file"):
        read_header(path)
