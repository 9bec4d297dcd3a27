"""Drawing a Compression onto its image: the selection map and the score heatmap.

Both return PIL images (never file paths). Every crop is drawn at its place on the original image:
LLaVA-1.5's centre square, or OneVision's base image (left panel) and anyres tiles (right panel).
Work is done per patch in numpy and upsampled with NEAREST, so a 729-patch crop costs a few ms.
"""

import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageDraw

DIM = 0.3  # brightness kept by a non-dominant patch
TINT = 0.45  # weight of its contextual group's colour
OUTLINE = (255, 230, 0)  # dominant patch outline
TARGET = (255, 255, 255)  # dot on each contextual token's target patch
PANEL_SIDE = 560  # longest side of a panel, in pixels
GAP = 12


def group_colours(n: int) -> np.ndarray:
    """n distinct RGB colours (uint8), one per contextual token."""
    cmap = colormaps["tab20"] if n > 10 else colormaps["tab10"]
    return (np.array([cmap(i % cmap.N)[:3] for i in range(max(n, 1))]) * 255).astype(np.uint8)


def panels(comp):
    """-> [(title, [crop indices])]: one panel for a single crop; else one for the crop(s) showing the
    whole image (LLaVA's base image, InternVL's thumbnail) and one for the tiles."""
    if len(comp.crops) == 1:
        return [("image", [0])]
    h, w = comp.image_size
    whole = [i for i, c in enumerate(comp.crops) if tuple(c.box) == (0, 0, w, h)]
    tiles = [i for i in range(len(comp.crops)) if i not in whole]
    return [("whole image", whole), (f"{len(tiles)} tiles", tiles)]


def _canvas(image: Image.Image, crops):
    """Region of the image covered by these crops (clipped), scaled to PANEL_SIDE."""
    x0 = max(0.0, min(c.box[0] for c in crops))
    y0 = max(0.0, min(c.box[1] for c in crops))
    x1 = min(float(image.width), max(c.box[2] for c in crops))
    y1 = min(float(image.height), max(c.box[3] for c in crops))
    scale = PANEL_SIDE / max(x1 - x0, y1 - y0)
    size = (max(1, round((x1 - x0) * scale)), max(1, round((y1 - y0) * scale)))
    region = image.crop((round(x0), round(y0), round(x1), round(y1))).resize(size, Image.BILINEAR)
    return np.asarray(region, dtype=np.float32), (x0, y0, scale)


def _patch_rects(crop, origin):
    """(rows, cols, 4) pixel rectangles of every patch of a crop on the panel (unclipped)."""
    x0, y0, scale = origin
    rows, cols = crop.grid
    bx0, by0, bx1, by1 = [(v - o) * scale for v, o in zip(crop.box, (x0, y0, x0, y0))]
    xs = bx0 + (bx1 - bx0) * np.arange(cols + 1) / cols
    ys = by0 + (by1 - by0) * np.arange(rows + 1) / rows
    rect = np.zeros((rows, cols, 4))
    rect[..., 0], rect[..., 2] = xs[None, :-1], xs[None, 1:]
    rect[..., 1], rect[..., 3] = ys[:-1, None], ys[1:, None]
    return rect


def _paint(canvas, crop, origin, per_patch):
    """Blend a (rows, cols, 3) float image into the crop's box on the canvas (padding clipped)."""
    rect = _patch_rects(crop, origin)
    x0, y0 = rect[0, 0, 0], rect[0, 0, 1]
    x1, y1 = rect[-1, -1, 2], rect[-1, -1, 3]
    w, h = max(1, round(x1 - x0)), max(1, round(y1 - y0))
    up = np.asarray(Image.fromarray(per_patch.astype(np.uint8)).resize((w, h), Image.NEAREST), dtype=np.float32)
    cx0, cy0 = round(x0), round(y0)
    H, W = canvas.shape[:2]
    sx0, sy0 = max(0, -cx0), max(0, -cy0)
    dx0, dy0 = max(0, cx0), max(0, cy0)
    dx1, dy1 = min(W, cx0 + w), min(H, cy0 + h)
    if dx1 > dx0 and dy1 > dy0:
        canvas[dy0:dy1, dx0:dx1] = up[sy0:sy0 + dy1 - dy0, sx0:sx0 + dx1 - dx0]


def _patch_means(pixels, crop, origin):
    """Original colour at each patch centre (rows, cols, 3), for compositing per patch."""
    rect = _patch_rects(crop, origin)
    cx = np.clip(((rect[..., 0] + rect[..., 2]) / 2).astype(int), 0, pixels.shape[1] - 1)
    cy = np.clip(((rect[..., 1] + rect[..., 3]) / 2).astype(int), 0, pixels.shape[0] - 1)
    return cx, cy


def render_selection(image: Image.Image, comp) -> Image.Image:
    """Dominant patches bright with an outline; every other patch dimmed and tinted by the
    contextual token it merged into (one colour per contextual token); targets dotted."""
    out = []
    colours = group_colours(max(comp.contextual_budget, 1)).astype(np.float32)
    for title, idx in panels(comp):
        crops = [comp.crops[i] for i in idx]
        original, origin = _canvas(image, crops)
        if comp.method == "full":  # every token is kept: the crops as the model sees them, unmarked
            panel = Image.fromarray(original.astype(np.uint8))
            out.append(_label(panel, title) if len(comp.crops) > 1 else panel)
            continue
        canvas = original.copy()
        for crop in crops:
            rows, cols = crop.grid
            groups = crop.groups.reshape(rows, cols)
            # per patch: 1 keeps the pixel; otherwise DIM * pixel + TINT * colour (applied per pixel below)
            keep = (groups < 0).astype(np.float32)[..., None]
            tint = np.where(groups[..., None] >= 0, colours[np.clip(groups, 0, None) % len(colours)], 0)
            mask = np.dstack([keep[..., 0] * 255] * 3)
            tint_img = np.zeros_like(canvas)
            mask_img = np.zeros_like(canvas)
            _paint(tint_img, crop, origin, tint)
            _paint(mask_img, crop, origin, mask)
            _blend_inside(canvas, original, tint_img, mask_img, crop, origin)
        panel = Image.fromarray(canvas.clip(0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(panel)
        for crop in crops:
            rect = _patch_rects(crop, origin)
            rows, cols = crop.grid
            for p in crop.dominant:
                r, c = divmod(int(p), cols)
                _outline(draw, rect[r, c], OUTLINE)
            for t in crop.targets:
                if t >= 0:
                    r, c = divmod(int(t), cols)
                    x0, y0, x1, y1 = rect[r, c]
                    cx, cy, rad = (x0 + x1) / 2, (y0 + y1) / 2, max(1.5, (x1 - x0) / 5)
                    draw.ellipse([cx - rad, cy - rad, cx + rad, cy + rad], fill=TARGET)
        out.append(_label(panel, title) if len(comp.crops) > 1 else panel)
    return _side_by_side(out)


def _outline(draw, rect, colour):
    """A 1-pixel outline on the patch's own pixels (edges rounded, so neighbours never overlap). A patch
    less than a pixel wide or high (a very thin image) becomes a line or a dot."""
    x0, y0, x1, y1 = (round(v) for v in rect)
    draw.rectangle([x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], outline=colour, width=1)


def _blend_inside(canvas, original, tint_img, mask_img, crop, origin):
    """Inside the crop's box: keep original where mask, else DIM*original + TINT*tint."""
    rect = _patch_rects(crop, origin)
    H, W = canvas.shape[:2]
    x0, y0 = max(0, round(rect[0, 0, 0])), max(0, round(rect[0, 0, 1]))
    x1, y1 = min(W, round(rect[-1, -1, 2])), min(H, round(rect[-1, -1, 3]))
    if x1 <= x0 or y1 <= y0:
        return
    o = original[y0:y1, x0:x1]
    keep = mask_img[y0:y1, x0:x1, :1] / 255.0
    dimmed = np.clip(DIM * o + TINT * tint_img[y0:y1, x0:x1], 0, 255)
    canvas[y0:y1, x0:x1] = keep * o + (1 - keep) * dimmed


def render_scores(image: Image.Image, comp, cmap: str = "inferno") -> Image.Image | None:
    """The selection score of every patch (CLS attention, or mean attention received) over the
    image, with a colour bar. None when the compression has no scores (method "full")."""
    if comp.crops[0].scores is None:
        return None
    return _render_values(image, comp, [c.scores for c in comp.crops], cmap, "score")


def render_importance(image: Image.Image, comp, importance: np.ndarray, kept: np.ndarray,
                      cmap: str = "viridis") -> Image.Image:
    """SGL: the small model's importance of each visual token spread over the patches it covers
    (a contextual token covers its whole group), with the tokens the large model keeps outlined."""
    values = comp.per_patch(np.asarray(importance, dtype=np.float64))
    kept_patches = [np.nan_to_num(k) > 0.5 for k in comp.per_patch(np.asarray(kept, dtype=np.float64))]
    return _render_values(image, comp, values, cmap, "importance", outline=kept_patches)


def _render_values(image, comp, per_crop: list, cmap: str, label: str, outline: list | None = None):
    """Colour each patch by its value (NaN: left dark), optionally outline patches, plus a colour bar."""
    finite = np.concatenate([v[np.isfinite(v)] for v in per_crop])
    vmin, vmax = (float(finite.min()), float(np.percentile(finite, 99.5))) if finite.size else (0.0, 1.0)
    vmax = vmax if vmax > vmin else vmin + 1e-9
    lut = (colormaps[cmap](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.float32)
    out = []
    for title, idx in panels(comp):
        original, origin = _canvas(image, [comp.crops[i] for i in idx])
        canvas = original * 0.25
        for i in idx:
            crop = comp.crops[i]
            values = per_crop[i]
            level = np.clip((np.nan_to_num(values, nan=vmin) - vmin) / (vmax - vmin), 0, 1).reshape(crop.grid)
            heat = np.where(np.isfinite(values).reshape(*crop.grid, 1), lut[(level * 255).astype(int)], 0)
            _paint(canvas, crop, origin, heat)
        panel = Image.fromarray((0.2 * original + 0.8 * canvas).clip(0, 255).astype(np.uint8))
        if outline is not None:
            draw = ImageDraw.Draw(panel)
            for i in idx:
                rect = _patch_rects(comp.crops[i], origin)
                cols = comp.crops[i].grid[1]
                for p in np.flatnonzero(outline[i]):
                    _outline(draw, rect[divmod(int(p), cols)], (255, 255, 255))
        out.append(_label(panel, title))
    return _side_by_side(out + [_colour_bar(lut, vmin, vmax, out[0].height, label)])


def _colour_bar(lut, vmin, vmax, height, label="score"):
    bar_w, pad = 18, 6
    height = max(height, 96)  # readable beside a very flat panel
    bar = Image.new("RGB", (bar_w + 70, height), (255, 255, 255))
    grad = lut[::-1][np.linspace(0, 255, height - 2 * pad).astype(int)]
    strip = np.repeat(grad[:, None, :], bar_w, axis=1).astype(np.uint8)
    bar.paste(Image.fromarray(strip), (pad, pad))
    draw = ImageDraw.Draw(bar)
    draw.text((bar_w + 2 * pad, pad), f"{vmax:.3g}", fill=(0, 0, 0))
    draw.text((bar_w + 2 * pad, height - pad - 12), f"{vmin:.3g}", fill=(0, 0, 0))
    draw.text((bar_w + 2 * pad, height // 2 - 6), label, fill=(0, 0, 0))
    return bar


def _label(panel, text):
    """A small caption in the bottom-left corner (away from patch centres we check in tests)."""
    draw = ImageDraw.Draw(panel)
    w = 7 * len(text) + 8
    draw.rectangle([0, panel.height - 18, w, panel.height], fill=(0, 0, 0))
    draw.text((4, panel.height - 15), text, fill=(255, 255, 255))
    return panel


def _side_by_side(images):
    width = sum(im.width for im in images) + GAP * (len(images) - 1)
    height = max(im.height for im in images)
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    x = 0
    for im in images:
        sheet.paste(im, (x, 0))
        x += im.width + GAP
    return sheet
