"""Images of every everyday shape, in every family, with the CPU tile cap on and off, in Full and
VisionZip: the answer comes, every map view draws the image, a click on the map names a patch, and the
next question still works. (A 256x256 square on OneVision has a base image and a single tile with the
same box: that once broke the map and every later turn.)"""

import numpy as np
import pytest
from PIL import Image

from pipeline import ChatSession, InputError
from pipeline.heatmap import hit, layout, render_map

SHAPES = [(1, 1), (2, 2), (64, 64), (256, 256), (300, 300), (384, 384), (448, 448), (1, 4000), (4000, 1)]
FAMILIES = {"tiny-llava": "tiny_llava", "tiny-ov-small": "tiny_ov", "tiny-next": "tiny_next",
            "tiny-internvl-small": "tiny_internvl", "tiny-qwen-small": "tiny_qwen"}


def picture(w, h):
    ys, xs = np.mgrid[0:h, 0:w]
    return Image.fromarray(np.stack([xs * 255 // max(w - 1, 1), ys * 255 // max(h - 1, 1),
                                     np.full_like(xs, 90)], -1).astype(np.uint8))


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_every_shape_answers_and_draws(name, request):
    vlm = request.getfixturevalue(FAMILIES[name])
    for w, h in SHAPES:
        image = picture(w, h)
        for max_tiles in (0, 4):
            for method in ("full", "visionzip"):
                s = ChatSession(vlm, method=method, max_new_tokens=2, max_tiles=max_tiles)
                where = (name, w, h, max_tiles, method)
                try:
                    comp = s.add_image(image)
                except InputError as e:  # refused with a message a person can act on (Qwen: > 200:1)
                    assert vlm.family.name == "qwen2_5_vl" and max(w, h) / min(w, h) > 200, where
                    assert "crop" in str(e), where
                    continue
                s.ask("What is it?")
                assert s.last_turn.visual_tokens == comp.num_tokens > 0, where
                views = ["kept", "groups"] + (["scores"] if method == "visionzip" else [])
                for view in views:
                    canvas = render_map(image, comp, view)
                    assert canvas.width >= 40 and canvas.height >= 40, where + (view,)
                panels = layout(comp)
                assert sum(len(p.crops) for p in panels) == len(comp.crops), where  # every crop drawn, once
                p = panels[0]
                spot = hit(comp, p.origin[0] + p.size[0] / 2, p.origin[1] + p.size[1] / 2)
                assert spot is not None and spot[0] in p.crops, where
                assert s.ask("And now?") is not None and len(s.state.turns) == 2, where


def test_small_square_on_onevision_draws_base_and_tile(tiny_ov_large):
    """The base image and its single tile cover the same box: two panels, the tile's own kept patches."""
    s = ChatSession(tiny_ov_large, method="visionzip", max_new_tokens=2)
    comp = s.add_image(picture(256, 256))
    assert len(comp.crops) == 2 and tuple(comp.crops[0].box) == tuple(comp.crops[1].box)
    panels = layout(comp)
    assert [p.crops for p in panels] == [[0], [1]]
    kept = render_map(picture(256, 256), comp, "kept")
    p = panels[1]
    x, y = p.origin[0] + p.size[0] // 2, p.origin[1] + p.size[1] // 2
    crop, unit = hit(comp, x, y)
    assert crop == 1
    faded = comp.crops[1].groups[unit] != -1
    original = np.asarray(picture(256, 256).resize(p.size))[p.size[1] // 2, p.size[0] // 2].astype(float)
    pixel = np.asarray(kept)[y, x].astype(float)
    assert (pixel.mean() > original.mean() + 20) == faded  # faded towards white exactly where not kept


@pytest.mark.parametrize("method", ["divprune", "vispruner", "random", "pool", "fastv"])
@pytest.mark.parametrize("name", FAMILIES)
def test_every_method_takes_everyday_shapes(name, method, request):
    """The other methods on the shapes that break things (a pixel, a small square, a panorama): the answer
    comes, the maps draw, a click names a patch, a second turn works; a crop never sends more than its
    budget."""
    vlm = request.getfixturevalue(FAMILIES[name])
    for w, h in [(1, 1), (64, 64), (2000, 250)]:
        image = picture(w, h)
        s = ChatSession(vlm, method=method, max_new_tokens=2, max_tiles=4)
        where = (name, method, w, h)
        s.add_image(image)
        s.ask("What is it?")
        image_, comp = s.current_view()
        t = s.last_turn
        if method == "fastv":
            assert len(t.guidance.kept) == max(1, t.visual_tokens // 2) and t.visual_tokens == comp.num_tokens, where
        else:
            for c in comp.crops:
                n = c.grid[0] * c.grid[1]
                sent = len(c.kept) + (int(c.groups.max()) + 1 if (c.groups >= 0).any() else 0)
                assert 0 < sent <= max(1, sum(vlm.family.budget(54, 10, n + vlm.family.has_cls))), where
        for view in ("kept", "groups") + (("scores",) if comp.crops[0].scores is not None else ()):
            assert render_map(image_, comp, view).width >= 40, where + (view,)
        p = layout(comp)[0]
        assert hit(comp, p.origin[0] + p.size[0] / 2, p.origin[1] + p.size[1] / 2) is not None, where
        assert s.ask("And now?") is not None and len(s.state.turns) == 2, where
