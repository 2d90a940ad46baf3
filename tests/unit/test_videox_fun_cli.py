"""A VideoX-Fun user's command line works as pasted: its documented Wan2.1 training lines resolve to the
values they mean, every option of its scripts/wan2.1/train.py has a status that behaves as the README's
table says, and its model YAML (--config_path) is read."""

import dataclasses
import json
import shlex
from pathlib import Path

import pytest

from train import videox_fun
from train.config import BOOLEAN_CHOICES, SECTIONS, ConfigError, _types, load_config

REPO = Path(__file__).resolve().parents[2]

# The flags of VideoX-Fun's README_TRAIN.md (Wan2.1 full training) after `scripts/wan2.1/train.py`,
# the same in each of its documented lines; $VARS and config files are the paths to replace.
SCRIPT_FLAGS = """
  --config_path="$CONFIG_PATH" \\
  --pretrained_model_name_or_path=$MODEL_NAME \\
  --train_data_dir=$DATASET_NAME \\
  --train_data_meta=$DATASET_META_NAME \\
  --image_sample_size=640 \\
  --video_sample_size=640 \\
  --token_sample_size=640 \\
  --video_sample_stride=2 \\
  --video_sample_n_frames=81 \\
  --train_batch_size=1 \\
  --video_repeat=1 \\
  --gradient_accumulation_steps=1 \\
  --dataloader_num_workers=8 \\
  --num_train_epochs=100 \\
  --checkpointing_steps=50 \\
  --learning_rate=2e-05 \\
  --lr_scheduler="constant_with_warmup" \\
  --lr_warmup_steps=100 \\
  --seed=42 \\
  --output_dir="output_dir_wan2.1" \\
  --gradient_checkpointing \\
  --mixed_precision="bf16" \\
  --adam_weight_decay=3e-2 \\
  --adam_epsilon=1e-10 \\
  --vae_mini_batch=1 \\
  --max_grad_norm=0.05 \\
  --random_hw_adapt \\
  --training_with_video_token_length \\
  --enable_bucket \\
  --uniform_sampling \\
  --low_vram \\
  --train_mode="normal" \\
  --trainable_modules "."
"""
# What follows `accelerate launch` in each documented line, up to the script.
LAUNCHERS = {
    "zero2": "--use_deepspeed --deepspeed_config_file $ZERO2_JSON --deepspeed_multinode_launcher standard",
    "fsdp": '--mixed_precision="bf16" --use_fsdp --fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP '
    '--fsdp_transformer_layer_cls_to_wrap=WanAttentionBlock --fsdp_sharding_strategy "FULL_SHARD" '
    '--fsdp_state_dict_type=SHARDED_STATE_DICT --fsdp_backward_prefetch "BACKWARD_PRE" '
    "--fsdp_cpu_ram_efficient_loading False",
    "zero3": "--zero_stage 3 --zero3_save_16bit_model true --zero3_init_flag true --use_deepspeed "
    "--deepspeed_config_file $ZERO3_JSON --deepspeed_multinode_launcher standard",
    "ddp": '--mixed_precision="bf16"',  # "Training Without DeepSpeed and FSDP"
    "multi-node": '--mixed_precision="bf16" --main_process_ip=$MASTER_ADDR --main_process_port=$MASTER_PORT '
    "--num_machines=$WORLD_SIZE --num_processes=$NUM_PROCESS --machine_rank=$RANK --use_deepspeed "
    "--deepspeed_config_file $ZERO2_JSON --deepspeed_multinode_launcher standard",
}

# A model YAML in the layout of VideoX-Fun's config/wan2.1/wan_civitai.yaml.
CIVITAI_YAML = """format: civitai
pipeline: Wan
transformer_additional_kwargs:
  transformer_subpath: ./
  dict_mapping:
    in_dim: in_channels
vae_kwargs:
  vae_subpath: Wan2.1_VAE.pth
  temporal_compression_ratio: 4
  spatial_compression_ratio: 8
text_encoder_kwargs:
  text_encoder_subpath: models_t5_umt5-xxl-enc-bf16.pth
  tokenizer_subpath: google/umt5-xxl
  text_length: 512
  vocab: 256384
  dim: 4096
  dim_attn: 4096
  dim_ffn: 10240
  num_heads: 64
  num_layers: 24
  num_buckets: 32
  shared_pos: False
  dropout: 0.0
scheduler_kwargs:
  scheduler_subpath: null
  num_train_timesteps: 1000
  shift: 5.0
  use_dynamic_shifting: false
  base_shift: 0.5
  max_shift: 1.15
  base_image_seq_len: 256
  max_image_seq_len: 4096
image_encoder_kwargs:
  image_encoder_subpath: models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth
"""


def deepspeed_json(stage: int) -> dict:
    """A DeepSpeed file in the style VideoX-Fun's launcher lines pass: accelerate's "auto" placeholders."""
    return {
        "bf16": {"enabled": True}, "train_micro_batch_size_per_gpu": 1, "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "steps_per_print": 2000,
        "wall_clock_breakdown": False,
        "zero_optimization": {"stage": stage, "overlap_comm": True, "contiguous_gradients": True,
                              "reduce_bucket_size": 5e8, "sub_group_size": 1e9},
    }  # fmt: skip


@pytest.fixture
def paths(tmp_path) -> dict[str, str]:
    (tmp_path / "wan_civitai.yaml").write_text(CIVITAI_YAML)
    for stage in (2, 3):
        (tmp_path / f"zero_stage{stage}_config.json").write_text(json.dumps(deepspeed_json(stage)))
    return {
        "CONFIG_PATH": str(tmp_path / "wan_civitai.yaml"), "MODEL_NAME": "models/Wan2.1-T2V-1.3B",
        "DATASET_NAME": "datasets/X-Fun-Videos-Demo/", "DATASET_META_NAME": "datasets/X-Fun-Videos-Demo/metadata.json",
        "ZERO2_JSON": str(tmp_path / "zero_stage2_config.json"), "ZERO3_JSON": str(tmp_path / "zero_stage3_config.json"),
        "MASTER_ADDR": "192.168.1.100", "MASTER_PORT": "10086", "WORLD_SIZE": "2", "NUM_PROCESS": "16", "RANK": "0",
    }  # fmt: skip


def pasted(launcher: str, paths: dict[str, str]) -> list[str]:
    """The documented line after `accelerate launch`, as the shell hands it over, paths filled in."""
    text = f"{LAUNCHERS[launcher]} scripts/wan2.1/train.py {SCRIPT_FLAGS}".replace("\\\n", " ")
    for var, value in paths.items():
        text = text.replace(f"${var}", value)
    return shlex.split(text)


@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_documented_command_lines(launcher, paths):
    notes: list[str] = []
    cfg = load_config(pasted(launcher, paths), notes)
    m, d, t, o, c, p = cfg.model, cfg.data, cfg.train, cfg.optim, cfg.checkpoint, cfg.parallel
    assert (m.pretrained_model_name_or_path, m.config_path) == ("models/Wan2.1-T2V-1.3B", paths["CONFIG_PATH"])
    assert (d.train_data_dir, d.train_data_meta) == ("datasets/X-Fun-Videos-Demo/", paths["DATASET_META_NAME"])
    assert (d.image_sample_size, d.video_sample_size, d.token_sample_size) == (640, 640, 640)
    assert (d.video_sample_stride, d.video_sample_n_frames, d.video_repeat, d.dataloader_num_workers) == (2, 81, 1, 8)
    assert d.random_hw_adapt and d.training_with_video_token_length and d.enable_bucket
    assert (t.train_batch_size, t.gradient_accumulation_steps, t.num_train_epochs, t.seed) == (1, 1, 100, 42)
    assert (t.output_dir, t.mixed_precision, t.uniform_sampling, t.shift) == ("output_dir_wan2.1", "bf16", True, 5.0)
    assert (o.learning_rate, o.lr_scheduler, o.lr_warmup_steps) == (2e-05, "constant_with_warmup", 100)
    assert (o.adam_weight_decay, o.adam_epsilon, o.max_grad_norm) == (3e-2, 1e-10, 0.05)
    assert (c.checkpointing_steps, m.vae_mini_batch, m.gradient_checkpointing, m.low_vram) == (50, 1, "full", True)
    assert (m.train_mode, m.trainable_modules, m.tokenizer_max_length) == ("normal", ["."], 512)
    engine = {"zero2": "zero2", "multi-node": "zero2", "zero3": "zero3", "fsdp": "fsdp", "ddp": "ddp"}[launcher]
    assert p.engine == engine
    assert p.deepspeed_config == {"zero2": paths["ZERO2_JSON"], "multi-node": paths["ZERO2_JSON"],
                                  "zero3": paths["ZERO3_JSON"]}.get(launcher, "")  # fmt: skip
    assert c.save_consolidated_weights == (launcher == "zero3")  # --zero3_save_16bit_model true
    assert p.reshard_after_forward  # FULL_SHARD, and the default elsewhere
    assert any("scripts/wan2.1/train.py: no effect here" in n for n in notes)
    ignored = {"zero2": ["deepspeed_multinode_launcher"], "zero3": ["zero3_init_flag", "deepspeed_multinode_launcher"],
               "fsdp": ["fsdp_auto_wrap_policy", "fsdp_transformer_layer_cls_to_wrap", "fsdp_state_dict_type",
                        "fsdp_backward_prefetch", "fsdp_cpu_ram_efficient_loading"],
               "multi-node": ["main_process_ip", "main_process_port", "num_machines", "num_processes", "machine_rank"],
               "ddp": []}[launcher]  # fmt: skip
    for name in ignored:
        assert sum(n.startswith(f"--{name}: no effect here") for n in notes) == 1, (name, notes)


# The flags of VideoX-Fun's README_TRAIN_LORA.md (Wan2.1 LoRA) after `scripts/wan2.1/train_lora.py`, the same
# in its ZeRO-2 quick start and its FSDP line (whose launchers are LAUNCHERS' zero2 and fsdp).
LORA_SCRIPT_FLAGS = """
  --config_path="$CONFIG_PATH" \\
  --pretrained_model_name_or_path=$MODEL_NAME \\
  --train_data_dir=$DATASET_NAME \\
  --train_data_meta=$DATASET_META_NAME \\
  --image_sample_size=640 \\
  --video_sample_size=640 \\
  --token_sample_size=640 \\
  --video_sample_stride=2 \\
  --video_sample_n_frames=81 \\
  --train_batch_size=1 \\
  --video_repeat=1 \\
  --gradient_accumulation_steps=1 \\
  --dataloader_num_workers=8 \\
  --num_train_epochs=100 \\
  --checkpointing_steps=50 \\
  --learning_rate=1e-04 \\
  --seed=42 \\
  --output_dir="output_dir_wan2.1_lora" \\
  --gradient_checkpointing \\
  --mixed_precision="bf16" \\
  --adam_weight_decay=3e-2 \\
  --adam_epsilon=1e-10 \\
  --vae_mini_batch=1 \\
  --max_grad_norm=0.05 \\
  --random_hw_adapt \\
  --training_with_video_token_length \\
  --enable_bucket \\
  --uniform_sampling \\
  --rank=64 \\
  --network_alpha=32 \\
  --target_name="q,k,v,ffn.0,ffn.2" \\
  --use_peft_lora \\
  --low_vram \\
  --train_mode="normal"
"""


@pytest.mark.parametrize("launcher", ["zero2", "fsdp"])
def test_documented_lora_lines(launcher, paths):
    """README_TRAIN_LORA.md's ZeRO-2 quick start and its FSDP line, as pasted: a rank-64 adapter, scale
    32 / 64, on q, k, v (self and cross attention) and both FFN layers of every block, base frozen."""
    text = f"{LAUNCHERS[launcher]} scripts/wan2.1/train_lora.py {LORA_SCRIPT_FLAGS}".replace("\\\n", " ")
    for var, value in paths.items():
        text = text.replace(f"${var}", value)
    notes: list[str] = []
    cfg = load_config(shlex.split(text), notes)
    lora, o, p = cfg.lora, cfg.optim, cfg.parallel
    assert (lora.rank, lora.network_alpha, lora.target_name, lora.dropout, lora.init) == (
        64, 32.0, "q,k,v,ffn.0,ffn.2", 0.0, "kaiming"
    )  # fmt: skip
    assert lora.spec.scale == 0.5 and lora.spec.targets == ("q", "k", "v", "ffn.0", "ffn.2")
    assert p.engine == launcher
    assert (o.learning_rate, o.lr_scheduler, o.lr_warmup_steps, o.max_grad_norm) == (1e-4, "constant", 0, 0.05)
    assert (cfg.train.output_dir, cfg.train.mixed_precision, cfg.model.trainable_modules) == (
        "output_dir_wan2.1_lora", "bf16", ["."]
    )  # fmt: skip
    assert cfg.data.random_hw_adapt and cfg.data.training_with_video_token_length and cfg.model.low_vram
    assert any("scripts/wan2.1/train_lora.py: no effect here" in n for n in notes)
    assert not any("use_peft_lora" in n for n in notes)  # --rank given: nothing to say
    # The adapter those options put on the 1.3B DiT: 8 layers in each of its 30 blocks.
    from train.models import build_dit_recipe

    recipe = build_dit_recipe(dataclasses.replace(cfg.model, pretrained_model_name_or_path="", preset="1.3B"), 0,
                              lora.spec, "bf16")  # fmt: skip
    trainable, total = recipe.parameter_counts()
    dim, ffn = 1536, 8960
    assert trainable == 30 * 64 * (6 * (dim + dim) + (dim + ffn) + (ffn + dim))
    assert total > 1.4e9


def test_the_documented_zero_lines_build_their_deepspeed_config(paths):
    """The DeepSpeed config the zero3 line stands for: the JSON's values over ours, 'auto' keeping ours."""
    import torch

    from train.distributed import ParallelLayout
    from train.engines import EngineSetup
    from train.engines.deepspeed import deepspeed_config

    cfg = load_config(pasted("zero3", paths))
    setup = EngineSetup(
        parallel=cfg.parallel, optim=cfg.optim, mixed_precision=cfg.train.mixed_precision, micro_batch_size=1,
        accumulation_steps=1, total_steps=10, layout=ParallelLayout.single(torch.device("cpu")),
    )  # fmt: skip
    changes: list[str] = []
    ds = deepspeed_config(setup, world_size=16, report=changes.append)
    assert ds["zero_optimization"]["stage"] == 3 and ds["zero_optimization"]["sub_group_size"] == 1e9
    assert ds["gradient_clipping"] == 0.05 and ds["train_batch_size"] == 16  # 'auto': ours
    assert any("steps_per_print" in line for line in changes)


# Every option of VideoX-Fun's scripts/wan2.1/train.py (its parse_args), with a value to pass, and the
# `accelerate launch` options of its documented lines. None: a store_true flag.
THEIR_OPTIONS: dict[str, str | list[str] | None] = {
    "input_perturbation": "0.1", "pretrained_model_name_or_path": "models/wan", "revision": "main",
    "variant": "fp16", "train_data_dir": "data", "train_data_meta": "data/meta.json", "max_train_samples": "10",
    "validation_prompts": ["a dog", "a cat"], "output_dir": "out", "cache_dir": "cache", "seed": "3",
    "random_flip": None, "use_came": None, "multi_stream": None, "train_batch_size": "2", "vae_mini_batch": "2",
    "num_train_epochs": "3", "max_train_steps": "7", "gradient_accumulation_steps": "2",
    "gradient_checkpointing": None, "selective_ac": "0.5", "learning_rate": "1e-4", "scale_lr": None,
    "lr_scheduler": "cosine_with_restarts", "lr_warmup_steps": "5", "use_8bit_adam": None, "allow_tf32": None,
    "use_ema": None, "non_ema_revision": "main", "dataloader_num_workers": "4", "adam_beta1": "0.8",
    "adam_beta2": "0.99", "adam_weight_decay": "0.02", "adam_epsilon": "1e-10", "max_grad_norm": "0.05",
    "push_to_hub": None, "hub_token": "hf_secret_token", "prediction_type": "v_prediction",
    "hub_model_id": "me/wan", "logging_dir": "logs", "report_model_info": None, "mixed_precision": "no",
    "report_to": "tensorboard", "local_rank": "0", "checkpointing_steps": "100", "checkpoints_total_limit": "2",
    "resume_from_checkpoint": "latest", "noise_offset": "0.1", "validation_epochs": "5", "validation_steps": "100",
    "tracker_project_name": "wan", "snr_loss": None, "uniform_sampling": None,
    "enable_text_encoder_in_dataloader": None, "enable_bucket": None, "random_ratio_crop": None,
    "random_frame_crop": None, "random_hw_adapt": None, "training_with_video_token_length": None,
    "motion_sub_loss": None, "motion_sub_loss_ratio": "0.3", "train_sampling_steps": "1000",
    "keep_all_node_same_token_length": None, "token_sample_size": "256", "video_sample_size": "256",
    "image_sample_size": "512", "video_sample_stride": "3", "video_sample_n_frames": "21", "video_repeat": "0",
    "config_path": "CIVITAI_YAML", "transformer_path": "merged", "vae_path": "vae.pth",
    "trainable_modules": ["blocks", "head"], "trainable_modules_low_learning_rate": ["patch_embedding"],
    "tokenizer_max_length": "512", "use_deepspeed": None, "use_fsdp": None, "low_vram": None,
    "train_mode": "inpaint", "abnormal_norm_clip_start": "1000", "initial_grad_norm_ratio": "5",
    "weighting_scheme": "sigma_sqrt", "logit_mean": "0.1", "logit_std": "1.1", "mode_scale": "1.2",
    "validation_paths": ["asset/1.png"],
    # scripts/wan2.1/train_lora.py's own
    "rank": "64", "network_alpha": "32", "target_name": "q,k,v", "lora_skip_name": "blocks.0.", "use_peft_lora": None,
    "train_text_encoder": None, "noise_share_in_frames": None, "noise_share_in_frames_ratio": "0.5", "save_state": None,
    # scripts/wan2.2/train.py's own
    "boundary_type": "high",
}  # fmt: skip
THEIR_LAUNCHER_OPTIONS: dict[str, str | None] = {
    "zero_stage": "3", "deepspeed_config_file": "ZERO3_JSON", "zero3_save_16bit_model": "true",
    "zero3_init_flag": "true", "deepspeed_multinode_launcher": "standard", "fsdp_sharding_strategy": "SHARD_GRAD_OP",
    "fsdp_offload_params": "true", "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
    "fsdp_transformer_layer_cls_to_wrap": "WanAttentionBlock", "fsdp_state_dict_type": "SHARDED_STATE_DICT",
    "fsdp_backward_prefetch": "BACKWARD_PRE", "fsdp_cpu_ram_efficient_loading": "False", "multi_gpu": None,
    "num_processes": "16", "num_machines": "2", "machine_rank": "0", "main_process_ip": "10.0.0.1",
    "main_process_port": "29500",
}  # fmt: skip
# Options that need another one to be valid here (i2v needs an i2v model; fsdp options the fsdp engine...).
COMPANIONS = {
    "train_mode": ["--pretrained_model_name_or_path=models/wan-i2v"], "use_fsdp": [], "use_deepspeed": [],
    "fsdp_sharding_strategy": ["--use_fsdp"], "fsdp_offload_params": ["--use_fsdp"],
    "deepspeed_config_file": ["--use_deepspeed"], "zero3_save_16bit_model": ["--zero_stage", "3", "--use_deepspeed"],
    "zero_stage": ["--use_deepspeed"], "video_sample_size": ["--token_sample_size=256"],
    "validation_paths": ["--train_mode=i2v", "--pretrained_model_name_or_path=models/wan-i2v"],
}  # fmt: skip


def argv_of(name: str, value, paths: dict[str, str]) -> list[str]:
    if value is None:
        return [f"--{name}"]
    values = value if isinstance(value, list) else [paths.get(value, value)]
    return [f"--{name}", *values]


@pytest.mark.parametrize("name", [*THEIR_OPTIONS, *THEIR_LAUNCHER_OPTIONS])
def test_every_videox_fun_option_has_a_working_status(name, paths, tmp_path):
    paths = {**paths, "CIVITAI_YAML": paths["CONFIG_PATH"]}
    value = THEIR_OPTIONS.get(name, THEIR_LAUNCHER_OPTIONS.get(name))
    argv = ["--train_data_dir=base", *COMPANIONS.get(name, []), *argv_of(name, value, paths)]
    status = videox_fun.OPTIONS[name].status if name in videox_fun.OPTIONS else "same"
    assert status in videox_fun.STATUSES
    assert (name in videox_fun.SAME) == (status == "same"), name
    notes: list[str] = []
    if status == "refused":
        with pytest.raises(ConfigError) as info:
            load_config(argv, notes)
        (problem,) = [p for p in info.value.problems if p.startswith(f"--{name}")]
        assert problem == f"--{name} is not supported: {videox_fun.OPTIONS[name].note}"
        assert "; " in problem or " use " in problem or "without" in problem  # gives the alternative
        return
    cfg = load_config(argv, notes)
    defaults = load_config(["--train_data_dir=base", *COMPANIONS.get(name, [])])
    if status == "ignored":
        assert notes == [f"--{name}: no effect here: {videox_fun.OPTIONS[name].note}"]
        assert cfg == defaults
        assert "hf_secret_token" not in " ".join(notes)
    elif status == "same":  # our key of that name holds the value given
        owners = [s for s, cls in SECTIONS.items() if name in _types(cls)]
        assert len(owners) == 1, name
        typ = _types(SECTIONS[owners[0]])[name]
        expected = True if value is None else value if isinstance(value, list) else typ(paths.get(value, value))
        if isinstance(expected, str):
            expected = {"no": "fp32", "inpaint": "i2v"}.get(expected, expected)  # VALUE_ALIASES
        if isinstance(expected, bool):  # a string key that also takes a boolean
            expected = BOOLEAN_CHOICES.get((owners[0], name), {}).get(expected, expected)
        assert getattr(getattr(cfg, owners[0]), name) == expected, name
    else:  # mapped: the target key changed, nothing is printed unless the mapping explains itself
        target = videox_fun.OPTIONS[name].target
        if target:
            section, key = target.split(".")
            assert getattr(getattr(cfg, section), key) != getattr(getattr(defaults, section), key), name
        elif name == "use_ema":  # the average on, with diffusers' EMAModel warmup as VideoX-Fun has it
            assert (cfg.ema.enabled, cfg.ema.warmup, cfg.ema.decay) == (True, True, 0.9999)
            assert not defaults.ema.enabled
        elif name == "use_peft_lora":  # LoRA on, at train_lora.py's default rank
            assert (defaults.lora.rank, cfg.lora.rank) == (0, videox_fun.VIDEOX_FUN_LORA_RANK)
            assert load_config([*argv, "--rank=16"]).lora.rank == 16
        else:  # train_sampling_steps: 1000 only
            assert cfg == defaults
            with pytest.raises(ConfigError, match="1000 only"):
                load_config(["--train_data_dir=data", f"--{name}", "500"])


def test_value_aliases_and_refusals():
    notes: list[str] = []
    cfg = load_config(["--train_data_dir=d", "--mixed_precision=no", "--report_to", "tensorboard"], notes)
    assert cfg.train.mixed_precision == "fp32" and notes == ["mixed_precision 'no' is 'fp32' here"]
    with pytest.raises(ConfigError, match="wandb sync --sync-tensorboard"):
        load_config(["--train_data_dir=d", "--report_to=wandb"])
    with pytest.raises(ConfigError, match="must be one of 2, 3"):
        load_config(["--train_data_dir=d", "--use_deepspeed", "--zero_stage=1"])
    cfg = load_config(["--train_data_dir=d", "--selective_ac=0.25"])
    assert cfg.model.gradient_checkpointing and cfg.model.gradient_checkpointing_every == 4
    notes = []
    cfg = load_config(["--train_data_dir=d", "--selective_ac=0.25", "--gradient_checkpointing"], notes)
    assert cfg.model.gradient_checkpointing_every == 1 and "already recomputes every block" in notes[0]


def test_readme_table_is_the_module_table():
    readme = (REPO / "README.md").read_text()
    assert videox_fun.markdown_table() in readme
    for name in [*THEIR_OPTIONS, *THEIR_LAUNCHER_OPTIONS]:
        assert f"| `--{name}`" in videox_fun.markdown_table(), name
    assert len(videox_fun.markdown_table().splitlines()) == 2 + len(THEIR_OPTIONS) + len(THEIR_LAUNCHER_OPTIONS)


def test_model_yaml_is_used_and_checked(tmp_path):
    good = tmp_path / "wan.yaml"
    good.write_text(CIVITAI_YAML.replace("shift: 5.0", "shift: 3.0").replace("text_length: 512", "text_length: 256"))
    notes: list[str] = []
    cfg = load_config(["--train_data_dir=d", f"--config_path={good}"], notes)
    assert (cfg.train.shift, cfg.model.tokenizer_max_length) == (3.0, 256)
    assert any("scheduler_kwargs.shift = 3.0 -> [train] shift" in n for n in notes)
    # A value the run sets itself must agree with the YAML.
    with pytest.raises(ConfigError, match=r"scheduler_kwargs.shift = 3.0 conflicts with \[train\] shift = 5.0"):
        load_config(["--train_data_dir=d", f"--config_path={good}", "--shift=5.0"])
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        CIVITAI_YAML.replace("dim_ffn: 10240", "dim_ffn: 2048").replace("use_dynamic_shifting: false",
                                                                          "use_dynamic_shifting: true")
        .replace("temporal_compression_ratio: 4", "temporal_compression_ratio: 8")
        .replace("tokenizer_subpath: google/umt5-xxl", "tokenizer_subpath: tok")
    )  # fmt: skip
    with pytest.raises(ConfigError) as info:
        load_config(["--train_data_dir=d", f"--config_path={bad}"])
    text = str(info.value)
    for part in ("dim_ffn = 2048, Wan2.1's umT5-XXL has 10240", "use_dynamic_shifting is not supported",
                 "temporal_compression_ratio = 8", "tokenizer_subpath 'tok'"):  # fmt: skip
        assert part in text, part
    assert len(info.value.problems) == 4
    # Another VAE file name is used from the release folder.
    other = tmp_path / "vae.yaml"
    other.write_text(CIVITAI_YAML.replace("vae_subpath: Wan2.1_VAE.pth", "vae_subpath: my_vae.pth"))
    cfg = load_config(["--train_data_dir=d", f"--config_path={other}", "--pretrained_model_name_or_path=/wan"])
    assert cfg.model.vae_path == "/wan/my_vae.pth"
    (tmp_path / "broken.yaml").write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(["--train_data_dir=d", f"--config_path={tmp_path / 'broken.yaml'}"])


@pytest.mark.slow
def test_a_pasted_line_trains_on_two_ranks(tmp_path):
    """VideoX-Fun's flags (sizes scaled to the debug models) through torchrun with 2 ranks: it trains,
    and each printed note appears once."""
    from train_runs import torchrun

    from tools.make_demo_data import make_demo_data

    data = tmp_path / "data"
    make_demo_data(data)
    flags = shlex.split(
        f"--cfg configs/debug.toml --use_deepspeed --zero_stage 2 --deepspeed_multinode_launcher standard "
        f"scripts/wan2.1/train.py --train_data_dir={data} --train_data_meta={data / 'metadata.json'} "
        "--image_sample_size=96 --video_sample_size=64 --token_sample_size=64 --video_sample_stride=2 "
        "--video_sample_n_frames=9 --train_batch_size=1 --video_repeat=1 --gradient_accumulation_steps=1 "
        "--dataloader_num_workers=0 --max_train_steps=3 --checkpointing_steps=50 --learning_rate=2e-05 "
        '--lr_scheduler="constant_with_warmup" --lr_warmup_steps=1 --seed=42 '
        f"--output_dir={tmp_path / 'out'} --gradient_checkpointing --mixed_precision=no --adam_weight_decay=3e-2 "
        "--adam_epsilon=1e-10 --vae_mini_batch=1 --max_grad_norm=0.05 --random_hw_adapt "
        "--training_with_video_token_length --enable_bucket --uniform_sampling --low_vram "
        '--train_mode="normal" --trainable_modules blocks head --validation_prompts "a dog, running" "a cat" '
        "--validation_steps=2 --validation_inference_steps=2 --report_to tensorboard --progress_bar=false"
    )
    proc = torchrun(data, tmp_path / "out", *flags, nproc=2, base=False)
    out = proc.stdout + proc.stderr
    assert "it fell" in out or "did NOT fall" in out
    assert "DiT on the zero2 engine" in out
    samples = sorted(p.name for p in (tmp_path / "out" / "samples").glob("step-*/*.mp4"))  # steps 2 and 3 (end)
    assert len(samples) == 4 and "running" in samples[0], samples  # a comma stays inside its prompt
    for note in ("--deepspeed_multinode_launcher: no effect here",
                 "scripts/wan2.1/train.py: no effect here", "mixed_precision 'no' is 'fp32' here"):  # fmt: skip
        assert out.count(note) == 1, (note, out[-3000:])


def test_deepspeed_file_stage_picks_the_engine_over_a_shipped_ddp_config(paths):
    notes: list[str] = []
    argv = ["--cfg", str(REPO / "configs" / "1.3b_ddp.toml"), "--use_deepspeed", "--deepspeed_config_file"]
    cfg = load_config([*argv, paths["ZERO3_JSON"], "--train_data_dir=d"], notes)
    assert cfg.parallel.engine == "zero3" and any("stage 3 -> engine zero3" in n for n in notes)
    # The command line's own choice stays; the engine then reports the conflict, naming the key.
    cfg = load_config([*argv, paths["ZERO3_JSON"], "--train_data_dir=d", "--engine=zero2"])
    assert cfg.parallel.engine == "zero2"


def test_a_bare_flag_before_the_script_path():
    notes: list[str] = []
    cfg = load_config(
        ["--use_deepspeed", "scripts/wan2.1/train.py", "--train_data_dir=d", "--low_vram", "false"], notes
    )
    assert cfg.parallel.engine == "zero2" and not cfg.model.low_vram
    assert notes == ["scripts/wan2.1/train.py: no effect here: the script of an accelerate command line is train.main"]
