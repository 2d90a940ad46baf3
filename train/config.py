"""The run configuration: one dataclass per TOML section, loaded from `--cfg FILE` then CLI overrides.

Key names are VideoX-Fun's, so `--learning_rate=2e-05` style flags carry over (a flat key works when
it lives in one section). Every problem (types, unknown keys, bad values) is collected and raised at
once in a ConfigError, before any model or data is touched.
"""

import ast
import difflib
import functools
import inspect
import itertools
import json
import os
import sys
import textwrap
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from train.data.loader import DataConfig
from train.ema import EMAConfig
from train.engines import DEFAULT_ENGINE, REGISTRY, engine_family, engine_names
from train.engines.base import check_mixed_precision
from train.experts import ExpertsConfig
from train.flow import MODE_SCALE_RANGE, WEIGHTING_SCHEMES
from train.lr import LR_SCHEDULERS
from train.validation import ValidationConfig
from train.videox_fun import FLAG, OPTIONS, VALUES, apply_model_yaml, settle, their_option
from wan.configs import DIT_PRESETS
from wan.modules.attention import ATTENTION_BACKENDS, resolve_attention_backend
from wan.modules.checkpointing import CHECKPOINTING_MODES, ActivationCheckpointing
from wan.modules.lora import LORA_INITS, LoRASpec

TRAIN_MODES = ("normal", "i2v", "ti2v")
# String keys that also take a boolean (their older spelling): true / false -> these values.
BOOLEAN_CHOICES: dict[tuple[str, str], dict[bool, str]] = {
    ("model", "gradient_checkpointing"): {True: "full", False: "none"},
}
BOOLEAN_CHOICE_WORDS: dict[tuple[str, str], tuple[str, ...]] = {
    ("model", "gradient_checkpointing"): CHECKPOINTING_MODES
}
MIXED_PRECISIONS = ("bf16", "fp16", "fp32")
REPORT_TO = ("tensorboard",)
BACKENDS = ("auto", "nccl", "gloo")


def _choice(name: str, value: str, choices: tuple[str, ...]) -> list[str]:
    return [] if value in choices else [f"{name} must be one of {', '.join(choices)}, got {value!r}"]


def _at_least(section: object, low: int, *names: str) -> list[str]:
    return [f"{n} must be >= {low}, got {getattr(section, n)}" for n in names if getattr(section, n) < low]


@dataclass
class ModelConfig:
    pretrained_model_name_or_path: str = ""
    """Wan2.1 release folder: DiT config.json + safetensors, Wan2.1_VAE.pth, models_t5_umt5-xxl-enc-bf16.pth,
    the google/umt5-xxl tokenizer and, for i2v, the CLIP .pth. Empty: random weights sized by preset."""
    transformer_path: str = ""
    """A DiT folder whose weights replace the release's (VideoX-Fun's name): e.g. the output of
    tools/zero_to_bf16.py, to continue on another engine or number of GPUs. Empty: the release's DiT."""
    vae_path: str = ""
    """A VAE weights file (.pth or .safetensors) that replaces the release's Wan2.1_VAE.pth."""
    config_path: str = ""
    """VideoX-Fun's model YAML (e.g. config/wan2.1/wan_civitai.yaml): its file names are used and its
    scheduler shift, text length and encoder sizes checked against the release; conflicts are errors."""
    tokenizer_max_length: int = 512
    """Text tokens per prompt (longer prompts are truncated); Wan2.1 was trained with 512."""
    preset: str = "debug"
    """Sizes of the random-weight models when there is no pretrained path: debug, debug-i2v, 1.3B, 14B, i2v-14B."""
    train_mode: str = "normal"
    """"normal" (text-to-video) or "i2v" (first-frame conditioning)."""
    trainable_modules: list[str] = field(default_factory=lambda: ["."])
    """Parameter name substrings: a parameter trains if any matches; "." trains all."""
    trainable_modules_low_learning_rate: list[str] = field(default_factory=list)
    """Parameter name substrings that train at half the learning rate (when trainable_modules does
    not already match them)."""
    gradient_checkpointing: str = "none"
    """Activation checkpointing of the DiT blocks: "full" (recompute each block in backward: least
    memory, ~1/3 more compute), "selective" (keep the attention outputs, recompute the cheap rest) or
    "none". true / false mean "full" / "none"."""
    gradient_checkpointing_every: int = 1
    """Checkpoint every k-th block only (1: all blocks)."""
    selective_checkpoint_matmuls: bool = False
    """With gradient_checkpointing = "selective", also keep the large matmul outputs (more memory,
    less recompute)."""
    compile: bool = False
    """torch.compile each DiT block (bucketed shapes; recompiles are counted and logged)."""
    attention_backend: str = "auto"
    """SDPA kernel: "auto" (cuDNN on Hopper, flash elsewhere, FlashAttention-3 when flash_attn_interface
    is installed; the math kernel on the CPU), "cudnn", "flash", "efficient", "math" or "fa3"."""
    low_vram: bool = False
    """Keep the VAE, text and image encoders off the GPU except while they encode."""
    vae_mini_batch: int = 1
    """Clips the VAE encodes at once."""

    @property
    def checkpoint_policy(self) -> ActivationCheckpointing:
        """gradient_checkpointing, gradient_checkpointing_every and selective_checkpoint_matmuls as one
        value (raises ValueError where problems() would report them)."""
        return ActivationCheckpointing(
            self.gradient_checkpointing, self.gradient_checkpointing_every, self.selective_checkpoint_matmuls
        )

    def problems(self) -> list[str]:
        out = _choice("train_mode", self.train_mode, TRAIN_MODES) + _choice("preset", self.preset, tuple(DIT_PRESETS))
        out += _choice("gradient_checkpointing", self.gradient_checkpointing, CHECKPOINTING_MODES)
        out += _choice("attention_backend", self.attention_backend, ATTENTION_BACKENDS)
        if self.selective_checkpoint_matmuls and self.gradient_checkpointing != "selective":
            out.append('selective_checkpoint_matmuls needs gradient_checkpointing = "selective"')
        if not self.trainable_modules:
            out.append('trainable_modules is empty: nothing would train ("." trains all)')
        out += _at_least(self, 1, "gradient_checkpointing_every", "vae_mini_batch", "tokenizer_max_length")
        # A random-weight DiT's input width (16 t2v, 36 i2v) must match the mode's latents.
        if not self.pretrained_model_name_or_path and self.preset in DIT_PRESETS:
            model_type = DIT_PRESETS[self.preset]["model_type"]
            from train.models import mode_fits

            if not mode_fits(model_type, self.train_mode):
                out.append(f"train_mode {self.train_mode!r} does not fit the {model_type} preset {self.preset!r}")
        return out


@dataclass
class TrainConfig:
    output_dir: str = "output"
    """Folder for checkpoints, TensorBoard logs and the resolved config."""
    max_train_steps: int = 0
    """Optimizer steps to run; 0: run num_train_epochs."""
    num_train_epochs: int = 1
    """Passes over the data when max_train_steps is 0."""
    train_batch_size: int = 1
    """Samples per rank per micro-step."""
    gradient_accumulation_steps: int = 1
    """Micro-steps per optimizer step."""
    seed: int = 42
    """Seed of the data order, timesteps, noise and random init."""
    mixed_precision: str = "bf16"
    """"bf16" (bf16 autocast with fp32 master weights), "fp16" (fp16 autocast with loss scaling; CUDA
    only) or "fp32". VideoX-Fun's "no" means fp32."""
    allow_tf32: bool = False
    """Let CUDA matmuls and convolutions of fp32 work use TF32 (faster on Ampere and later, ~10 bits of
    mantissa); no effect on the CPU or on bf16/fp16 work."""
    uniform_sampling: bool = False
    """Stratify timesteps over the global batch so it covers [0, 1000)."""
    weighting_scheme: str = "logit_normal"
    """Timestep density when uniform_sampling is off, and loss weighting, as diffusers' SD3 helpers:
    "logit_normal", "mode" (mode_scale) or "uniform" ("none") draw t with weight 1; "sigma_sqrt"
    (weight sigma^-2) and "cosmap" draw t uniformly and weight the loss."""
    logit_mean: float = 0.0
    """Mean of the logit-normal timestep density."""
    logit_std: float = 1.0
    """Standard deviation of the logit-normal timestep density."""
    mode_scale: float = 1.29
    """Scale of the "mode" timestep density."""
    motion_sub_loss: bool = False
    """Add the MSE between frame-to-frame differences of prediction and target (motion)."""
    motion_sub_loss_ratio: float = 0.25
    """Loss = (1 - r) * MSE + r * motion MSE when motion_sub_loss is on."""
    shift: float = 5.0
    """Training sigma shift: 5.0 for T2V, 3.0 for I2V 480p."""
    max_nonfinite_steps: int = 5
    """Skipped updates (NaN/inf loss or gradient) in a row before the run stops; fp16 runs allow 16 more
    for loss-scale overflows (a finite loss)."""

    def problems(self) -> list[str]:
        out = _choice("mixed_precision", self.mixed_precision, MIXED_PRECISIONS)
        out += _choice("weighting_scheme", self.weighting_scheme, WEIGHTING_SCHEMES)
        out += _at_least(self, 1, "train_batch_size", "gradient_accumulation_steps", "max_nonfinite_steps")
        out += _at_least(self, 0, "max_train_steps")
        if self.max_train_steps <= 0:
            out += _at_least(self, 1, "num_train_epochs")
        if not 0 <= self.seed < 2**32:  # numpy's seed range
            out.append(f"seed must be in [0, 2**32), got {self.seed}")
        if not self.output_dir:
            out.append("output_dir must not be empty")
        # `not x > 0` also refuses NaN.
        out += [f"{n} must be > 0, got {getattr(self, n)}" for n in ("shift", "logit_std") if not getattr(self, n) > 0]
        lo, hi = MODE_SCALE_RANGE
        if self.weighting_scheme == "mode" and not lo <= self.mode_scale <= hi:
            out.append(f"mode_scale must be in [{lo:g}, {hi:.3f}] (a density on [0, 1]), got {self.mode_scale}")
        if not 0 <= self.motion_sub_loss_ratio <= 1:
            out.append(f"motion_sub_loss_ratio must be in [0, 1], got {self.motion_sub_loss_ratio}")
        return out


@dataclass
class OptimConfig:
    learning_rate: float = 2e-5
    """Peak AdamW learning rate."""
    lr_scheduler: str = "constant"
    """constant, constant_with_warmup, linear, cosine, cosine_with_restarts (one cycle, as diffusers'
    default) or polynomial (linear decay to 1e-7, diffusers' defaults); the decays end at the last step."""
    scale_lr: bool = False
    """Multiply learning_rate by train_batch_size x gradient_accumulation_steps x ranks (the global batch)."""
    lr_warmup_steps: int = 0
    """Optimizer steps of linear warmup from 0."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    adam_weight_decay: float = 1e-2
    """AdamW decoupled weight decay."""
    adam_epsilon: float = 1e-8
    """AdamW epsilon."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this on every engine; 0 disables clipping."""

    def problems(self) -> list[str]:
        out = _choice("lr_scheduler", self.lr_scheduler, LR_SCHEDULERS) + _at_least(self, 0, "lr_warmup_steps")
        for name in ("learning_rate", "adam_epsilon"):
            if not getattr(self, name) > 0:
                out.append(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                out.append(f"{name} must be in [0, 1), got {getattr(self, name)}")
        for name in ("adam_weight_decay", "max_grad_norm"):
            if not getattr(self, name) >= 0:
                out.append(f"{name} must be >= 0, got {getattr(self, name)}")
        return out


@dataclass
class CheckpointConfig:
    checkpointing_steps: int = 500
    """Save every N optimizer steps; 0: only at the end."""
    checkpoints_total_limit: int = 0
    """Keep the newest N complete checkpoints; 0 keeps all."""
    resume_from_checkpoint: str = ""
    """A checkpoint folder; "latest": the newest checkpoint-N that verifies (none does: an error); "none"/"": fresh."""
    save_consolidated_weights: bool = False
    """Also write the whole DiT in bf16 in the official layout into each checkpoint (consolidated/),
    streamed one tensor at a time (VideoX-Fun's zero3_save_16bit_model); tools/zero_to_bf16.py does
    the same afterwards from any checkpoint."""

    def problems(self) -> list[str]:
        return _at_least(self, 0, "checkpointing_steps", "checkpoints_total_limit")


@dataclass
class LoggingConfig:
    log_every: int = 1
    """Console line every N steps (rank 0 only)."""
    progress_bar: bool = True
    """Show a progress bar on rank 0."""
    loss_smoothing: float = 0.9
    """EMA factor of the smoothed loss shown and logged (0: no smoothing)."""
    timestep_bins: int = 10
    """Bins of the loss-by-timestep curves in TensorBoard."""
    logging_dir: str = "tensorboard"
    """TensorBoard folder, relative to output_dir (VideoX-Fun's name; an absolute path is used as is)."""
    report_to: str = "tensorboard"
    """Where curves go: "tensorboard" (the only built-in tracker; wandb can sync its folder)."""
    peak_tflops: float = 0.0
    """The accelerator's dense bf16 peak in TFLOP/s for MFU; 0: from the GPU's name (none on the CPU)."""

    def problems(self) -> list[str]:
        out = _at_least(self, 1, "log_every", "timestep_bins")
        if self.report_to not in REPORT_TO:
            out.append(
                f"report_to {self.report_to!r} is not built in: curves go to TensorBoard only; use "
                "report_to = tensorboard (wandb can mirror it: wandb sync --sync-tensorboard <logging_dir>)"
            )
        if not self.logging_dir:
            out.append("logging_dir must not be empty")
        if not self.peak_tflops >= 0:
            out.append(f"peak_tflops must be >= 0 (0: from the GPU's name), got {self.peak_tflops}")
        if not 0 <= self.loss_smoothing < 1:
            out.append(f"loss_smoothing must be in [0, 1), got {self.loss_smoothing}")
        return out


@dataclass
class LoRAConfig:
    rank: int = 0
    """LoRA rank (VideoX-Fun's --rank): train a low-rank adapter on the target_name layers instead of the
    DiT's weights, which stay frozen (bf16 under bf16/fp16 mixed precision). 0: no LoRA."""
    network_alpha: float = 64.0
    """The adapter's update is scaled by network_alpha / rank (VideoX-Fun's --network_alpha)."""
    target_name: str = "q,k,v,ffn.0,ffn.2"
    """Comma list of module-name suffixes: each Linear of a DiT block whose name ends with one gets an
    adapter ("q" adapts self_attn.q and cross_attn.q; VideoX-Fun's --target_name)."""
    lora_skip_name: str = ""
    """Comma list of substrings: a layer whose name holds one gets no adapter (VideoX-Fun's --lora_skip_name,
    e.g. "blocks.0." leaves the first block alone)."""
    dropout: float = 0.0
    """Dropout on the adapter's input while training (peft's lora_dropout)."""
    init: str = "kaiming"
    """How the adapter's A matrix starts (B starts at zero): "kaiming" (peft's default) or "gaussian"."""

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def spec(self) -> LoRASpec | None:
        """The adapter's shape and scale, None without LoRA."""
        if not self.enabled:
            return None
        targets = tuple(t.strip() for t in self.target_name.split(",") if t.strip())
        skip = tuple(s.strip() for s in self.lora_skip_name.split(",") if s.strip())
        return LoRASpec(self.rank, self.network_alpha, targets, self.dropout, self.init, skip)

    def problems(self) -> list[str]:
        out = _at_least(self, 0, "rank") + _choice("init", self.init, LORA_INITS)
        if not self.network_alpha > 0:
            out.append(f"network_alpha must be > 0, got {self.network_alpha}")
        if not 0 <= self.dropout < 1:
            out.append(f"dropout must be in [0, 1), got {self.dropout}")
        if self.enabled and not any(t.strip() for t in self.target_name.split(",")):
            out.append('target_name is empty: name the layers to adapt, e.g. "q,k,v,o,ffn.0,ffn.2"')
        return out


def _one_of(names: list[str]) -> str:
    return " or ".join(names) if len(names) < 3 else ", ".join(names[:-1]) + " or " + names[-1]


@dataclass
class ParallelConfig:
    engine: str = DEFAULT_ENGINE
    """Distributed engine, one of train/engines' registry: ddp (whole model on every rank), zero2
    (DeepSpeed: optimizer state and gradients sharded), zero3 (DeepSpeed: parameters too), fsdp (FSDP2:
    everything sharded)."""
    backend: str = "auto"
    """torch.distributed backend: "auto" (nccl with GPUs, gloo without), "nccl" or "gloo"."""
    use_deepspeed: bool = False
    """VideoX-Fun's flag: a DeepSpeed engine, zero2 unless engine says zero3."""
    use_fsdp: bool = False
    """VideoX-Fun's flag: the fsdp engine."""
    deepspeed_config: str = ""
    """Optional DeepSpeed JSON file for experts: its values win over the generated ones (printed)."""
    offload_optimizer: bool = False
    """zero2, zero3, fsdp: keep the fp32 master weights and optimizer state in host memory."""
    offload_param: bool = False
    """zero3, fsdp: keep the sharded parameters in host memory between uses."""
    reduce_bucket_size: int = 500_000_000
    """DeepSpeed: elements per gradient reduce bucket."""
    allgather_bucket_size: int = 500_000_000
    """DeepSpeed ZeRO-2: elements per parameter all-gather bucket."""
    overlap_comm: bool = True
    """DeepSpeed: overlap gradient reduction with the backward pass."""
    stage3_prefetch_bucket_size: int = 50_000_000
    """DeepSpeed ZeRO-3: elements of parameters fetched ahead of use."""
    stage3_param_persistence_threshold: int = 100_000
    """DeepSpeed ZeRO-3: parameters with fewer elements stay whole on every rank."""
    stage3_max_live_parameters: int = 1_000_000_000
    """DeepSpeed ZeRO-3: parameter elements kept gathered at once."""
    reshard_after_forward: bool = True
    """fsdp: free gathered parameters after forward (gathered again for backward): less memory."""
    reduce_every_micro_step: bool = True
    """fsdp: reduce-scatter gradients on every micro-step; false accumulates full-size unsharded
    gradients on every rank until the last micro-step (56 GB at 14B) to save communication."""
    sp: int = 1
    """Sequence parallel (Ulysses) degree: each group of sp consecutive ranks trains the same samples,
    each rank on 1/sp of the video tokens, so activation memory divides by sp. The number of ranks and
    the DiT's heads (1.3B: 12, 14B: 40) must divide by it; the data-parallel size is ranks / sp. 1: off."""

    def problems(self) -> list[str]:
        out = _choice("engine", self.engine, engine_names()) + _choice("backend", self.backend, BACKENDS)
        traits = REGISTRY.get(self.engine)
        flag = traits.videox_fun_flag if traits else ""
        # After resolve(): use_deepspeed / use_fsdp have set the engine unless another was chosen.
        if self.use_deepspeed and traits and flag != "use_deepspeed":
            out.append(f"use_deepspeed asks for a DeepSpeed engine, but engine = {self.engine!r}")
        if self.use_fsdp and traits and (flag != "use_fsdp" or self.use_deepspeed):
            fsdp = engine_family("use_fsdp")[0].name
            out.append(f"use_fsdp asks for the {fsdp} engine, but engine = {self.engine!r}"
                       + (" and use_deepspeed is set" if self.use_deepspeed else ""))  # fmt: skip
        if self.deepspeed_config and traits and flag != "use_deepspeed" and not self.use_deepspeed:
            out.append(f"deepspeed_config is set, but engine {self.engine!r} is not a DeepSpeed engine")
        for offload in ("optimizer", "param"):
            if getattr(self, f"offload_{offload}") and traits and offload not in traits.offloads:
                if offload == "optimizer" and self.use_deepspeed:
                    continue  # said above: use_deepspeed with an engine that is not DeepSpeed's
                able = [t.name for t in REGISTRY.values() if offload in t.offloads]
                out.append(f"offload_{offload} needs engine {_one_of(able)}, not {self.engine!r}")
        out += _at_least(self, 0, "stage3_param_persistence_threshold") + _at_least(self, 1, "sp")
        out += _at_least(self, 1, "reduce_bucket_size", "allgather_bucket_size", "stage3_prefetch_bucket_size",
                         "stage3_max_live_parameters")  # fmt: skip
        return out

    def resolve(self) -> None:
        """VideoX-Fun's --use_deepspeed means a DeepSpeed engine: zero2 unless zero3 was chosen."""
        if self.use_deepspeed and self.engine == DEFAULT_ENGINE:
            self.engine = engine_family("use_deepspeed")[0].name
        if self.use_fsdp and self.engine == DEFAULT_ENGINE and not self.use_deepspeed:
            self.engine = engine_family("use_fsdp")[0].name


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    experts: ExpertsConfig = field(default_factory=ExpertsConfig)

    def problems(self) -> list[str]:
        out = [f"[{f.name}] {p}" for f in fields(self) for p in getattr(self, f.name).problems()]
        v = self.validation
        if v.validation_images and self.model.train_mode == "normal":
            out.append(
                '[validation] validation_images are first frames for train_mode = "i2v" or "ti2v"; this run is '
                "text-to-video"
            )
        # i2v samples from first frames; ti2v from first frames when given, else from text alone.
        if (self.model.train_mode == "i2v" or v.validation_images) and v.validation_prompts:
            n, m = len(v.validation_images), len(v.validation_prompts)
            if n not in (1, m):
                out.append(
                    f"[validation] {self.model.train_mode} needs one validation image for all prompts or one per "
                    f"prompt ({m}), got {n}"
                )
        if v.eval_holdout and self.data.train_data_meta == "" and self.data.train_data_dir == "":
            out.append("[validation] eval_holdout needs a training set to hold clips out of")
        if self.lora.enabled and self.model.trainable_modules != ["."]:
            out.append(
                f"[model] trainable_modules {self.model.trainable_modules} with [lora] rank = {self.lora.rank}: "
                "a LoRA run trains the adapter only (leave trainable_modules at its default)"
            )
        if self.lora.enabled and self.model.trainable_modules_low_learning_rate:
            out.append("[model] trainable_modules_low_learning_rate with [lora]: a LoRA run trains the adapter only")
        traits = REGISTRY.get(self.parallel.engine)
        if self.model.compile and traits and traits.compiles:
            out.append(
                f"[model] compile = true does not work with [parallel] engine = {traits.name!r}: {traits.compiles}"
            )
        return out


# Section name -> class; the loader looks keys up here (tests add a section to make a key ambiguous).
SECTIONS: dict[str, type] = {f.name: f.default_factory for f in fields(RunConfig)}
_TYPE_NAMES = {
    str: "a string", int: "an integer", float: "a number", bool: "a boolean", list[str]: "a list of strings",
    list[float]: "a list of numbers",
}  # fmt: skip
# List keys whose items are prose (prompts hold commas): on the command line each token is one item,
# never split at commas (a TOML array ["a", "b"] also works).
PROSE_LISTS = ("validation_prompts",)
_BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


class ConfigError(ValueError):
    """Every problem of a run configuration, one per line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        count = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
        super().__init__(f"invalid run configuration ({count}):\n  " + "\n  ".join(problems))


@functools.cache
def _types(cls: type) -> dict[str, Any]:
    return {f.name: typing.get_type_hints(cls)[f.name] for f in fields(cls)}


@functools.cache
def _docs(cls: type) -> dict[str, str]:
    """Attribute docstrings: the string literal on the line after each field."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    return {
        a.target.id: inspect.cleandoc(b.value.value)
        for a, b in itertools.pairwise(body)
        if isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name)
        and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant) and isinstance(b.value.value, str)
    }  # fmt: skip


def _hint(name: str, known: typing.Iterable[str], cutoff: float = 0.7) -> str:
    # 0.7, not difflib's 0.6: close misspellings only (learning_rat, modle, optimizer -> optim), not
    # unrelated keys that share a prefix (logging_dir -> logit_std at 0.6).
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=cutoff)
    return f" (did you mean {close[0]}?)" if close else ""


def _owners(key: str) -> list[str]:
    return [s for s, cls in SECTIONS.items() if key in _types(cls)]


def _from_toml(value: Any, typ: Any) -> Any:
    """A TOML value checked against a field type (no strings parsed: a string for an int is an error)."""
    if typ is bool or typ is str:
        ok = isinstance(value, typ)
    elif typ is int or typ is float:
        ok = isinstance(value, (int, typ)) and not isinstance(value, bool)  # bool is an int subclass
    elif typ == list[str]:
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    elif typ == list[float]:
        ok = isinstance(value, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    else:
        raise TypeError(f"config fields of type {typ} are not supported")
    if not ok:
        raise ValueError
    if typ == list[float]:
        return [float(v) for v in value]
    return float(value) if typ is float else list(value) if typ == list[str] else value


def _from_cli(text: str, typ: Any) -> Any:
    if typ is bool:
        if text.lower() not in _BOOLS:
            raise ValueError
        return _BOOLS[text.lower()]
    if typ is int or typ is float:
        return typ(text)
    if typ == list[str] or typ == list[float]:
        if text.lstrip().startswith("["):  # a TOML array: ["a", "b"]
            try:
                return _from_toml(tomllib.loads(f"v = {text}")["v"], typ)
            except tomllib.TOMLDecodeError:
                raise ValueError from None
        parts = [part.strip() for part in text.split(",") if part.strip()]
        return parts if typ == list[str] else [float(part) for part in parts]
    return _from_toml(text, typ)


def _locate(name: str, flag: str, problems: list[str]) -> tuple[str, str] | None:
    """The (section, key) a CLI option names, or None after recording why not."""
    if "." in name:
        section, key = name.split(".", 1)
        if section not in SECTIONS:
            problems.append(f"{flag}: unknown section [{section}]{_hint(section, SECTIONS)}")
        elif key not in _types(SECTIONS[section]):
            problems.append(f"{flag}: unknown key [{section}] {key}{_hint(key, _types(SECTIONS[section]))}")
        else:
            return section, key
        return None
    owners = _owners(name)
    if len(owners) == 1:
        return owners[0], name
    if owners:
        choices = " or ".join(f"--{s}.{name}" for s in owners)
        problems.append(f"{flag} is ambiguous: {name} is in {', '.join(f'[{s}]' for s in owners)}; write {choices}")
    else:
        # VideoX-Fun's options are names a pasted line may misspell too (deepspeed_multinode_launcherr),
        # but closer only: theirs share long prefixes, and most do nothing here (push_to_wandb is not
        # push_to_hub, at 0.75).
        ours = [k for c in SECTIONS.values() for k in _types(c)]
        problems.append(f"{flag}: unknown option{_hint(name, ours) or _hint(name, OPTIONS, cutoff=0.85)}")
    return None


def _apply_toml(cfg: RunConfig, path: str, problems: list[str], explicit: set[str]) -> None:
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except OSError as e:  # missing file, a folder, no permission
        problems.append(f"--cfg {path}: cannot read it ({e.strerror})")
        return
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        problems.append(f"{path}: TOML syntax error: {e}")
        return
    for top, table in doc.items():
        if top not in SECTIONS:
            if isinstance(table, dict):
                problems.append(f"{path}: unknown section [{top}]{_hint(top, SECTIONS)}")
            elif _owners(top):
                problems.append(f"{path}: top-level key {top} belongs in [{'] or ['.join(_owners(top))}]")
            else:
                problems.append(f"{path}: unknown top-level key {top} (keys go in [section] tables)")
            continue
        if not isinstance(table, dict):
            problems.append(f"{path}: {top} must be a [{top}] table, got {table!r}")
            continue
        types = _types(SECTIONS[top])
        for key, value in table.items():
            if key not in types:
                problems.append(f"{path}: unknown key [{top}] {key}{_hint(key, types)}")
                continue
            if isinstance(value, bool) and (top, key) in BOOLEAN_CHOICES:
                value = BOOLEAN_CHOICES[top, key][value]
            try:
                setattr(getattr(cfg, top), key, _from_toml(value, types[key]))
                explicit.add(f"{top}.{key}")
            except ValueError:
                problems.append(f"{path}: [{top}] {key} must be {_TYPE_NAMES[types[key]]}, got {value!r}")


def load_config(argv: list[str], notes: list[str] | None = None) -> RunConfig:
    """The run config from `--cfg FILE` (TOML) and `--section.key=value` / `--key value` overrides (CLI wins).

    VideoX-Fun's options are understood as train/videox_fun.py says; what they do here (or why they do
    nothing) is appended to `notes`, for the caller to print once. Raises ConfigError listing every
    problem; prints help_text() and exits 0 on -h/--help."""
    if wants_help(argv):
        print(help_text())
        raise SystemExit(0)
    cfg, problems = _load(argv, [] if notes is None else notes)
    if problems:
        raise ConfigError(problems)
    return cfg


def wants_help(argv: list[str]) -> bool:
    return "-h" in argv or "--help" in argv


def _load(argv: list[str], notes: list[str]) -> tuple[RunConfig, list[str]]:
    """load_config's work: the config as far as it could be read, and every problem found."""
    paths: list[str] = []
    overrides: list[tuple[str, str, str, str]] = []  # (flag, section, key, text)
    cli_problems: list[str] = []
    i = 0
    while i < len(argv):
        token, i = argv[i], i + 1
        if token.endswith(".py") and not token.startswith("-"):
            notes.append(f"{token}: no effect here: the script of an accelerate command line is train.main")
            continue
        if not token.startswith("--") or token == "--":
            cli_problems.append(f"unexpected argument {token!r} (options look like --section.key=value)")
            continue
        name, eq, text = token[2:].partition("=")
        flag = f"--{name}"
        theirs = OPTIONS.get(name) if name != "cfg" and "." not in name and not _owners(name) else None
        loc = None if name == "cfg" or theirs else _locate(name, flag, cli_problems)
        typ = _types(SECTIONS[loc[0]])[loc[1]] if loc else None
        if not eq:
            nxt = argv[i] if i < len(argv) else None
            flag_like = typ is bool or (theirs and theirs.takes == FLAG) or (loc is not None and loc in BOOLEAN_CHOICES)
            # the next token's words a flag may take: a boolean, or for BOOLEAN_CHOICES keys a choice too
            words = set(_BOOLS) | (set(BOOLEAN_CHOICE_WORDS.get(loc, ())) if loc else set())
            if flag_like and (nxt is None or nxt.startswith("--") or nxt.lower() not in words):
                text = "true"  # a bare boolean flag (the next token is not a boolean: the script path, say)
            elif nxt is None or nxt.startswith("--"):
                if loc or theirs or name == "cfg":
                    cli_problems.append(f"{flag} needs a value")
                continue
            elif typ in (list[str], list[float]) or (theirs and theirs.takes == VALUES):
                # VideoX-Fun's spelling of a list: --trainable_modules blocks head (argparse nargs="+").
                values = list(itertools.takewhile(lambda t: not t.startswith("--"), argv[i:]))
                prose = loc is not None and loc[1] in PROSE_LISTS  # prompts hold commas: one token, one item
                parts = values if prose else [p.strip() for value in values for p in value.split(",") if p.strip()]
                text = values[0] if len(values) == 1 else json.dumps(parts)  # one value: a,b or ["a", "b"]
                i += len(values)
            else:
                text, i = nxt, i + 1  # consumed even for an unknown option, so it is not reported twice
        if name == "cfg":
            paths.append(text)
        elif theirs:
            overrides += their_option(name, text, flag, cli_problems, notes)
        elif loc:
            overrides.append((flag, *loc, text))

    cfg = RunConfig()
    problems: list[str] = []
    explicit: set[str] = set()
    for path in paths:  # several files apply in order: a base config, then an experiment's
        _apply_toml(cfg, path, problems, explicit)
    problems += cli_problems
    selective = None
    lora_flag = False
    from_cli: set[str] = set()
    for flag, section, key, text in overrides:
        if section == "selective_ac":
            selective = float(text)
            continue
        if section == "use_peft_lora":
            lora_flag = True
            continue
        typ = _types(SECTIONS[section])[key]
        try:
            if (section, key) in BOOLEAN_CHOICES and text.lower() in _BOOLS:
                text = BOOLEAN_CHOICES[section, key][_BOOLS[text.lower()]]
            prose = key in PROSE_LISTS and not text.lstrip().startswith("[")
            value = ([text] if text.strip() else []) if prose else _from_cli(text, typ)  # --validation_prompts= : none
            setattr(getattr(cfg, section), key, value)
            explicit.add(f"{section}.{key}")
            from_cli.add(f"{section}.{key}")
        except ValueError:
            problems.append(f"{flag}: expected {_TYPE_NAMES[typ]}, got {text!r}")
    settle(cfg, selective, from_cli, notes, lora_flag)
    yaml_problems, yaml_notes = apply_model_yaml(cfg, explicit)
    problems += yaml_problems
    notes += yaml_notes
    cfg.parallel.resolve()
    problems += cfg.problems()
    return cfg, problems


def check_paths(cfg: RunConfig) -> list[str]:
    """Every file or folder the run reads that is missing, one line each: the release folder's files,
    transformer_path, vae_path, deepspeed_config, the data and its precomputed cache. Run before any data or
    model is read."""
    from train.models import check_mode, dit_source, release_files  # the release layout is the model loader's

    out = []

    def need(path: str, what: str, kind: str) -> bool:
        p = Path(path).expanduser()
        ok = p.is_file() if kind == "file" else p.is_dir() if kind == "folder" else p.exists()
        if not ok:
            out.append(f"{what} {path}: no such {kind}")
        return ok

    m = cfg.model
    if m.pretrained_model_name_or_path and need(m.pretrained_model_name_or_path, "pretrained_model_name_or_path",
                                                "folder"):  # fmt: skip
        root = Path(m.pretrained_model_name_or_path).expanduser()
        dit = None
        if not m.transformer_path or Path(m.transformer_path).exists():  # a missing one is reported below
            try:  # a DiT of the other mode first: it explains a missing CLIP file better than the file list
                dit, source = dit_source(m)[:2]
                check_mode(dit.get("model_type", "t2v"), dit.get("in_dim", 16), m.train_mode, source)
            except (ValueError, OSError) as err:
                out.append(str(err))
        try:
            release_files(root, dit if dit is not None else {"model_type": "i2v" if m.train_mode == "i2v" else "t2v"})
        except ValueError as err:
            out.append(str(err))
    if m.transformer_path:
        need(m.transformer_path, "transformer_path", "file or folder")
    if m.vae_path:
        need(m.vae_path, "vae_path", "file")
    if cfg.parallel.deepspeed_config:
        need(cfg.parallel.deepspeed_config, "deepspeed_config", "file")
    d = cfg.data
    if d.train_data_meta:
        need(d.train_data_meta, "train_data_meta", "file or folder")
    if d.train_data_dir:
        need(d.train_data_dir, "train_data_dir", "folder")
    if d.latent_cache_dir:
        need(d.latent_cache_dir, "latent_cache_dir", "folder")
    v = cfg.validation
    for image in v.validation_images:
        need(image, "validation_images", "file")
    if v.validation_data_meta:
        need(v.validation_data_meta, "validation_data_meta", "file or folder")
    if v.validation_data_dir:
        need(v.validation_data_dir, "validation_data_dir", "folder")
    return out


def run_device() -> torch.device:
    """The device train.main trains on in this process: cuda:LOCAL_RANK when CUDA is available, else the
    CPU. Read from torchrun's environment, so it is known before any process group exists."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def check_run(cfg: RunConfig, device: torch.device, world_size: int | None) -> list[str]:
    """Every problem train.main finds before it reads data or builds a model, past the config's own: the
    files the run reads (check_paths), the mixed precision the engine runs on `device`, the attention
    kernel `device` has, and the deepspeed_config file merged over the generated DeepSpeed config.

    train.main and `python -m train.config` both call it, so the check refuses what a run refuses.
    world_size None (a check outside torchrun) leaves out the one comparison that needs the number of
    ranks: a deepspeed_config file's train_batch_size. A value the config's own problems already refuse
    (an unknown engine, say) is not checked again."""
    out = check_paths(cfg)
    m, t, p = cfg.model, cfg.train, cfg.parallel
    traits = REGISTRY.get(p.engine)
    precision_ok = t.mixed_precision in MIXED_PRECISIONS and traits is not None
    if precision_ok:
        try:
            check_mixed_precision(t.mixed_precision, traits, device)
        except ValueError as err:
            out.append(str(err))
            precision_ok = False  # the DeepSpeed config below would refuse it a second time
    if m.attention_backend in ATTENTION_BACKENDS:
        try:
            resolve_attention_backend(m.attention_backend, device)
        except ValueError as err:
            out.append(f"[model] {err}")
    if precision_ok:  # an engine's own checks (the DeepSpeed file merged over ours) need a precision it runs
        out += traits.preflight(cfg, device, world_size)
    if p.sp > 1:
        out += _sequence_parallel_problems(cfg, world_size)
    if cfg.lora.enabled and not cfg.lora.problems():
        out += _lora_problems(cfg)
    if not cfg.experts.problems() and not cfg.train.problems():
        out += _experts_problems(cfg)
    out += _wan22_vae_problems(cfg)
    return out


def _wan22_vae_problems(cfg: RunConfig) -> list[str]:
    """A DiT on the Wan2.2 VAE's latents (TI2V-5B: 16x spatial, so pixel sides are multiples of 32)."""
    from train.models import dit_source, uses_wan22_vae

    try:
        config = dit_source(cfg.model)[0]
    except (ValueError, OSError):
        return []  # check_paths' to report
    if not uses_wan22_vae(config):
        return []
    out = []
    if cfg.data.bucket_side_multiple != 32:
        out.append(f"[data] bucket_side_multiple = {cfg.data.bucket_side_multiple}: the DiT works on the Wan2.2 VAE's "
                   "latents (16x spatial, patch 2), so pixel sides must be multiples of 32: set it to 32")  # fmt: skip
    v = cfg.validation
    out += [f"[validation] {n} = {getattr(v, n)} must be a multiple of 32 (the Wan2.2 VAE's 16x, patch 2)"
            for n in ("validation_height", "validation_width") if getattr(v, n) % 32]  # fmt: skip
    return out


def _experts_problems(cfg: RunConfig) -> list[str]:
    """[experts] against the model: its keys need Wan2.2 A14B experts (but timestep_range), validation
    sampling needs both experts, and each trained expert needs timesteps in timestep_range."""
    from train.experts import ExpertPlan
    from train.flow import FlowMatching
    from train.models import model_boundary

    e = cfg.experts
    try:
        boundary = model_boundary(cfg.model, e)
    except (ValueError, OSError):
        return []  # an unreadable DiT folder is check_paths' to report
    if boundary is None:
        if not e.is_default:
            return ["[experts] train_experts, boundary and the per-expert learning rates need a Wan2.2 A14B model "
                    "(two experts); this model has one DiT"]  # fmt: skip
    elif len(e.train_experts) == 1 and cfg.validation.validation_prompts:
        return [f"[validation] validation_prompts: sampling a video needs both A14B experts, but [experts] "
                f"train_experts = {e.train_experts} builds one (train both, or sample after with tools/sample.py)"]  # fmt: skip
    try:
        ExpertPlan.build(e, FlowMatching.from_config(cfg.train), cfg.train.seed, boundary)
    except ValueError as err:
        return [str(err)]
    return []


def _lora_problems(cfg: RunConfig) -> list[str]:
    """[lora] target_name against the DiT's layers (built on the meta device: no memory, no weights)."""
    from train.models import dit_source
    from wan import WanModel
    from wan.modules.lora import apply_lora

    try:
        config = dit_source(cfg.model)[0]
        with torch.device("meta"):
            model = WanModel(**config)
    except (ValueError, TypeError):
        return []  # an unreadable DiT folder is check_paths' to report
    try:
        apply_lora(model, cfg.lora.spec)
    except ValueError as err:
        return [str(err)]
    return []


def _sequence_parallel_problems(cfg: RunConfig, world_size: int | None) -> list[str]:
    """[parallel] sp against the number of ranks and the DiT's heads (from its config.json or preset),
    before any model is built. An unreadable DiT folder is check_paths' to report."""
    from train.models import dit_source

    sp, out = cfg.parallel.sp, []
    if world_size is not None and world_size % sp:
        out.append(f"[parallel] sp = {sp} does not divide the {world_size} ranks")
    try:
        config, source = dit_source(cfg.model)[:2]
    except ValueError:
        return out
    heads = config.get("num_heads", 1)
    if heads % sp:
        valid = ", ".join(str(n) for n in range(1, heads + 1) if heads % n == 0)
        out.append(f"[parallel] sp = {sp}: the DiT's {heads} heads ({source}) do not divide by it; sp can be {valid}")
    return out


def load_run_config(
    argv: list[str], notes: list[str], device: torch.device, world_size: int | None, read_data: bool = False
) -> RunConfig:
    """load_config, then check_run on `device` and `world_size` ranks: the one start-up check of train.main
    and `python -m train.config`. Raises one ConfigError listing every problem of both, so a bad option or
    an unreadable config_path never hides a missing file or a conflicting DeepSpeed file.

    read_data also reads the training data's listing as the run's loader does (train.main reads it
    afterwards, in its loader, so it leaves this off)."""
    if wants_help(argv):
        print(help_text())
        raise SystemExit(0)
    cfg, problems = _load(argv, notes)
    problems += check_run(cfg, device, world_size)
    if read_data:
        problems += _data_listing_problems(cfg.data)
    if problems:
        raise ConfigError(problems)
    return cfg


def _data_listing_problems(data: DataConfig) -> list[str]:
    """What the loader's metadata read refuses (malformed entries, nothing listed); the sizes it probes
    from the files' headers and a resume's checkpoint are left to the run (they read whole data sets)."""
    from train.data.metadata import load_metadata

    meta, folder = data.train_data_meta, data.train_data_dir
    if not (meta or folder) or any(p and not Path(p).expanduser().exists() for p in (meta, folder)):
        return []  # the config's own problem, or check_paths' line
    try:
        load_metadata(meta or None, folder or None, skipped=[])  # a bad sample is the run's to skip
    except ValueError as err:
        return [str(err)]
    return []


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)  # repr round-trips floats; TOML reads inf, nan and 2e-05 as written
    if isinstance(value, str):
        # JSON escapes are valid TOML basic-string escapes; TOML also forbids a raw DEL.
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def config_to_toml(cfg: RunConfig) -> str:
    """The resolved config as TOML text that load_config(["--cfg", file]) reads back unchanged."""
    lines = ["# Resolved run configuration: train again with --cfg <this file>."]
    for section in fields(cfg):
        values = getattr(cfg, section.name)
        lines += ["", f"[{section.name}]"] + [
            f"{f.name} = {_toml_value(getattr(values, f.name))}" for f in fields(values)
        ]
    return "\n".join(lines) + "\n"


def _type_name(typ: Any) -> str:
    return "list[str]" if typ == list[str] else "list[float]" if typ == list[float] else typ.__name__


def help_text() -> str:
    """Usage, then every key of every section with its type, default and meaning."""
    lines = [
        "usage: torchrun --nproc_per_node N -m train.main --cfg FILE [--section.key=value ...]",
        "",
        "Values come from the TOML file's [section] tables, then from the command line (which wins).",
        'A key that lives in one section also works flat: --learning_rate=2e-05. Lists: a b, a,b or ["a", "b"].',
    ]
    defaults = RunConfig()
    for section in fields(RunConfig):
        cls, values = SECTIONS[section.name], getattr(defaults, section.name)
        lines += ["", f"[{section.name}]"]
        for f in fields(cls):
            lines.append(f"  {f.name}: {_type_name(_types(cls)[f.name])} = {_toml_value(getattr(values, f.name))}")
            lines += [f"      {line}" for line in _docs(cls).get(f.name, "(undocumented)").splitlines()]
    return "\n".join(lines)


# python -m train.config --cfg FILE ...: check a config as train.main does, then print it resolved.
if __name__ == "__main__":
    notes: list[str] = []
    device = run_device()
    if device.type == "cpu":
        notes.append("checked for this machine's cpu (no GPU here): check a GPU run's attention_backend and "
                     "fp16 on a GPU node")  # fmt: skip
    world_size = int(os.environ["WORLD_SIZE"]) if "WORLD_SIZE" in os.environ else None
    try:
        cfg = load_run_config(sys.argv[1:], notes, device, world_size, read_data=True)
    except ConfigError as e:  # exit 2, as train.main refuses the same config
        print("\n".join([*notes, f"error: {e}"]), file=sys.stderr)
        sys.exit(2)
    if notes:
        print("\n".join(notes), file=sys.stderr)
    print(config_to_toml(cfg), end="")
