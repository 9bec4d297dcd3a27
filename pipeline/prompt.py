"""A turn's prompt: the conversation rendered with the checkpoint's chat template, flattened into token ids,
and fitted to the context window.

Words: a *unit* is one vision patch (or merged patch) of a crop, what the methods select; a *slot* is a
stretch of the flat token sequence: one text token, or one image's visual tokens (with the family's
markers around them). A KV cache records which slots its positions hold (lane.py)."""

from dataclasses import dataclass
from typing import NamedTuple

import torch

from .chat import Message
from .errors import InputError


class Slot(NamedTuple):
    """A stretch of the flat token sequence: one text token, or one image's visual tokens."""
    key: tuple  # ("t", id) | ("i", image key, *method key): what a KV cache must match to be reused
    start: int
    end: int
    features: torch.Tensor | None  # (visual tokens, D) for an image, None for text
    compression: object = None  # the image's Compression (token map, grid), None for text


@dataclass
class Plan:
    """What one turn sends to the model(s): the flat ids and their slots (the small model's too, for SGL)."""
    ids: list
    slots: list  # list[Slot]
    compressions: list
    turn_start: int  # index in ids of this turn's first token
    window_start: int  # the first turn of the conversation that fits the window
    small_ids: list | None = None
    small_slots: list | None = None


def messages(turns: list) -> list:
    out = []
    for t in turns:
        out += [Message("user", t.question, list(t.images)), Message("assistant", t.answer)]
    return out


def flatten(segments, vlm, image_slot) -> tuple:
    """Rendered segments -> (ids, slots, compressions): each image becomes its visual tokens' placeholder ids
    (and the family's markers around them). `image_slot(key)` -> (slot key, Compression) of an image."""
    ids, slots, comps = [], [], []
    for kind, value in segments:
        if kind == "text":
            for t in value:
                slots.append(Slot(("t", t), len(ids), len(ids) + 1, None))
                ids.append(t)
        else:
            key, comp = image_slot(value)
            comps.append(comp)
            image_ids = vlm.family.visual_ids(comp, vlm.image_token_id)  # markers around, if any
            slots.append(Slot(key, len(ids), len(ids) + len(image_ids), comp.features, comp))
            ids.extend(image_ids)
    return ids, slots, comps


def render(vlm, state, turn, start: int, image_slot, carry: bool = True) -> tuple:
    """The conversation from turn `start` on, with `turn` as the new question -> (history messages, segments,
    ids, slots, compressions, whether an image was carried). If no kept turn has an image, the most recent image
    of the left-out turns is carried along (`carry`): the user is most likely still talking about it."""
    kept, carried = state.turns[start:], []
    if carry and not turn.images and not any(t.images for t in kept):
        carried = next((t.images for t in reversed(state.turns[:start]) if t.images), [])
    history = messages(kept)
    question = Message("user", turn.question, list(turn.images))
    (history[0] if history else question).images[:0] = carried  # before the first message's own
    segments = vlm.chat.render(history + [question])
    return (history, segments, *flatten(segments, vlm, image_slot), bool(carried))


def plan(vlm, state, turn, image_slot, room: int, window: int, edge_fill: float, small=None,
         small_slot=None) -> Plan:
    """Render the conversation with `turn` as the new question, fitted to the `window`. When it does not fit,
    the oldest turns are left out until the prompt and `room` for an answer take at most `edge_fill` (3/4) of
    the window: the next turns then fit on top of the cached prefix again, instead of each dropping one turn and
    prefilling the whole conversation anew. The first turn kept is found by bisection (fewer turns, fewer
    tokens): a long history costs log(turns) renders, not turns. The carried image (`render`) goes last; nothing
    fits: InputError. `small`, `small_slot`: the small model's flat sequence too (SGL)."""
    start = state.window_start
    got = render(vlm, state, turn, start, image_slot)
    if len(got[2]) + room > window:
        edge = int(window * edge_fill)
        start, got = first_fitting(vlm, state, turn, image_slot, start + 1, room, edge)
        if len(got[2]) + room > window and got[5]:  # every turn left out, still too long: without the carried image
            got = render(vlm, state, turn, start, image_slot, carry=False)
        if len(got[2]) + room > window:
            ids, comps = got[2], got[4]
            raise InputError(
                f"This question needs {len(ids):,} tokens ({sum(c.num_tokens for c in comps):,} of them visual) "
                f"plus room for an answer, but {vlm.name} reads at most {window:,}. "
                "Shorten the question, or use VisionZip or a smaller budget for fewer visual tokens.")
    history, segments, ids, slots, comps, _ = got
    history_ids = flatten(vlm.chat.render(history, add_generation_prompt=False), vlm, image_slot)[0]
    turn_start = 0
    while turn_start < min(len(history_ids), len(ids)) and history_ids[turn_start] == ids[turn_start]:
        turn_start += 1
    out = Plan(ids, slots, comps, turn_start, start)
    if small is not None:
        out.small_ids, out.small_slots, _ = flatten(segments, small, small_slot)
    return out


def first_fitting(vlm, state, turn, image_slot, low: int, room: int, edge: int) -> tuple:
    """The first start in low .. len(turns) whose prompt and `room` fit `edge` tokens, by bisection, and its
    render; len(turns) (every turn left out) when none does."""
    high = len(state.turns)
    renders = {high: render(vlm, state, turn, high, image_slot)}
    while low < high:
        middle = (low + high) // 2
        renders[middle] = render(vlm, state, turn, middle, image_slot)
        if len(renders[middle][2]) + room <= edge:
            high = middle
        else:
            low = middle + 1
    return high, renders[high]
