"""FLOPs, MFU logging, the memory planner and the GPU step benchmark (issue 13, items 4-6)."""

import subprocess
import sys

import pytest
import torch.distributed as dist
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from train_runs import REPO, base_args, data

from train.config import ModelConfig, load_config
from train.distributed import ParallelLayout
from train.flops import forward_flops, micro_batch_flops, peak_tflops, step_flops
from train.main import Trainer
from wan import dit_preset
from wan.modules.checkpointing import ActivationCheckpointing

__all__ = ["data"]  # a fixture


def reference_forward_flops(c: dict, s: int, b: int = 1) -> float:
    """The forward count written out again, independently of train/flops.py (t2v)."""
    d, f, n, text = c["dim"], c["ffn_dim"], c["num_layers"], c["text_len"]
    block = 4 * s * d * d + 2 * s * s * d + 2 * s * d * d + 2 * text * d * d + 2 * s * text * d + 2 * s * d * f
    rest = s * c["in_dim"] * 4 * d + text * (c["text_dim"] * d + d * d) + c["freq_dim"] * d + 7 * d * d
    return 2.0 * b * (n * block + rest + s * d * 4 * c["out_dim"])


def test_forward_flops_matches_an_independent_count_and_checkpointing_adds_recompute():
    c = dit_preset("1.3B")
    s = 21 * 30 * 52
    assert forward_flops(c, 2, (21, 60, 104)) == pytest.approx(reference_forward_flops(c, s, 2), rel=1e-12)
    none = step_flops(c, 1, (21, 60, 104))
    full = step_flops(c, 1, (21, 60, 104), ActivationCheckpointing("full"))
    every2 = step_flops(c, 1, (21, 60, 104), ActivationCheckpointing("full", every=2))
    selective = step_flops(c, 1, (21, 60, 104), ActivationCheckpointing("selective"))
    matmuls = step_flops(c, 1, (21, 60, 104), ActivationCheckpointing("selective", save_matmuls=True))
    assert none.model == full.model == 3 * none.forward and none.recompute == 0 == matmuls.recompute
    assert 0.99 * none.forward < full.recompute < none.forward  # the blocks are ~all of a forward
    assert every2.recompute == pytest.approx(full.recompute / 2)
    assert 0 < selective.recompute < full.recompute
    i2v = dit_preset("i2v-14B")
    assert forward_flops(i2v, 1, (21, 60, 104)) > forward_flops(dit_preset("14B"), 1, (21, 60, 104))


def test_micro_batch_flops_reads_the_model_sections_checkpoint_policy():
    c, x0 = dit_preset("1.3B"), (2, 16, 21, 60, 104)
    m = ModelConfig(gradient_checkpointing="selective", gradient_checkpointing_every=3)
    assert m.checkpoint_policy == ActivationCheckpointing("selective", every=3)
    assert micro_batch_flops(c, x0, m) == step_flops(c, 2, (21, 60, 104), m.checkpoint_policy)
    assert micro_batch_flops(c, x0).recompute == 0 < micro_batch_flops(c, x0, m).recompute


def test_peak_tflops_by_name_override_and_cpu():
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA H200") == 989.4
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops("NVIDIA L40S") == 362.05
    assert peak_tflops("NVIDIA L4") == 121.0
    assert peak_tflops("NVIDIA RTX A6000") == 154.8
    assert peak_tflops("NVIDIA GeForce RTX 4090") == 165.2
    assert peak_tflops("NVIDIA H100 80GB HBM3", override=500.0) == 500.0
    assert peak_tflops(None) is None and peak_tflops("Some Future GPU") is None
    assert peak_tflops(None, override=0.01) == 0.01


def test_cpu_run_logs_mfu_tflops_and_tokens_per_gpu(data, tmp_path):
    out = tmp_path / "run"
    cfg = load_config([*base_args(data, out), "--max_train_steps=3", "--peak_tflops=0.01",
                       "--gradient_checkpointing=none", "--checkpointing_steps=0"])  # fmt: skip
    Trainer(cfg).train()
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    scalars = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}
    assert sorted(scalars["perf/mfu"]) == [1, 2, 3]
    c = dit_preset("debug")
    for step in (1, 2, 3):
        step_time = scalars["train/step_time_s"][step]
        tokens = round(scalars["train/tokens_per_s_global"][step] * step_time)  # batch 1, one rank: S tokens
        flops = 3 * reference_forward_flops(c, tokens)
        assert scalars["perf/tflops"][step] == pytest.approx(flops / step_time / 1e12, rel=1e-4)
        assert scalars["perf/mfu"][step] == pytest.approx(flops / step_time / 1e12 / 0.01, rel=1e-4)
        assert scalars["perf/tokens_per_s_per_gpu"][step] == pytest.approx(tokens / step_time, rel=1e-4)


def _measured_step(cfg, latent):
    """One real training step of the debug DiT on the configured engine (1 process): (model states as the
    engine holds them, activation bytes). Activations measured = the unique storages autograd saves
    during the forward and the loss (saved_tensors_hooks; parameters excluded) plus the inputs kept by
    each checkpointed block (its forward pre-hook's x), deduplicated by storage."""
    import torch

    from train.engines import EngineSetup, build_engine
    from train.inputs import condition_first_frame
    from train.models import build_dit_recipe

    setup = EngineSetup(
        parallel=cfg.parallel, optim=cfg.optim, mixed_precision=cfg.train.mixed_precision, micro_batch_size=1,
        accumulation_steps=1, total_steps=10, layout=ParallelLayout.single(torch.device("cpu")),
    )  # fmt: skip
    engine = build_engine(build_dit_recipe(cfg.model, 0, cfg.lora.spec, cfg.train.mixed_precision), setup)
    module = engine.module
    params = {p.untyped_storage()._cdata for p in module.parameters()}
    storages = {}

    def keep(t):
        s = t.untyped_storage()
        if s._cdata not in params:
            storages.setdefault(s._cdata, s)
        return t

    def keep_input(_, args):
        keep(args[0])

    hooks = [
        b.register_forward_pre_hook(keep_input) for i, b in enumerate(module.blocks) if i in module.checkpointed_blocks
    ]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, module.out_dim, *latent, generator=g)
    context = torch.randn(1, 512, 64, generator=g)
    t = torch.tensor([500.0])
    if cfg.model.train_mode == "ti2v":  # a timestep per token, the first frame's at 0 (train/inputs.py)
        _, t, _ = condition_first_frame(x, x, t)
    with engine.micro_step(last=True):
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            pred = engine.forward(x, t, context)
            loss = (pred.float() - x).square().mean()
        activations = sum(s.nbytes() for s in storages.values())
        for h in hooks:
            h.remove()
        engine.backward(loss)
    engine.step()
    states = engine.model_state_bytes()
    return sum(v for k, v in states.items() if k != "buffers"), activations


@pytest.fixture
def own_process_group():
    """An in-process fsdp run makes a private 1-rank process group: destroy it after the test, so that
    later in-process tests (DeepSpeed's, which set up their own) start without one."""
    had = dist.is_initialized()
    yield
    if not had and dist.is_initialized():
        dist.destroy_process_group()


@pytest.mark.parametrize(
    ("engine", "mode", "lora"),
    [("ddp", "none", 0), ("ddp", "full", 0), ("fsdp", "full", 0), ("ddp", "full", 8), ("fsdp", "full", 8),
     ("ddp", "ti2v", 0), ("fsdp", "ti2v", 0)],
)  # fmt: skip
@pytest.mark.usefixtures("own_process_group")
def test_planner_matches_measured_states_and_activations_on_the_debug_preset(data, tmp_path, engine, mode, lora):
    """train.plan's formulas against what one step holds; with LoRA (rank 8), a bf16 frozen base and an
    fp32 adapter with its gradients and AdamW state; "ti2v": Wan2.2 TI2V's per-token timesteps (the debug
    ti2v DiT, no checkpointing: every block's per-token modulation saved)."""
    from train.plan import activation_bytes, data_buckets, dit_config, model_state_bytes, param_counts

    ti2v = ["--preset=debug-ti2v", "--train_mode=ti2v", "--bucket_side_multiple=32", "--gradient_checkpointing=none"]
    cfg = load_config([*base_args(data, tmp_path), "--mixed_precision=bf16", f"--engine={engine}",
                       *(ti2v if mode == "ti2v" else [f"--gradient_checkpointing={mode}"]), f"--rank={lora}"])  # fmt: skip
    config, _ = dit_config(cfg)
    counts = param_counts(cfg, config)
    bucket = data_buckets(cfg)[0]  # the largest video bucket of the debug data options
    planned_states = sum(v for k, v in model_state_bytes(cfg, counts, gpus=1).items() if k != "host")
    planned = activation_bytes(cfg, config, counts, 1, bucket.latent()).saved
    states, activations = _measured_step(cfg, bucket.latent())
    assert planned_states == pytest.approx(states, rel=0.15), (planned_states, states)
    if engine == "ddp":  # fsdp's gathered bf16 parameters are saved too (and freed by FSDP after forward)
        assert planned == pytest.approx(activations, rel=0.15), (planned, activations)


def test_planner_cli_prints_a_table_with_verdicts(capsys):
    from train.plan import main

    main(["--cfg", str(REPO / "configs/14b_zero3.toml"), "--gpus", "8", "--gpu_memory", "80GB"])
    out = capsys.readouterr().out
    assert "| video | 256 | 81 |" in out and "| fits |" in out
    main(["--cfg", str(REPO / "configs/14b_zero3.toml"), "--gpus", "8", "--gpu_memory", "24GB",
          "--gradient_checkpointing=none"])  # fmt: skip
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out and 'gradient_checkpointing = "full"' in out


@pytest.mark.slow  # ~25 s: imports diffusers and builds both models per row
def test_gpu_step_bench_quick_cpu_table():
    out = subprocess.run(
        [sys.executable, "bench/gpu_step.py", "--quick"], cwd=REPO, capture_output=True, text=True, timeout=300,
        check=True,
    ).stdout  # fmt: skip
    assert "| width | size | impl | checkpointing |" in out
    assert "| toy-1.3B | toy-480p | ours | selective | off |" in out and "| diffusers | full |" in out
    row = next(line for line in out.splitlines() if "| toy-1.3B | toy-480p | ours | selective | off |" in line)
    cells = [c.strip() for c in row.strip("|").split("|")]
    # the ratio is of unrounded times; the table's seconds have 4 significant digits
    assert float(cells[6]) == pytest.approx(float(cells[5]) / diffusers_full_seconds(out), rel=0.01, abs=0.01)


def diffusers_full_seconds(table: str) -> float:
    row = next(line for line in table.splitlines() if "| toy-1.3B | toy-480p | diffusers | full | off |" in line)
    return float(row.strip("|").split("|")[5])
