"""Maps of a Compression drawn on its image, and what a click on a map points at.

Views (`VIEWS`), all on one canvas with every crop at its place on the photo (the whole image, and the
anyres tiles beside or below it, whichever keeps the canvas closer to a screen's shape; the processor's
padding cut off; each tile numbered as the readout names it):
- kept: the photo; the patches the LLM receives as themselves (dominant, picked by a pruning method or
  by hand) clear, every other patch faded towards white, each contextual token's target ringed (a legend
  below says so);
- groups: the tokens that stand for several units (VisionZip's contextual groups, Pool's cells), one
  colour each over the photo, with a legend "token k merged n" ("pooled n");
- scores: the attention VisionZip (and VisPruner) select by, over the photo, with a colour bar below;
- importance: after an SGL or FastV turn, the small model's importance (SGL) or the last prompt token's
  attention in layer K - 1 (FastV), the tokens the large model keeps outlined.
Work is per patch in numpy, upsampled with NEAREST; a panel is up to 900x600 pixels so a patch is
several pixels, and very thin images are stretched to a readable height. A click's patch can be marked.

Drawn for a `Display`, the space the page gives the map: on a wide screen the panels go side by side or
stacked, whichever shows the photo larger in the map's box; on a narrow one (a phone: no height limit, the page
scrolls) the tiles go under the whole image. Text is drawn so that it shows at least its nominal size (14 px)
once the picture is fitted to the display; a legend that would not fit (VisionZip's 50 groups over 5 crops)
becomes one line per crop, and a click on a patch names its token.
"""

import functools

from dataclasses import dataclass

import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageDraw, ImageFont

from .methods import registry

VIEWS = ("kept", "groups", "scores", "importance")
FADE = 0.7  # share of white over a patch the LLM does not receive as itself
TINT = 0.5  # share of a group's colour over its patches
PANEL_HEIGHT = 600  # at most, pixels: a 384 px tile of 27 patches gets 17 pixels a patch
MAX_WIDTH = 900  # of a panel; the panels are stacked (whole image above the tiles) to fit a page's column
MIN_SIDE = 48  # a panel is at least this many pixels on its short side (thin images are stretched)
GAP, TITLE = 12, 26
LEGEND_ROWS = 4  # a groups legend longer than this many rows is summed up in a line
TARGET = (255, 140, 0)  # ring on a contextual token's target patch
KEPT_OUTLINE = (255, 255, 255)
MARK = (255, 0, 200)  # the clicked patch
KIND_COLOURS = {1: (220, 20, 60), 2: (30, 144, 255), 3: (46, 160, 67)}  # kept patches of several kinds (HiPrune's
# anchors, buffers, registers: Method.kinds), outlined in the kept view
TEXT = (40, 40, 40)


@dataclass(frozen=True)
class Display:
    """The space a page gives the map, in CSS pixels: `width`, and `height` (None: as tall as the picture
    needs, where the page scrolls, as on a phone)."""
    width: float = 650.0
    height: float | None = 480.0

    @staticmethod
    def of(value) -> "Display":
        """The page's measure of the map's box, [width, height] (height 0: no limit), checked; anything else
        (an API call sends none) -> the desktop default."""
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            return DESKTOP
        w, h = value
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 20_000 for v in (w, h)) \
                or w < 120:
            return DESKTOP
        return Display(float(w), float(h) if h >= 120 else None)

    def scale(self, width: float, height: float) -> float:
        """Display pixels per canvas pixel, for a canvas `width` x `height` fitted into this space."""
        return min(self.width / width, self.height / height) if self.height else self.width / width


DESKTOP = Display()


def text_scale(width: float, height: float, display: Display = None) -> float:
    """How much larger than its nominal size text is drawn on a `width` x `height` canvas, so that it shows at
    its nominal size (or larger) once the canvas is fitted to `display`."""
    return max(1.0, 1.0 / (display or DESKTOP).scale(width, height))


@functools.lru_cache(maxsize=32)
def font(size: int):
    """Pillow's built-in font at a readable size (a bitmap font where FreeType is missing)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):
        return ImageFont.load_default()


def group_colours(n: int) -> np.ndarray:
    """n distinct RGB colours (uint8), one per contextual token."""
    cmap = colormaps["tab20"] if n > 10 else colormaps["tab10"]
    return (np.array([cmap(i % cmap.N)[:3] for i in range(max(n, 1))]) * 255).astype(np.uint8)


@dataclass
class Panel:
    title: str
    crops: list  # crop indices drawn here
    region: tuple  # (x0, y0, x1, y1): the part of the original image shown
    origin: tuple  # (x, y) of the panel on the canvas (top-left of the photo, below the title)
    scale: tuple  # (sx, sy) canvas pixels per original pixel
    text: float = 1.0  # the text scale of the canvas (text_scale)

    @property
    def size(self) -> tuple:
        x0, y0, x1, y1 = self.region
        return max(1, round((x1 - x0) * self.scale[0])), max(1, round((y1 - y0) * self.scale[1]))


def whole_crop(comp) -> int | None:
    """The crop that shows the whole image (LLaVA's base image, InternVL's thumbnail), when there are tiles."""
    h, w = comp.image_size
    if len(comp.crops) == 1 or comp.times is not None:  # (a clip's frames: none is the whole)
        return None
    return next((i for i, c in enumerate(comp.crops) if tuple(c.box) == (0, 0, w, h)), 0)


def crop_names(comp) -> list:
    """How the map and the readout name each crop: "image" alone, else "whole image" and "tile k"
    (numbered from 1 in the order the LLM receives them)."""
    if comp.times is not None:
        return [comp.frame_label(k) for k in range(len(comp.crops))]
    whole = whole_crop(comp)
    if whole is None:
        return ["image"]
    tiles = iter(range(1, len(comp.crops)))
    return ["whole image" if i == whole else f"tile {next(tiles)}" for i in range(len(comp.crops))]


def layout(comp, display: Display = None) -> list:
    """The panels of a Compression's canvas: one for a single crop; else one for the crop(s) showing the
    whole image and one for the tiles, side by side or stacked, whichever shows the photo larger in `display`
    (stacked where it has no height limit). A single tile may cover the whole image too (a small square on
    OneVision): it still gets its own panel. The text scale allows a tenth of the height for a legend."""
    display = display or DESKTOP
    h, w = comp.image_size
    whole = whole_crop(comp)
    if comp.times is not None:  # a clip: the frames views.clip_sheet placed (an empty box: not shown), one panel
        shown = [i for i, c in enumerate(comp.crops) if c.box[2] > c.box[0]]
        groups = [(f"{len(shown)} {comp.crop_word}" if len(shown) > 1 else
                   f"{comp.frame_label(shown[0])} of {len(comp.crops) * comp.frames_per_crop}, "
                   f"at {comp.times[shown[0]]:.1f} s", shown)]
    elif whole is None:
        groups = [("image", [0])]
    else:
        tiles = [i for i in range(len(comp.crops)) if i != whole]
        groups = [("whole image", [whole]), (f"{len(tiles)} tile{'s' * (len(tiles) > 1)}", tiles)]
    sized = []
    for title, idx in groups:
        boxes = [comp.crops[i].box for i in idx]
        region = (max(0.0, min(b[0] for b in boxes)), max(0.0, min(b[1] for b in boxes)),
                  min(float(w), max(b[2] for b in boxes)), min(float(h), max(b[3] for b in boxes)))
        rw, rh = region[2] - region[0], region[3] - region[1]
        s = min(PANEL_HEIGHT / rh, MAX_WIDTH / rw)
        sx, sy = max(s, MIN_SIDE / rw), max(s, MIN_SIDE / rh)  # stretch a very thin image to be seen
        sized.append(Panel(title, idx, region, (0, 0), (sx, sy)))
    if len(sized) == 1:
        a = sized[0]
        k = text_scale(a.size[0], (TITLE + a.size[1]) * 1.1, display)
        return [Panel(a.title, a.crops, a.region, (0, round(TITLE * k)), a.scale, k)]
    (a, b) = sized
    wide = (a.size[0] + GAP + b.size[0], TITLE + max(a.size[1], b.size[1]))
    tall = (max(a.size[0], b.size[0]), 2 * TITLE + GAP + a.size[1] + b.size[1])
    side_by_side = display.height is not None and display.scale(wide[0], wide[1] * 1.1) >= \
        0.95 * display.scale(tall[0], tall[1] * 1.1)
    w, h = wide if side_by_side else tall
    k = text_scale(w, h * 1.1, display)
    title = round(TITLE * k)  # (the title rows grow with the text)
    second = (a.size[0] + GAP, title) if side_by_side else (0, 2 * title + GAP + a.size[1])
    return [Panel(a.title, a.crops, a.region, (0, title), a.scale, k),
            Panel(b.title, b.crops, b.region, second, b.scale, k)]


def unit_rects(panel: Panel, crop) -> np.ndarray:
    """(rows, cols, 4) canvas rectangles (x0, y0, x1, y1) of a crop's units (may extend past the panel
    where the crop covers the processor's padding)."""
    rows, cols = crop.grid
    (ox, oy), (sx, sy), (rx, ry) = panel.origin, panel.scale, panel.region[:2]
    bx0, by0, bx1, by1 = crop.box
    xs = ox + ((bx0 + (bx1 - bx0) * np.arange(cols + 1) / cols) - rx) * sx
    ys = oy + ((by0 + (by1 - by0) * np.arange(rows + 1) / rows) - ry) * sy
    rect = np.zeros((rows, cols, 4))
    rect[..., 0], rect[..., 2] = xs[None, :-1], xs[None, 1:]
    rect[..., 1], rect[..., 3] = ys[:-1, None], ys[1:, None]
    return rect


def render_map(image: Image.Image, comp, view: str = "kept", importance=None, kept=None, mark=None,
               source: str = "SGL", display: Display = None) -> Image.Image:
    """One view of a Compression (see VIEWS), for `display` (the space the page gives it). `importance`,
    `kept`: per visual token of this image (SGL's or FastV's guidance: `source`), for the "importance" view.
    `mark`: (crop, unit) of a clicked patch, outlined."""
    if view not in VIEWS:
        raise ValueError(f"unknown view {view!r}")
    panels = layout(comp, display)
    out = _render(image, comp, view, importance, kept, mark, source, panels, panels[0].text)
    shown = (display or DESKTOP).scale(out.width, out.height) * panels[0].text
    if shown < 0.95:  # a long legend made the picture shrink in its box: its text drawn larger to make up
        out = _render(image, comp, view, importance, kept, mark, source, panels, panels[0].text / shown)
    return out


def _render(image, comp, view, importance, kept, mark, source, panels, legend_text):
    """The map on `panels`; the legend or colour bar below it at text scale `legend_text`."""
    width = max(p.origin[0] + p.size[0] for p in panels)
    height = max(p.origin[1] + p.size[1] for p in panels)
    photo = np.full((height, width, 3), 255.0, dtype=np.float32)
    for p in panels:
        (ox, oy), (pw, ph) = p.origin, p.size
        region = image.crop(tuple(round(v) for v in p.region)).resize((pw, ph), Image.BILINEAR)
        photo[oy:oy + ph, ox:ox + pw] = np.asarray(region, dtype=np.float32)
    legend, bar, k = None, None, panels[0].text
    if view == "kept":
        canvas = _kept(photo, comp, panels)
    elif view == "groups":
        canvas, legend = _groups(photo, comp, panels, legend_text)
    else:
        if view == "scores":
            values = [c.scores if c.scores is not None else np.full(c.grid[0] * c.grid[1], np.nan) for c in comp.crops]
            outline = None
        elif importance is None:
            raise ValueError("the importance view needs the SGL guidance of this image")
        else:
            values = comp.per_patch(np.asarray(importance, dtype=np.float64))
            outline = [np.nan_to_num(k) > 0.5 for k in comp.per_patch(np.asarray(kept, dtype=np.float64))]
        label = f"{source} importance" if view == "importance" else "score (attention)"
        canvas, bar = _values(photo, comp, panels, values, "viridis" if view == "importance" else "inferno",
                              outline, label, legend_text)
    out = Image.fromarray(canvas.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    title = round(TITLE * k)
    for p in panels:
        draw.text((p.origin[0] + 2, p.origin[1] - title + round(4 * k)), p.title, fill=TEXT, font=font(round(16 * k)))
    _tile_numbers(draw, comp, panels, k)
    if view == "kept" or view == "groups":
        _rings(draw, comp, panels)
    if view == "kept":
        _kind_outlines(draw, comp, panels)
    if view == "importance" and outline is not None:
        _outlines(draw, comp, panels, outline)
    if mark is not None:
        _mark(draw, comp, panels, *mark, width=max(3, round(3 * k)))
    if view == "kept":
        legend = _kept_legend(comp, out.width, legend_text)
    for below in (bar, legend):
        if below is not None:
            out = _below(out, below)
    return out


def group_count(crop) -> int:
    """Tokens that stand for several units in a crop: VisionZip's contextual tokens, Pool's cells."""
    return int(crop.groups.max()) + 1 if crop.groups.size else 0


def _paint(target: np.ndarray, comp, panels, per_unit) -> np.ndarray:
    """Paint a per-unit array (rows, cols, k) of every crop into the canvas (NEAREST), clipped to each
    panel's photo. -> (H, W, k) array, NaN where no unit was painted. Each crop's edges are rounded once, so
    neighbouring tiles meet without a gap."""
    k = per_unit(0).shape[-1]
    out = np.full(target.shape[:2] + (k,), np.nan, dtype=np.float32)
    for p in panels:
        (ox, oy), (pw, ph) = p.origin, p.size
        for i in p.crops:
            rect = unit_rects(p, comp.crops[i])
            cx0, cy0, cx1, cy1 = (round(v) for v in (rect[0, 0, 0], rect[0, 0, 1], rect[-1, -1, 2], rect[-1, -1, 3]))
            w, h = max(1, cx1 - cx0), max(1, cy1 - cy0)
            values = per_unit(i).astype(np.float32)  # (rows, cols, k)
            up = np.stack([np.asarray(Image.fromarray(values[..., j], mode="F").resize((w, h), Image.NEAREST))
                           for j in range(k)], -1)
            dx0, dy0 = max(ox, cx0), max(oy, cy0)
            dx1, dy1 = min(ox + pw, cx0 + w), min(oy + ph, cy0 + h)
            if dx1 > dx0 and dy1 > dy0:
                out[dy0:dy1, dx0:dx1] = up[dy0 - cy0:dy1 - cy0, dx0 - cx0:dx1 - cx0]
    return out


def _kept(photo, comp, panels):
    def faded(i):
        c = comp.crops[i]
        return (c.groups.reshape(c.grid) != -1).astype(np.float32)[..., None]  # 1: not sent as itself
    if registry.get(comp.method).kind == registry.FULL:
        return photo
    fade = np.nan_to_num(_paint(photo, comp, panels, faded))
    return photo * (1 - FADE * fade) + 255 * FADE * fade


def _groups(photo, comp, panels, k):
    """Each contextual token's patches in its colour over the photo; a legend of the merged counts (summed up
    in a line where one entry per token would not fit in LEGEND_ROWS rows)."""
    colours = group_colours(max(1, max((group_count(c) for c in comp.crops), default=1))).astype(np.float32)

    def tint(i):
        c = comp.crops[i]
        g = c.groups.reshape(c.grid)
        return np.where(g[..., None] >= 0, colours[np.clip(g, 0, None) % len(colours)], np.nan)
    painted = _paint(photo, comp, panels, tint)
    has = np.isfinite(painted[..., :1])
    canvas = np.where(has, (1 - TINT) * photo + TINT * np.nan_to_num(painted), photo)
    entries = []
    verb = registry.get(comp.method).words.merged
    names = crop_names(comp)
    for i, c in enumerate(comp.crops):
        for g in range(group_count(c)):
            token = int(np.flatnonzero((comp.token_map[:, 0] == i) & (comp.token_map[:, 2] == g))[0])
            entries.append((colours[g % len(colours)], f"token {token} {verb} {int((c.groups == g).sum())}"
                            + (f" ({names[i]})" if len(comp.crops) > 1 else "")))
    if -(-len(entries) // _legend_columns(entries, canvas.shape[1], k)[0]) <= LEGEND_ROWS:
        return canvas, _legend(entries, canvas.shape[1], k)
    counts = [group_count(c) for c in comp.crops]  # summed up: how many tokens, how many patches each
    sizes = [int((c.groups == g).sum()) for c in comp.crops for g in range(group_count(c))]
    per_crop = f"{counts[0]} per crop" if len(set(counts)) == 1 else f"{min(counts)} to {max(counts)} per crop"
    summary = [(colours[:4], f"one colour per token: {len(sizes)} tokens ({per_crop}), each {verb} "
                             f"{min(sizes)} to {max(sizes)} patches"),
               (None, "ring: a token's target; click a patch for its token")]
    return canvas, _legend(summary, canvas.shape[1], k)


def _values(photo, comp, panels, values, cmap, outline, label, k):
    finite = np.concatenate([v[np.isfinite(v)] for v in values]) if values else np.zeros(0)
    vmin, vmax = (float(finite.min()), float(np.percentile(finite, 99.5))) if finite.size else (0.0, 1.0)
    vmax = vmax if vmax > vmin else vmin + 1e-9
    lut = (colormaps[cmap](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.float32)

    def heat(i):
        c = comp.crops[i]
        v = np.asarray(values[i], dtype=np.float64).reshape(c.grid)
        level = np.clip((np.nan_to_num(v, nan=vmin) - vmin) / (vmax - vmin), 0, 1)
        return np.where(np.isfinite(v)[..., None], lut[(level * 255).astype(int)], np.nan)
    painted = _paint(photo, comp, panels, heat)
    has = np.isfinite(painted[..., :1])
    canvas = np.where(has, 0.35 * photo + 0.65 * np.nan_to_num(painted), photo * 0.5 + 127)
    return canvas, _colour_bar(lut, vmin, vmax, canvas.shape[1], label, k)


def _rings(draw, comp, panels):
    """A ring on each contextual token's target patch (none where the patch lies in the processor's padding,
    off the photo)."""
    for p in panels:
        (ox, oy), (pw, ph) = p.origin, p.size
        for i in p.crops:
            c = comp.crops[i]
            rect = unit_rects(p, c)
            for t in c.targets:
                if t < 0:
                    continue
                x0, y0, x1, y1 = rect[divmod(int(t), c.grid[1])]
                cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, max(2.0, min(x1 - x0, y1 - y0) / 2.5)
                if not (ox + r <= cx <= ox + pw - r and oy + r <= cy <= oy + ph - r):
                    continue
                draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=TARGET, width=2)


def _kind_outlines(draw, comp, panels):
    """Each kept patch of a method with several kinds (Method.kinds) outlined in its kind's colour, just inside
    the patch (neighbours never overdraw each other)."""
    for p in panels:
        for i in p.crops:
            c = comp.crops[i]
            if c.kinds is None:
                continue
            rect = unit_rects(p, c)
            for u in np.flatnonzero(c.kinds):
                x0, y0, x1, y1 = (round(v) for v in rect[divmod(int(u), c.grid[1])])
                draw.rectangle([x0 + 1, y0 + 1, max(x0 + 1, x1 - 2), max(y0 + 1, y1 - 2)],
                               outline=KIND_COLOURS.get(int(c.kinds[u]), KEPT_OUTLINE), width=1)


def _outlines(draw, comp, panels, masks):
    for p in panels:
        for i in p.crops:
            rect = unit_rects(p, comp.crops[i])
            for u in np.flatnonzero(masks[i]):
                x0, y0, x1, y1 = (round(v) for v in rect[divmod(int(u), comp.crops[i].grid[1])])
                draw.rectangle([x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], outline=KEPT_OUTLINE, width=1)


def _colour_bar(lut, vmin, vmax, width, label, k=1.0):
    """A horizontal colour bar under the map (clear of the buttons a page puts in its top corner):
    label, the low end, the gradient, the high end."""
    width = max(width, 360)
    f, pad, bar_h = font(round(14 * k)), round(8 * k), round(14 * k)
    bar = Image.new("RGB", (width, bar_h + 2 * pad + round(4 * k)), (255, 255, 255))
    draw = ImageDraw.Draw(bar)
    low, high = f"{vmin:.3g}", f"{vmax:.3g}"
    x = pad + draw.textlength(label, font=f) + 12
    draw.text((pad, pad - 1), label, fill=TEXT, font=f)
    draw.text((x, pad - 1), low, fill=TEXT, font=f)
    x0 = x + draw.textlength(low, font=f) + 6
    x1 = width - pad - draw.textlength(high, font=f) - 6
    if x1 > x0 + 20:
        grad = lut[np.linspace(0, 255, int(x1 - x0)).astype(int)]
        bar.paste(Image.fromarray(np.repeat(grad[None], bar_h, axis=0).astype(np.uint8)), (int(x0), pad))
    draw.text((x1 + 6, pad - 1), high, fill=TEXT, font=f)
    return bar


def _legend_columns(entries, width, k=1.0) -> tuple:
    """(columns, column width) of a legend `width` wide: as many columns as its widest entry allows."""
    f = font(round(14 * k))
    widest = max((round((30 + 12 * (max(1, len(c)) - 1 if np.ndim(c) == 2 else 0)) * k) + f.getlength(text)
                  for c, text in entries), default=0)
    cols = max(1, int(width // max(1, widest)))
    return cols, width / cols


def _wrap(text: str, f, width: float) -> list:
    """`text` in lines no wider than `width` (a word longer than that keeps its own line)."""
    lines = [""]
    for word in text.split():
        joined = f"{lines[-1]} {word}".strip()
        if lines[-1] and f.getlength(joined) > width:
            lines.append(word)
        else:
            lines[-1] = joined
    return lines


def _legend(entries, width, k=1.0):
    """Swatch-and-text entries in columns, as many as the widest fits in `width` (one column: long entries
    wrap); `k`: the text scale. An entry's colour None draws a ring; a list of colours draws a strip of them."""
    row_h, f = round(20 * k), font(round(14 * k))
    cols, col_w = _legend_columns(entries, width, k)
    if cols == 1:
        entries = [(c, "\n".join(_wrap(t, f, width - round((30 + 12 * (len(c) - 1 if np.ndim(c) == 2 else 0)) * k))))
                   for c, t in entries]
    tops = np.cumsum([0] + [t.count("\n") + 1 for _, t in entries])  # (one column: the line each entry starts on)
    rows = int(tops[-1]) if cols == 1 else -(-len(entries) // cols)
    legend = Image.new("RGB", (width, round(8 * k) + rows * row_h), (255, 255, 255))
    draw = ImageDraw.Draw(legend)
    for n, (colour, text) in enumerate(entries):
        x = round((n % cols) * col_w) + round(6 * k)
        y = round(4 * k) + (int(tops[n]) if cols == 1 else n // cols) * row_h
        swatch = [x, y + round(3 * k), x + round(12 * k), y + round(15 * k)]
        if colour is None:
            draw.ellipse(swatch, outline=TARGET, width=max(2, round(2 * k)))
        elif np.ndim(colour) == 2:  # several colours: a strip, each as wide as one swatch
            for j, c in enumerate(colour):
                draw.rectangle([x + j * round(12 * k), swatch[1], x + (j + 1) * round(12 * k), swatch[3]],
                               fill=tuple(int(v) for v in c), outline=(150, 150, 150))
            x += (len(colour) - 1) * round(12 * k)
        else:
            draw.rectangle(swatch, fill=tuple(int(v) for v in colour), outline=(150, 150, 150))
        draw.multiline_text((x + round(18 * k), y + round(k)), text, fill=TEXT, font=f, spacing=row_h - round(14 * k))
    return legend


def _kept_legend(comp, width, k=1.0):
    """What the kept view's marks mean, for this method."""
    method = registry.get(comp.method)
    if method.kind == registry.FULL:
        return None
    grey = int(255 - FADE * 127)
    entries = [((255, 255, 255), method.words.clear), ((grey, grey, grey), method.words.faded)]
    if method.kinds and any(c.kinds is not None for c in comp.crops):  # HiPrune: what each outline colour is
        entries = [(KIND_COLOURS[k], f"outline: {name}") for k, name in method.kinds.items()] + entries[1:]
    if any(len(c.targets) for c in comp.crops):
        entries.append((None, "ring: a contextual token's target"))
    return _legend(entries, width, k)


def _tile_numbers(draw, comp, panels, k=1.0):
    """Each tile's number in its corner, as the readout names it ("tile 2")."""
    names = crop_names(comp)
    if len(names) < 2:
        return
    for p in panels:
        if len(p.crops) < 2 and names[p.crops[0]] == "whole image":
            continue
        for i in p.crops:
            x0, y0 = unit_rects(p, comp.crops[i])[0, 0, :2]
            x0, y0 = max(x0, p.origin[0]), max(y0, p.origin[1])
            label, f = names[i].split()[-1], font(round(14 * k))
            w = draw.textlength(label, font=f)
            draw.rectangle([x0 + 2, y0 + 2, x0 + w + round(8 * k), y0 + round(20 * k)], fill=(255, 255, 255))
            draw.text((x0 + round(5 * k), y0 + round(3 * k)), label, fill=TEXT, font=f)


def _mark(draw, comp, panels, crop: int, unit: int, width: int = 3):
    """A bold outline round the clicked patch (in every panel that draws its crop)."""
    for p in panels:
        if crop in p.crops:
            c = comp.crops[crop]
            x0, y0, x1, y1 = unit_rects(p, c)[divmod(int(unit), c.grid[1])]
            draw.rectangle([x0 - width + 1, y0 - width + 1, x1 + width - 2, y1 + width - 2], outline=MARK, width=width)


def _beside(a, b):
    sheet = Image.new("RGB", (a.width + GAP + b.width, max(a.height, b.height)), (255, 255, 255))
    sheet.paste(a, (0, 0))
    sheet.paste(b, (a.width + GAP, 0))
    return sheet


def _below(a, b):
    sheet = Image.new("RGB", (max(a.width, b.width), a.height + b.height), (255, 255, 255))
    sheet.paste(a, (0, 0))
    sheet.paste(b, (0, a.height))
    return sheet


def hit(comp, x: float, y: float, display: Display = None):
    """The unit under canvas point (x, y) of a map of `comp` drawn for `display` -> (crop index, unit index),
    or None."""
    for p in layout(comp, display):
        (ox, oy), (pw, ph) = p.origin, p.size
        if not (ox <= x < ox + pw and oy <= y < oy + ph):
            continue
        for i in p.crops:
            rect = unit_rects(p, comp.crops[i])
            rows, cols = comp.crops[i].grid
            c = np.searchsorted(rect[0, :, 2], x, side="right")
            r = np.searchsorted(rect[:, 0, 3], y, side="right")
            if rect[0, 0, 0] <= x < rect[0, -1, 2] and rect[0, 0, 1] <= y < rect[-1, 0, 3] and r < rows and c < cols:
                return i, int(r * cols + c)
    return None


def describe(comp, crop: int, unit: int, importance=None, source: str = "SGL") -> str:
    """What one unit of a map is: the token it is (or joined), its score and rank; `importance` (per
    visual token) is `source`'s (SGL's small model, or FastV's layer K - 1 attention)."""
    c = comp.crops[crop]
    rows, cols = c.grid
    when = f" at {comp.times[crop]:.1f} s" if comp.times is not None else ""
    where = (f"{crop_names(comp)[crop]}{when}, " if len(comp.crops) > 1 else "") + f"row {unit // cols}, column {unit % cols}"
    group, method = int(c.groups[unit]), registry.get(comp.method)
    if method.kind == registry.FULL:
        what = method.words.kept
    elif group == -1:
        what = f"{method.words.kept}: sent as itself"
    elif group == -2:
        what = method.words.not_sent
    elif method.words.merged == "pooled":
        what = f"pooled token {group} of {crop_phrase(comp, crop)} (the mean of its cell's {int((c.groups == group).sum())} units)"
    else:
        merged = int((c.groups == group).sum())
        role = "its target" if group < len(c.targets) and c.targets[group] == unit else "merged into it"
        what = f"contextual token {group} of {crop_phrase(comp, crop)} ({merged} units; {role})"
    text = f"**{where}**: {what}"
    if c.scores is not None:
        rank = int((c.scores > c.scores[unit]).sum()) + 1
        text += f"; score {c.scores[unit]:.4g}, rank {rank} of {rows * cols}"
    if importance is not None:
        value = comp.per_patch(np.asarray(importance, dtype=np.float64))[crop][unit]
        if np.isfinite(value):
            text += f"; {source} importance {value:.4g}"
    return text


def crop_phrase(comp, crop: int) -> str:
    """"this image", "the whole image" or "tile 2"."""
    name = crop_names(comp)[crop]
    return {"image": "this image", "whole image": "the whole image"}.get(name, name)
