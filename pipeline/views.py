"""What the maps draw of a conversation's image: its compression for the current method (Manual: the picks on
VisionZip's crops), and what decided the last FastV or SGL turn's pruning. No model runs for a view that is
not asked to compress."""

import numpy as np

from .methods import manual, registry


def current_view(state, images, compress: bool = True, key: str | None = None):
    """(PIL image, Compression for the current method) of image `key` (default: the latest), or None. Without
    `compress`, None also when that compression is not cached yet."""
    key = key if key in state.images else state.last_image_key
    if key is None:
        return None
    method = registry.get(state.settings.method)
    if method.kind == registry.MANUAL:  # the picks drawn on the fallback's crops: no model runs for a click
        if not (compress or images.cached(state, key, method.fallback)):
            return None
        return images.image(state, key), manual.pick_view(state, images, key)
    encoded = method.encodes(state.settings)
    if not (compress or images.cached(state, key, encoded)):
        return None
    return images.image(state, key), images.compression(state, key, encoded)


def guidance_view(state, images, key: str | None = None):
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
    return (images.image(state, key), images.compression(state, key, encoded), t.guidance.importance[start:end],
            kept[start:end])
