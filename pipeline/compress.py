"""Encode one image once, for one method and budget, into the visual tokens the LLM will see."""

import time
from dataclasses import dataclass, replace

import numpy as np
import torch

from .errors import InputError
from .families import VisionOutput
from .families.base import distinct_crops
from .images import image_digest
from .methods import registry
from .methods.base import CropInput
from .methods.visionzip import gather
from .video import Frames


@dataclass
class CropInfo:
    """What happened to one crop (the whole image, or one anyres tile). Plain numpy, for the UI."""
    grid: tuple  # (rows, cols) of patches
    box: tuple  # (x0, y0, x1, y1) on the original image
    kept: np.ndarray  # sorted patch indices sent as themselves (row-major, CLS excluded), for every method
    includes_cls: bool  # the CLS token is sent too (VisionZip counts it as a dominant token)
    groups: np.ndarray  # (rows*cols,) per patch: -1 sent as itself, g merged into token g, -2 not sent
    scores: np.ndarray | None  # (rows*cols,) selection score of each patch (None where the method has none: Full)
    targets: np.ndarray  # (contextual,) patch index of each contextual token's target (-1 if CLS)
    kinds: np.ndarray | None = None  # (rows*cols,) what each kept patch is (Method.kinds: HiPrune's anchors,
    # buffers, registers), 0 not kept; None where the method keeps one kind

    @property
    def dominant(self) -> np.ndarray:
        """VisionZip's name for its kept patches (the dominant ones; docs/api.md): the same array as `kept`."""
        return self.kept


@dataclass
class Compression:
    method: str  # a registered method of kind full, compress-once or manual (methods/registry.py)
    dominant_budget: int
    contextual_budget: int
    num_tokens: int  # visual tokens the LLM sees for this image
    full_tokens: int  # visual tokens the LLM would see without compression
    crops: list  # list[CropInfo]
    image_size: tuple  # (height, width)
    features: torch.Tensor  # (num_tokens, D) projected tokens; on the CPU once a conversation keeps them
    encode_s: float
    token_map: np.ndarray  # (num_tokens, 3): crop, patch (-1: CLS or newline), contextual id (-1: none)
    question: str = ""  # the question a question-conditioned method selected for ("" before any question)
    vision: VisionOutput | None = None  # a question-conditioned method's tower output (CPU), for the next question
    times: tuple | None = None  # a clip's frames' times in seconds, one per crop (None: an image)
    seconds_per_crop: float | None = None  # a clip's seconds a crop, where positions count time (Qwen2.5-VL)
    frames_per_crop: int = 1  # a clip's frames a crop (Qwen2.5-VL: 2)

    @property
    def crop_word(self) -> str:  # its crops in words: "crops" (an image), a clip's "frames" or "frame pairs"
        return "crops" if self.times is None else "frames" if self.frames_per_crop == 1 else "frame pairs"

    def frame_label(self, k: int) -> str:  # a clip's crop k (0-based) in words: "frame 3", or "frames 5-6"
        return f"frame {k + 1}" if (n := self.frames_per_crop) == 1 else f"frames {k * n + 1}-{(k + 1) * n}"

    @property
    def nbytes(self) -> int:
        vision = () if self.vision is None else (self.vision.units, self.vision.scores, self.vision.keys)
        kept = [self.features, *vision]
        return sum(t.numel() * t.element_size() for t in kept if t is not None)

    def caption(self) -> str:
        """What the map shows, in a line: the method's own caption (registry.Method.caption), or
        "Label: n <its tokens> in k crops = n of N visual tokens (p%)"."""
        method = registry.get(self.method)
        if method.caption is not None:
            return method.caption(self)
        share = 100 * self.num_tokens / self.full_tokens
        crops = f" in {len(self.crops)} {self.crop_word}" if len(self.crops) > 1 else ""
        return (f"{method.label}: {self.num_tokens} {method.words.tokens}{crops} = {self.num_tokens} of "
                f"{self.full_tokens} visual tokens ({share:.0f}%)")

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


def method_key(method: str, dominant: int, contextual: int, max_tiles: int = 0, picks=None, knobs=None,
               question: str = "") -> tuple:
    """What a compression depends on, beside the image and the model: the method and its budget (Full: none;
    Manual: the picks, {crop: units} of one image), the method's own knobs (their defaults where unset), and a
    question-conditioned method's question."""
    kind = registry.get(method).kind
    if kind == registry.QUESTION:
        return method_key_of_selection(method, dominant, contextual, max_tiles, knobs) + (("question", question),)
    if kind == registry.FULL:
        return (method,)
    if kind == registry.MANUAL:
        return (method, max_tiles, tuple(sorted((c, tuple(sorted(u))) for c, u in (picks or {}).items() if u)))
    return method_key_of_selection(method, dominant, contextual, max_tiles, knobs)


def method_key_of_selection(method: str, dominant: int, contextual: int, max_tiles: int, knobs) -> tuple:
    own = tuple(sorted(method_knobs(method, knobs).items()))
    return (method, dominant, contextual, max_tiles) + ((own,) if own else ())


def selection_digest(comp: "Compression") -> tuple:
    """What a compression sends, as a key: its kept units and merges per crop (two selections for different
    questions that keep the same units send the same tokens)."""
    return tuple((c.includes_cls, c.kept.tobytes(), c.groups.tobytes()) for c in comp.crops)


def method_knobs(method: str, knobs: dict | None) -> dict:
    """A method's own knobs {name: value}: those given in `knobs`, the defaults for the rest."""
    return {k.name: (knobs or {}).get(k.name, k.default) for k in registry.get(method).knobs}


@torch.inference_mode()
def encode_image(vlm, image, method: str = "visionzip", dominant: int = 54, contextual: int = 10,
                 selection_from: Compression | None = None, max_tiles: int = 0, picks: dict | None = None,
                 knobs: dict | None = None, question: str = "", vision: VisionOutput | None = None,
                 keep_vision: bool = False) -> Compression:
    """PIL image (or video.Frames: a clip, one crop per frame) -> Compression. `method`: a registered method of kind full (every token exactly as transformers
    sends them), compress-once or question (its `pick` per crop; `question`: what it selects for, "" before any)
    or manual (exactly the units in `picks`, {crop: [unit, ...]}, each as itself, in order). `selection_from`:
    reuse another model's selection (same units and groups) on this model's features, so that two models of an
    SGL pair see the same tokens. `max_tiles` (> 0) caps the tiles VisionZip encodes (a CPU saving); "full"
    always sends what the checkpoint would. `knobs`: the method's own settings (unset ones at their defaults).
    `vision`: the tower's output for this image from an earlier question (Compression.vision), not run again.
    `keep_vision`: keep the tower's output on the Compression (a question-conditioned method always does)."""
    start = time.perf_counter()
    family, model = vlm.family, vlm.model
    kind = registry.get(method).kind
    if kind not in (registry.FULL, registry.MANUAL, *registry.BUDGETED):
        raise InputError(f"{registry.label(method)} does not compress an image once (it prunes inside the model).")
    prepared, full_map = prepared_input(vlm, image, max_tiles if kind != registry.FULL and max_tiles else None)
    if kind == registry.FULL:
        return encoded_full(family, model, prepared, method, dominant, contextual, full_map, start)
    manual = kind == registry.MANUAL
    if manual and not any(picks.get(i) for i in range(len(prepared.crops))):
        raise InputError("Pick at least one patch on the map for the manual method (or start from VisionZip's).")
    if selection_from is None:
        check_not_above_full(family, prepared.crops, method, dominant, contextual, picks, len(full_map))
    knobs = method_knobs(method, knobs)
    wanted = registry.get(method).attention_layers
    layers = tuple(wanted(family, knobs)) if wanted is not None and selection_from is None and not manual else ()
    out = encode_distinct(family, model, prepared, selection_from is None, layers) if vision is None \
        else on_device(vision, next(family.tower(model).parameters()).device)  # (the tower's earlier output)
    asked = kind == registry.QUESTION and selection_from is None
    relevance = registry.get(method).relevance(vlm, out, question) if asked else None
    seed = int(image_digest(image)[:15], 16)  # Random: the same draw for the same image, every turn
    crops, selected, projected, token_map = [], [], [], []
    for i, crop in enumerate(prepared.crops):
        if manual:
            info, tokens, done, crop_map = picked_by_hand(family, out, i, crop, picks)
        elif selection_from is None:
            info, tokens, done, crop_map = picked_by_method(vlm, method, out, i, crop, dominant, contextual, seed + i,
                                                            knobs, layers, relevance)
        else:
            info, tokens, done, crop_map = picked_by_other_model(family, out, i, selection_from.crops[i])
        crops.append(info)
        if tokens is None:  # (a crop without picks sends nothing)
            continue
        if family.keeps_index_order and not manual:  # M-RoPE: the kept units in index order (a contextual token at
            order = sorted(range(len(crop_map)), key=lambda k: crop_map[k][1])  # its target)
            crop_map, tokens = [crop_map[k] for k in order], tokens[torch.tensor(order)]
        selected.append(tokens)
        projected.append(done)
        token_map += crop_map
    if manual or any(projected) or len({len(s) for s in selected}) > 1:
        features = torch.cat([s if done else family.project(model, s[None])[0] for s, done in zip(selected, projected)])
    else:  # the same budget in every crop: one batched projection
        features = family.project(model, torch.stack(selected)).flatten(0, 1)  # (crops * budget, D)
    token_map = np.array(token_map, dtype=np.int64).reshape(-1, 3)
    return Compression(method, dominant, contextual, features.shape[0], len(full_map), crops, prepared.image_size,
                       features, time.perf_counter() - start, token_map, question if asked else "",
                       on_device(out, "cpu") if asked or keep_vision else None, **clip_fields(prepared))


def prepared_input(vlm, image, max_tiles: int | None) -> tuple:
    """-> (the tower's input, the token map of what the LLM would see without compression). A clip (video.Frames):
    a crop per frame (Qwen2.5-VL: per pair), as its video processor gives them."""
    family, model = vlm.family, vlm.model
    if isinstance(image, Frames):
        prepared = family.prepare_video(image, max_tiles)
        return prepared, family.video_token_map(model, prepared)
    return family.prepare(image, max_tiles), family.full_token_map(model, family.layout(image))


def clip_fields(prepared) -> dict:  # a Compression's fields about a clip (Family.prepare_video's extra)
    return {k: prepared.extra[k] for k in ("times", "seconds_per_crop", "frames_per_crop") if k in prepared.extra}


def encoded_full(family, model, prepared, method: str, dominant: int, contextual: int, full_map, start: float
                 ) -> Compression:
    """Every token exactly as transformers sends them."""
    video = prepared.extra.get("video")
    features = family.encode_video_full(model, prepared) if video else family.encode_full(model, prepared)
    crops = [CropInfo(c.grid, c.box, np.arange(c.grid[0] * c.grid[1]), False, np.full(c.grid[0] * c.grid[1], -1),
                      None, np.zeros(0, int)) for c in prepared.crops]
    return Compression(method, dominant, contextual, features.shape[0], len(full_map), crops, prepared.image_size,
                       features, time.perf_counter() - start, full_map, **clip_fields(prepared))


def picked_by_hand(family, out, i: int, crop, picks: dict) -> tuple:
    """Crop i's picked units, each sent as itself -> (CropInfo, units or None, projected, token map rows)."""
    offset = 1 if family.has_cls else 0
    units = np.array(sorted(set(picks.get(i, ()))), dtype=np.int64)
    groups = np.full(crop.grid[0] * crop.grid[1], -2)  # -2: not sent
    groups[units] = -1
    info = CropInfo(crop.grid, crop.box, units, False, groups, out.scores[i, offset:].float().cpu().numpy(),
                    np.zeros(0, dtype=np.int64))
    if not len(units):
        return info, None, False, []
    x = out.units[i]
    return info, x[torch.as_tensor(units + offset, device=x.device)], False, [(i, int(u), -1) for u in units]


def picked_by_method(vlm, method: str, out, i: int, crop, dominant: int, contextual: int, seed: int,
                     knobs: dict | None = None, layers: tuple = (), relevance: list | None = None) -> tuple:
    """Crop i as a compress-once method picks it (its record's `pick`) -> (CropInfo, tokens, projected, token map
    rows)."""
    family, model = vlm.family, vlm.model
    x, offset = out.units[i], 1 if family.has_cls else 0  # (U, C)
    d, c = family.budget(dominant, contextual, x.shape[0] - offset)
    picked = registry.get(method).pick(CropInput(
        units=x, scores=out.scores[i], keys=out.keys[i], has_cls=family.has_cls, grid=crop.grid, dominant=d,
        contextual=c, seed=seed, project=lambda u: family.project(model, u[None])[0],
        project_parts=family.project_parts(model), received={layer: out.received[layer][i] for layer in layers},
        attention_layers=layers, knobs=dict(knobs or {}), relevance=None if relevance is None else relevance[i]))
    info = CropInfo(grid=crop.grid, box=crop.box, kept=picked.kept.cpu().numpy(), includes_cls=picked.includes_cls,
                    groups=picked.groups.cpu().numpy(),
                    scores=None if picked.scores is None else picked.scores.float().cpu().numpy(),
                    targets=picked.targets.cpu().numpy(),
                    kinds=None if picked.kinds is None else picked.kinds.cpu().numpy())
    crop_map = [(i, int(p), int(g)) for p, g in zip(picked.token_patches.tolist(), picked.token_groups.tolist())]
    return info, picked.tokens, picked.projected, crop_map


def picked_by_other_model(family, out, i: int, info) -> tuple:
    """Crop i with another model's VisionZip selection `info` (SGL's pair) -> (the same CropInfo, tokens,
    projected, token map rows)."""
    x, offset = out.units[i], 1 if family.has_cls else 0
    dom = torch.as_tensor(np.concatenate([[0] * info.includes_cls, info.kept + offset])).long()
    groups = torch.as_tensor(np.concatenate([[-1] * offset, info.groups])).long()
    targets = torch.as_tensor(info.targets + offset).long()
    tokens = gather(x, dom.to(x.device), targets.to(x.device), groups.to(x.device))
    crop_map = [(i, p, -1) for p in (dom.cpu().numpy() - offset)] + [(i, t, g) for g, t in enumerate(info.targets)]
    return info, tokens, False, crop_map


def check_not_above_full(family, crops: list, method: str, dominant: int, contextual: int, picks, full: int):
    """A compress-once method never sends more visual tokens for an image than Full sends for it: Full packs
    anyres tiles into fewer tokens than crops x units (OneVision pools its tiles; NeXT unpads them), so a
    large per-crop budget can exceed it. -> InputError with both numbers and the budget that fits."""
    manual = registry.get(method).kind == registry.MANUAL
    if manual:
        sent = sum(len(set(picks.get(i, ()))) for i in range(len(crops)))
    else:
        units = [c.grid[0] * c.grid[1] for c in crops]
        if any(dominant + contextual > u + family.has_cls for u in units):
            return  # larger than a crop itself: the selection says so, in those terms
        sent = sum(sum(family.budget(dominant, contextual, u)) for u in units)
    if sent <= full:
        return
    where = f" ({len(crops)} crops)" if len(crops) > 1 else ""
    if manual:
        raise InputError(f"{sent:,} patches are picked on this image{where}, more visual tokens than the {full:,} "
                         f"that Full sends for it. Unpick some (at most {full:,}), or choose Full.")
    fits = full // len(crops)
    raise InputError(f"{registry.label(method)} at {dominant}+{contextual} tokens per crop would send {sent:,} visual tokens "
                     f"for this image{where}, more than the {full:,} that Full sends for it. A budget of at most "
                     f"{fits} per crop fits (dominant + contextual); or choose Full.")


def on_device(out: VisionOutput, device) -> VisionOutput:
    move = (lambda t: None if t is None else t.to(device))
    return VisionOutput(units=move(out.units), scores=move(out.scores), keys=move(out.keys),
                        received={layer: move(r) for layer, r in out.received.items()})


def encode_distinct(family, model, prepared, with_stats: bool, received_at: tuple = ()) -> VisionOutput:
    """`family.encode`, running the tower once for crops whose preprocessed pixels are identical: the same
    tokens as encoding every crop, for less work."""
    if len(prepared.crops) < 2 or len(prepared.pixel_values) != len(prepared.crops):  # (Qwen2.5-VL: patches)
        return family.encode(model, prepared, with_stats, received_at=received_at)
    keep, inverse = distinct_crops(prepared.pixel_values)
    if len(keep) == len(inverse):
        return family.encode(model, prepared, with_stats, received_at=received_at)
    out = family.encode(model, replace(prepared, pixel_values=prepared.pixel_values[keep],
                                       crops=[prepared.crops[i] for i in keep]), with_stats, received_at=received_at)
    pick = torch.tensor(inverse, device=out.units.device)
    return VisionOutput(units=out.units[pick], scores=None if out.scores is None else out.scores[pick],
                        keys=None if out.keys is None else out.keys[pick],
                        received={layer: r[pick] for layer, r in out.received.items()})
