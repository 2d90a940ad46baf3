"""Wan2.1 models, written from scratch: they load the official release files unchanged."""

from wan.configs import DIT_PRESETS, dit_preset
from wan.modules.model import WanModel

__all__ = ["DIT_PRESETS", "WanModel", "dit_preset"]
