"""The run's parts, built in order before the loop (train/main.py): process defaults, the output
folder, the data, the encoders and the engine, the checkpointer with every saved part, validation.
Each builder gets the config sections it needs and the rank layout (train/distributed.py)."""

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from train.checkpoint import Checkpointer, remove_interrupted_saves
from train.config import RunConfig, config_to_toml
from train.data.cache import CacheReader, differences, fingerprint
from train.data.loader import build_dataloader
from train.distributed import ParallelLayout, barrier
from train.ema import EMA
from train.engines import Engine, EngineSetup, build_engine, engine_traits
from train.engines.consolidated import ConsolidatedWeights
from train.engines.experts import ExpertEngines
from train.experts import ExpertEMA, ExpertPlan, PerExpert
from train.guard import hold_output_dir
from train.models import DiTRecipe, Models, build_dit_recipe, build_models, expert_sources
from train.rng import RNGState
from train.state import SamplerState, TrainerState, count_steps
from train.validation import ValidationSampler, sampling_options
from wan.modules.attention import device_label, set_attention_backend
from wan.modules.dit_weights import EXPERT_FOLDERS
from wan.modules.ulysses import SequenceParallel


def set_process_defaults(cfg: RunConfig, layout: ParallelLayout) -> None:
    if layout.device.type == "cuda":  # TF32 for fp32 matmuls and convolutions only when asked (torch's default)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.train.allow_tf32
    if not layout.is_main:  # console logs from rank 0 only; other ranks' bad files reach it at the end
        logging.getLogger().setLevel(logging.ERROR)
    # The global RNGs only seed what is not derived per step (nothing in the loop draws from them); they
    # are still saved and restored per rank for code that might.
    torch.manual_seed(cfg.train.seed + layout.rank)


def prepare_output_dir(cfg: RunConfig, out: Path, layout: ParallelLayout, log: Callable[[str], None]) -> None:
    hold_output_dir(out, layout.rank)  # one job per output_dir: before anything is written there
    if layout.is_main:
        # A crashed or failed save's leftovers may hold the disk space the coming saves need.
        for leftover in remove_interrupted_saves(out):
            log(f"removed {leftover}, left by an interrupted or failed save")
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.toml").write_text(config_to_toml(cfg))
    barrier()


@dataclass
class Data:
    loader: torch.utils.data.DataLoader
    sampler: object  # train.data.sampler.DistributedBucketBatchSampler
    tracker: object  # train.data.dataset.BadSampleTracker
    total_steps: int
    held_out: list
    """The samples eval_holdout keeps out of training (for the eval loss)."""


def build_data(cfg: RunConfig, layout: ParallelLayout, out: Path) -> Data:
    """The loader over this data-parallel rank's share, its sampler and bad-sample tracker, and the run's
    length in optimizer steps."""
    t, v = cfg.train, cfg.validation
    held_out: list = []
    loader, sampler, tracker = build_dataloader(
        cfg.data, t.train_batch_size, layout.dp_rank, layout.dp_size, t.seed,
        pin_memory=layout.device.type == "cuda", accumulation_steps=t.gradient_accumulation_steps, cache_dir=out,
        holdout=v.eval_holdout, holdout_seed=v.validation_seed, held_out=held_out, cache=open_cache(cfg),
    )  # fmt: skip
    return Data(loader, sampler, tracker, count_steps(sampler, t.max_train_steps, t.num_train_epochs), held_out)


def open_cache(cfg: RunConfig) -> CacheReader | None:
    """[data] latent_cache_dir's reader, refused unless its fingerprint is this run's (every difference named)."""
    if not cfg.data.latent_cache_dir:
        return None
    cache = CacheReader(cfg.data.latent_cache_dir, cfg.data.train_data_dir)
    problems = differences(cache.fingerprint, fingerprint(cfg.data, cfg.model, cfg.train.seed))
    if problems:
        raise ValueError(
            f"[data] latent_cache_dir {cfg.data.latent_cache_dir} was written for other options:\n  "
            + "\n  ".join(problems)
            + "\nrerun python -m tools.precompute with this config and another latent_cache_dir"
        )
    return cache


def build_training(
    cfg: RunConfig,
    layout: ParallelLayout,
    total_steps: int,
    log: Callable[[str], None],
    plan: ExpertPlan | None = None,
) -> tuple[Engine, Models | None, DiTRecipe]:
    """The frozen encoders (None when the data come from a cache) and the engine with the DiT built from its
    recipe; for Wan2.2 A14B experts, ExpertEngines over an engine per trained expert (`plan`: which
    steps each trains, its lr schedule's length)."""
    t, m, optim = cfg.train, cfg.model, cfg.optim
    factor = 1
    if optim.scale_lr:  # VideoX-Fun's: the lr grows with the global batch (the config keeps the base lr)
        factor = t.train_batch_size * t.gradient_accumulation_steps * layout.dp_size
        optim = dataclasses.replace(optim, learning_rate=optim.learning_rate * factor)
        log(f"scale_lr: learning_rate {cfg.optim.learning_rate:g} x {factor} = {optim.learning_rate:g}")
    setup = EngineSetup(
        parallel=cfg.parallel, optim=optim, mixed_precision=t.mixed_precision, micro_batch_size=t.train_batch_size,
        accumulation_steps=t.gradient_accumulation_steps, total_steps=total_steps, layout=layout,
    )  # fmt: skip
    # The attention kernel, chosen explicitly (check_run refused an unavailable one).
    kernel = set_attention_backend(m.attention_backend, layout.device)
    log(f"attention: {kernel if kernel != 'default' else 'torch default'} ({device_label(layout.device)})")
    recipe = build_dit_recipe(m, t.seed, cfg.lora.spec, t.mixed_precision)
    if layout.sp_size > 1:
        recipe.sequence_parallel = SequenceParallel(layout.sp_group)
    # From a cache the encoders are not needed to train; validation and the eval loss borrow them
    # (InputBuilder.encoders).
    models = build_models(m, layout.device, t.seed) if not cfg.data.latent_cache_dir else None
    if models is None:
        log(
            f"encoders: none loaded to train: the latents and text embeddings come from {cfg.data.latent_cache_dir} "
            "(validation and the eval loss load them while they run)"
        )
    trainable, total = recipe.parameter_counts()
    if expert_sources(m) is None:
        engine = build_engine(recipe, setup)
        log(
            f"DiT on the {cfg.parallel.engine} engine: {trainable:,} of {total:,} parameters train "
            f"({100 * trainable / total:.1f}%)"
        )
        return engine, models, recipe
    # Wan2.2 A14B: an engine per trained expert, each with its own lr and schedule over its own steps.
    steps = plan.steps_of(total_steps)
    engines = {}
    for expert in plan.names:
        lr = cfg.experts.learning_rate(expert, cfg.optim.learning_rate) * factor
        own_steps = max(steps[expert], 1)
        # Each expert warms up over its own first steps (at most all of them: a short run's expert may have fewer).
        warmup = min(optim.lr_warmup_steps, own_steps)
        expert_optim = dataclasses.replace(optim, learning_rate=lr, lr_warmup_steps=warmup)
        own = dataclasses.replace(setup, optim=expert_optim, total_steps=own_steps)
        expert_recipe = build_dit_recipe(m, t.seed, cfg.lora.spec, t.mixed_precision, expert=expert)
        expert_recipe.sequence_parallel = recipe.sequence_parallel
        engines[expert] = build_engine(expert_recipe, own)
        log(
            f"{expert}-noise expert on the {cfg.parallel.engine} engine: {trainable:,} of {total:,} parameters "
            f"train, lr {lr:g}, {steps[expert]} of the {total_steps} steps ({plan.describe_one(expert)})"
        )
    return ExpertEngines(engines, plan.boundary), models, recipe


def build_checkpointer(
    cfg: RunConfig,
    out: Path,
    layout: ParallelLayout,
    engine: Engine,
    state: TrainerState,
    sampler,
    dit_config: dict,
    ema: EMA | ExpertEMA | None = None,
) -> Checkpointer:
    """Every saved part registered once; load order = registration order: the RNG last, after everything
    that might draw."""
    checkpointer = Checkpointer(
        out, rank=layout.rank, world_size=layout.world_size, total_limit=cfg.checkpoint.checkpoints_total_limit,
        config_text=config_to_toml(cfg), marker_info={"engine": cfg.parallel.engine, **experts_marker(engine)},
    )  # fmt: skip
    checkpointer.register_files("engine", engine)
    if ema is not None:
        checkpointer.register_files("ema", ema)
    if cfg.checkpoint.save_consolidated_weights:
        if isinstance(engine, ExpertEngines):  # consolidated/high_noise_model/, low_noise_model/: a transformer_path
            parts = {e: ConsolidatedWeights(eng, dit_config, lora=cfg.lora.spec, subfolder=EXPERT_FOLDERS[e][0])
                     for e, eng in engine.engines.items()}  # fmt: skip
            checkpointer.register_files("consolidated", PerExpert(parts, in_place=True))
        else:
            checkpointer.register_files("consolidated", ConsolidatedWeights(engine, dit_config, lora=cfg.lora.spec))
    checkpointer.register("trainer_state", state)
    checkpointer.register("sampler", SamplerState(sampler, state))
    checkpointer.register("rng", RNGState(), per_rank=True)
    return checkpointer


def experts_marker(engine: Engine) -> dict:
    """The checkpoint marker's record of an A14B run's trained experts (their sub-folders): a resume must
    train the same ones."""
    return {"experts": list(engine.engines)} if isinstance(engine, ExpertEngines) else {}


def build_ema(
    cfg: RunConfig, engine: Engine, layout: ParallelLayout, plan: ExpertPlan | None
) -> EMA | ExpertEMA | None:
    """[ema]: the average of the trainable weights; an A14B run's: one per expert, over its own steps."""
    if not cfg.ema.enabled:
        return None
    if isinstance(engine, ExpertEngines):
        emas = {e: EMA(cfg.ema, eng, layout.rank, layout.world_size) for e, eng in engine.engines.items()}
        return ExpertEMA(emas, plan)
    return EMA(cfg.ema, engine, layout.rank, layout.world_size)


def build_validation(
    cfg: RunConfig,
    layout: ParallelLayout,
    models: Models | None,
    engine: Engine,
    dit_config: dict,
    out: Path,
    metrics,
    encoders=None,
) -> ValidationSampler | None:
    """The validation sampler, or None; `encoders` lends the encoders when `models` is None (from a cache)."""
    v, d = cfg.validation, cfg.data
    if not v.sampling_enabled():  # prompts, and validation_steps or validation_epochs
        return None
    return ValidationSampler(
        v, sampling_options(v, d.video_sample_size, d.video_sample_n_frames, cfg.train.shift, d.bucket_side_multiple),
        models=models,
        engine=engine, collective=engine_traits(cfg.parallel.engine).collective_inference or layout.sp_size > 1,
        dit_config=dit_config,
        layout=layout, output_dir=out, metrics=metrics, offload=cfg.model.low_vram, encoders=encoders,
    )  # fmt: skip
