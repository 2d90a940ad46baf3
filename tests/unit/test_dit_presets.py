"""The release presets have the architecture of the published checkpoints (built on the meta device)."""

import pytest
import torch

from wan import WanModel, dit_preset


def meta_model(name: str) -> WanModel:
    with torch.device("meta"):
        return WanModel(**dit_preset(name))


def test_t2v_1_3b_has_the_release_tensor_count_and_shapes():
    state = meta_model("1.3B").state_dict()
    assert len(state) == 825  # the T2V-1.3B release file holds 825 tensors
    assert state["patch_embedding.weight"].shape == (1536, 16, 1, 2, 2)
    assert state["text_embedding.0.weight"].shape == (1536, 4096)
    assert state["time_projection.1.weight"].shape == (6 * 1536, 1536)
    assert state["blocks.29.ffn.0.weight"].shape == (8960, 1536)
    assert state["blocks.0.self_attn.norm_q.weight"].shape == (1536,)
    assert state["blocks.0.modulation"].shape == (1, 6, 1536)
    assert state["head.head.weight"].shape == (64, 1536)
    assert state["head.modulation"].shape == (1, 2, 1536)


@pytest.mark.parametrize("name,in_dim,i2v", [("14B", 16, False), ("i2v-14B", 36, True)])
def test_14b_presets(name, in_dim, i2v):
    model = meta_model(name)
    state = model.state_dict()
    assert state["patch_embedding.weight"].shape == (5120, in_dim, 1, 2, 2)
    assert "blocks.39.ffn.2.weight" in state and "blocks.40.ffn.2.weight" not in state
    assert model.blocks[0].self_attn.num_heads == 40 and model.rope.axis_pairs == (22, 21, 21)
    image_keys = {k for k in state if "img" in k}
    if i2v:
        assert {"img_emb.proj.0.weight", "img_emb.proj.4.bias", "blocks.0.cross_attn.k_img.weight",
                "blocks.0.cross_attn.norm_k_img.weight"} <= image_keys  # fmt: skip
        assert state["img_emb.proj.1.weight"].shape == (1280, 1280)
        assert state["img_emb.proj.3.weight"].shape == (5120, 1280)
    else:
        assert not image_keys
    assert sum(t.numel() for t in state.values()) == closed_form_params(d=5120, ffn=13824, in_dim=in_dim, i2v=i2v)


def closed_form_params(
    d: int, ffn: int, in_dim: int, i2v: bool, layers: int = 40, out_dim: int = 16, clip: bool = True
) -> int:
    """Parameter count from the architecture table of the spec (clip: an i2v model's image branch,
    which Wan2.2's I2V-A14B lacks)."""
    i2v = i2v and clip
    linear = lambda i, o: i * o + o  # noqa: E731
    block = (
        4 * linear(d, d) + 2 * d  # self-attention q, k, v, o + norm_q, norm_k
        + 4 * linear(d, d) + 2 * d  # cross-attention
        + (2 * linear(d, d) + d if i2v else 0)  # k_img, v_img, norm_k_img
        + 2 * d  # norm3 (affine)
        + linear(d, ffn) + linear(ffn, d)
        + 6 * d  # modulation
    )  # fmt: skip
    top = (
        in_dim * 4 * d + d  # patch embedding (1, 2, 2)
        + linear(4096, d) + linear(d, d)  # text embedding
        + linear(256, d) + linear(d, d) + linear(d, 6 * d)  # time embedding, projection
        + linear(d, 4 * out_dim) + 2 * d  # head (patch 1x2x2) + its modulation
        + ((2 * 1280 + linear(1280, 1280) + linear(1280, d) + 2 * d) if i2v else 0)  # img_emb
    )  # fmt: skip
    return layers * block + top


def test_1_3b_parameter_count():
    state = meta_model("1.3B").state_dict()
    assert sum(t.numel() for t in state.values()) == closed_form_params(
        d=1536, ffn=8960, in_dim=16, i2v=False, layers=30
    )


def test_unknown_preset_lists_the_names():
    with pytest.raises(ValueError, match="debug, debug-i2v, 1.3B, 14B, i2v-14B, t2v-A14B, i2v-A14B, ti2v-5B"):
        dit_preset("13B")


def test_wan22_presets_have_the_release_shapes():
    """Wan2.2: each A14B expert is a Wan2.1 14B network (I2V-A14B's without the CLIP branch: 36 input
    channels, no img_emb, no k_img); TI2V-5B is dim 3072, ffn 14336, 24 heads, 30 layers on 48 channels."""
    t2v, i2v, ti2v = meta_model("t2v-A14B"), meta_model("i2v-A14B"), meta_model("ti2v-5B")
    assert t2v.state_dict().keys() == meta_model("14B").state_dict().keys()
    i2v_state = i2v.state_dict()
    assert i2v.model_type == "i2v" and i2v.image_dim is None and not [k for k in i2v_state if "img" in k]
    assert i2v_state["patch_embedding.weight"].shape == (5120, 36, 1, 2, 2)
    assert sum(t.numel() for t in i2v_state.values()) == closed_form_params(
        d=5120, ffn=13824, in_dim=36, i2v=True, clip=False
    )
    state = ti2v.state_dict()
    assert ti2v.model_type == "ti2v" and ti2v.rope.axis_pairs == (22, 21, 21)  # head_dim 128
    assert state["patch_embedding.weight"].shape == (3072, 48, 1, 2, 2)
    assert state["head.head.weight"].shape == (4 * 48, 3072)
    num_params = sum(t.numel() for t in state.values())
    assert num_params == closed_form_params(d=3072, ffn=14336, in_dim=48, i2v=False, layers=30, out_dim=48)
    assert 4.9e9 < num_params < 5.1e9  # "5B"
