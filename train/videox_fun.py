"""VideoX-Fun's command line, as its users paste it.

A user of VideoX-Fun's `scripts/wan2.1/train.py` runs ours with the same flags:
`torchrun --nproc_per_node 8 -m train.main --cfg configs/1.3b_ddp.toml <their flags>`, and may keep the
`accelerate launch` options of VideoX-Fun's documented command lines too. Every option has one status:

- same: a key of ours with that name and meaning (found in the config sections, not listed here);
- mapped: another key of ours, or another value of it (`--zero_stage 3` -> engine = zero3);
- ignored: accepted with one printed line saying why it has no effect here;
- refused: an error giving the reason and what to use instead.

`THEIR_DEFAULTS` records where VideoX-Fun's default differs from ours (only the README's table shows
it: a pasted line sets what it needs). The README's table is `markdown_table()`; a test keeps them equal.
"""

import json
from collections.abc import Mapping
from dataclasses import dataclass

from train.engines import DEFAULT_ENGINE, engine_family
from train.engines.deepspeed_config import STAGES

VIDEOX_FUN_LORA_RANK = 128  # train_lora.py's --rank default
FLAG, VALUE, VALUES = "flag", "value", "values"  # argparse store_true, one value, nargs="+"
STATUSES = ("same", "mapped", "ignored", "refused")


@dataclass(frozen=True)
class Option:
    status: str  # mapped, ignored or refused
    note: str  # why (ignored, refused) or how (mapped); printed or raised as is
    takes: str = VALUE
    target: str = ""  # mapped: "section.key"
    values: Mapping[str, str] | None = None  # mapped: their value -> ours (None: passed as given)
    launcher: bool = False  # an `accelerate launch` option, not one of train.py's


def _ignored(note: str, takes: str = VALUE, launcher: bool = False) -> Option:
    return Option("ignored", note, takes, launcher=launcher)


def _refused(note: str, takes: str = FLAG) -> Option:
    return Option("refused", note, takes)


_TORCHRUN = "torchrun sets it (--nnodes, --node_rank, --nproc_per_node, --master_addr, --master_port; see launch/)"

OPTIONS: dict[str, Option] = {
    # --- scripts/wan2.1/train.py ---------------------------------------------------------------------
    "input_perturbation": _ignored("VideoX-Fun's Wan2.1 script defines it but never uses it"),
    "revision": _ignored("weights are read from the local pretrained_model_name_or_path folder (no Hub download)"),
    "variant": _ignored("weights are read from the local pretrained_model_name_or_path folder (no Hub download)"),
    "cache_dir": _ignored("nothing is downloaded, so there is nothing to cache"),
    "non_ema_revision": _ignored("weights are read from the local folder (no Hub download)"),
    "validation_paths": Option(
        "mapped", "i2v first frames of the validation prompts", VALUES, target="validation.validation_images"
    ),
    "random_flip": _ignored("VideoX-Fun's Wan2.1 script defines it but never flips", FLAG),
    "multi_stream": _ignored("the VAE encodes on the training stream; results are the same", FLAG),
    "push_to_hub": _ignored("VideoX-Fun never pushes either; upload the tools/zero_to_bf16.py folder yourself", FLAG),
    "hub_token": _ignored("nothing is uploaded (the token is not stored or printed)"),
    "hub_model_id": _ignored("nothing is uploaded"),
    "prediction_type": _ignored("flow matching always predicts the velocity (VideoX-Fun ignores it too)"),
    "report_model_info": _ignored(
        "per-parameter gradient norms are not logged; the global gradient norm is, every step", FLAG
    ),
    "local_rank": _ignored("torchrun passes LOCAL_RANK in the environment, which is what is read"),
    "noise_offset": _ignored("VideoX-Fun's Wan2.1 script defines it but never uses it"),
    "tracker_project_name": _ignored("TensorBoard events go straight to logging_dir"),
    "snr_loss": _ignored("VideoX-Fun's Wan2.1 script defines it but never uses it", FLAG),
    "enable_text_encoder_in_dataloader": _ignored(
        "umT5 encodes in the training process (a copy per loader worker would cost 11 GB each)", FLAG
    ),
    "keep_all_node_same_token_length": _ignored(
        "every rank already trains the same shape at every step (one bucket, size and frame count per "
        "global step), which is what the option is for",
        FLAG,
    ),
    "abnormal_norm_clip_start": _ignored(
        "max_grad_norm clips on every engine from step 0; VideoX-Fun's ramp from initial_grad_norm_ratio x "
        "max_grad_norm over the first abnormal_norm_clip_start steps (DDP runs only) is not reproduced"
    ),
    "initial_grad_norm_ratio": _ignored(
        "max_grad_norm clips on every engine from step 0; VideoX-Fun's ramp (DDP runs only) is not reproduced"
    ),
    # No key of ours: their_option accepts 1000 (what we do) and refuses anything else.
    "train_sampling_steps": Option("mapped", "1000 only: timesteps span the scheduler's 1000 training steps"),
    "selective_ac": Option(
        "mapped",
        "a fraction p of DiT blocks recomputed in backward: gradient_checkpointing_every = round(1/p) "
        "(ignored when gradient_checkpointing is on, as in VideoX-Fun)",
        target="model.gradient_checkpointing_every",
    ),
    "use_came": _refused(
        "the CAME optimizer needs came_pytorch, which is not a dependency; AdamW trains every engine "
        "(for memory use offload_optimizer or engine zero2/zero3/fsdp)"
    ),
    "use_8bit_adam": _refused(
        "8-bit AdamW needs bitsandbytes (CUDA only), which is not a dependency; to save optimizer memory use "
        "engine zero2/zero3/fsdp (sharded AdamW) or offload_optimizer"
    ),
    "use_ema": Option(
        "mapped",
        "[ema] enabled with warmup: diffusers' EMAModel schedule as VideoX-Fun uses it (decay min(0.9999, "
        "(1 + n) / (10 + n))), sharded under every engine, zero3 included (which VideoX-Fun refuses)",
        FLAG,
    ),
    # --- scripts/wan2.1/train_lora.py's own options (rank, network_alpha, target_name, lora_skip_name: same) ---
    "use_peft_lora": Option(
        "mapped",
        "LoRA on ([lora] rank = 128, VideoX-Fun's default, unless --rank gives one), with peft's math (A kaiming, "
        "B zero, scale network_alpha / rank) in our own layer; the adapter exports for ComfyUI and diffusers",
        FLAG,
    ),
    "train_text_encoder": _refused(
        "a LoRA on the umT5 text encoder is not built; the adapter trains on the DiT only (VideoX-Fun's peft path "
        "does the same)"
    ),
    "noise_share_in_frames": _ignored("VideoX-Fun's train_lora.py defines it but never uses it", FLAG),
    "noise_share_in_frames_ratio": _ignored("VideoX-Fun's train_lora.py defines it but never uses it"),
    "save_state": _ignored(
        "every checkpoint holds the whole training state (adapter, optimizer, schedule, data position, RNG)", FLAG
    ),
    "random_ratio_crop": _refused(
        "random aspect-ratio crops are not built yet; every sample trains in its own aspect bucket (enable_bucket)"
    ),
    # --- scripts/wan2.2/train.py's own --------------------------------------------------------------------
    "boundary_type": Option(
        "mapped",
        "which Wan2.2 A14B expert trains: low, high, or full (both in one run: each step one, drawn with its "
        "timestep range's probability)",
        target="experts.train_experts",
        values={"low": "low", "high": "high", "full": "high,low"},
    ),
    # --- accelerate launch options of VideoX-Fun's documented command lines ----------------------------
    "zero_stage": Option(
        "mapped",
        "the DeepSpeed engine",
        target="parallel.engine",
        values={str(n): name for name, n in STAGES.items()},
        launcher=True,
    ),
    "deepspeed_config_file": Option(
        "mapped",
        "DeepSpeed JSON merged over ours ('auto' keeps ours); its zero_optimization.stage picks zero2/zero3",
        target="parallel.deepspeed_config",
        launcher=True,
    ),
    "zero3_save_16bit_model": Option(
        "mapped",
        "each checkpoint also holds the whole DiT in bf16 (consolidated/)",
        target="checkpoint.save_consolidated_weights",
        launcher=True,
    ),
    "zero3_init_flag": _ignored("zero3 always builds the DiT partitioned (zero.Init)", launcher=True),
    "deepspeed_multinode_launcher": _ignored(_TORCHRUN, launcher=True),
    "fsdp_sharding_strategy": Option(
        "mapped",
        "FULL_SHARD: reshard_after_forward = true; SHARD_GRAD_OP: false",
        target="parallel.reshard_after_forward",
        values={"FULL_SHARD": "true", "SHARD_GRAD_OP": "false", "1": "true", "2": "false"},
        launcher=True,
    ),
    "fsdp_offload_params": Option(
        "mapped", "parameters and optimizer state in host memory", target="parallel.offload_param", launcher=True
    ),
    "fsdp_auto_wrap_policy": _ignored("fsdp always shards each DiT block (and the rest as one unit)", launcher=True),
    "fsdp_transformer_layer_cls_to_wrap": _ignored("fsdp always shards each DiT block", launcher=True),
    "fsdp_state_dict_type": _ignored(
        "fsdp checkpoints are sharded (DCP); save_consolidated_weights adds a whole bf16 DiT", launcher=True
    ),
    "fsdp_backward_prefetch": _ignored("FSDP2 prefetches the next block in backward by itself", launcher=True),
    "fsdp_cpu_ram_efficient_loading": _ignored(
        "every engine loads the DiT one tensor at a time, never a full copy per rank", launcher=True
    ),
    "multi_gpu": _ignored(_TORCHRUN, FLAG, launcher=True),
    "num_processes": _ignored(_TORCHRUN, launcher=True),
    "num_machines": _ignored(_TORCHRUN, launcher=True),
    "machine_rank": _ignored(_TORCHRUN, launcher=True),
    "main_process_ip": _ignored(_TORCHRUN, launcher=True),
    "main_process_port": _ignored(_TORCHRUN, launcher=True),
}

# Values of our own keys that VideoX-Fun spells differently.
VALUE_ALIASES: dict[tuple[str, str], dict[str, str]] = {
    ("train", "mixed_precision"): {"no": "fp32"},
    ("model", "train_mode"): {"inpaint": "i2v"},
}

# Options of VideoX-Fun's train.py that are keys of ours with the same meaning (checked by a test to be
# keys of ours), with VideoX-Fun's default where it differs from ours.
SAME: tuple[str, ...] = (
    "pretrained_model_name_or_path", "train_data_dir", "train_data_meta", "max_train_samples", "output_dir",
    "seed", "train_batch_size", "vae_mini_batch", "num_train_epochs", "max_train_steps",
    "gradient_accumulation_steps", "gradient_checkpointing", "learning_rate", "scale_lr", "lr_scheduler",
    "lr_warmup_steps", "allow_tf32", "dataloader_num_workers", "adam_beta1", "adam_beta2", "adam_weight_decay",
    "adam_epsilon", "max_grad_norm", "logging_dir", "mixed_precision", "report_to", "checkpointing_steps",
    "checkpoints_total_limit", "resume_from_checkpoint", "uniform_sampling", "enable_bucket", "random_frame_crop",
    "random_hw_adapt", "training_with_video_token_length", "motion_sub_loss", "motion_sub_loss_ratio",
    "token_sample_size", "video_sample_size", "image_sample_size", "video_sample_stride", "video_sample_n_frames",
    "video_repeat", "config_path", "transformer_path", "vae_path", "trainable_modules",
    "trainable_modules_low_learning_rate", "tokenizer_max_length", "use_deepspeed", "use_fsdp", "low_vram",
    "train_mode", "weighting_scheme", "logit_mean", "logit_std", "mode_scale", "validation_prompts",
    "validation_steps", "validation_epochs",
    # train_lora.py's own
    "rank", "network_alpha", "target_name", "lora_skip_name",
)  # fmt: skip

THEIR_DEFAULTS: dict[str, str] = {
    "output_dir": "sd-model-finetuned",
    "seed": "none (unseeded)",
    "train_batch_size": "16",
    "vae_mini_batch": "32",
    "num_train_epochs": "100",
    "learning_rate": "1e-4",
    "lr_warmup_steps": "500",
    "dataloader_num_workers": "0",
    "logging_dir": "logs",
    "mixed_precision": "accelerate's",
    "enable_bucket": "false",
    "video_sample_stride": "4",
    "video_sample_n_frames": "17",
    "video_repeat": "0 (= 1)",
    "weighting_scheme": "none",
    "validation_epochs": "5",
    "rank": "128 (train_lora.py; 0 here: no LoRA unless set)",
    "target_name": "none (train_lora.py's peft path then fails)",
}

_NOTES_OF_SAME: dict[str, str] = {
    "mixed_precision": "also fp16 with loss scaling (ddp, fsdp; DeepSpeed on CUDA only); 'no' is fp32",
    "train_mode": "'inpaint' is i2v",
    "report_to": "tensorboard only; others are refused with the alternative",
    "motion_sub_loss": "differences over frames (VideoX-Fun's code takes them over channels)",
    "training_with_video_token_length": "alone: small batches repeated x2/x4; with random_hw_adapt: size and frames",
    "config_path": "read: file names used, shift and text length used, sizes checked",
    "transformer_path": "a DiT folder, or one .safetensors/.pth file whose tensors replace those they name",
    "vae_path": "a Wan2.1_VAE.pth-layout file or a diffusers VAE folder (loaded strictly)",
    "trainable_modules_low_learning_rate": "a second AdamW group at half the learning rate, on every engine",
    "weighting_scheme": "also 'uniform' (= none)",
    "lr_scheduler": "constant, constant_with_warmup, linear, cosine, cosine_with_restarts, polynomial",
    "validation_prompts": "sampled with the release's sampler (UniPC, guidance 5.0, its negative prompt), mp4 + TensorBoard",
    "validation_steps": "also once at the end of training",
    "rank": "[lora] rank: the adapter's rank; every engine (ddp, zero2, zero3, fsdp)",
    "target_name": "[lora]: module-name suffixes, as peft matches them (q: self_attn.q and cross_attn.q, not k_img)",
    "lora_skip_name": "[lora]: comma list of substrings; a layer holding one gets no adapter",
}


def their_option(name: str, text: str, flag: str, problems: list[str], notes: list[str]) -> list[tuple]:
    """A VideoX-Fun option that is not a key of ours (one of OPTIONS): the overrides it stands for,
    as (flag, section, key, text); its note or refusal recorded."""
    opt = OPTIONS[name]
    if opt.status == "ignored":
        notes.append(f"{flag}: no effect here: {opt.note}")
        return []
    if opt.status == "refused":
        problems.append(f"{flag} is not supported: {opt.note}")
        return []
    if name == "train_sampling_steps":
        if text.strip() != "1000":
            problems.append(f"{flag}={text}: {opt.note}")
        return []
    if name == "use_ema":
        on = text.strip().lower() in ("true", "1", "yes")
        return [(flag, "ema", "enabled", "true"), (flag, "ema", "warmup", "true")] if on else []
    if name == "use_peft_lora":
        return [(flag, "use_peft_lora", "", "")] if text.strip().lower() in ("true", "1", "yes") else []
    if name == "selective_ac":
        try:
            fraction = float(text)
        except ValueError:
            problems.append(f"{flag}: expected a number, got {text!r}")
            return []
        if not 0 <= fraction <= 1:
            problems.append(f"{flag} must be in [0, 1], got {text}")
            return []
        return [(flag, "selective_ac", "", str(fraction))] if fraction > 0 else []  # settled after the rest
    value = text
    if opt.values is not None:
        if text.strip() not in opt.values:
            problems.append(f"{flag} must be one of {', '.join(opt.values)}, got {text!r}")
            return []
        value = opt.values[text.strip()]
    section, key = opt.target.split(".")
    return [(flag, section, key, value)]


def settle(cfg, selective: float | None, from_cli: set[str], notes: list[str], lora_flag: bool = False) -> None:
    """Values that follow from others: VideoX-Fun's spellings of our values, selective_ac, use_peft_lora
    (LoRA at VideoX-Fun's default rank unless one is given), and the engine a --deepspeed_config_file's zero
    stage asks for (unless the command line chose one)."""
    if lora_flag and cfg.lora.rank == 0:
        cfg.lora.rank = VIDEOX_FUN_LORA_RANK
        notes.append(
            f"--use_peft_lora: LoRA of rank {VIDEOX_FUN_LORA_RANK} (VideoX-Fun's default; --rank sets another)"
        )
    for (section, key), aliases in VALUE_ALIASES.items():
        value = getattr(getattr(cfg, section), key)
        if value in aliases:
            setattr(getattr(cfg, section), key, aliases[value])
            notes.append(f"{key} {value!r} is {aliases[value]!r} here")
    if selective is not None:
        if cfg.model.gradient_checkpointing != "none":
            notes.append("--selective_ac: no effect: gradient_checkpointing already recomputes every block")
        else:
            every = max(1, round(1 / selective))
            cfg.model.gradient_checkpointing, cfg.model.gradient_checkpointing_every = "full", every
            notes.append(f"--selective_ac={selective:g}: one DiT block in {every} is recomputed in backward")
    source = cfg.parallel.deepspeed_config
    by_stage = {n: name for name, n in STAGES.items()}
    # The engine unless chosen: the default, or the one use_deepspeed picks by default.
    unchosen = (DEFAULT_ENGINE, engine_family("use_deepspeed")[0].name)
    if source and "parallel.engine" not in from_cli and cfg.parallel.engine in unchosen:
        try:
            with open(source, encoding="utf-8") as f:
                stage = json.load(f).get("zero_optimization", {}).get("stage")
        except (OSError, ValueError, AttributeError):
            return  # the engine reports an unreadable file, naming it
        if stage in by_stage and cfg.parallel.engine != by_stage[stage]:
            cfg.parallel.engine = by_stage[stage]
            notes.append(f"deepspeed_config {source}: zero_optimization.stage {stage} -> engine {by_stage[stage]}")


def markdown_table() -> str:
    """The README's table: every VideoX-Fun option, its status here, and why or how."""
    rows = ["| option | status | here |", "|---|---|---|"]
    names = sorted({*SAME, *OPTIONS})
    for name in names:
        if name in OPTIONS:
            opt = OPTIONS[name]
            where = " (accelerate launch)" if opt.launcher else ""
            target = f"`{opt.target}`: " if opt.target else ""
            rows.append(f"| `--{name}`{where} | {opt.status} | {target}{opt.note} |")
        else:
            notes = [_NOTES_OF_SAME.get(name, "")]
            if name in THEIR_DEFAULTS:
                notes.append(f"VideoX-Fun's default: {THEIR_DEFAULTS[name]}")
            rows.append(f"| `--{name}` | same | {'; '.join(n for n in notes if n)} |")
    return "\n".join(rows) + "\n"


def apply_model_yaml(cfg, explicit: set[str]) -> tuple[list[str], list[str]]:
    """Read `[model] config_path` (VideoX-Fun's model YAML, e.g. config/wan2.1/wan_civitai.yaml) into
    `cfg`: its scheduler shift and text length are used unless the run sets them (then they must agree),
    its VAE file name is used, and every other value that matters is checked against what the release
    folder holds. Returns (problems, notes). `explicit`: the "section.key"s the TOML or CLI set."""
    import yaml  # only --config_path needs it

    from train.models import CLIP_FILE, T5_FILE, TOKENIZER_DIR, VAE22_FILE, VAE_FILE
    from wan.modules.dit_weights import EXPERT_FOLDERS
    from wan.modules.t5 import T5_PRESETS

    path = cfg.model.config_path
    if not path:
        return [], []
    where = f"config_path {path}"
    try:
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f)
    except OSError as err:
        return [f"{where}: cannot read it ({err.strerror})"], []
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        return [f"{where}: not valid YAML ({err})"], []
    if not isinstance(doc, dict):
        return [f"{where}: expected a mapping of sections, got {type(doc).__name__}"], []
    problems: list[str] = []
    notes: list[str] = []

    def section(name: str) -> dict:
        value = doc.get(name) or {}
        if not isinstance(value, dict):
            problems.append(f"{where}: {name} must be a mapping, got {value!r}")
            return {}
        return value

    def use(key: str, value, label: str) -> None:
        """Take a YAML value for `key` ("section.key") unless the run set another one."""
        group, name = key.split(".")
        current = getattr(getattr(cfg, group), name)
        if key in explicit and current != value:
            problems.append(f"{where}: {label} = {value!r} conflicts with [{group}] {name} = {current!r}; keep one")
        elif current != value:
            setattr(getattr(cfg, group), name, value)
            notes.append(f"{where}: {label} = {value!r} -> [{group}] {name}")

    if doc.get("format", "civitai") not in ("civitai", "diffusers"):
        problems.append(f"{where}: format {doc.get('format')!r} is not civitai (a Wan2.1 release) or diffusers")
    dit = section("transformer_additional_kwargs")
    sub = str(dit.get("transformer_subpath", "./"))
    if sub.strip("/") not in ("", "."):
        problems.append(
            f"{where}: transformer_additional_kwargs.transformer_subpath {sub!r}: the DiT is read from the "
            f"release folder itself; set transformer_path = <release>/{sub} instead"
        )
    # Wan2.2 (config/wan2.2/*.yaml): the A14B experts' sub-folders are the release's (or "./": one DiT) and
    # their boundary is [experts] boundary.
    for expert, (folder, _) in EXPERT_FOLDERS.items():
        key = f"transformer_{expert}_noise_model_subpath"
        value = str(dit.get(key, f"./{folder}")).strip("/")
        if value not in (folder, f"./{folder}", "", "."):
            problems.append(f"{where}: transformer_additional_kwargs.{key} {dit[key]!r}: the release's {folder}/ is "
                            "read (rename the folder)")  # fmt: skip
    if "boundary" in dit:
        use("experts.boundary", float(dit["boundary"]), "transformer_additional_kwargs.boundary")
    vae = section("vae_kwargs")
    vae_file = vae.get("vae_subpath")
    wan22_vae = vae_file == VAE22_FILE
    for key, want in (("temporal_compression_ratio", 4), ("spatial_compression_ratio", 16 if wan22_vae else 8)):
        if key in vae and vae[key] != want:
            problems.append(f"{where}: vae_kwargs.{key} = {vae[key]!r}, the {'Wan2.2' if wan22_vae else 'Wan2.1'} "
                            f"VAE's is {want}")  # fmt: skip
    if vae_file and vae_file not in (VAE_FILE, VAE22_FILE) and cfg.model.pretrained_model_name_or_path:
        if cfg.model.vae_path:
            notes.append(f"{where}: vae_kwargs.vae_subpath {vae_file!r} is replaced by vae_path {cfg.model.vae_path}")
        else:
            use("model.vae_path", f"{cfg.model.pretrained_model_name_or_path.rstrip('/')}/{vae_file}", "vae_subpath")
    text = section("text_encoder_kwargs")
    image = section("image_encoder_kwargs")
    for group, key, ours in (
        (text, "text_encoder_subpath", T5_FILE),
        (text, "tokenizer_subpath", TOKENIZER_DIR),
        (image, "image_encoder_subpath", CLIP_FILE),
    ):
        value = group.get(key)
        if value is not None and str(value).strip("/") != ours:
            problems.append(f"{where}: {key} {value!r}: the release layout read here has {ours}; rename the file")
    umt5 = T5_PRESETS["umt5-xxl"]
    for key, ours in umt5.items():
        if key in text and text[key] != ours:
            problems.append(f"{where}: text_encoder_kwargs.{key} = {text[key]!r}, Wan2.1's umT5-XXL has {ours}")
    if text.get("shared_pos"):
        problems.append(f"{where}: text_encoder_kwargs.shared_pos = true, Wan2.1's umT5 has a bias per block")
    if "text_length" in text:
        use("model.tokenizer_max_length", text["text_length"], "text_encoder_kwargs.text_length")
    scheduler = section("scheduler_kwargs")
    if scheduler.get("num_train_timesteps", 1000) != 1000:
        problems.append(f"{where}: scheduler_kwargs.num_train_timesteps must be 1000 (Wan2.1's), got "
                        f"{scheduler['num_train_timesteps']!r}")  # fmt: skip
    if scheduler.get("use_dynamic_shifting"):
        problems.append(f"{where}: scheduler_kwargs.use_dynamic_shifting is not supported; set a fixed shift")
    if "shift" in scheduler:
        use("train.shift", float(scheduler["shift"]), "scheduler_kwargs.shift")
    return problems, notes
