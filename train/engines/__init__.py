"""The engines behind the training loop, one file each, and their registry.

    ddp.py        DDP: the whole model on every rank
    deepspeed.py  DeepSpeed ZeRO-2 / ZeRO-3 (deepspeed_reader.py reads their checkpoints without it)
    fsdp.py       FSDP2: everything sharded

Each declares an EngineTraits (base.py): how to build it and what the rest of the code may ask of it.
A new engine is one file plus one line in REGISTRY (or register_engine, as a test does); nothing else
names an engine.
"""

from train.engines import ddp, deepspeed, fsdp
from train.engines.base import Engine, EngineSetup, EngineTraits, StepResult

DEFAULT_ENGINE = ddp.TRAITS.name

REGISTRY: dict[str, EngineTraits] = {t.name: t for t in (ddp.TRAITS, *deepspeed.TRAITS.values(), fsdp.TRAITS)}


def register_engine(traits: EngineTraits) -> None:
    """Add an engine (a test's, or a plugin's) under traits.name; the config accepts it from then on."""
    if traits.name in REGISTRY and REGISTRY[traits.name] is not traits:
        raise ValueError(f"an engine named {traits.name!r} is registered already")
    REGISTRY[traits.name] = traits


def engine_names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def engine_traits(name: str) -> EngineTraits:
    """The traits of the engine `name` (the config refuses names not registered)."""
    if name not in REGISTRY:
        raise ValueError(f"[parallel] engine {name!r} is not one of {', '.join(REGISTRY)}")
    return REGISTRY[name]


def engine_family(flag: str) -> list[EngineTraits]:
    """The engines a VideoX-Fun launcher flag ("use_deepspeed", "use_fsdp") asks for, its default first."""
    family = [t for t in REGISTRY.values() if t.videox_fun_flag == flag]
    return sorted(family, key=lambda t: not t.flag_default)


def build_engine(recipe, setup: EngineSetup) -> Engine:
    """The engine [parallel] engine names, building the DiT from `recipe` (a train.models.DiTRecipe)."""
    return engine_traits(setup.parallel.engine).build(recipe, setup)


__all__ = ["Engine", "EngineSetup", "EngineTraits", "StepResult", "build_engine", "engine_names", "engine_traits"]
