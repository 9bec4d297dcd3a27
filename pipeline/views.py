"""What the maps draw of a conversation's image: its compression for the current method (Manual: the picks on
VisionZip's crops), and what decided the last FastV or SGL turn's pruning. No model runs for a view that is
not asked to compress."""

import math
from dataclasses import replace

import numpy as np
from PIL import Image

from .methods import manual, registry
from .video import Frames

SHEET_COLUMNS, SHEET_WIDTH, SHEET_GAP = 4, 1280, 8  # a clip's frames: at most 4 a row, 1280 px wide in all


def current_view(state, images, compress: bool = True, key: str | None = None, frame: int | None = None):
    """(PIL image, Compression for the current method) of image `key` (default: the latest), or None. Without
    `compress`, None also when that compression is not cached yet. A clip: `drawn`'s sheet (`frame`: one)."""
    key = key if key in state.images else state.last_image_key
    if key is None:
        return None
    method = registry.get(state.settings.method)
    if method.kind == registry.MANUAL:  # the picks drawn on the fallback's crops: no model runs for a click
        if not (compress or images.cached(state, key, method.fallback)):
            return None
        return drawn(images.image(state, key), manual.pick_view(state, images, key), frame)
    encoded = method.encodes(state.settings)
    if not (compress or images.cached(state, key, encoded)):
        return None
    return drawn(images.image(state, key), images.compression(state, key, encoded), frame)


def guidance_view(state, images, key: str | None = None, frame: int | None = None):
    """(PIL image, its Compression, per-token importance, per-token kept mask) of image `key` (default: the
    latest) for the last FastV or SGL turn, while the method is still that one with the same tokens, or None.
    No model runs here."""
    t = state.last_turn
    key = key if key in state.images else state.last_image_key
    encoded = registry.get(state.settings.method).encodes(state.settings)
    if (t is None or t.guidance is None or key not in t.guidance.image_spans
            or state.settings.method != t.guidance.source or not images.cached(state, key, encoded)):
        return None
    start, end = t.guidance.image_spans[key]
    kept = np.zeros(len(t.guidance.importance), dtype=bool)
    kept[t.guidance.kept] = True
    return (*drawn(images.image(state, key), images.compression(state, key, encoded), frame),
            t.guidance.importance[start:end],
            kept[start:end])


def drawn(image, comp, frame: int | None = None) -> tuple:
    """(what a map draws, the Compression it draws): an image and its own; a clip's frames on one sheet (`frame`,
    0-based: that frame alone, larger)."""
    if not isinstance(image, Frames):
        return image, comp
    return clip_sheet(image, comp, frame if frame is not None and 0 <= frame < len(comp.crops) else None)


def clip_sheet(frames: Frames, comp, frame: int | None = None) -> tuple:
    """A clip's frames in rows, each at the clip's shape (or frame `frame` alone, as wide as the whole sheet), and
    `comp` with each frame's crop boxed where its frame sits on that sheet (the others' boxes empty) -> (sheet,
    Compression): the maps draw a clip as they draw an image's tiles. A crop of several frames (Qwen2.5-VL's pairs)
    is drawn on its first frame."""
    shown = range(len(comp.crops)) if frame is None else [frame]
    per_crop = -(-len(frames) // len(comp.crops))
    cols = min(len(shown), SHEET_COLUMNS)
    w, h = frames.shown
    cell_w = (SHEET_WIDTH + SHEET_GAP) // cols - SHEET_GAP
    cell_h = max(1, round(cell_w * h / w))
    rows = math.ceil(len(shown) / cols)
    sheet = Image.new("RGB", (cols * (cell_w + SHEET_GAP) - SHEET_GAP, rows * (cell_h + SHEET_GAP) - SHEET_GAP),
                      (255, 255, 255))
    crops = [replace(c, box=(0, 0, 0, 0)) for c in comp.crops]
    for n, k in enumerate(shown):
        x, y = (n % cols) * (cell_w + SHEET_GAP), (n // cols) * (cell_h + SHEET_GAP)
        sheet.paste(Image.fromarray(frames.pixels[min(k * per_crop, len(frames) - 1)]).resize((cell_w, cell_h), Image.BICUBIC), (x, y))
        crops[k] = replace(comp.crops[k], box=(x, y, x + cell_w, y + cell_h))
    return sheet, replace(comp, crops=crops, image_size=(sheet.height, sheet.width))
