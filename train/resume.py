"""Resuming a run: whether a checkpoint can continue this one (refused before any model is built),
and which of this run's values differ from the checkpoint's own config (said once)."""

from collections.abc import Callable
from pathlib import Path

from train.checkpoint import CONFIG_FILE, MERGE_ADVICE
from train.checkpoint_io import read_json
from train.config import ConfigError, RunConfig, load_config
from train.engines import DEFAULT_ENGINE, engine_traits

# (section, key) of the values a resume takes from this run's config where they differ from the
# checkpoint's: the lr schedule's base lr and shape (its position comes from the checkpoint), clipping,
# the AdamW values and the non-finite limit.
RESUME_CHANGEABLE = (
    ("optim", "learning_rate"), ("optim", "scale_lr"), ("optim", "lr_scheduler"), ("optim", "lr_warmup_steps"),
    ("optim", "max_grad_norm"), ("optim", "adam_beta1"), ("optim", "adam_beta2"), ("optim", "adam_weight_decay"),
    ("optim", "adam_epsilon"), ("train", "max_nonfinite_steps"),
)  # fmt: skip


def check_resumable(cfg: RunConfig, path: Path, marker: dict, world_size: int, sampler) -> None:
    """Refuse (ValueError) a checkpoint this run cannot continue, before any model is built: another
    engine, another world size where the engine's checkpoints are tied to it, or a data order the
    sampler cannot continue. `marker` is the checkpoint's COMPLETE marker, parsed once by the caller."""
    engine, saved = cfg.parallel.engine, marker.get("engine", DEFAULT_ENGINE)
    if saved != engine:
        raise ValueError(f"{path} was written by the {saved} engine, this run uses {engine}; {MERGE_ADVICE}")
    if marker["world_size"] != world_size and engine_traits(engine).tied_to_world_size:
        raise ValueError(
            f"{path} was written by {marker['world_size']} ranks, this run has {world_size}: {engine} "
            f"checkpoints are tied to the number of ranks; {MERGE_ADVICE}"
        )
    saved_experts, experts = marker.get("experts"), run_experts(cfg)
    if saved_experts != experts:
        what = lambda e: f"the Wan2.2 A14B experts {e}" if e else "one DiT (no experts)"  # noqa: E731
        raise ValueError(
            f"{path} holds {what(saved_experts)}, this run trains {what(experts)}: resume with the same [experts] "
            "train_experts and model, or merge it (python tools/zero_to_bf16.py CHECKPOINT OUT) and start a new run "
            "from OUT ([model] transformer_path = OUT)"
        )
    try:  # the data plan needs the same global batch (loaded again with the other parts)
        sampler.load_state_dict(read_json(path / "sampler.json"))
    except ValueError as err:
        raise ValueError(f"{path}: cannot continue its data order: {err}{holdout_hint(cfg, path)}") from None


def run_experts(cfg: RunConfig) -> list[str] | None:
    """The experts this run trains, in the order the engines hold them (the marker's), None without experts."""
    from train.models import expert_sources
    from wan.configs import EXPERTS

    if expert_sources(cfg.model) is None:
        return None
    return [e for e in EXPERTS if e in cfg.experts.train_experts]


def holdout_hint(cfg: RunConfig, path: Path) -> str:
    """Why the data changed when the held-out clips did: they are not in the training data."""
    try:
        saved = load_config(["--cfg", str(path / CONFIG_FILE)]).validation
    except (ConfigError, OSError):
        return ""
    now = cfg.validation
    if (saved.eval_holdout, saved.validation_seed if saved.eval_holdout else 0) == (
        now.eval_holdout,
        now.validation_seed if now.eval_holdout else 0,
    ):
        return ""
    return (
        f" (eval_holdout {saved.eval_holdout} / validation_seed {saved.validation_seed} in the checkpoint, "
        f"{now.eval_holdout} / {now.validation_seed} now: held-out clips are taken out of the training data, "
        "so resume with the checkpoint's values)"
    )


def report_resume_changes(cfg: RunConfig, path: Path, log: Callable[[str], None]) -> None:
    """Say which values this run changes against the checkpoint's own config: the engines take the
    lr and AdamW values from the config, not the checkpoint (a lower learning_rate is the advice
    after non-finite steps), and the loop reads the rest from it every step."""
    saved_file = path / CONFIG_FILE
    if not saved_file.is_file():
        return  # nothing to compare with
    try:
        saved = load_config(["--cfg", str(saved_file)])
    except ConfigError as err:
        log(f"{saved_file}: not compared with this run's config: {err}")
        return
    changes = [
        f"{key} {getattr(getattr(saved, section), key)} -> {getattr(getattr(cfg, section), key)}"
        for section, key in RESUME_CHANGEABLE
        if getattr(getattr(saved, section), key) != getattr(getattr(cfg, section), key)
    ]
    if changes:
        log("changed on resume: " + ", ".join(changes))
