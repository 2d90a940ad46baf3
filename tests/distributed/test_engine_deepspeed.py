"""The DeepSpeed ZeRO-2 / ZeRO-3 engine: its config builder (no processes), and 2 gloo ranks training the
debug DiT against the DDP engine on the same batches (tests/distributed/deepspeed_engine_worker.py runs every
scenario once per engine; the tests below check what it measured)."""

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from deepspeed_engine_worker import LR, STEPS, setup
from ranks import free_port, outputs, run_ranks

from train.engines.deepspeed import deepspeed_config
from train.engines.deepspeed_config import generated_config

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("deepspeed_engine_worker.py")


# ----------------------------------------------------------------------------------------------------
# The config builder


def test_generated_config_zero2():
    s = setup("zero2", mixed="bf16", accumulation=3, micro=2)
    s.optim.max_grad_norm = 0.5
    s.parallel.offload_optimizer = True
    config = deepspeed_config(s, world_size=4)
    assert config["train_micro_batch_size_per_gpu"] == 2
    assert config["gradient_accumulation_steps"] == 3
    assert config["train_batch_size"] == 2 * 3 * 4
    assert config["bf16"] == {"enabled": True}
    assert config["fp16"] == {"enabled": False}
    assert config["communication_data_type"] == "fp32"
    assert config["gradient_clipping"] == 0.5
    assert config["zero_force_ds_cpu_optimizer"] is False
    assert config["wall_clock_breakdown"] is False and config["steps_per_print"] > 10**12
    assert config["zero_optimization"] == {
        "stage": 2,
        "reduce_bucket_size": 200_000,
        "allgather_bucket_size": 200_000,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "offload_optimizer": {"device": "cpu"},
    }


def test_generated_config_zero3():
    s = setup("zero3")
    s.parallel.offload_param = True
    s.parallel.stage3_max_live_parameters = 123
    config = generated_config(s, world_size=2)
    assert config["bf16"] == {"enabled": False} and "communication_data_type" not in config
    assert config["train_batch_size"] == 2
    zero = config["zero_optimization"]
    assert zero["stage"] == 3 and "allgather_bucket_size" not in zero and "offload_optimizer" not in zero
    assert zero["offload_param"] == {"device": "cpu"}
    assert zero["stage3_prefetch_bucket_size"] == 200_000
    assert zero["stage3_param_persistence_threshold"] == 0
    assert zero["stage3_max_live_parameters"] == 123
    assert zero["memory_efficient_linear"] is False


def test_deepspeed_config_file_wins_and_is_reported(tmp_path):
    path = tmp_path / "ds.json"
    override = {
        "zero_optimization": {"reduce_bucket_size": 123, "overlap_comm": True, "round_robin_gradients": True},
        "gradient_clipping": 2.0,
        "train_micro_batch_size_per_gpu": 1,  # equal to ours: allowed, not reported
        "steps_per_print": 10,
    }
    path.write_text(json.dumps(override))
    s = setup("zero2")
    s.parallel.deepspeed_config = str(path)
    lines = []
    config = deepspeed_config(s, world_size=2, report=lines.append)
    assert config["zero_optimization"]["reduce_bucket_size"] == 123
    assert config["zero_optimization"]["round_robin_gradients"] is True
    assert config["zero_optimization"]["allgather_bucket_size"] == 200_000  # deep merge keeps the rest
    assert config["gradient_clipping"] == 2.0 and config["steps_per_print"] == 10
    assert sorted(lines) == sorted(
        [
            f"deepspeed_config {path}: zero_optimization.reduce_bucket_size: 200000 -> 123",
            f"deepspeed_config {path}: zero_optimization.round_robin_gradients: (unset) -> true",
            f"deepspeed_config {path}: gradient_clipping: 1.0 -> 2.0",
            f"deepspeed_config {path}: steps_per_print: {2**62} -> 10",
        ]
    )


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "no such file"),
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"gradient_accumulation_steps": 4}', "gradient_accumulation_steps = 4 conflicts"),
        ('{"zero_optimization": {"stage": 3}}', r"zero_optimization.stage = 3 conflicts .* \[parallel\] engine"),
        ('{"bf16": {"enabled": true}}', r"bf16.enabled = True conflicts .* \[train\] mixed_precision"),
        ('{"fp16": {"enabled": true}}', r"fp16.enabled = True conflicts .* \[train\] mixed_precision"),
        ('{"optimizer": {"type": "Adam"}}', r"'optimizer' is not supported; set \[optim\]"),
        ('{"checkpoint": {"load_universal": true}}', "checkpoint.load_universal = True is refused: .* unpickle"),
    ],
)
def test_deepspeed_config_file_refused(tmp_path, content, message):
    path = tmp_path / "ds.json"
    if content is not None:
        path.write_text(content)
    s = setup("zero2")
    s.parallel.deepspeed_config = str(path)
    with pytest.raises(ValueError, match=f"deepspeed_config {path}: .*{message}"):
        deepspeed_config(s, world_size=2)


# ----------------------------------------------------------------------------------------------------
# Two gloo ranks


@pytest.fixture(scope="module", params=["zero2", "zero3"])
def run(request, tmp_path_factory) -> tuple[str, list[dict], Path]:
    """Both ranks' measurements for one engine (the worker runs once per engine, ~10 s)."""
    engine = request.param
    out = tmp_path_factory.mktemp(engine)
    port = free_port()
    procs = run_ranks(lambda r: [str(WORKER), str(out), engine, str(r), "2", str(port)])
    results = [
        json.loads((out / f"rank_{r}.json").read_text()) if (out / f"rank_{r}.json").exists() else {} for r in (0, 1)
    ]
    errors = [r.get("error") for r in results if r.get("error")]
    if [p.returncode for p in procs] != [0, 0] or errors:
        pytest.fail("\n".join(errors) or outputs(procs))
    return engine, results, out


@pytest.mark.slow
def test_matches_ddp(run):
    """6 fp32 steps (warmup then linear lr decay; norms ~0.29 under max_grad_norm 1) on the same per-rank
    batches as the DDP engine. Measured: losses bitwise equal; weights bitwise equal under zero2, within
    1.2e-7 (an ulp of weights ~1) under zero3, whose gathered parameter buffers and autograd hooks give
    some gradients last-bit differences (first seen at step 3, in text_embedding's gradients)."""
    engine, results, _ = run
    for res in results:
        assert res["loss_rel_vs_ddp"] <= 1e-6, res["loss_rel_vs_ddp"]
        assert res["weights_vs_ddp"]["max_rel"] <= 1e-6, res["weights_vs_ddp"]
        if engine == "zero2":
            assert res["weights_vs_ddp"]["bitwise"], res["weights_vs_ddp"]
        assert [s["lr"] for s in res["ds"]] == [s["lr"] for s in res["ddp"]]
        assert res["ds"][2]["lr"] == LR  # the schedule reaches ZeRO's update (else the weights would differ)
        assert all(s["updated"] for s in res["ds"])
        for ds, ddp in zip(res["ds"], res["ddp"], strict=True):  # DeepSpeed's global norm (an fp64 sum)
            assert ds["grad_norm"] == pytest.approx(ddp["grad_norm"], rel=1e-6)
    assert results[0]["ds"][0]["loss"] != results[1]["ds"][0]["loss"]  # ranks saw different batches


@pytest.mark.slow
def test_clipping_matches_ddp(run):
    """max_grad_norm 0.05 against norms ~0.29: DeepSpeed's gradient_clipping clips like DDP's
    clip_grad_norm_. The clip factors differ in the last bit (fp64 vs fp32 norm), which AdamW turns into
    ~1e-7 weight differences (measured 3e-8 zero3, 6e-8 zero2) against a 1e-3 effect of clipping itself."""
    _, results, _ = run
    for res in results:
        assert all(s["grad_norm"] > 0.05 for s in res["ds_clipped"])
        assert res["clipped_loss_rel_vs_ddp"] <= 1e-6
        assert res["clipped_weights_vs_ddp"]["max_abs"] <= 1e-6, res["clipped_weights_vs_ddp"]
        assert res["clipping_effect_in_ddp"]["max_abs"] > 1e-4, res["clipping_effect_in_ddp"]


@pytest.mark.slow
def test_resume_is_bitwise(run):
    """Save after step 3, a fresh engine loads it and trains steps 4-6: the same losses, lrs and
    weights as the uninterrupted run, bit for bit."""
    _, results, _ = run
    for res in results:
        assert res["resume_losses_bitwise"], (res["resumed"], res["ds"][3:])
        assert res["resume_lrs_equal"]
        assert res["resume_weights"]["bitwise"], res["resume_weights"]


@pytest.mark.slow
def test_save_claims_every_file_once(run):
    engine, results, _ = run
    claimed = [f for res in results for f in res["saved_files"]]
    assert sorted(claimed) == sorted(set(claimed)) == results[0]["ckpt_listing"]  # nothing unclaimed
    model = "zero_pp_rank_{r}_mp_rank_00_model_states.pt" if engine == "zero3" else "mp_rank_00_model_states.pt"
    for rank, res in enumerate(results):
        mine = {f"deepspeed/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"}
        if engine == "zero3" or rank == 0:
            mine.add(f"deepspeed/{model.format(r=rank)}")
        if rank == 0:
            mine.add("scheduler.json")
        assert set(res["saved_files"]) == mine


@pytest.mark.slow
def test_bf16_checkpoint_round_trip(run):
    """bf16: the optimizer files carry DeepSpeed's bf16_ prefix; a fresh engine gets the same fp32 master
    weights and the same bf16 module back; an fp32 run refuses the checkpoint, saying why."""
    engine, results, out = run
    for rank, res in enumerate(results):
        assert f"deepspeed/bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" in res["bf16_saved_files"]
        assert res["bf16_resume_master"]["bitwise"], res["bf16_resume_master"]
        assert res["bf16_resume_forward_equal"]
        assert res["precision_error"].startswith(f"{out / 'ckpt_bf16' / 'deepspeed'}: saved by a {engine} run with ")
        assert "mixed_precision bf16; this run is engine" in res["precision_error"]


@pytest.mark.slow
def test_non_finite_gradients_skip_the_update_on_every_rank(run):
    """A NaN loss on rank 1 only: neither rank updates, both report it, the schedule still advances,
    and the next step trains normally."""
    _, results, _ = run
    assert results[1]["nan_step"]["loss"] != results[1]["nan_step"]["loss"]  # NaN
    for res in results:
        assert res["nan_step"]["updated"] is False
        assert res["nan_step"]["grad_norm"] == float("inf")
        assert res["nan_weights_unchanged"]
        assert res["after_nan_step"]["updated"] is True
        assert res["after_nan_step"]["grad_norm"] < float("inf")
        assert res["after_nan_weights_changed"]
        assert res["after_nan_step"]["lr"] < res["nan_step"]["lr"]  # linear decay went on


@pytest.mark.slow
def test_incomplete_or_foreign_checkpoint_is_refused(run):
    _, results, out = run
    for res in results:
        missing = out / "broken" / "deepspeed" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
        assert res["broken_error"].startswith(f"{missing}: missing from the checkpoint"), res["broken_error"]
        assert "rank 2 (zero_pp_rank_2_*)" in res["extra_error"] and "tied to the world size" in res["extra_error"]


@pytest.mark.slow
def test_accumulation_equals_one_big_batch(run):
    """2 micro-batches of 1 (engine.backward divides by 2) give the gradients of one batch of 2."""
    _, results, _ = run
    for res in results:
        assert res["accumulation_losses_rel"] < 1e-6
        acc, big = res["accumulation_grad_norms"]
        assert acc == pytest.approx(big, rel=1e-4)
        assert res["accumulation_weights"]["max_abs"] < 1e-6, res["accumulation_weights"]


@pytest.mark.slow
def test_offload_and_gradient_checkpointing(run):
    """offload_optimizer (and offload_param under zero3) with our torch AdamW on the host, and
    gradient checkpointing, train like DDP (measured: losses bitwise, weights bitwise / 4e-9)."""
    _, results, _ = run
    for res in results:
        assert res["offload_losses_rel"] <= 1e-6
        assert res["offload_weights"]["max_rel"] <= 1e-6, res["offload_weights"]


@pytest.mark.slow
def test_model_state_bytes(run):
    """Against DDP's 4 (fp32 weights) + 4 (grads) + 8 (AdamW) bytes per trainable element on every rank.
    Measured per element at 2 ranks: zero3 bf16 1 + 1 + 2 (master) + 4 = 8, half of DDP's 16; zero3 fp32
    2 + 2 + 2 + 4 = 10 (DeepSpeed keeps an fp32 master copy even when the parameters are fp32); zero2
    keeps whole parameters (2 or 4) and halves the rest."""
    engine, results, _ = run
    for res in results:
        n = res["trainable_elements"]
        for mixed in ("bf16", "fp32"):
            held = res[f"memory_{mixed}"]
            width = 2 if mixed == "bf16" else 4
            # Every engine/precision: the AdamW state (DDP: 8 n) and the fp32 master weights are halved.
            assert abs(held["optimizer"] / (8 * n / 2) - 1) < 0.01, (mixed, held)
            assert abs(held["master"] / (4 * n / 2) - 1) < 0.01, (mixed, held)
            assert abs(held["grads"] / (width * n / 2) - 1) < 0.1, (mixed, held)  # partitions, module dtype
            whole = 1 if engine == "zero2" else 2
            assert abs(held["params"] / (width * n / whole) - 1) < 0.01, (mixed, held)
            # zero3's reduce bucket: reduce_bucket_size (200_000) fp32 elements; zero2 frees its buckets
            # at the end of each backward.
            assert held["buffers"] == (200_000 * 4 if engine == "zero3" else 0), held
        if engine == "zero3":
            model_state = sum(v for k, v in res["memory_bf16"].items() if k != "buffers")
            assert abs(model_state / (16 * n / 2) - 1) < 0.1, res["memory_bf16"]


@pytest.mark.slow
def test_precision_and_full_state(run):
    engine, results, _ = run
    names = None
    for res in results:
        for mixed, dtype in (("bf16", "torch.bfloat16"), ("fp32", "torch.float32")):
            assert res[f"{mixed}_param_dtype"] == dtype
            assert res[f"{mixed}_master_exact"], mixed  # the fp32 master starts at the fp32 weights
            assert res[f"{mixed}_rope_dtype"] == "torch.float32" and res[f"{mixed}_rope_ok"], mixed
            assert res[f"{mixed}_step"]["updated"] and res[f"{mixed}_step"]["loss"] < 2
        # bf16 runs close to fp32 (the first step's loss: same weights, same batch).
        assert res["bf16_step"]["loss"] == pytest.approx(res["fp32_step"]["loss"], rel=2e-2)
        assert res["full_state_names_ok"] and res["full_state_shapes_ok"] and res["full_state_equals_trainable"]
        assert res["partial_names_ok"]
        assert res["partial_frozen_dtype"] == "torch.bfloat16" and res["partial_frozen_equal"]
        assert res["partial_trainable_dtype"] == "torch.float32" and res["partial_trainable_changed"]
        assert res["f_linear_untouched"]
        if engine == "zero3":
            assert res["zero3_partitioned"]
        names = names or res["full_state_names"]
        assert res["full_state_names"] == names  # every rank iterates alike
    assert len(names) == len(set(names)) and "head.head.weight" in names and STEPS == 6


class _Exploit:
    """A pickle that would run code when loaded without restrictions."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_resume_never_unpickles_blindly(tmp_path):
    """DeepSpeed's own loader would run this file's code; the engine's replacement refuses it, and still
    reads what DeepSpeed really writes (tensors and its three data classes)."""
    from deepspeed.runtime.zero.config import ZeroStageEnum

    from train.engines.deepspeed import load_weights_only

    marker = tmp_path / "ran"
    torch.save({"optimizer_state_dict": _Exploit(str(marker))}, tmp_path / "evil.pt")
    with pytest.raises(pickle.UnpicklingError):
        load_weights_only(str(tmp_path / "evil.pt"))
    assert not marker.exists()
    torch.save({"zero_stage": ZeroStageEnum(3), "partition": torch.arange(4.0)}, tmp_path / "good.pt")
    loaded = load_weights_only(str(tmp_path / "good.pt"))
    assert loaded["zero_stage"] == ZeroStageEnum(3) and torch.equal(loaded["partition"], torch.arange(4.0))
