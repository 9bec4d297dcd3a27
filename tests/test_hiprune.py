"""HiPrune against a brute-force reference written from its rule (docs/methods.md), on every family's tiny twin:
the two layers' global attention from transformers' eager forward (every attention matrix materialised; Qwen2.5-VL:
the blocks' attention written out by hand from their inputs), then anchors, grid neighbours and registers chosen
by sorting lists in plain Python. Edge budgets; the knobs; KV reuse exact; the map's three kinds."""

import numpy as np
import pytest
import torch

from pipeline import ChatSession, InputError, encode_image
from pipeline.methods import hiprune
from pipeline.models import resolve

_EAGER = {}


def global_attention(weights: torch.Tensor) -> torch.Tensor:
    """(H, T, T) attention probabilities -> (T,): the mean over heads and queries of what each key receives."""
    return weights.float().mean(dim=(0, 1))


def qwen_block_attention(vlm, image, blocks: list) -> dict:
    """Qwen2.5-VL: block -> (units,) global attention in natural unit order, written out from each block's own
    input (a full-attention block: the tiny twin's object layer is one, asserted) and the model's own output order."""
    visual = vlm.model.model.visual
    assert all(b in visual.fullatt_block_indexes for b in blocks)
    prepared = vlm.family.prepare(image)
    got = {}
    hooks = [visual.blocks[b].register_forward_pre_hook(lambda m, a, k, b=b: got.__setitem__(b, (a[0], k)),
                                                       with_kwargs=True) for b in blocks]
    with torch.no_grad():
        visual(prepared.pixel_values, grid_thw=prepared.extra["grid_thw"])
    for h in hooks:
        h.remove()
    natural = eager_natural(vlm, image)
    out = {}
    for b in blocks:
        x, kw = got[b]
        attn = visual.blocks[b].attn
        n = x.shape[0]
        with torch.no_grad():
            qkv = attn.qkv(visual.blocks[b].norm1(x)).reshape(n, 3, attn.num_heads, -1)
        cos, sin = kw["position_embeddings"]

        def rotate(t):
            half = t.shape[-1] // 2
            return t * cos[:, None] + torch.cat([-t[..., half:], t[..., :half]], -1) * sin[:, None]
        q, k = rotate(qkv[:, 0].float()), rotate(qkv[:, 1].float())
        weights = torch.softmax(torch.einsum("ihd,jhd->hij", q, k) * attn.head_dim ** -0.5, dim=-1)
        per_patch = global_attention(weights)
        out[b] = torch.stack([per_patch[4 * i:4 * i + 4].mean() for i in natural])
    return out


def eager_natural(vlm, image) -> list:
    """Qwen2.5-VL: natural unit j -> window-ordered unit, read off the model's own merger output."""
    visual = vlm.model.model.visual
    prepared = vlm.family.prepare(image)
    got = {}
    hook = visual.blocks[-1].register_forward_hook(lambda m, a, o: got.__setitem__("out", o))
    with torch.no_grad():
        pooled = visual(prepared.pixel_values, grid_thw=prepared.extra["grid_thw"]).pooler_output
        hook.remove()
        windowed = visual.merger(got["out"])
    return [int(torch.cdist(pooled[j:j + 1], windowed).argmin()) for j in range(len(pooled))]


def reference_attention(vlm, image, layers: tuple) -> list:
    """Per crop: {layer (0-based): (units,) global attention}, the slow way."""
    if vlm.family.name == "qwen2_5_vl":
        return [qwen_block_attention(vlm, image, list(layers))]
    if vlm.name not in _EAGER:
        _EAGER[vlm.name] = type(vlm.model).from_pretrained(resolve(vlm.name)[0], attn_implementation="eager").eval()
    eager = _EAGER[vlm.name]
    with torch.no_grad():
        out = eager.model.vision_tower(vlm.family.prepare(image).pixel_values, output_attentions=True)
    crops = []
    for c in range(out.attentions[0].shape[0]):
        per = {}
        for layer in layers:
            g = global_attention(out.attentions[layer][c])  # (T,)
            if vlm.family.name == "internvl":  # CLS, then 32x32 patches merged 2x2 into 16x16 units
                n = int((len(g) - 1) ** 0.5)
                g = torch.stack([torch.stack([g[1 + (2 * r + dy) * n + 2 * col + dx] for dy in (0, 1) for dx in (0, 1)]
                                             ).mean() for r in range(n // 2) for col in range(n // 2)])
            elif vlm.family.has_cls:
                g = g[1:]
            per[layer] = g
        crops.append(per)
    return crops


def reference_kept(obj: list, out: list, rows: int, cols: int, budget: int, alpha: float) -> tuple:
    """The rule, with lists: (anchors, buffers, registers) as sets of patch indices."""
    n = len(obj)
    budget = min(budget, n)
    by_obj = sorted(range(n), key=lambda j: (-obj[j], j))
    anchors = by_obj[:round(budget * alpha / 5)]
    buffers = []
    for a in anchors:
        r, c = divmod(a, cols)
        for rr, cc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
            j = rr * cols + cc
            if 0 <= rr < rows and 0 <= cc < cols and j not in anchors and j not in buffers:
                buffers.append(j)
    if len(anchors) + len(buffers) > budget:
        anchors = anchors[:budget]
        buffers = sorted(buffers, key=lambda j: (-obj[j], j))[:budget - len(anchors)]
    rest = sorted((j for j in range(n) if j not in anchors and j not in buffers), key=lambda j: (-out[j], j))
    registers = rest[:budget - len(anchors) - len(buffers)]
    return set(anchors), set(buffers), set(registers)


@pytest.mark.parametrize("dominant, contextual, alpha", [(54, 10, 0.1), (100, 28, 0.5), (1, 0, 0.1), (3, 0, 1.0)])
def test_kept_sets_match_the_rule_on_the_slow_attention(tiny_vlm, photo, dominant, contextual, alpha):
    vlm = tiny_vlm
    with torch.no_grad():  # (Qwen2.5-VL: a throw-away first forward, as in test_methods)
        vlm.family.encode(vlm.model, vlm.family.prepare(photo), with_stats=False)
    layers = hiprune.attention_layers(vlm.family, {})
    comp = encode_image(vlm, photo, "hiprune", dominant, contextual, knobs={"hiprune_alpha": alpha})
    reference = reference_attention(vlm, photo, layers)
    assert len(reference) == len(comp.crops)
    for info, per in zip(comp.crops, reference):
        rows, cols = info.grid
        obj, out = per[layers[0]].tolist(), per[layers[1]].tolist()
        budget = sum(vlm.family.budget(dominant, contextual, rows * cols))
        anchors, buffers, registers = reference_kept(obj, out, rows, cols, budget, alpha)
        kinds = info.kinds
        # near-ties in float32 may order differently: a difference is allowed only between equal-looking scores
        got = {k: set(np.flatnonzero(kinds == k).tolist()) for k in (1, 2, 3)}
        assert got[1] == anchors and got[2] == buffers, (got, anchors, buffers)
        assert len(got[3]) == len(registers)
        if got[3] != registers:
            swapped = sorted(got[3] ^ registers)
            assert max(out[j] for j in swapped) - min(out[j] for j in swapped) < 1e-5 * max(out)
        assert set(info.kept.tolist()) == anchors | buffers | got[3] and not info.includes_cls
        assert len(info.kept) == min(budget, rows * cols)
        assert np.allclose(info.scores, out, rtol=1e-3, atol=1e-6)  # the score map: the output layer's attention


def test_budgets_beyond_an_image_are_refused(tiny_llava, photo):
    """The settings refuse a budget above a crop's units (as for every method); the selection itself sends every
    unit at most (as DivPrune and Random do)."""
    s = ChatSession(tiny_llava, method="hiprune")
    with pytest.raises(InputError):
        s.set_method("hiprune", dominant=600, contextual=10)  # more than the crop's 576 units
    every = encode_image(tiny_llava, photo, "hiprune", 575, 1)  # exactly every unit
    assert every.num_tokens == 576 and (every.crops[0].kinds > 0).all()
    assert encode_image(tiny_llava, photo, "hiprune", 600, 10).num_tokens == 576


def test_the_knobs_change_the_selection_and_are_checked(tiny_ov, photo):
    """alpha and the object layer reach the selection and the compression's cache key; an object layer at or
    past the output layer is refused with the range."""
    plain = encode_image(tiny_ov, photo, "hiprune")
    wide = encode_image(tiny_ov, photo, "hiprune", knobs={"hiprune_alpha": 0.8})
    assert (wide.crops[0].kinds == 1).sum() > (plain.crops[0].kinds == 1).sum()
    with pytest.raises(InputError, match="object layer must be between 1 and"):
        encode_image(tiny_ov, photo, "hiprune", knobs={"hiprune_object_layer": tiny_ov.family.num_layers_to_run})
    s = ChatSession(tiny_ov, method="hiprune", max_new_tokens=2)
    s.add_image(photo)
    first = s.current_view()[1]
    s.set_method("hiprune", hiprune_alpha=0.8)
    again = s.current_view()[1]
    assert (again.crops[0].kinds == 1).sum() == (wide.crops[0].kinds == 1).sum() != (first.crops[0].kinds == 1).sum()


def test_default_object_layers_follow_the_authors_rule():
    from types import SimpleNamespace
    clip = SimpleNamespace(name="llava", vision_depth=24, num_layers_to_run=23)
    qwen = SimpleNamespace(name="qwen2_5_vl", vision_depth=32, num_layers_to_run=32)
    siglip = SimpleNamespace(name="llava_onevision", vision_depth=26, num_layers_to_run=26)
    internvit = SimpleNamespace(name="internvl", vision_depth=24, num_layers_to_run=24)
    assert [hiprune.object_layer(f) for f in (clip, qwen, siglip, internvit)] == [9, 16, 10, 9]


def test_compressed_once_and_kv_reuse_exact(tiny_vlm, photo):
    reused = ChatSession(tiny_vlm, method="hiprune", max_new_tokens=6)
    fresh = ChatSession(tiny_vlm, method="hiprune", max_new_tokens=6, reuse_cache=False)
    for s in (reused, fresh):
        s.add_image(photo)
    for q in ("What is in the image?", "What colour is it?"):
        assert reused.ask(q) == fresh.ask(q)
    t = reused.last_turn
    assert t.cache_reused and t.images_encoded == 0 and t.prefill_tokens < t.prompt_tokens / 2


def test_the_map_colours_the_three_kinds(tiny_llava, photo):
    """The kept view outlines anchors, buffers and registers each in its colour; the legend names them."""
    from pipeline.heatmap import KIND_COLOURS, layout, render_map, unit_rects
    comp = encode_image(tiny_llava, photo, "hiprune", knobs={"hiprune_alpha": 0.5})
    shown = np.asarray(render_map(photo, comp, "kept"), dtype=int)
    panel = layout(comp)[0]
    rect = unit_rects(panel, comp.crops[0])
    cols = comp.crops[0].grid[1]
    for kind in (1, 2, 3):
        colour = np.array(KIND_COLOURS[kind])
        units = np.flatnonzero(comp.crops[0].kinds == kind)
        hits = 0
        for u in units:
            x0, y0, x1, y1 = (int(round(v)) + d for v, d in zip(rect[divmod(int(u), cols)], (1, 1, -2, -2)))
            border = np.concatenate([shown[y0, x0:x1], shown[y1, x0:x1], shown[y0:y1, x0], shown[y0:y1, x1]])
            hits += (np.abs(border - colour).sum(-1) < 40).mean() > 0.3
        assert hits >= 0.8 * len(units), (kind, hits, len(units))
