"""Model families as plug-ins: one module per family holds every touch of its transformers internals.

Adding a family is one new module with a `Family` subclass (see base.py), listed here.
"""

from .base import Crop, Family, Prepared, VisionOutput
from .internvl import InternVL
from .llava import Llava
from .llava_next import LlavaNext
from .onevision import OneVision
from .qwen2_5_vl import Qwen25VL

FAMILIES = [Llava, OneVision, LlavaNext, InternVL, Qwen25VL]
BY_MODEL_TYPE = {f.model_type: f for f in FAMILIES}


def family_of_preset(name: str):
    """The family that defines preset `name` (hub, tiny or architecture preset), or None."""
    return next((f for f in FAMILIES if name in f.presets or name in f.tiny or name in f.arch), None)


__all__ = ["BY_MODEL_TYPE", "Crop", "FAMILIES", "Family", "Prepared", "VisionOutput", "family_of_preset"]
