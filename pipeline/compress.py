"""Encode one image once, for one method and budget, into the visual tokens the LLM will see."""

import time
from dataclasses import dataclass, replace

import numpy as np
import torch

from .errors import InputError
from .families import VisionOutput
from .families.base import distinct_crops
from .images import image_digest
from .methods import COMPRESS_ONCE, LABELS, SELECT
from .methods.base import CropInput
from .methods.visionzip import gather


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

    @property
    def kept(self) -> np.ndarray:
        """The patches sent as themselves, for every method (VisionZip: its dominant patches; Pool: none)."""
        return self.dominant


@dataclass
class Compression:
    method: str  # "full", a compress-once method (methods/__init__.py), or "manual"
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
        if self.method == "manual" and not self.num_tokens:
            return "no patches picked on this image: Manual sends it as VisionZip's choice (click patches to pick your own)"
        if self.method == "manual":
            patches = "patch" if self.num_tokens == 1 else "patches"
            return f"{self.num_tokens} {patches} picked by hand = {self.num_tokens} of {self.full_tokens} visual tokens " \
                   f"({share:.0f}%)"
        if self.method != "visionzip":
            crops = f" in {len(self.crops)} crops" if len(self.crops) > 1 else ""
            what = {"pool": "pooled cells (cell means)", "divprune": "diverse patches (max-min distance)",
                    "vispruner": "patches (important by attention, then diverse)",
                    "random": "random patches (seeded by the image)"}.get(self.method, "patches")
            return (f"{LABELS.get(self.method, self.method)}: {self.num_tokens} {what}{crops} = {self.num_tokens} of "
                    f"{self.full_tokens} visual tokens ({share:.0f}%)")
        kept = {(len(c.dominant) + c.includes_cls, len(c.targets)) for c in self.crops}
        if kept == {(self.dominant_budget, self.contextual_budget)}:
            per_crop = f"{self.dominant_budget} dominant + {self.contextual_budget} contextual"
            crops = f" x {len(self.crops)} crops" if len(self.crops) > 1 else ""
        else:  # a share of each image's units (dynamic resolution)
            d, c = (sum(k) for k in zip(*((len(c.dominant) + c.includes_cls, len(c.targets)) for c in self.crops)))
            per_crop = (f"{d} dominant + {c} contextual (the {self.dominant_budget}+{self.contextual_budget} "
                        "per 576 share)")
            crops = ""
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


def units_view(comp: Compression, units: list, method: str, num_tokens: int | None = None) -> Compression:
    """`comp` as drawn for a method that sends exactly `units` (per crop: patch indices) as themselves and
    no other unit (the manual picks; FastV's and SGL's kept tokens). For the maps: its features are not
    the model's. `num_tokens`: the tokens the method sends, where they are not one per unit."""
    crops = []
    for c, picked in zip(comp.crops, units):
        picked = np.array(sorted(picked), dtype=np.int64)
        groups = np.full(c.grid[0] * c.grid[1], -2)  # -2: not sent
        groups[picked] = -1
        crops.append(replace(c, dominant=picked, includes_cls=False, groups=groups, targets=np.zeros(0, np.int64)))
    token_map = np.array([(i, u, -1) for i, c in enumerate(crops) for u in c.dominant], dtype=np.int64).reshape(-1, 3)
    return replace(comp, method=method, crops=crops, token_map=token_map, features=comp.features[:0],
                   num_tokens=len(token_map) if num_tokens is None else num_tokens)


def method_key(method: str, dominant: int, contextual: int, max_tiles: int = 0, picks=None) -> tuple:
    if method == "full":
        return ("full",)
    if method == "manual":  # picks: {crop: units} of one image
        return ("manual", max_tiles, tuple(sorted((c, tuple(sorted(u))) for c, u in (picks or {}).items() if u)))
    return (method, dominant, contextual, max_tiles)


@torch.inference_mode()
def encode_image(vlm, image, method: str = "visionzip", dominant: int = 54, contextual: int = 10,
                 selection_from: Compression | None = None, max_tiles: int = 0, picks: dict | None = None
                 ) -> Compression:
    """PIL image -> Compression. `method` "full" keeps every token exactly as transformers does.
    `selection_from`: reuse another model's VisionZip selection (same units and groups) on this
    model's features, so that two models of an SGL pair see the same tokens. `max_tiles` (> 0) caps
    the tiles VisionZip encodes (a CPU saving); "full" always sends what the checkpoint would.
    `method` "manual": exactly the units in `picks` ({crop: [unit, ...]}), each as itself, in order."""
    start = time.perf_counter()
    family, model = vlm.family, vlm.model
    full_map = family.full_token_map(model, family.layout(image))  # what the LLM would see without compression
    prepared = family.prepare(image, max_tiles if method != "full" and max_tiles else None)
    if method == "full":
        features = family.encode_full(model, prepared)
        crops = [CropInfo(c.grid, c.box, np.arange(c.grid[0] * c.grid[1]), False, np.full(c.grid[0] * c.grid[1], -1),
                          None, np.zeros(0, int)) for c in prepared.crops]
        return Compression(method, dominant, contextual, features.shape[0], len(full_map), crops, prepared.image_size,
                           features, time.perf_counter() - start, full_map)
    if method not in COMPRESS_ONCE + ("manual",):
        raise InputError(f"Unknown compression method {method!r}.")
    if method == "manual" and not any(picks.get(i) for i in range(len(prepared.crops))):
        raise InputError("Pick at least one patch on the map for the manual method (or start from VisionZip's).")
    if selection_from is None:
        check_not_above_full(family, prepared.crops, method, dominant, contextual, picks, len(full_map))
    out = encode_distinct(family, model, prepared, with_stats=selection_from is None)
    offset = 1 if family.has_cls else 0
    crops, selected, projected, token_map = [], [], [], []
    seed = int(image_digest(image)[:15], 16)  # Random: the same draw for the same image, every turn
    parts = family.project_parts(model)
    for i, crop in enumerate(prepared.crops):
        x = out.units[i]  # (U, C)
        if method == "manual":
            units = np.array(sorted(set(picks.get(i, ()))), dtype=np.int64)
            groups = np.full(crop.grid[0] * crop.grid[1], -2)  # -2: not sent
            groups[units] = -1
            info = CropInfo(crop.grid, crop.box, units, False, groups, out.scores[i, offset:].float().cpu().numpy(),
                            np.zeros(0, dtype=np.int64))
            crops.append(info)
            if len(units):
                selected.append(x[torch.as_tensor(units + offset, device=x.device)])
                projected.append(False)
                token_map += [(i, int(u), -1) for u in units]
            continue
        if selection_from is None:
            d, c = family.budget(dominant, contextual, x.shape[0] - offset)
            picked = SELECT[method](CropInput(
                units=x, scores=out.scores[i], keys=out.keys[i], has_cls=family.has_cls, grid=crop.grid, dominant=d,
                contextual=c, seed=seed + i, project=lambda u: family.project(model, u[None])[0],
                project_parts=parts))
            selected.append(picked.tokens)
            projected.append(picked.projected)
            info = CropInfo(
                grid=crop.grid, box=crop.box, dominant=picked.kept.cpu().numpy(), includes_cls=picked.includes_cls,
                groups=picked.groups.cpu().numpy(),
                scores=None if picked.scores is None else picked.scores.float().cpu().numpy(),
                targets=picked.targets.cpu().numpy())
            crop_map = [(i, int(p), int(g)) for p, g in zip(picked.token_patches.tolist(), picked.token_groups.tolist())]
        else:
            info = selection_from.crops[i]
            dom = torch.as_tensor(np.concatenate([[0] * info.includes_cls, info.dominant + offset])).long()
            groups = torch.as_tensor(np.concatenate([[-1] * offset, info.groups])).long()
            targets = torch.as_tensor(info.targets + offset).long()
            selected.append(gather(x, dom.to(x.device), targets.to(x.device), groups.to(x.device)))
            projected.append(False)
            crop_map = [(i, p, -1) for p in (dom.cpu().numpy() - offset)] + [(i, t, g) for g, t in enumerate(info.targets)]
        crops.append(info)
        if family.keeps_index_order:  # M-RoPE families: the kept units in index order (a contextual token at its target)
            order = sorted(range(len(crop_map)), key=lambda k: crop_map[k][1])
            crop_map, selected[-1] = [crop_map[k] for k in order], selected[-1][torch.tensor(order)]
        token_map += crop_map
    if method == "manual" or any(projected) or len({len(s) for s in selected}) > 1:
        features = torch.cat([s if done else family.project(model, s[None])[0] for s, done in zip(selected, projected)])
    else:  # the same budget in every crop: one batched projection
        features = family.project(model, torch.stack(selected)).flatten(0, 1)  # (crops * budget, D)
    token_map = np.array(token_map, dtype=np.int64).reshape(-1, 3)
    return Compression(method, dominant, contextual, features.shape[0], len(full_map), crops, prepared.image_size,
                       features, time.perf_counter() - start, token_map)


def check_not_above_full(family, crops: list, method: str, dominant: int, contextual: int, picks, full: int):
    """A compress-once method never sends more visual tokens for an image than Full sends for it: Full packs
    anyres tiles into fewer tokens than crops x units (OneVision pools its tiles; NeXT unpads them), so a
    large per-crop budget can exceed it. -> InputError with both numbers and the budget that fits."""
    if method == "manual":
        sent = sum(len(set(picks.get(i, ()))) for i in range(len(crops)))
    else:
        units = [c.grid[0] * c.grid[1] for c in crops]
        if any(dominant + contextual > u + family.has_cls for u in units):
            return  # larger than a crop itself: the selection says so, in those terms
        sent = sum(sum(family.budget(dominant, contextual, u)) for u in units)
    if sent <= full:
        return
    where = f" ({len(crops)} crops)" if len(crops) > 1 else ""
    if method == "manual":
        raise InputError(f"{sent:,} patches are picked on this image{where}, more visual tokens than the {full:,} "
                         f"that Full sends for it. Unpick some (at most {full:,}), or choose Full.")
    fits = full // len(crops)
    raise InputError(f"{LABELS[method]} at {dominant}+{contextual} tokens per crop would send {sent:,} visual tokens "
                     f"for this image{where}, more than the {full:,} that Full sends for it. A budget of at most "
                     f"{fits} per crop fits (dominant + contextual); or choose Full.")


def encode_distinct(family, model, prepared, with_stats: bool) -> VisionOutput:
    """`family.encode`, running the tower once for crops whose preprocessed pixels are identical: the same
    tokens as encoding every crop, for less work."""
    if len(prepared.crops) < 2:  # (Qwen2.5-VL: one image, its pixel_values are patches, not crops)
        return family.encode(model, prepared, with_stats)
    keep, inverse = distinct_crops(prepared.pixel_values)
    if len(keep) == len(inverse):
        return family.encode(model, prepared, with_stats)
    out = family.encode(model, replace(prepared, pixel_values=prepared.pixel_values[keep],
                                       crops=[prepared.crops[i] for i in keep]), with_stats)
    pick = torch.tensor(inverse, device=out.units.device)
    return VisionOutput(units=out.units[pick], scores=None if out.scores is None else out.scores[pick],
                        keys=None if out.keys is None else out.keys[pick])
