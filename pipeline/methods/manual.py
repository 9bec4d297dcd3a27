"""Manual: the units a person picks on the map, each sent as itself, in order. The picks live in the
conversation's state per image ({crop: [unit, ...]}) and are drawn on VisionZip's crops (the crops the
maps show); no model runs for a click. The functions edit the state (state.py), with the conversation's
images (conversation.Images) for the crops."""

from ..config import checked
from ..errors import InputError
from .base import units_view
from .registry import MANUAL, MapWords, Method, register


NO_PICKS = ("Pick at least one patch on the map: Manual sends exactly the patches you pick (or start from "
            "VisionZip's choice). An image of the conversation without picks is sent as VisionZip's choice.")


def check_picks(state):
    """A conversation with images must have picks on one of them before Manual answers."""
    if state.images and not any(state.picks.get(k) for k in state.images):
        raise InputError(NO_PICKS)


def image_key(state, key: str | None) -> str:
    """The image a pick is about: `key`, or the latest image; an InputError when there is none."""
    key = key or state.last_image_key
    if key is None:
        raise InputError("Upload an image first, then pick its patches.")
    if key not in state.images:
        raise InputError("That image is not in this conversation.")
    return key


def pick_view(state, images, key: str):
    """The manual picks of an image as a Compression to draw (picked units sent as themselves, the
    others not sent); its features are not the model's (use `compression` for those)."""
    layout = images.compression(state, key, "visionzip")
    picks = state.picks.get(key, {})
    return units_view(layout, [picks.get(i, ()) for i in range(len(layout.crops))], "manual")


def set_picks(state, images, picks: dict, key: str | None = None):
    """The units the "manual" method sends for an image ({crop: [unit, ...]}; default: the latest
    image), checked against the image's crops as the maps show them."""
    key = image_key(state, key)
    if not isinstance(picks, dict):
        raise InputError("The picks are {crop: [unit, ...]}, e.g. {0: [5, 17]}.")
    grids = [c.grid for c in images.compression(state, key, "visionzip").crops]
    clean = {}
    for crop, units in (picks or {}).items():
        crop = checked("crop", crop, 0, len(grids) - 1, integer=True)
        n = grids[crop][0] * grids[crop][1]
        clean[crop] = sorted({checked("unit", u, 0, n - 1, integer=True) for u in units})
    state.picks = dict(state.picks, **{key: {c: u for c, u in clean.items() if u}})


def toggle_pick(state, images, crop: int, unit: int, radius: int = 0, key: str | None = None) -> int:
    """Pick (or unpick, if it is picked) a unit and the (2 radius + 1)^2 block around it.
    -> the number of units picked for the image."""
    key = image_key(state, key)
    crops = images.compression(state, key, "visionzip").crops
    crop = checked("crop", crop, 0, len(crops) - 1, integer=True)
    rows, cols = crops[crop].grid
    unit = checked("unit", unit, 0, rows * cols - 1, integer=True)
    radius = checked("brush radius", radius, 0, max(rows, cols), integer=True)
    r0, c0 = divmod(unit, cols)
    block = {r * cols + c for r in range(max(0, r0 - radius), min(rows, r0 + radius + 1))
             for c in range(max(0, c0 - radius), min(cols, c0 + radius + 1))}
    picks = {c: set(u) for c, u in state.picks.get(key, {}).items()}
    current = picks.setdefault(crop, set())
    picks[crop] = current - block if unit in current else current | block
    set_picks(state, images, {c: sorted(u) for c, u in picks.items()}, key)
    return sum(len(u) for u in state.picks.get(key, {}).values())


def picks_from_visionzip(state, images, key: str | None = None) -> int:
    """Start the manual picks from VisionZip's choice: its dominant units and contextual targets."""
    key = image_key(state, key)
    comp = images.compression(state, key, "visionzip")
    set_picks(state, images, {i: sorted(set(c.kept.tolist()) | {int(t) for t in c.targets if t >= 0})
                              for i, c in enumerate(comp.crops)}, key)
    return sum(len(u) for u in state.picks[key].values())


def caption(comp) -> str:
    if not comp.num_tokens:
        return "no patches picked on this image: Manual sends it as VisionZip's choice (click patches to pick your own)"
    share = 100 * comp.num_tokens / comp.full_tokens
    patches = "patch" if comp.num_tokens == 1 else "patches"
    return f"{comp.num_tokens} {patches} picked by hand = {comp.num_tokens} of {comp.full_tokens} visual tokens ({share:.0f}%)"


register(Method("manual", "Manual", MANUAL, fallback="visionzip", caption=caption,
                words=MapWords(kept="picked", clear="clear: picked, sent", not_sent="not sent (not picked)"),
                doc="the patches picked by hand on the map"))
