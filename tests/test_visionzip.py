"""VisionZip against a brute-force reference: eager attention from transformers' own forward,
and the selection/merge rules written out with plain Python loops."""

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import InputError, encode_image
from pipeline.models import resolve
from pipeline.methods.visionzip import BUDGETS


def eager_units(vlm, eager, image):
    """Per crop, from transformers' eager forward with every attention materialised and explicit
    loops: (X (U, C) the units' projector inputs, score (U,), keys (U, d) averaged over heads)."""
    pixel_values = vlm.family.prepare(image).pixel_values
    tower = eager.model.vision_tower
    fl = eager.config.vision_feature_layer
    if vlm.family.name == "internvl":
        layers = tower.encoder.layer
        proj = layers[len(layers) - 1 if fl == -1 else fl - 1].attention.k_proj  # the layer giving the features
    else:
        body = getattr(tower, "vision_model", tower)
        layers = body.encoder.layers
        proj = layers[fl if fl >= 0 else len(layers) + fl].self_attn.k_proj
    keys = {}
    hook = proj.register_forward_hook(lambda m, i, o: keys.__setitem__("k", o))
    with torch.no_grad():
        out = tower(pixel_values, output_hidden_states=True, output_attentions=True)
    hook.remove()
    layer_idx = (fl if fl >= 0 else len(layers) + fl)
    attn = out.attentions[layer_idx]  # (crops, H, T, T)
    heads = attn.shape[1]
    K = keys["k"].view(attn.shape[0], attn.shape[-1], heads, -1).mean(2)  # (crops, T, d)
    if vlm.family.name != "internvl":
        X = out.hidden_states[fl]  # (crops, T, C)
        if vlm.family.has_cls:
            return [(X[c], attn[c, :, 0, :].sum(0), K[c]) for c in range(X.shape[0])]
        return [(X[c], attn[c].mean(dim=(0, 1)), K[c]) for c in range(X.shape[0])]
    X = out.last_hidden_state if fl == -1 else out.hidden_states[fl]  # InternViT: CLS, then 32x32 patches
    n = int((X.shape[1] - 1) ** 0.5)
    results = []
    for c in range(X.shape[0]):  # a unit merges 2x2 patches: (2r, 2c), (2r, 2c+1), (2r+1, 2c), (2r+1, 2c+1)
        score, key = attn[c, :, 0, :].sum(0), K[c]
        units, scores, unit_keys = [], [], []
        for r in range(n // 2):
            for col in range(n // 2):
                patches = [1 + (2 * r + dy) * n + 2 * col + dx for dy in (0, 1) for dx in (0, 1)]
                units.append(torch.cat([X[c, p] for p in patches]))
                scores.append(torch.stack([score[p] for p in patches]).mean())
                unit_keys.append(torch.stack([key[p] for p in patches]).mean(0))
        results.append((torch.stack(units), torch.stack(scores), torch.stack(unit_keys)))
    return results


def eager_reference(vlm, image, dominant, contextual):
    """Per crop: (dominant indices incl. CLS, groups over all units, tokens sent to the projector, scores)."""
    path, _ = resolve(vlm.name)
    eager = type(vlm.model).from_pretrained(path, attn_implementation="eager").eval()
    has_cls = vlm.family.has_cls
    results = []
    for X, score, K in eager_units(vlm, eager, image):
        T = X.shape[0]
        if has_cls:
            order = sorted(range(1, T), key=lambda j: -float(score[j]))
            dom = sorted([0] + order[: dominant - 1])
        else:
            dom = sorted(sorted(range(T), key=lambda j: -float(score[j]))[:dominant])
        remaining = [j for j in range(T) if j not in set(dom)]
        step = max(1, len(remaining) // contextual)
        targets = remaining[::step][:contextual]
        groups = [-1] * T
        members = {t: [] for t in targets}
        for i, t in enumerate(targets):
            groups[t] = i
        for j in remaining:
            if j in members:
                continue
            sims = [float(torch.nn.functional.cosine_similarity(K[j], K[t], dim=0)) for t in targets]
            best = int(np.argmax(sims))
            groups[j] = best
            members[targets[best]].append(j)
        tokens = [X[j] for j in dom]
        for t in targets:
            extra = torch.stack([X[j] for j in members[t]]).mean(0) if members[t] else 0
            tokens.append(X[t] + extra)
        results.append((dom, groups, torch.stack(tokens), score))
    return results, eager


def test_visionzip_matches_brute_force(tiny_vlm, photo):
    vlm = tiny_vlm
    if vlm.family.name == "qwen2_5_vl":
        pytest.skip("Qwen2.5-VL's window attention and merger have their own reference: test_qwen.py")
    dominant, contextual = 54, 10
    comp = encode_image(vlm, photo, "visionzip", dominant, contextual)
    reference, eager = eager_reference(vlm, photo, dominant, contextual)
    assert len(comp.crops) == len(reference)
    offset = 1 if vlm.family.has_cls else 0
    budget = dominant + contextual
    for c, (crop, (dom, groups, tokens, score)) in enumerate(zip(comp.crops, reference)):
        assert crop.includes_cls == vlm.family.has_cls
        expected_patches = [j - offset for j in dom if j >= offset]
        assert crop.dominant.tolist() == expected_patches
        assert len(crop.dominant) + crop.includes_cls == dominant
        assert crop.groups.tolist() == groups[offset:]
        np.testing.assert_allclose(crop.scores, score[offset:].numpy(), rtol=1e-4, atol=1e-6)
        # The projector input: compare after projecting the reference tokens the same way.
        projected = eager.model.multi_modal_projector(tokens)
        got = comp.features[c * budget:(c + 1) * budget]
        # (float32 through a whole tower two ways: AVX512/AMX CPUs round differently, up to ~2e-4 seen)
        torch.testing.assert_close(got, projected, rtol=1e-3, atol=5e-4)
    assert comp.num_tokens == budget * len(comp.crops)


def test_clip_budget_gives_64_tokens_with_cls(tiny_llava, photo):
    for total, (dominant, contextual) in BUDGETS.items():
        comp = encode_image(tiny_llava, photo, "visionzip", dominant, contextual)
        assert comp.num_tokens == total
        crop = comp.crops[0]
        assert crop.includes_cls and len(crop.dominant) == dominant - 1  # CLS counts as a dominant token
        assert (crop.groups == -1).sum() == dominant - 1
        assert set(np.unique(crop.groups[crop.groups >= 0])) == set(range(contextual))
    assert comp.full_tokens == 576


def test_no_contextual_tokens_drops_the_rest(tiny_llava, photo):
    """A budget of 0 contextual tokens: the dominant patches go as themselves and every other patch is dropped
    (-2: not sent, what the map fades), none merged."""
    comp = encode_image(tiny_llava, photo, "visionzip", 64, 0)
    crop = comp.crops[0]
    assert comp.num_tokens == 64 and len(crop.targets) == 0
    expected = np.full(576, -2)
    expected[crop.kept] = -1
    assert crop.groups.tolist() == expected.tolist() and len(crop.kept) == 63


def test_siglip_budget_per_crop(tiny_ov, photo):
    comp = encode_image(tiny_ov, photo, "visionzip", 54, 10)
    assert len(comp.crops) > 1  # base image + anyres tiles
    for crop in comp.crops:
        assert crop.grid == (27, 27) and not crop.includes_cls
        assert len(crop.dominant) == 54 and (crop.groups == -1).sum() == 54
    assert comp.num_tokens == 64 * len(comp.crops)


def test_budget_larger_than_grid_is_refused(tiny_llava, photo):
    with pytest.raises(InputError, match="larger than"):
        encode_image(tiny_llava, photo, "visionzip", 570, 10)
    with pytest.raises(InputError, match="at least 1 dominant"):
        encode_image(tiny_llava, photo, "visionzip", 0, 10)


def crop_pixels(image, box, side, processor):
    """What the processor should have fed the tower for a crop with this box: the box cut from the
    original, resized to side x side (bicubic, as LLaVA's processors) and normalised with the
    processor's mean and std; plus the mask of the pixels that lie on the image (the rest is the
    processor's padding)."""
    x0, y0, x1, y1 = box
    cut = image.crop((round(x0), round(y0), round(x1), round(y1))).resize((side, side), Image.BICUBIC)
    xs = x0 + (np.arange(side) + 0.5) / side * (x1 - x0)
    ys = y0 + (np.arange(side) + 0.5) / side * (y1 - y0)
    on_image = (xs[None, :] >= 1) & (xs[None, :] < image.width - 1) & (ys[:, None] >= 1) & (ys[:, None] < image.height - 1)
    pixels = (np.asarray(cut, dtype=np.float32) / 255 - processor.image_mean) / processor.image_std
    return pixels, on_image


@pytest.mark.parametrize("name", ["tiny-ov-small", "tiny-next"])
def test_crop_boxes_match_anyres_preprocessing(name, photo):
    """Each crop's box, cut from the original and resized, reproduces the processor's pixels: the
    maps draw every crop where the model's input really came from."""
    from pipeline import load_vlm
    vlm = load_vlm(name)
    prepared = vlm.family.prepare(photo)
    side = vlm.family.side
    rows, cols = prepared.tile_grid
    assert len(prepared.crops) == 1 + rows * cols > 2
    assert prepared.crops[0].box == (0, 0, photo.width, photo.height)
    for i, crop in enumerate(prepared.crops):
        expected, on_image = crop_pixels(photo, crop.box, side, vlm.image_processor)
        got = prepared.pixel_values[i].permute(1, 2, 0).numpy()
        assert on_image.mean() > 0.5
        assert np.abs(expected - got)[on_image].mean() < 0.05, i  # resampling differences only
        if i:  # and a box a tenth of a tile off would not pass
            x0, y0, x1, y1 = crop.box
            shifted, mask = crop_pixels(photo, (x0 + (x1 - x0) / 10, y0, x1 + (x1 - x0) / 10, y1), side,
                                        vlm.image_processor)
            assert np.abs(shifted - got)[mask & on_image].mean() > 0.1
