"""Work zipchat skips must not change what the model gets: identical crops (a small square's base image
and its single tile) are encoded once and give exactly the tokens of encoding each; dropping turns at the
context edge down to three quarters of the window keeps every later answer equal to a recompute."""

import numpy as np
import pytest
import torch
from PIL import Image

import pipeline.compress as compress
import pipeline.families.llava_common as llava_common
from pipeline import ChatSession
from pipeline.compress import encode_image


def square(side, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8))


def every_crop(pixel_values):
    """The reference: every crop its own (no deduplication)."""
    return list(range(len(pixel_values))), list(range(len(pixel_values)))


@pytest.mark.parametrize("fixture, side, max_tiles", [("tiny_ov_large", 384, 0), ("tiny_ov_large", 200, 4),
                                                      ("tiny_next", 336, 1)])
@pytest.mark.parametrize("method", ["visionzip", "full"])
def test_identical_crops_are_encoded_once_with_the_same_tokens(fixture, side, max_tiles, method, request,
                                                               monkeypatch):
    if method == "full" and max_tiles:
        pytest.skip("Full ignores the tile cap: it sends what the checkpoint would")
    vlm = request.getfixturevalue(fixture)
    image = square(side)
    prepared = vlm.family.prepare(image, max_tiles or None)
    assert len(prepared.crops) == 2 and torch.equal(prepared.pixel_values[0], prepared.pixel_values[1])
    crops_run = []
    first = vlm.family.tower_layers(vlm.model)[0]
    hook = first.register_forward_pre_hook(lambda m, args, kwargs: crops_run.append(
        (args[0] if args else kwargs["hidden_states"]).shape[0]), with_kwargs=True)
    try:
        got = encode_image(vlm, image, method, max_tiles=max_tiles)
        assert sum(crops_run) == 1  # one crop through the tower, not two
        monkeypatch.setattr(compress, "distinct_crops", every_crop)
        monkeypatch.setattr(llava_common, "distinct_crops", every_crop)
        crops_run.clear()
        reference = encode_image(vlm, image, method, max_tiles=max_tiles)
        assert sum(crops_run) == 2
    finally:
        hook.remove()
    assert torch.equal(got.features, reference.features)
    assert np.array_equal(got.token_map, reference.token_map)
    for a, b in zip(got.crops, reference.crops):
        assert np.array_equal(a.dominant, b.dominant) and np.array_equal(a.groups, b.groups)


def test_the_context_edge_drops_to_three_quarters_and_answers_equal_a_recompute(tiny_llava, photo):
    window, turns = 400, 14
    runs = {}
    for reuse in (True, False):
        s = ChatSession(tiny_llava, method="visionzip", max_new_tokens=8, context_window=window, reuse_cache=reuse,
                        stop_at_eos=False)
        s.add_image(photo)
        runs[reuse] = []
        for i in range(turns):
            answer = s.ask(f"Question number {i}: what else can you see in the picture here?")
            runs[reuse].append((answer, s.last_turn.dropped_now, s.last_turn.dropped_turns, s.last_turn.prefill_tokens,
                                s.last_turn.prompt_tokens))
    assert [r[:3] for r in runs[True]] == [r[:3] for r in runs[False]]  # the same answers and drops as a recompute
    drops = [r for r in runs[True] if r[1]]
    assert drops and all(r[1] >= 2 for r in drops)  # a turn that drops, drops several
    for answer, dropped_now, _, prefill, prompt in drops:
        assert prompt + 8 <= 0.75 * window  # ... down to three quarters of the window
    reused = [r for r in runs[True][1:] if not r[1]]
    assert reused and all(r[3] < 60 for r in reused)  # turns that drop nothing prefill only the new question
    assert sum(1 for r in runs[True] if r[1]) <= turns // 3  # and most turns past the edge drop nothing


def test_a_uniform_image_keeps_every_crop_and_patch(tiny_qwen, tiny_internvl):
    """Crops are compared as crops: Qwen2.5-VL's pixel rows are patches (all equal in a flat image), and
    InternVL's tiles of a flat image are equal but each still gets its tokens."""
    flat = Image.new("RGB", (896, 448), (90, 120, 30))
    for vlm in (tiny_qwen, tiny_internvl):
        comp = encode_image(vlm, flat, "visionzip")
        full = encode_image(vlm, flat, "full")
        assert comp.features.shape[0] == comp.num_tokens and full.num_tokens == full.full_tokens
        assert len(comp.crops) == len(vlm.family.prepare(flat).crops)
