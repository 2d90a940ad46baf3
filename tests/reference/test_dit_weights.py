"""Release folders: our writer and reader round-trip; diffusers' own writer's folders load; bad
folders are refused with messages that name the file, the key and both shapes."""

import json

import pytest
import torch
from dit_reference import build_pair, randomize, reference_forward, rel_err
from safetensors import safe_open

from wan import WanModel, dit_preset
from wan.modules.dit_weights import load_dit_weights
from wan.modules.safetensors_io import parse_size

OFFICIAL_CONFIG_FIELDS = {
    "dim",
    "eps",
    "ffn_dim",
    "freq_dim",
    "in_dim",
    "model_type",
    "num_heads",
    "num_layers",
    "out_dim",
    "text_len",
}


def random_model(preset: str, seed: int = 0) -> WanModel:
    model = WanModel(**dit_preset(preset)).eval()
    randomize(model, seed)
    return model


def sample_inputs(model: WanModel):
    gen = torch.Generator().manual_seed(0)
    i2v = model.model_type == "i2v"
    return dict(
        x=torch.randn(1, 16, 3, 4, 6, generator=gen),
        t=torch.tensor([321.0]),
        context=torch.randn(1, 9, model.config["text_dim"], generator=gen),
        clip_fea=torch.randn(1, 257, model.image_dim, generator=gen) if i2v else None,
        y=torch.randn(1, 20, 3, 4, 6, generator=gen) if i2v else None,
    )


def assert_same_model(a: WanModel, b: WanModel):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    inputs = sample_inputs(a)
    with torch.no_grad():
        assert torch.equal(a(**inputs), b(**inputs))


@pytest.mark.parametrize("preset", ["debug", "debug-i2v"])
def test_round_trip_single_file(tmp_path, preset):
    model = random_model(preset)
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["_class_name"] == "WanModel" and OFFICIAL_CONFIG_FIELDS <= config.keys()
    # image_dim is ours (tiny test CLIPs); a release-width model's config.json stays official.
    assert config.get("image_dim") == (64 if preset == "debug-i2v" else None)
    with safe_open(str(tmp_path / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(model.state_dict())  # official key names, no RoPE tables
    assert_same_model(model, WanModel.from_pretrained(tmp_path))


def test_round_trip_sharded_with_matching_index(tmp_path):
    model = random_model("debug-i2v")
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    model.save_pretrained(tmp_path, max_shard_size=total // 4)
    index = json.loads((tmp_path / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 4
    assert shards == sorted(p.name for p in tmp_path.glob("diffusion_pytorch_model-*-of-*.safetensors"))
    assert index["metadata"]["total_size"] == total
    for name in shards:  # the index says where each key really is
        with safe_open(str(tmp_path / name), "pt") as f:
            assert all(index["weight_map"][k] == name for k in f.keys())
    assert set(index["weight_map"]) == set(model.state_dict())
    assert_same_model(model, WanModel.from_pretrained(tmp_path))

    # Saving again unsharded leaves no stale shards or index behind.
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]


def test_save_bf16_and_load_in_stored_or_requested_dtype(tmp_path):
    model = random_model("debug")
    model.save_pretrained(tmp_path, dtype=torch.bfloat16)
    kept = WanModel.from_pretrained(tmp_path, dtype=None)
    assert {p.dtype for p in kept.parameters()} == {torch.bfloat16}
    assert kept.rope.cos.dtype == torch.float32
    upcast = WanModel.from_pretrained(tmp_path)  # default: float32 master weights
    for (name, p), q in zip(upcast.named_parameters(), model.parameters(), strict=True):
        assert p.dtype == torch.float32
        assert torch.equal(p, q.to(torch.bfloat16).float()), name


@pytest.mark.parametrize("preset,shard", [("debug", None), ("debug-i2v", "200KB")])
def test_diffusers_folder_loads_and_matches(tmp_path, preset, shard):
    """A folder written by diffusers' own save_pretrained (single or sharded) loads into ours."""
    ref, _ = build_pair(dit_preset(preset), seed=5)
    kwargs = {"max_shard_size": shard} if shard else {}
    ref.save_pretrained(tmp_path / "transformer", safe_serialization=True, **kwargs)
    if shard:
        assert (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors.index.json").exists()
    ours = WanModel.from_pretrained(tmp_path)  # a pipeline folder: transformer/ is found
    inputs = sample_inputs(ours)
    with torch.no_grad():
        assert rel_err(ours(**inputs), reference_forward(ref, text_len=512, **inputs)) <= 1e-4


def test_folder_without_config(tmp_path):
    with pytest.raises(ValueError, match=r"no config\.json"):
        WanModel.from_pretrained(tmp_path)


def test_missing_shard_is_named(tmp_path):
    random_model("debug").save_pretrained(tmp_path, max_shard_size="300KB")
    victim = sorted(tmp_path.glob("diffusion_pytorch_model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(ValueError, match=f"index.json names shard files that are not in .*{victim.name}"):
        WanModel.from_pretrained(tmp_path)


def test_i2v_weights_into_t2v_model_names_both_widths(tmp_path):
    random_model("debug-i2v").save_pretrained(tmp_path)
    t2v = WanModel(**dit_preset("debug"))
    with pytest.raises(ValueError) as err:
        load_dit_weights(t2v, tmp_path)
    msg = str(err.value)
    assert "diffusion_pytorch_model.safetensors: key 'patch_embedding.weight' has shape [128, 36, 1, 2, 2]" in msg
    assert "expects [128, 16, 1, 2, 2]" in msg and "i2v weights" in msg and "in_dim 16, t2v" in msg


def test_shape_and_key_problems_are_all_listed(tmp_path):
    model = random_model("debug")
    model.save_pretrained(tmp_path)
    # A config that disagrees with its weights: every mismatching tensor is listed with both shapes.
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(config, ffn_dim=192)))
    with pytest.raises(ValueError) as err:
        WanModel.from_pretrained(tmp_path)
    msg = str(err.value)
    for i in range(2):
        assert (
            f"diffusion_pytorch_model.safetensors: key 'blocks.{i}.ffn.0.weight' has shape [256, 128] in the file, the model expects [192, 128]"
            in msg
        )
        assert f"'blocks.{i}.ffn.2.weight'" in msg

    # A file with an extra key and a missing key.
    from safetensors.torch import save_file

    state = dict(model.state_dict())
    state["blocks.0.extra.weight"] = torch.zeros(3)
    del state["head.modulation"]
    save_file(state, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError) as err:
        WanModel.from_pretrained(tmp_path)
    assert "unexpected key 'blocks.0.extra.weight'" in str(err.value)
    assert "missing from diffusion_pytorch_model.safetensors: head.modulation" in str(err.value)


def test_unknown_config_field_is_refused(tmp_path):
    random_model("debug").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(config, num_head=3, window_size=[8, 8])))
    with pytest.raises(
        ValueError, match=r"config\.json: unknown field 'num_head'; window_size \[8, 8\] is not supported"
    ):
        WanModel.from_pretrained(tmp_path)


def test_parse_size():
    assert parse_size("10GB") == 10 * 10**9
    assert parse_size("1.5MiB") == int(1.5 * 2**20)
    assert parse_size(123) == 123
    with pytest.raises(ValueError, match="size"):
        parse_size("ten gigs")


def test_missing_or_invalid_config_values_name_the_file(tmp_path):
    random_model("debug").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "dim"}))
    with pytest.raises(ValueError, match=r"config\.json: missing field 'dim'"):
        WanModel.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(dict(config, model_type="flf2v")))
    with pytest.raises(ValueError, match=r"config\.json: invalid WanModel config: model_type must be"):
        WanModel.from_pretrained(tmp_path)
