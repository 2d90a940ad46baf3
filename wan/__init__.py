"""Wan2.1 models, written from scratch: they load the official release files unchanged."""

from wan.configs import DIT_PRESETS, dit_preset
from wan.modules.clip import CLIP_PRESETS, CLIPVision
from wan.modules.model import WanModel

__all__ = ["CLIP_PRESETS", "CLIPVision", "DIT_PRESETS", "WanModel", "dit_preset"]
