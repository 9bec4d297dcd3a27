"""Pixel checks on the maps: the kept view shows the photo where tokens are kept and fades the rest;
groups are tinted with their token's colour; scores and importance follow their values; every crop
is drawn at its place on the image; a click finds the patch under it."""

import numpy as np
import pytest
from PIL import Image

from pipeline import encode_image
from pipeline.heatmap import (DESKTOP, FADE, TARGET, TINT, Display, describe, group_colours, hit, layout, render_map,
                              unit_rects)


def centres(comp, image):
    """Per crop: [(unit, canvas x, canvas y, original x, original y)] of the unit centres that lie well
    inside the image, computed from each crop's box on the original and its panel's place and scale."""
    out = []
    for p in layout(comp):
        (ox, oy), (sx, sy), (rx, ry) = p.origin, p.scale, p.region[:2]
        for i in p.crops:
            c = comp.crops[i]
            rows, cols = c.grid
            bw, bh = (c.box[2] - c.box[0]) / cols, (c.box[3] - c.box[1]) / rows
            for u in range(rows * cols):
                r, col = divmod(u, cols)
                x, y = c.box[0] + (col + 0.5) * bw, c.box[1] + (r + 0.5) * bh
                if bw <= x < image.width - bw and bh <= y < image.height - bh:
                    out.append((i, u, int(ox + (x - rx) * sx), int(oy + (y - ry) * sy), int(x), int(y)))
    return out


@pytest.mark.parametrize("method", ["visionzip", "divprune", "vispruner", "random"])
@pytest.mark.parametrize("name", ["tiny-llava", "tiny-ov-small", "tiny-internvl-small", "tiny-qwen-small"])
def test_kept_view_shows_the_photo_where_tokens_are_kept(name, method, photo, request):
    vlm = request.getfixturevalue({"tiny-llava": "tiny_llava", "tiny-ov-small": "tiny_ov",
                                   "tiny-internvl-small": "tiny_internvl", "tiny-qwen-small": "tiny_qwen"}[name])
    comp = encode_image(vlm, photo, method)
    shown = np.asarray(render_map(photo, comp, "kept"), dtype=np.float32)
    original = np.asarray(photo, dtype=np.float32)
    kept, faded = [], []
    for i, u, x, y, ox, oy in centres(comp, photo):
        (kept if comp.crops[i].groups[u] == -1 else faded).append((shown[y, x], original[oy, ox]))
    assert len(kept) >= 10 and len(faded) > 100  # (Qwen2.5-VL keeps 17 of its 176 units of this photo)
    got, want = np.array(kept).transpose(1, 0, 2)
    assert abs(got.mean() - want.mean()) / want.mean() < 0.05  # the photo's own brightness, within 5%
    got, want = np.array(faded).transpose(1, 0, 2)
    np.testing.assert_allclose(got.mean(0), (want * (1 - FADE) + 255 * FADE).mean(0), rtol=0.05)


def test_groups_view_tints_each_contextual_token(tiny_ov, photo):
    comp = encode_image(tiny_ov, photo, "visionzip")
    rendered = render_map(photo, comp, "groups")
    shown = np.asarray(rendered, dtype=np.float32)
    original = np.asarray(photo, dtype=np.float32)
    colours = group_colours(10).astype(np.float32)
    errors = []
    for i, u, x, y, ox, oy in centres(comp, photo):
        g = comp.crops[i].groups[u]
        if g >= 0 and u not in set(comp.crops[i].targets.tolist()):  # (targets wear a ring)
            errors.append(np.abs(shown[y, x] - ((1 - TINT) * original[oy, ox] + TINT * colours[g])).max())
    assert len(errors) > 300 and np.median(errors) < 20
    panels_height = max(p.origin[1] + p.size[1] for p in layout(comp))
    assert rendered.height > panels_height + 16  # the legend below: "token k merged n" for every contextual token


def test_pool_groups_view_tints_each_cell(tiny_llava, photo):
    """Pool: nothing kept as itself (all faded in the kept view); each cell one colour in the groups view,
    the legend saying what each token pooled."""
    comp = encode_image(tiny_llava, photo, "pool")
    assert comp.crops[0].groups.max() == 63 and "Pool: 64 pooled cells" in comp.caption()
    shown = np.asarray(render_map(photo, comp, "groups"), dtype=np.float32)
    original = np.asarray(photo, dtype=np.float32)
    colours = group_colours(64).astype(np.float32)
    errors = [np.abs(shown[y, x] - ((1 - TINT) * original[oy, ox] + TINT * colours[comp.crops[i].groups[u] % 20])).max()
              for i, u, x, y, ox, oy in centres(comp, photo)]
    assert len(errors) > 300 and np.median(errors) < 20
    kept = np.asarray(render_map(photo, comp, "kept"), dtype=np.float32)
    faded = [(kept[y, x], original[oy, ox]) for i, u, x, y, ox, oy in centres(comp, photo)]
    got, want = np.array(faded).transpose(1, 0, 2)
    np.testing.assert_allclose(got.mean(0), (want * (1 - FADE) + 255 * FADE).mean(0), rtol=0.05)
    assert "pooled token 0 of this image (the mean of its cell's 9 units)" in describe(comp, 0, 0)


def test_scores_view_is_bright_where_the_score_is_high(tiny_llava, photo):
    comp = encode_image(tiny_llava, photo, "visionzip")
    shown = np.asarray(render_map(photo, comp, "scores"), dtype=np.float32)
    spots = {u: (x, y) for i, u, x, y, _, _ in centres(comp, photo)}
    order = [u for u in np.argsort(comp.crops[0].scores) if u in spots]
    brightness = [shown[spots[u][1], spots[u][0]].sum() for u in order[:3] + order[-3:]]
    assert max(brightness[:3]) < min(brightness[3:])  # inferno: high scores are bright
    panel = layout(comp)[0]
    assert shown.shape[0] > panel.origin[1] + panel.size[1] + 20  # the colour bar under the map (clear of the
    # buttons a page puts in its top corner)


def test_full_method_draws_the_crops_unmarked(tiny_ov, photo):
    comp = encode_image(tiny_ov, photo, "full")
    shown = np.asarray(render_map(photo, comp, "kept"), dtype=np.float32)
    original = np.asarray(photo, dtype=np.float32)
    diffs = [np.abs(shown[y, x] - original[oy, ox]).mean() for _, _, x, y, ox, oy in centres(comp, photo)]
    assert np.mean(diffs) < 8


def test_importance_view_outlines_the_kept_tokens(tiny_ov, tiny_ov_large, photo):
    from pipeline import ChatSession
    s = ChatSession(tiny_ov_large, method="sgl", small=tiny_ov, keep_ratio=0.05, early_exit=None, max_new_tokens=3)
    s.add_image(photo)
    s.ask("What is it?")
    image, comp, importance, kept = s.guidance_view()
    shown = np.asarray(render_map(image, comp, "importance", importance, kept), dtype=np.float32)
    base = [p for p in layout(comp) if 0 in p.crops][0]
    kept_units = set(comp.token_map[(comp.token_map[:, 0] == 0) & kept][:, 1].tolist())
    edges = {True: [], False: []}
    rows, cols = comp.crops[0].grid
    (ox, oy), (sx, sy) = base.origin, base.scale
    cw, ch = (comp.crops[0].box[2] - comp.crops[0].box[0]) / cols * sx, (comp.crops[0].box[3] - comp.crops[0].box[1]) / rows * sy
    for u in range(rows * cols):
        r, c = divmod(u, cols)
        if 0 < r < rows - 1 and 0 < c < cols - 1:
            edges[u in kept_units].append(shown[int(oy + (r + 0.5) * ch), round(ox + c * cw)].min() > 240)
    assert edges[True] and np.mean(edges[True]) > 0.9 and np.mean(edges[False]) < 0.2


@pytest.mark.parametrize("display", [None, Display(324, None), Display(1200, 400)])
@pytest.mark.parametrize("size", [(451, 300), (8000, 20), (20, 8000), (1152, 768)])
def test_a_click_finds_the_patch_under_it(tiny_ov, size, display):
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    comp = encode_image(tiny_ov, image, "visionzip")
    found = 0
    for p in layout(comp, display):
        for i in p.crops:
            c = comp.crops[i]
            rows, cols = c.grid
            (ox, oy), (sx, sy), (rx, ry) = p.origin, p.scale, p.region[:2]
            for u in range(0, rows * cols, 37):
                r, col = divmod(u, cols)
                x = ox + (c.box[0] + (col + 0.5) * (c.box[2] - c.box[0]) / cols - rx) * sx
                y = oy + (c.box[1] + (r + 0.5) * (c.box[3] - c.box[1]) / rows - ry) * sy
                if ox <= x < ox + p.size[0] and oy <= y < oy + p.size[1]:
                    assert hit(comp, x, y, display) == (i, u)
                    found += 1
    assert found > 10 and hit(comp, -5, -5, display) is None


def test_describe_says_what_a_patch_is(tiny_llava, photo):
    comp = encode_image(tiny_llava, photo, "visionzip")
    crop = comp.crops[0]
    dom = int(crop.dominant[0])
    joined = int(np.flatnonzero(crop.groups == 3)[-1])
    assert "dominant: sent as itself" in describe(comp, 0, dom)
    text = describe(comp, 0, joined)
    assert f"contextual token 3 of this image ({int((crop.groups == 3).sum())} units" in text
    assert f"rank {int((crop.scores > crop.scores[joined]).sum()) + 1} of 576" in text


def panorama():
    """Three copies of a random photo side by side (1353x300): on OneVision, the whole image and 4 tiles whose
    grid reaches into the processor's padding."""
    rng = np.random.default_rng(5)
    return Image.fromarray(np.repeat(rng.integers(0, 255, (300, 451, 3), dtype=np.uint8), 1, 0)).resize((1353, 300))


def test_on_a_narrow_screen_the_tiles_go_under_the_whole_image_and_text_shows_at_its_size(tiny_ov_large):
    """The layout follows the display: a phone (no height limit) stacks the panels, a wide box puts a panorama's
    side by side when that shows it larger; the text scale makes 14 px text show at 14 px or more once the
    picture is fitted (the legend's own scale grows where a legend shrank the picture)."""
    comp = encode_image(tiny_ov_large, panorama(), "visionzip", max_tiles=4)
    assert len(comp.crops) == 5
    phone = Display(324, None)
    whole, tiles = layout(comp, phone)
    assert tiles.origin[0] == 0 and tiles.origin[1] > whole.origin[1] + whole.size[1]  # stacked
    wide = Display(1400, 300)
    a, b = layout(comp, wide)
    assert b.origin[0] >= a.origin[0] + a.size[0]  # a 6:1 box: side by side
    for display in (phone, wide, DESKTOP):
        for view in ("kept", "groups", "scores"):
            picture = render_map(panorama(), comp, view, display=display)
            k = layout(comp, display)[0].text
            assert 14 * k * display.scale(picture.width, picture.height) >= 14 * 0.8, (display, view)


def test_a_groups_legend_that_would_not_fit_is_summed_up(tiny_ov_large):
    """50 contextual tokens over 5 crops: not 50 entries (a legend taller than the photo) but one line, with the
    counts; a single crop's 10 tokens keep their own entries."""
    comp = encode_image(tiny_ov_large, panorama(), "visionzip", max_tiles=4)
    panels = layout(comp, DESKTOP)
    photo_bottom = max(p.origin[1] + p.size[1] for p in panels)
    picture = render_map(panorama(), comp, "groups")
    legend_height = picture.height - photo_bottom
    assert legend_height < 0.4 * photo_bottom, (legend_height, photo_bottom)
    single = encode_image(tiny_ov_large, panorama().resize((300, 300)), "visionzip", max_tiles=0)
    one = render_map(panorama().resize((300, 300)), single, "groups")
    one_bottom = max(p.origin[1] + p.size[1] for p in layout(single))
    assert one.height - one_bottom > legend_height  # (10 entries in rows: taller than the summed-up line)


def test_rings_are_never_drawn_off_the_photo(tiny_ov_large):
    """A contextual token's target in the processor's padding (off the photo) gets no ring: no ring colour
    lands outside the panels' photos, on titles or past an edge."""
    image = panorama()
    comp = encode_image(tiny_ov_large, image, "visionzip", max_tiles=4)
    panels = layout(comp)
    off = 0
    for p in panels:
        for i in p.crops:
            rect, c = unit_rects(p, comp.crops[i]), comp.crops[i]
            for t in c.targets[c.targets >= 0]:
                x0, y0, x1, y1 = rect[divmod(int(t), c.grid[1])]
                off += not (p.origin[0] <= (x0 + x1) / 2 < p.origin[0] + p.size[0]
                            and p.origin[1] <= (y0 + y1) / 2 < p.origin[1] + p.size[1])
    shown = np.asarray(render_map(image, comp, "kept"), dtype=int)
    ring = (np.abs(shown - TARGET).sum(-1) < 60)
    inside = np.zeros(ring.shape, bool)
    for p in panels:
        inside[p.origin[1]:p.origin[1] + p.size[1], p.origin[0]:p.origin[0] + p.size[0]] = True
    photo_bottom = max(p.origin[1] + p.size[1] for p in panels)
    inside[photo_bottom:] = True  # (the legend's own ring)
    assert off > 0  # (this image has targets in the padding: without the check they were ringed off the photo)
    assert ring[inside].sum() > 50 and ring[~inside].sum() == 0


def test_the_page_measure_is_checked():
    """What the page (or a forged API call) sends as the map's box: two numbers in range, else the desktop."""
    assert Display.of([324, 0]) == Display(324.0, None)
    assert Display.of([650, 478]) == Display(650.0, 478.0)
    for bad in (None, "wide", [1], [0, 400], [-5, 400], [True, 400], [1e9, 400], [float("nan"), 400], {"w": 3}):
        assert Display.of(bad) == DESKTOP, bad
