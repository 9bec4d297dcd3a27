"""The lowest floor: a conversation's settings and sampling as plain records, and the check every number
from a person or an API call goes through. Imports nothing of the project but its errors."""

import math
from dataclasses import dataclass, field

import numpy as np

from .errors import InputError

MIN_TEMPERATURE = 1e-3  # below this a temperature is greedy: logits / 1e-40 overflow to inf, softmax to nan
UNSET = object()  # early_exit left out: None already means "disabled"


def checked(name: str, value, low: float, high: float, integer: bool = False):
    """A number from a person or an API call, or an InputError that says what is wrong with it."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise InputError(f"The {name} must be a number (got {value!r}).")
    if not math.isfinite(value):
        raise InputError(f"The {name} must be a finite number (got {value!r}).")
    if integer and value != int(value):
        raise InputError(f"The {name} must be a whole number (got {value!r}).")
    if not low <= value <= high:
        raise InputError(f"The {name} must be between {low:g} and {high:g} (got {value!r}).")
    return int(value) if integer else float(value)


@dataclass
class Sampling:
    temperature: float = 0.0  # 0 (or below MIN_TEMPERATURE) = greedy
    top_p: float = 0.9  # in (0, 1]
    seed: int = 0

    def __post_init__(self):  # (dataclasses.replace runs this too: no Sampling exists that `pick` fails on)
        self.temperature = checked("temperature", self.temperature, 0, 5)
        self.top_p = checked("top-p", self.top_p, 0, 1)
        if self.top_p <= 0:
            raise InputError("The top-p must be above 0 (the share of probability mass sampled from, at most 1).")


@dataclass
class Settings:
    method: str = "full"  # a registered method's name (methods/registry.py)
    dominant: int = 54
    contextual: int = 10
    keep_ratio: float = 0.35  # SGL: share of visual tokens the large model keeps from layer K on
    prune_layer: float = 0.4  # SGL: K as a fraction of the large model's depth
    early_exit: float | None = 0.8  # SGL: exit threshold; None disables early exit
    sgl_tokens: str = "full"  # SGL: "visionzip" makes both models see VisionZip tokens
    fastv_layer: int = 2  # FastV: K, the layer from which the large model keeps only the top visual tokens
    fastv_keep_ratio: float = 0.5  # FastV: share of visual tokens kept from layer K on
    max_tiles: int = 0  # tiles per image the compress-once methods encode (tiling families); 0: the checkpoint's limit
    max_new_tokens: int = 256
    sampling: Sampling = field(default_factory=Sampling)
    knobs: dict = field(default_factory=dict)  # the knobs of methods that have no field above (registry.Knob)
