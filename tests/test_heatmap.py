"""Pixel checks on rendered maps: dominant patches keep the photo's colours, the others are dimmed
and tinted with their contextual token's colour, for a CLIP grid and for anyres tiles."""

import numpy as np

from pipeline import encode_image
from pipeline.heatmap import DIM, GAP, PANEL_SIDE, TINT, group_colours, render_scores, render_selection


def panel_geometry(image, crops):
    x0 = max(0.0, min(c.box[0] for c in crops))
    y0 = max(0.0, min(c.box[1] for c in crops))
    x1 = min(image.width, max(c.box[2] for c in crops))
    y1 = min(image.height, max(c.box[3] for c in crops))
    return x0, y0, PANEL_SIDE / max(x1 - x0, y1 - y0)


def check_crop(rendered, image, crop, x_offset, geometry, colours):
    """Sample every patch centre that lies on the image; return counts of checked patches."""
    x0, y0, scale = geometry
    rows, cols = crop.grid
    orig = np.asarray(image, dtype=np.float32)
    out = np.asarray(rendered, dtype=np.float32)
    bw, bh = (crop.box[2] - crop.box[0]) / cols, (crop.box[3] - crop.box[1]) / rows
    targets = set(crop.targets.tolist())
    dominant = set(crop.dominant.tolist())
    checked = {"dominant": 0, "merged": 0}
    for p in range(rows * cols):
        r, c = divmod(p, cols)
        ox, oy = crop.box[0] + (c + 0.5) * bw, crop.box[1] + (r + 0.5) * bh  # centre on the original
        if not (bw <= ox < image.width - bw and bh <= oy < image.height - bh) or p in targets:
            continue
        px, py = int((ox - x0) * scale) + x_offset, int((oy - y0) * scale)
        if py >= out.shape[0] - 20:
            continue  # panel caption
        pixel = out[py, px]
        source = orig[int(oy), int(ox)]
        if p in dominant:
            assert crop.groups[p] == -1
            assert np.abs(pixel - source).max() < 40, (p, pixel, source)
            checked["dominant"] += 1
        else:
            expected = DIM * source + TINT * colours[crop.groups[p] % len(colours)]
            assert np.abs(pixel - np.clip(expected, 0, 255)).max() < 40, (p, pixel, expected)
            assert np.abs(pixel - source).sum() > np.abs(pixel - expected).sum()
            checked["merged"] += 1
    return checked


def test_selection_map_clip_grid(tiny_llava, photo):
    comp = encode_image(tiny_llava, photo, "visionzip", 54, 10)
    rendered = render_selection(photo, comp)
    assert rendered.size == (PANEL_SIDE, PANEL_SIDE)  # the centre square LLaVA-1.5 sees
    crop = comp.crops[0]
    checked = check_crop(rendered, photo, crop, 0, panel_geometry(photo, [crop]), group_colours(10).astype(float))
    assert checked["dominant"] >= 40 and checked["merged"] >= 400


def test_selection_map_anyres_tiles(tiny_ov, photo):
    comp = encode_image(tiny_ov, photo, "visionzip", 54, 10)
    rendered = render_selection(photo, comp)
    base_geom = panel_geometry(photo, comp.crops[:1])
    tiles_geom = panel_geometry(photo, comp.crops[1:])
    base_w = round(photo.width * base_geom[2])
    assert rendered.width == base_w + GAP + round(photo.width * tiles_geom[2])
    colours = group_colours(10).astype(float)
    total = check_crop(rendered, photo, comp.crops[0], 0, base_geom, colours)
    assert total["dominant"] >= 30
    for crop in comp.crops[1:]:  # every tile at its place on the original image
        checked = check_crop(rendered, photo, crop, base_w + GAP, tiles_geom, colours)
        assert checked["dominant"] + checked["merged"] > 100


def test_score_map_follows_scores(tiny_llava, photo):
    comp = encode_image(tiny_llava, photo, "visionzip", 54, 10)
    rendered = np.asarray(render_scores(photo, comp), dtype=np.float32)
    crop = comp.crops[0]
    x0, y0, scale = panel_geometry(photo, [crop])
    bw = (crop.box[2] - crop.box[0]) / 24
    brightness = []
    for p in np.argsort(crop.scores)[[0, 1, 2, -3, -2, -1]]:
        r, c = divmod(int(p), 24)
        px, py = int(((crop.box[0] + (c + .5) * bw) - x0) * scale), int(((crop.box[1] + (r + .5) * bw) - y0) * scale)
        brightness.append(rendered[min(py, 530), px].sum())
    assert max(brightness[:3]) < min(brightness[3:])  # inferno: high scores are bright
    assert rendered.shape[1] > PANEL_SIDE  # colour bar beside the map


def test_full_method_has_no_score_map(tiny_llava, photo):
    comp = encode_image(tiny_llava, photo, "full")
    assert render_scores(photo, comp) is None
    rendered = render_selection(photo, comp)
    assert rendered.size == (PANEL_SIDE, PANEL_SIDE)
    x0, y0, scale = panel_geometry(photo, comp.crops)
    expected = np.asarray(photo.crop((round(x0), round(y0), round(x0 + PANEL_SIDE / scale),
                                      round(y0 + PANEL_SIDE / scale))).resize(rendered.size), dtype=np.float32)
    assert np.abs(np.asarray(rendered, dtype=np.float32) - expected).mean() < 3  # unmarked: the crop itself


def test_importance_map_outlines_kept_tokens(tiny_ov, tiny_ov_large, photo):
    from pipeline import ChatSession
    from pipeline.heatmap import render_importance
    s = ChatSession(tiny_ov_large, method="sgl", small=tiny_ov, sgl_tokens="full", keep_ratio=0.05,
                    early_exit=None, max_new_tokens=3)
    s.add_image(photo)
    s.ask("What is it?")
    image, comp, importance, kept = s.guidance_view()
    assert len(importance) == comp.num_tokens and kept.sum() == len(s.last_turn.guidance.kept)
    rendered = np.asarray(render_importance(image, comp, importance, kept), dtype=np.float32)
    base = comp.crops[0]
    x0, y0, scale = panel_geometry(image, [base])
    cell_w = (base.box[2] - base.box[0]) / 27 * scale
    cell_h = (base.box[3] - base.box[1]) / 27 * scale
    base_tokens = comp.token_map[:, 0] == 0
    kept_patches = set(comp.token_map[base_tokens & kept][:, 1].tolist())
    white_edges = {True: [], False: []}
    for p in range(27 * 27):
        r, c = divmod(p, 27)
        if r in (0, 26) or c in (0, 26):
            continue
        ex, cy = round(c * cell_w), int((r + 0.5) * cell_h)  # left edge, mid-height
        white_edges[p in kept_patches].append(rendered[cy, ex].min() > 240)
    assert white_edges[True] and np.mean(white_edges[True]) > 0.9  # kept tokens: white outline
    assert np.mean(white_edges[False]) < 0.2
