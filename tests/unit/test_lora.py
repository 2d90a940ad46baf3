"""The LoRA adapter (wan/modules/lora.py) against independent expectations: the base model at step 0
(B = 0), diffusers' WanTransformer3DModel with the exported file loaded through its own Wan LoRA
converter and peft (test-only), ComfyUI's loading rule for the file layout, and the merged weights."""

import re

import pytest
import torch
from reference.dit_reference import build_pair, reference_forward

from train.config import ConfigError, load_config
from train.models import build_dit_recipe
from wan import WanModel, dit_preset
from wan.modules.dit_weights import official_to_diffusers_key
from wan.modules.lora import (
    LoRALinear,
    LoRASpec,
    adapter_names,
    apply_lora,
    lora_file_tensors,
    lora_targets,
    merge_adapter_stream,
    merge_lora_file,
    read_lora_file,
)

TARGETS = ("q", "k", "v", "o", "ffn.0", "ffn.2")


def inputs(model: WanModel, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return dict(
        x=torch.randn(1, 16, 2, 4, 6, generator=gen),
        t=torch.tensor([613.0]),
        context=torch.randn(1, 7, model.config["text_dim"], generator=gen),
    )


@torch.no_grad()
def randomize_adapters(model: torch.nn.Module, seed: int) -> None:
    """Non-zero adapters (a trained one), so that a misplaced or misscaled update shows."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith((".lora_A.weight", ".lora_B.weight")):
            p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)


def test_targets_are_suffixes_of_block_linears():
    with torch.device("meta"):
        model = WanModel(**dit_preset("debug-i2v"))
    names = lora_targets(model, ["q", " k ", "ffn.0"])
    assert "blocks.0.self_attn.q" in names and "blocks.0.cross_attn.q" in names and "blocks.1.ffn.0" in names
    assert not [n for n in names if n.endswith(("k_img", "v_img", "ffn.2", ".v"))]  # "k" is not "k_img"
    assert all(n.startswith("blocks.") for n in names)  # the embeddings and head keep their float32 paths
    with pytest.raises(ValueError, match=r"matches no Linear layer.*their names end with: .*self_attn\.q"):
        apply_lora(model, LoRASpec(4, 4.0, ("attn1.to_q",)))


@pytest.mark.parametrize("mixed_precision", ["fp32", "bf16"])
def test_the_adapted_model_equals_the_base_at_step_0(mixed_precision):
    """B starts at zero: the adapted DiT's output is the base's, exactly (fp32; and under bf16, where the
    frozen base is held in bf16, the base held in bf16 alike)."""
    cfg = load_config(["--cfg", "configs/debug.toml", "--rank=4", f"--mixed_precision={mixed_precision}"])
    recipe = build_dit_recipe(cfg.model, seed=3, lora=cfg.lora.spec, mixed_precision=mixed_precision)
    model = recipe.materialize(torch.device("cpu"))
    torch.manual_seed(3)
    base = WanModel(**dit_preset("debug"))
    frozen = torch.bfloat16 if mixed_precision == "bf16" else torch.float32
    base.to(frozen)
    base.rope.reset_tables(torch.device("cpu"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert (
        trainable == set(adapter_names(model)) and len(trainable) == 2 * 8 * 2
    )  # 2 blocks x (q, k, v twice, ffn.0, ffn.2) x (A, B)
    assert {p.dtype for n, p in model.named_parameters() if n not in trainable} == {frozen}
    assert {p.dtype for n, p in model.named_parameters() if n in trainable} == {torch.float32}
    assert all(model.get_parameter(n).abs().sum() > 0 for n in trainable if "lora_A" in n)
    with torch.no_grad():
        torch.nn.init.normal_(model.head.head.weight, std=0.02)  # the init's zero head would hide the blocks
        base.head.head.weight.copy_(model.head.head.weight)
        x = inputs(base)
        assert torch.equal(model(**x), base(**x))


def test_the_same_adapter_starts_alike_whatever_builds_it():
    """Every engine fills the adapter from DiTWeights.read: the same values by name, from the seed."""
    cfg = load_config(["--cfg", "configs/debug.toml", "--rank=4", "--init=gaussian"])
    a = build_dit_recipe(cfg.model, 5, cfg.lora.spec).materialize(torch.device("cpu")).state_dict()
    b = build_dit_recipe(cfg.model, 5, cfg.lora.spec).materialize(torch.device("cpu")).state_dict()
    c = build_dit_recipe(cfg.model, 6, cfg.lora.spec).materialize(torch.device("cpu")).state_dict()
    name = "blocks.1.ffn.2.lora_A.weight"
    assert torch.equal(a[name], b[name]) and not torch.equal(a[name], c[name])
    assert a[name].std().item() == pytest.approx(1 / 4, rel=0.2)  # gaussian: std 1 / rank


def test_config_refuses_bad_lora_settings_together(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(["--cfg", "configs/debug.toml", "--rank=-1", "--network_alpha=0", "--dropout=1.5", "--init=pissa"])
    text = str(err.value)
    for expected in (
        "rank must be >= 0",
        "network_alpha must be > 0",
        "dropout must be in [0, 1)",
        "init must be one of",
    ):
        assert expected in text
    with pytest.raises(ConfigError, match="trains the adapter only"):
        load_config(["--cfg", "configs/debug.toml", "--rank=4", "--trainable_modules", "ffn"])


@pytest.fixture(scope="module")
def trained():
    """A diffusers WanTransformer3DModel and our DiT with the same random weights, ours with a trained
    (random, non-zero) adapter on every target, rank 4, alpha 8."""
    ref, ours = build_pair(dit_preset("debug"), seed=11)
    spec = LoRASpec(4, 8.0, TARGETS)
    apply_lora(ours, spec)
    randomize_adapters(ours, seed=12)
    return ref, ours.eval(), spec


def test_the_exported_file_loads_in_diffusers_and_gives_our_output(trained, tmp_path):
    """The file as tools/export_lora.py writes it, loaded the way a diffusers user loads a Wan LoRA
    (WanPipeline.lora_state_dict converts the non-diffusers layout, then peft injects it)."""
    from diffusers import WanPipeline  # its LoRA loading needs peft (a test dependency)
    from safetensors.torch import save_file

    ref, ours, spec = trained
    adapters = {n: p.detach() for n, p in ours.named_parameters() if n in adapter_names(ours)}
    path = tmp_path / "lora.safetensors"
    save_file(lora_file_tensors(adapters, spec.alpha), path)
    x = inputs(ours)
    with torch.no_grad():
        without = reference_forward(ref, text_len=ours.text_len, **x)
        state = WanPipeline.lora_state_dict(str(path))
        ref.load_lora_adapter(state, prefix="transformer", adapter_name="ours")
        expected = reference_forward(ref, text_len=ours.text_len, **x)
        got = ours(**x)
        scales = {m: m.lora_scale for m in ours.modules() if isinstance(m, LoRALinear)}
        for m in scales:
            m.lora_scale = 0.0
        base = ours(**x)
        for m, scale in scales.items():
            m.lora_scale = scale
    assert (expected - without).abs().max() > 1e-2  # the adapter changes the output
    # Every adapted layer alone: diffusers' (peft) layer gives ours within 1e-5.
    gen = torch.Generator().manual_seed(5)
    layers = [n for n, m in ours.named_modules() if isinstance(m, LoRALinear)]
    assert len(layers) == 2 * 10
    for layer in layers:
        theirs = ref.get_submodule(official_to_diffusers_key(f"{layer}.weight").removesuffix(".weight"))
        assert "ours" in getattr(theirs, "lora_A", {}), layer  # peft injected it there
        mine = ours.get_submodule(layer)
        h = torch.randn(3, mine.in_features, generator=gen)
        with torch.no_grad():
            torch.testing.assert_close(mine(h), theirs(h), rtol=0, atol=1e-5, msg=layer)
    # The whole DiT: the two base models agree to float32 summation order only (1.3e-5 of outputs up to
    # 3.6 here, measured), and so do the adapted ones and the adapters' effect on the output.
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=3e-5)
    torch.testing.assert_close(got - base, expected - without, rtol=0, atol=3e-5)


def test_the_file_layout_is_comfyuis(trained, tmp_path):
    """ComfyUI's Wan LoRA layout: `diffusion_model.<layer>` + `.lora_A.weight` (down) / `.lora_B.weight`
    (up) / `.alpha`, <layer> a Linear weight of the official state dict less `.weight`; ComfyUI applies
    W + strength x alpha / rank x up @ down (comfy/lora.py: the "diffusers2" names, alpha / down rows)."""
    from safetensors.torch import save_file

    _, ours, spec = trained
    adapters = {n: p.detach() for n, p in ours.named_parameters() if n in adapter_names(ours)}
    tensors = lora_file_tensors(adapters, spec.alpha)
    layers = {n.removesuffix(".weight") for n, p in ours.state_dict().items() if p.ndim == 2}
    pattern = re.compile(r"diffusion_model\.(.+)\.(lora_A\.weight|lora_B\.weight|alpha)")
    seen = set()
    for key in tensors:
        match = pattern.fullmatch(key)
        assert match and match.group(1) in layers, key
        seen.add(match.group(1))
    assert len(tensors) == 3 * len(seen) == 3 * 2 * 10  # 2 blocks x (q, k, v, o twice, ffn.0, ffn.2)
    # ComfyUI's rule, applied to a plain copy of the base weights, gives our adapted output.
    plain = WanModel(**ours.config).eval()
    plain.load_state_dict({k: v for k, v in ours.state_dict().items() if "lora_" not in k})
    with torch.no_grad():
        for layer in seen:
            up, down = (
                tensors[f"diffusion_model.{layer}.lora_B.weight"],
                tensors[f"diffusion_model.{layer}.lora_A.weight"],
            )
            alpha = tensors[f"diffusion_model.{layer}.alpha"].item()
            plain.get_parameter(f"{layer}.weight").add_(alpha / down.shape[0] * (up @ down))
        x = inputs(ours, seed=1)
        torch.testing.assert_close(plain(**x), ours(**x), rtol=0, atol=1e-5)
    # merge_lora_file (tools/sample.py --lora) reads the file back to the same weights.
    path = tmp_path / "lora.safetensors"
    save_file(tensors, path)
    assert set(read_lora_file(path)) == seen
    again = WanModel(**ours.config).eval()
    again.load_state_dict({k: v for k, v in ours.state_dict().items() if "lora_" not in k})
    assert merge_lora_file(again, path) == len(seen)
    for name, value in plain.state_dict().items():
        torch.testing.assert_close(again.state_dict()[name], value, rtol=0, atol=1e-6)


def test_merged_weights_give_base_plus_adapter(trained):
    """The streamed merge (consolidated saves) folds every adapter into its weight: the plain DiT with
    those weights gives the adapted model's output within 1e-5."""
    _, ours, spec = trained
    merged = dict(merge_adapter_stream(ours.state_dict().items(), spec.scale))
    assert not [n for n in merged if "lora_" in n]
    plain = WanModel(**ours.config).eval()
    assert list(merged) == list(plain.state_dict())  # the plain DiT's names, in its order
    plain.load_state_dict(merged)
    x = inputs(ours, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(plain(**x), ours(**x), rtol=0, atol=1e-5)
    assert isinstance(ours.blocks[0].ffn[0], LoRALinear) and not isinstance(plain.blocks[0].ffn[0], LoRALinear)
