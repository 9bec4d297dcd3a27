"""Encode one image once, for one method and budget, into the visual tokens the LLM will see."""

import time
from dataclasses import dataclass

import numpy as np
import torch

from .vision import run_vision_tower
from .visionzip import select


@dataclass
class CropInfo:
    """What happened to one crop (the whole image, or one anyres tile). Plain numpy, for the UI."""
    grid: tuple  # (rows, cols) of patches
    box: tuple  # (x0, y0, x1, y1) on the original image
    dominant: np.ndarray  # sorted patch indices kept as dominant (row-major, CLS excluded)
    includes_cls: bool  # the CLS token is one of the dominant tokens
    groups: np.ndarray  # (rows*cols,) contextual token id of each patch, -1 for dominant patches
    scores: np.ndarray | None  # (rows*cols,) selection score of each patch (None for method "full")
    targets: np.ndarray  # (contextual,) patch index of each contextual token's target (-1 if CLS)


@dataclass
class Compression:
    method: str  # "full" | "visionzip"
    dominant_budget: int
    contextual_budget: int
    num_tokens: int  # visual tokens the LLM sees for this image
    full_tokens: int  # visual tokens the LLM would see without compression
    crops: list  # list[CropInfo]
    image_size: tuple  # (height, width)
    features: torch.Tensor  # (num_tokens, D) projected tokens, on the model's device
    encode_s: float

    @property
    def nbytes(self) -> int:
        return self.features.numel() * self.features.element_size()

    def caption(self) -> str:
        share = 100 * self.num_tokens / self.full_tokens
        if self.method == "full":
            return f"all {self.num_tokens} visual tokens (no compression)"
        per_crop = f"{self.dominant_budget} dominant + {self.contextual_budget} contextual"
        crops = f" x {len(self.crops)} crops" if len(self.crops) > 1 else ""
        return f"{per_crop}{crops} = {self.num_tokens} of {self.full_tokens} visual tokens ({share:.0f}%)"


def method_key(method: str, dominant: int, contextual: int) -> tuple:
    return ("full",) if method == "full" else ("visionzip", dominant, contextual)


@torch.inference_mode()
def encode_image(vlm, image, method: str = "visionzip", dominant: int = 54, contextual: int = 10) -> Compression:
    """PIL image -> Compression. `method` "full" keeps every token exactly as transformers does."""
    start = time.perf_counter()
    adapter = vlm.adapter
    prepared = adapter.prepare(image)
    pixel_values = prepared.pixel_values.to(vlm.device, vlm.dtype)
    compress = method != "full"
    out = run_vision_tower(vlm.vision_tower, pixel_values, adapter.num_layers_to_run, adapter.has_cls,
                           with_attention=compress)
    projector = vlm.model.model.multi_modal_projector
    offset = 1 if adapter.has_cls else 0
    crops = []
    if not compress:
        features = adapter.pack_full(vlm.model, projector(out.features), prepared)
        full_tokens = features.shape[0]
        for crop in prepared.crops:
            n = crop.grid[0] * crop.grid[1]
            crops.append(CropInfo(crop.grid, crop.box, np.arange(n), False, np.full(n, -1), None, np.zeros(0, int)))
    else:
        selected = []
        for i, crop in enumerate(prepared.crops):
            sel = select(out.features[i], out.scores[i], out.keys[i], dominant, contextual, adapter.has_cls)
            selected.append(sel.tokens)
            dom = sel.dominant.cpu().numpy()
            crops.append(CropInfo(
                grid=crop.grid, box=crop.box,
                dominant=dom[dom >= offset] - offset,
                includes_cls=bool(offset and (dom == 0).any()),
                groups=sel.groups[offset:].cpu().numpy(),
                scores=out.scores[i, offset:].float().cpu().numpy(),
                targets=sel.targets.cpu().numpy() - offset,
            ))
        features = projector(torch.stack(selected)).flatten(0, 1)  # (crops * budget, D)
        full_tokens = full_token_count(vlm, prepared)
    return Compression(method, dominant, contextual, features.shape[0], full_tokens, crops, prepared.image_size,
                       features, time.perf_counter() - start)


def full_token_count(vlm, prepared) -> int:
    """How many tokens the uncompressed image gives the LLM, from shapes alone (no projection)."""
    n_crops = len(prepared.crops)
    dummy = torch.zeros(n_crops, prepared.crops[0].grid[0] * prepared.crops[0].grid[1], 1)
    if vlm.adapter.has_cls:
        dummy = torch.zeros(n_crops, 1 + dummy.shape[1], 1)
    if vlm.adapter.family == "llava":
        return vlm.adapter.pack_full(vlm.model, dummy, prepared).shape[0]
    # OneVision packing needs the newline vector's width; a 1-wide stand-in gives the same count.
    packed, _ = vlm.model.model.pack_image_features(
        [dummy], torch.tensor([prepared.image_size]), image_newline=torch.zeros(1),
        vision_aspect_ratio=vlm.model.config.vision_aspect_ratio)
    return packed[0].shape[0]
