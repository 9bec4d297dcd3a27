"""Encode one image once, for one method and budget, into the visual tokens the LLM will see."""

import time
from dataclasses import dataclass

import numpy as np
import torch

from .vision import run_vision_tower
from .visionzip import gather, select


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
    token_map: np.ndarray  # (num_tokens, 3): crop, patch (-1: CLS or newline), contextual id (-1: none)

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

    def per_patch(self, values: np.ndarray) -> list:
        """Spread one value per visual token onto every crop's patches (contextual tokens cover their
        whole group) -> list of (rows*cols,) arrays, NaN where no token carries the patch."""
        out = [np.full(c.grid[0] * c.grid[1], np.nan) for c in self.crops]
        for (crop, patch, ctx), v in zip(self.token_map, values):
            if ctx >= 0:
                out[crop][self.crops[crop].groups == ctx] = v
            elif patch >= 0:
                out[crop][patch] = v
        return out


def method_key(method: str, dominant: int, contextual: int) -> tuple:
    return ("full",) if method == "full" else ("visionzip", dominant, contextual)


@torch.inference_mode()
def encode_image(vlm, image, method: str = "visionzip", dominant: int = 54, contextual: int = 10,
                 selection_from: Compression | None = None) -> Compression:
    """PIL image -> Compression. `method` "full" keeps every token exactly as transformers does.
    `selection_from`: reuse another model's VisionZip selection (same patches and groups) on this
    model's features, so that two models of an SGL pair see the same tokens."""
    start = time.perf_counter()
    adapter = vlm.adapter
    prepared = adapter.prepare(image)
    pixel_values = prepared.pixel_values.to(vlm.device, vlm.dtype)
    compress = method != "full"
    out = run_vision_tower(vlm.vision_tower, pixel_values, adapter.num_layers_to_run, adapter.has_cls,
                           with_attention=compress and selection_from is None)
    projector = vlm.model.model.multi_modal_projector
    offset = 1 if adapter.has_cls else 0
    crops = []
    if not compress:
        features = adapter.pack_full(vlm.model, projector(out.features), prepared)
        for crop in prepared.crops:
            n = crop.grid[0] * crop.grid[1]
            crops.append(CropInfo(crop.grid, crop.box, np.arange(n), False, np.full(n, -1), None, np.zeros(0, int)))
        token_map = full_token_map(vlm, prepared)
    else:
        selected, token_map = [], []
        for i, crop in enumerate(prepared.crops):
            if selection_from is None:
                sel = select(out.features[i], out.scores[i], out.keys[i], dominant, contextual, adapter.has_cls)
                dom, targets, groups = sel.dominant, sel.targets, sel.groups
                selected.append(sel.tokens)
                info = CropInfo(
                    grid=crop.grid, box=crop.box,
                    dominant=dom[dom >= offset].cpu().numpy() - offset,
                    includes_cls=bool(offset and (dom == 0).any()),
                    groups=groups[offset:].cpu().numpy(),
                    scores=out.scores[i, offset:].float().cpu().numpy(),
                    targets=targets.cpu().numpy() - offset,
                )
            else:
                info = selection_from.crops[i]
                dom = torch.as_tensor(np.concatenate([[0] * info.includes_cls, info.dominant + offset])).long()
                groups = torch.as_tensor(np.concatenate([[-1] * offset, info.groups])).long()
                targets = torch.as_tensor(info.targets + offset).long()
                selected.append(gather(out.features[i], dom.to(vlm.device), targets.to(vlm.device),
                                       groups.to(vlm.device)))
            crops.append(info)
            token_map += [(i, p, -1) for p in (dom.cpu().numpy() - offset)]
            token_map += [(i, t, g) for g, t in enumerate(info.targets)]
        features = projector(torch.stack(selected)).flatten(0, 1)  # (crops * budget, D)
        token_map = np.array(token_map, dtype=np.int64).reshape(-1, 3)
    full_tokens = len(full_token_map(vlm, prepared)) if compress else features.shape[0]
    return Compression(method, dominant, contextual, features.shape[0], full_tokens, crops, prepared.image_size,
                       features, time.perf_counter() - start, token_map)


def full_layout(vlm, image) -> tuple:
    """(visual tokens, grid of each crop) of an image without compression: what must match between
    the two models of an SGL pair. Computed from the preprocessing alone; no model runs."""
    prepared = vlm.adapter.prepare(image)
    return len(full_token_map(vlm, prepared)), tuple(c.grid for c in prepared.crops)


def full_token_map(vlm, prepared) -> np.ndarray:
    """(crop, patch, -1) of every token of the uncompressed image, in the LLM's order.

    OneVision's packing (unpadding, newlines, anyres_max_9 pooling) is run by transformers itself on
    coordinate features (is_base, y, x) instead of real ones, so the map follows it exactly."""
    rows, cols = prepared.crops[0].grid
    n_crops = len(prepared.crops)
    if vlm.adapter.family == "llava":
        return np.array([(0, p, -1) for p in range(rows * cols)], dtype=np.int64).reshape(-1, 3)
    ys, xs = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    coords = [np.stack([np.ones_like(ys), ys, xs], -1)]
    t_rows, t_cols = prepared.tile_grid
    for k in range(n_crops - 1):
        tr, tc = divmod(k, t_cols)
        coords.append(np.stack([np.zeros_like(ys), ys + tr * rows, xs + tc * cols], -1))
    feats = torch.tensor(np.stack(coords).reshape(n_crops, rows * cols, 3), dtype=torch.float32)
    packed, _ = vlm.model.model.pack_image_features(
        [feats], torch.tensor([prepared.image_size]), image_newline=torch.full((3,), -1.0),
        vision_aspect_ratio=vlm.model.config.vision_aspect_ratio)
    out = []
    for is_base, y, x in packed[0].round().long().tolist():
        if is_base < 0:
            out.append((0, -1, -1))  # newline token
        elif is_base == 1:
            out.append((0, y * cols + x, -1))
        else:
            out.append((1 + (y // rows) * t_cols + x // cols, (y % rows) * cols + x % cols, -1))
    return np.array(out, dtype=np.int64).reshape(-1, 3)
