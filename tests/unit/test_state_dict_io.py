"""Reading torch.save'd state dicts: good files load strictly, bad files are refused by name."""

import pickle

import pytest
import torch

from wan.modules.state_dict_io import load_pth, load_state_dict_into


def test_round_trip_into_meta_module(tmp_path):
    source = torch.nn.Linear(3, 4)
    torch.save(source.state_dict(), tmp_path / "w.pth")
    with torch.device("meta"):
        target = torch.nn.Linear(3, 4)
    load_state_dict_into(target, load_pth(tmp_path / "w.pth"), tmp_path / "w.pth", dtype=torch.bfloat16)
    assert target.weight.dtype == torch.bfloat16 and not target.weight.is_meta
    assert torch.equal(target.weight, source.weight.detach().bfloat16())


def test_wrong_keys_and_shapes_are_listed(tmp_path):
    torch.save({"weight": torch.zeros(4, 2), "extra": torch.zeros(1)}, tmp_path / "w.pth")
    with pytest.raises(ValueError) as err:
        load_state_dict_into(torch.nn.Linear(3, 4), load_pth(tmp_path / "w.pth"), tmp_path / "w.pth")
    msg = str(err.value)
    assert "w.pth: key 'weight' has shape [4, 2] in the file, the model expects [4, 3]" in msg
    assert "w.pth: unexpected key 'extra'" in msg and "missing from w.pth: bias" in msg


@pytest.mark.parametrize(
    "content,message",
    [
        ("truncated", "not a readable torch state dict"),
        ("text", "not a readable torch state dict"),
        ("list", "holds a list, not a state dict"),
        ("nested", "entries that are not tensors: config"),
        ("object", "not a readable torch state dict"),
    ],
)
def test_bad_files_are_refused(tmp_path, content, message):
    path = tmp_path / "bad.pth"
    if content == "truncated":
        torch.save({"w": torch.randn(1000)}, path)
        path.write_bytes(path.read_bytes()[:2000])
    elif content == "text":
        path.write_text("not a checkpoint")
    elif content == "list":
        torch.save([torch.zeros(1)], path)
    elif content == "nested":
        torch.save({"w": torch.zeros(1), "config": {"dim": 3}}, path)
    else:  # an arbitrary pickled object: weights_only refuses to build it
        with open(path, "wb") as f:
            pickle.dump(torch.nn.Linear(2, 2), f)
    with pytest.raises(ValueError, match=message):
        load_pth(path)


def test_missing_file():
    with pytest.raises(ValueError, match="no such file"):
        load_pth("/nonexistent/Wan2.1_VAE.pth")
