"""The run configuration: sections, TOML + CLI loading, every problem reported at once, help, round trip."""

import dataclasses
from dataclasses import dataclass, fields

import pytest

from train import config
from train.config import (
    CheckpointConfig,
    ConfigError,
    DataConfig,
    LoggingConfig,
    LoRAConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    RunConfig,
    TrainConfig,
    config_to_toml,
    help_text,
    load_config,
)
from train.ema import EMAConfig
from train.experts import ExpertsConfig
from train.validation import ValidationConfig

DATA = "--train_data_dir=/data"  # DataConfig needs a data source; every valid load gives one


def write(tmp_path, text: str, name: str = "run.toml") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def problems_of(argv: list[str]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(argv)
    # The message lists every problem, one per line.
    assert str(info.value).splitlines()[1:] == [f"  {p}" for p in info.value.problems]
    return info.value.problems


def has(problems: list[str], *parts: str) -> bool:
    """Some problem mentions every part."""
    return any(all(part in p for part in parts) for p in problems)


def test_defaults_have_no_problems():
    cfg = RunConfig()
    assert cfg.problems() == ["[data] give train_data_meta or train_data_dir"]
    cfg.data.train_data_dir = "/data"
    assert cfg.problems() == []
    assert load_config([DATA]) == cfg


def test_every_field_is_documented_and_typed():
    for name, cls in config.SECTIONS.items():
        docs = config._docs(cls)
        for f in fields(cls):
            assert docs.get(f.name, "").strip(), f"[{name}] {f.name} has no docstring"
            assert config._types(cls)[f.name] in config._TYPE_NAMES, f"[{name}] {f.name}: unsupported type"
        assert hasattr(cls, "problems")


def test_sections_are_the_public_ones():
    assert config.SECTIONS == {
        "model": ModelConfig, "data": DataConfig, "train": TrainConfig, "optim": OptimConfig,
        "checkpoint": CheckpointConfig, "logging": LoggingConfig, "parallel": ParallelConfig,
        "validation": ValidationConfig, "lora": LoRAConfig, "ema": EMAConfig, "experts": ExpertsConfig,
    }  # fmt: skip


def test_toml_then_cli_precedence(tmp_path):
    path = write(tmp_path, '[optim]\nlearning_rate = 1e-4\n[train]\nseed = 1\n[data]\ntrain_data_dir = "/toml"\n')
    cfg = load_config(["--train.seed=7", "--cfg", path])  # the CLI wins wherever it stands
    assert cfg.optim.learning_rate == 1e-4 and cfg.train.seed == 7 and cfg.data.train_data_dir == "/toml"
    cfg = load_config([f"--cfg={path}", "--learning_rate", "3e-4"])
    assert cfg.optim.learning_rate == 3e-4 and cfg.train.seed == 1


def test_several_cfg_files_apply_in_order(tmp_path):
    base = write(tmp_path, "[train]\nseed = 1\nshift = 3.0\n", "base.toml")
    exp = write(tmp_path, "[train]\nseed = 2\n", "exp.toml")
    cfg = load_config([DATA, "--cfg", base, "--cfg", exp])
    assert cfg.train.seed == 2 and cfg.train.shift == 3.0


def test_override_forms():
    cfg = load_config(
        [DATA, "--optim.learning_rate=2e-05", "--optim.lr_scheduler", "cosine", "--max_grad_norm=0",
         "--output_dir", "/out", "--train.logit_mean", "-0.5", "--shift=3", "--train_batch_size", "2"]
    )  # fmt: skip
    assert cfg.optim.learning_rate == 2e-05 and cfg.optim.lr_scheduler == "cosine" and cfg.optim.max_grad_norm == 0.0
    assert cfg.train.output_dir == "/out" and cfg.train.logit_mean == -0.5 and cfg.train.train_batch_size == 2
    assert cfg.train.shift == 3.0 and isinstance(cfg.train.shift, float)


def test_no_real_key_is_ambiguous():
    # Flat keys are unique today; the ambiguity rule is tested with an extra section below.
    keys = [f.name for cls in config.SECTIONS.values() for f in fields(cls)]
    assert len(keys) == len(set(keys))


def test_ambiguous_flat_key_is_refused(monkeypatch, tmp_path):
    @dataclass
    class Extra:
        seed: int = 0
        """Clashes with [train] seed."""

    monkeypatch.setitem(config.SECTIONS, "extra", Extra)
    found = problems_of([DATA, "--seed=3"])
    assert has(found, "--seed is ambiguous", "[train]", "[extra]", "--train.seed")
    found = problems_of([DATA, "--cfg", write(tmp_path, "seed = 3\n")])
    assert has(found, "run.toml", "seed belongs in [train] or [extra]")
    assert load_config([DATA, "--train.seed", "3"]).train.seed == 3


def test_all_problems_reported_together(tmp_path):
    bad = write(
        tmp_path,
        'learning_rate = 1e-4\n[train]\nseed = "abc"\ntrain_batch_size = true\nshift = -1.0\n'
        '[optim]\nlearning_rat = 1e-4\nadam_beta1 = "0.9"\n[model]\ntrainable_modules = "blocks"\n'
        "[optimizer]\nx = 1\n[data]\nvideo_sample_n_frames = 50\n",
        "bad.toml",
    )
    broken = write(tmp_path, "[train\nseed = 1\n", "broken.toml")
    missing = str(tmp_path / "missing.toml")
    found = problems_of(["--cfg", bad, "--cfg", broken, "--cfg", missing, "--train.sed=1", "--max_train_steps", "x",
                         "--modle.preset=debug", "--parallel.engine", "zero4", "stray"])  # fmt: skip
    assert has(found, "bad.toml", "learning_rate belongs in [optim]")
    assert has(found, "bad.toml", "[train] seed", "an integer", "'abc'")
    assert has(found, "bad.toml", "[train] train_batch_size", "an integer", "True")  # a bool is not an int
    assert has(found, "bad.toml", "[optim] adam_beta1", "a number", "'0.9'")
    assert has(found, "bad.toml", "[model] trainable_modules", "a list of strings")
    assert has(found, "bad.toml", "unknown key [optim] learning_rat", "did you mean learning_rate")
    assert has(found, "bad.toml", "unknown section [optimizer]", "did you mean optim")
    assert has(found, "broken.toml", "TOML syntax error")
    assert has(found, "missing.toml", "No such file")
    assert has(found, "--train.sed", "unknown key [train] sed", "did you mean seed")
    assert has(found, "--max_train_steps", "an integer", "'x'")
    assert has(found, "--modle.preset", "unknown section [modle]", "did you mean model")
    assert has(found, "unexpected argument 'stray'")
    # problems() entries of the values that did load, prefixed with their section:
    assert "[train] shift must be > 0, got -1.0" in found
    assert has(found, "[data] video_sample_n_frames must be 4k+1", "50")
    assert has(found, "[parallel] engine must be one of ddp, zero2, zero3, fsdp", "'zero4'")
    assert "[data] give train_data_meta or train_data_dir" in found


@pytest.mark.parametrize(
    "text, value", [("true", True), ("TRUE", True), ("1", True), ("yes", True), ("false", False), ("0", False),
                    ("no", False)]
)  # fmt: skip
def test_bool_values(text, value):
    assert load_config([DATA, f"--model.low_vram={text}"]).model.low_vram is value
    assert load_config([DATA, "--enable_bucket", text]).data.enable_bucket is value


def test_bare_bool_flags():
    cfg = load_config(["--low_vram", DATA, "--model.gradient_checkpointing"])  # before an option, and last
    assert cfg.model.low_vram and cfg.model.gradient_checkpointing == "full"
    assert has(problems_of([DATA, "--low_vram=maybe"]), "--low_vram", "a boolean", "'maybe'")
    assert has(problems_of([DATA, "--output_dir"]), "--output_dir needs a value")


def test_list_values(tmp_path):
    assert load_config([DATA, "--trainable_modules=blocks.0.,head"]).model.trainable_modules == ["blocks.0.", "head"]
    cfg = load_config([DATA, "--model.trainable_modules", '["a", "b,c"]'])
    assert cfg.model.trainable_modules == ["a", "b,c"]
    path = write(tmp_path, '[model]\ntrainable_modules = ["blocks.", "head"]\n')
    assert load_config([DATA, "--cfg", path]).model.trainable_modules == ["blocks.", "head"]
    assert has(problems_of([DATA, "--trainable_modules="]), "[model] trainable_modules is empty")
    assert has(problems_of([DATA, "--trainable_modules=[1, 2]"]), "--trainable_modules", "a list of strings")


def test_numbers(tmp_path):
    path = write(tmp_path, "[optim]\nlearning_rate = 1\n")
    cfg = load_config([DATA, "--cfg", path])
    assert cfg.optim.learning_rate == 1.0 and isinstance(cfg.optim.learning_rate, float)
    assert has(problems_of([DATA, "--cfg", write(tmp_path, "[train]\nseed = 1.5\n")]), "[train] seed", "1.5")
    assert has(problems_of([DATA, "--seed=1.5"]), "--seed", "an integer")
    assert "[optim] learning_rate must be > 0, got -1.0" in problems_of([DATA, "--learning_rate=-1"])
    assert has(problems_of([DATA, "--learning_rate=nan"]), "[optim] learning_rate must be > 0")


def test_section_checks():
    assert load_config([DATA, "--engine=fsdp"]).parallel.engine == "fsdp"
    assert has(problems_of([DATA, "--engine=horovod"]), "[parallel] engine must be one of ddp")
    # VideoX-Fun's --use_deepspeed: a DeepSpeed engine, zero2 unless zero3 was chosen.
    assert load_config([DATA, "--use_deepspeed"]).parallel.engine == "zero2"
    assert load_config([DATA, "--use_deepspeed", "--engine=zero3"]).parallel.engine == "zero3"
    assert has(problems_of([DATA, "--use_deepspeed", "--engine=fsdp"]), "use_deepspeed", "'fsdp'")
    assert has(problems_of([DATA, "--offload_param"]), "offload_param needs engine zero3 or fsdp")
    assert has(problems_of([DATA, "--deepspeed_config=ds.json"]), "deepspeed_config is set", "'ddp'")
    assert has(problems_of([DATA, "--lr_scheduler=step"]), "[optim] lr_scheduler must be one of")
    assert has(problems_of([DATA, "--adam_beta2=1"]), "[optim] adam_beta2 must be in [0, 1)")
    assert has(problems_of([DATA, "--preset=7B"]), "[model] preset must be one of", "i2v-14B")
    assert has(problems_of([DATA, "--train_mode=i2v"]), "[model] train_mode 'i2v'", "'debug'")
    assert has(problems_of([DATA, "--preset=debug-i2v"]), "[model] train_mode 'normal'", "'debug-i2v'")
    assert load_config([DATA, "--train_mode=i2v", "--preset=debug-i2v"]).model.train_mode == "i2v"
    # With a release folder the preset is not used, so it cannot disagree with the mode.
    assert load_config([DATA, "--train_mode=i2v", "--pretrained_model_name_or_path=/wan"]).model.preset == "debug"
    assert has(problems_of([DATA, "--num_train_epochs=0"]), "[train] num_train_epochs must be >= 1")
    assert load_config([DATA, "--num_train_epochs=0", "--max_train_steps=10"]).train.max_train_steps == 10
    assert has(problems_of([DATA, "--mixed_precision=fp8"]), "[train] mixed_precision must be one of bf16, fp16, fp32")


def test_help_lists_every_field(capsys):
    with pytest.raises(SystemExit) as info:
        load_config([DATA, "--seed=x", "-h"])  # help wins over problems
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.strip() == help_text().strip()
    assert "torchrun --nproc_per_node N -m train.main --cfg FILE" in out
    defaults = RunConfig()
    for name, cls in config.SECTIONS.items():
        assert f"[{name}]" in out
        for f in fields(cls):
            default = config._toml_value(getattr(getattr(defaults, name), f.name))
            assert f"  {f.name}: {config._type_name(config._types(cls)[f.name])} = {default}\n" in out
    assert "Clips the VAE encodes at once." in out and "Frames per video sample" in out


NON_DEFAULT = {
    "model": dict(pretrained_model_name_or_path='C:\\wan "2.1"\ttü/🎬\x7f\n', preset="debug-i2v", train_mode="i2v",
                  trainable_modules=["blocks.0.", 'he"ad\\', "ü"], gradient_checkpointing="selective",
                  selective_checkpoint_matmuls=True, attention_backend="flash",
                  gradient_checkpointing_every=2, low_vram=True, vae_mini_batch=4, transformer_path="/merged",
                  vae_path="/vae.pth", config_path="wan.yaml", tokenizer_max_length=226,
                  trainable_modules_low_learning_rate=["head"]),
    "data": dict(train_data_dir="/data/ü", train_data_meta="meta.jsonl", video_sample_n_frames=81,
                 video_sample_stride=3, video_sample_size=768, image_sample_size=1024, token_sample_size=256,
                 enable_bucket=False, random_hw_adapt=True, training_with_video_token_length=True, random_frame_crop=True,
                 video_repeat=2, latent_cache_dir="/cache/480p",
                 caption_dropout=0.1 + 0.2, dataloader_num_workers=0, prefetch_factor=4, max_bad_fraction=0.5,
                 max_retries=1, decode_timeout=1e16, max_train_samples=7, bucket_side_multiple=32),
    "train": dict(output_dir="out dir", max_train_steps=100, num_train_epochs=3, train_batch_size=2,
                  gradient_accumulation_steps=4, seed=0, mixed_precision="fp32", uniform_sampling=True,
                  weighting_scheme="uniform", logit_mean=-0.5, logit_std=1.5, shift=3.0, max_nonfinite_steps=1,
                  allow_tf32=True, mode_scale=1.0, motion_sub_loss=True, motion_sub_loss_ratio=0.5),
    "optim": dict(learning_rate=3e-05, lr_scheduler="cosine", lr_warmup_steps=10, adam_beta1=0.8, adam_beta2=0.95,
                  adam_weight_decay=0.0, adam_epsilon=1e-15, max_grad_norm=float("inf"), scale_lr=True),
    "checkpoint": dict(checkpointing_steps=0, checkpoints_total_limit=3, resume_from_checkpoint="latest",
                       save_consolidated_weights=True),
    "logging": dict(log_every=10, progress_bar=False, loss_smoothing=0.1, timestep_bins=20, logging_dir="/tb",
                    peak_tflops=989.5),
    "parallel": dict(engine="zero3", backend="gloo", use_deepspeed=True, deepspeed_config="ds.json",
                     offload_optimizer=True, offload_param=True, reduce_bucket_size=1, allgather_bucket_size=2,
                     overlap_comm=False, stage3_prefetch_bucket_size=3, stage3_param_persistence_threshold=0,
                     stage3_max_live_parameters=5, reshard_after_forward=False, reduce_every_micro_step=False, sp=4),
    "validation": dict(validation_prompts=["a \"dog\", running", "🎬"], validation_images=["ü.png", "b.png"],
                       validation_steps=7, validation_epochs=2, validation_height=32, validation_width=48,
                       validation_num_frames=5, validation_inference_steps=3, validation_guidance_scale=1.0 / 3,
                       validation_shift=2.5, validation_sampler="euler", validation_negative_prompt="",
                       validation_seed=2**40, validation_data_meta="held.json", validation_data_dir="/held",
                       validation_guidance_scale_low=2.5,
                       eval_steps=9, eval_quantiles=[0.05, 0.5], eval_max_samples=3),
    "lora": dict(network_alpha=8.0, target_name="q,o", lora_skip_name="blocks.0.", dropout=0.1, init="gaussian"),
    "ema": dict(enabled=True, decay=0.99, warmup=True, start_step=3, update_every=2, device="cpu",
                validate_with_ema=False),
    "experts": dict(train_experts=["low"], boundary=0.9, learning_rate_high=1e-5, learning_rate_low=2e-5,
                    timestep_range=[100.0, 950.0]),
}  # fmt: skip
# Fields left at their default: use_fsdp (not with use_deepspeed), report_to (one allowed value),
# eval_holdout (not with validation_data_meta).
# rank: a LoRA run refuses the trainable_modules set above.
LEFT_DEFAULT = {"use_fsdp", "report_to", "eval_holdout", "compile", "rank"}  # compile: refused with zero3


def test_round_trip(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "wan.yaml").write_text("format: civitai\n")  # config_path is read
    cfg = RunConfig(**{name: dataclasses.replace(getattr(RunConfig(), name), **v) for name, v in NON_DEFAULT.items()})
    defaults = RunConfig()
    for name in config.SECTIONS:
        for f in fields(getattr(cfg, name)):
            if f.name not in LEFT_DEFAULT:
                assert getattr(getattr(cfg, name), f.name) != getattr(getattr(defaults, name), f.name), f.name
    assert cfg.problems() == []
    text = config_to_toml(cfg)
    assert "learning_rate = 3e-05\n" in text and "caption_dropout = 0.30000000000000004\n" in text
    assert config.tomllib.loads(text)["model"]["trainable_modules"] == ["blocks.0.", 'he"ad\\', "ü"]
    assert load_config(["--cfg", write(tmp_path, text)]) == cfg
    assert config_to_toml(load_config(["--cfg", write(tmp_path, config_to_toml(RunConfig()), "d.toml"), DATA])) == (
        config_to_toml(load_config([DATA]))
    )


def test_list_flags_take_videox_fun_spelling():
    """--trainable_modules blocks head (argparse nargs="+") as VideoX-Fun's train.sh writes it; the
    comma and TOML-array spellings keep working, and the values stop at the next flag."""
    for argv in (["--trainable_modules", "blocks", "head"], ["--trainable_modules", "blocks,head"],
                 ["--trainable_modules=blocks,head"], ["--trainable_modules", '["blocks", "head"]'],
                 ["--trainable_modules", "blocks", "head,", "--seed", "3"]):  # fmt: skip
        assert load_config([DATA, *argv]).model.trainable_modules == ["blocks", "head"], argv
    assert load_config([DATA, "--trainable_modules", "blocks", "head", "--seed", "3"]).train.seed == 3


def test_did_you_mean_only_for_close_spellings():
    assert has(problems_of([DATA, "--learning_rat=1"]), "did you mean learning_rate")
    assert has(problems_of([DATA, "--modle.preset=debug"]), "did you mean model")
    for far in ("--wandb_entity=me", "--push_to_wandb=1"):  # no close key here
        (problem,) = [p for p in problems_of([DATA, far]) if far.split("=")[0] in p]
        assert "did you mean" not in problem, problem


def test_validation_section(tmp_path):
    """Prompts hold commas: each command-line token is one prompt; numbers lists; the checks listed."""
    cfg = load_config([DATA, "--validation_prompts", "a dog, running", "a cat", "--seed", "3"])
    assert cfg.validation.validation_prompts == ["a dog, running", "a cat"] and cfg.train.seed == 3
    assert load_config([DATA, "--validation_prompts=a dog, running"]).validation.validation_prompts == [
        "a dog, running"
    ]
    cfg = load_config([DATA, "--validation_prompts", '["a", "b, c"]', "--eval_quantiles=0.25,0.5"])
    assert cfg.validation.validation_prompts == ["a", "b, c"] and cfg.validation.eval_quantiles == [0.25, 0.5]
    path = write(tmp_path, "[validation]\neval_quantiles = [0.1, 0.9]\nvalidation_prompts = ['x']\n")
    assert load_config([DATA, "--cfg", path]).validation.eval_quantiles == [0.1, 0.9]
    assert has(problems_of([DATA, "--eval_quantiles=0.5,1.5"]), "eval_quantiles must be", "(0, 1)")
    assert has(problems_of([DATA, "--eval_quantiles=[true]"]), "--eval_quantiles", "a list of numbers")
    assert has(problems_of([DATA, "--validation_height=100"]), "validation_height must be a multiple of 16")
    assert has(problems_of([DATA, "--validation_num_frames=10"]), "validation_num_frames must be 4k+1")
    assert has(problems_of([DATA, "--validation_sampler=ddim"]), "validation_sampler must be one of unipc, euler")
    assert has(problems_of([DATA, "--validation_images=a.png"]), "validation_images", "text-to-video")
    i2v = [DATA, "--train_mode=i2v", "--preset=debug-i2v", "--validation_prompts", "a", "b", "c"]
    assert has(problems_of([*i2v, "--validation_images", "x.png", "y.png"]), "one per prompt (3), got 2")
    assert load_config([*i2v, "--validation_images", "x.png"]).validation.validation_images == ["x.png"]
    # VideoX-Fun's --validation_paths is our validation_images
    assert load_config([*i2v, "--validation_paths", "x.png"]).validation.validation_images == ["x.png"]
    assert has(problems_of([DATA, "--eval_holdout=2", "--validation_data_meta=v.json"]), "use one held-out set")
    assert load_config([DATA, "--validation_prompts="]).validation.validation_prompts == []


def test_gradient_checkpointing_modes_and_their_boolean_spelling(tmp_path):
    for argv, mode in ((["--gradient_checkpointing"], "full"), (["--gradient_checkpointing=false"], "none"),
                       (["--gradient_checkpointing", "selective"], "selective"), ([], "none")):  # fmt: skip
        assert load_config([DATA, *argv]).model.gradient_checkpointing == mode, argv
    path = write(tmp_path, "[model]\ngradient_checkpointing = true\n")
    assert load_config([DATA, "--cfg", path]).model.gradient_checkpointing == "full"
    assert has(problems_of([DATA, "--gradient_checkpointing=some"]), "gradient_checkpointing must be one of full")
    assert has(problems_of([DATA, "--selective_checkpoint_matmuls"]), 'needs gradient_checkpointing = "selective"')
    assert has(problems_of([DATA, "--attention_backend=xformers"]), "attention_backend must be one of auto")
    assert has(problems_of([DATA, "--peak_tflops=-1"]), "peak_tflops must be >= 0")
