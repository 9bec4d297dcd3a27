"""Qwen2.5-VL: VisionZip with window attention and the 2x2 merger, and M-RoPE positions, against
transformers' own computations on the tiny model."""

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import ChatSession, Turn, encode_image

QUESTIONS = ["What is in the image?", "What colour is it?"]


def hf_positions(vlm, ids, grid_thw):
    """transformers' own M-RoPE positions (get_rope_index) of an uncompressed sequence -> (3, L)."""
    ids_t = torch.tensor([ids])
    return vlm.model.model.get_rope_index(ids_t, (ids_t == vlm.image_token_id).int(), image_grid_thw=grid_thw)[0][:, 0]


def test_positions_follow_the_uncompressed_layout(tiny_qwen, photo):
    """Full: our positions are transformers'. VisionZip: each kept unit keeps its uncompressed position
    (a contextual token its target's), in index order, and every text token keeps its own, over two turns."""
    grid_thw = tiny_qwen.family.prepare(photo).extra["grid_thw"]
    layouts = {}
    for method in ("full", "visionzip"):
        s = ChatSession(tiny_qwen, method=method, max_new_tokens=4)
        s.add_image(photo)
        s.state.turns = [Turn(QUESTIONS[0], list(s.state.pending), "A cat on a table.")]  # the same first turn
        s.state.pending = []
        plan = s.plan(Turn(QUESTIONS[1]))  # the follow-up, on top of the first answer
        layouts[method] = (plan.ids, tiny_qwen.family.positions(plan.ids, plan.slots), plan.compressions[0])
    full_ids, full_pos, _ = layouts["full"]
    torch.testing.assert_close(full_pos, hf_positions(tiny_qwen, full_ids, grid_thw), rtol=0, atol=0)
    ids, pos, comp = layouts["visionzip"]
    image_at = full_ids.index(tiny_qwen.image_token_id)
    units = comp.token_map[:, 1]
    assert (np.diff(units) > 0).all()  # index order
    zip_at = ids.index(tiny_qwen.image_token_id)
    torch.testing.assert_close(pos[:, zip_at:zip_at + len(units)], full_pos[:, image_at + torch.as_tensor(units)])
    n_full = comp.full_tokens
    torch.testing.assert_close(pos[:, :zip_at], full_pos[:, :image_at])  # text before the image
    torch.testing.assert_close(pos[:, zip_at + len(units):], full_pos[:, image_at + n_full:])  # and after it
    assert ids[zip_at + len(units):] == full_ids[image_at + n_full:]


def hf_greedy(vlm, ids, features, positions, n_new):
    """No KV cache: transformers' language model on the whole sequence for every new token, with explicit
    M-RoPE positions (a generated token goes on after the largest), and the same suppressed ids."""
    from pipeline.generate import embed, embed_token
    tokens = []
    for _ in range(n_new):
        h = embed(vlm, ids, features)
        if tokens:
            h = torch.cat([h] + [embed_token(vlm, t) for t in tokens], dim=1)
        after = int(positions.max()) + 1 + torch.arange(len(tokens))
        pos = torch.cat([positions, after.expand(3, -1)], dim=1)
        with torch.no_grad():
            out = vlm.model.model.language_model(inputs_embeds=h, position_ids=pos[:, None, :]).last_hidden_state
            logits = vlm.model.lm_head(out[:, -1])[0]
        logits[sorted(vlm.banned_ids)] = float("-inf")
        token = int(logits.argmax())
        if token in vlm.stop_ids:
            break
        tokens.append(token)
    return tokens


def test_visionzip_turns_equal_transformers_language_model(tiny_qwen, photo):
    s = ChatSession(tiny_qwen, method="visionzip", max_new_tokens=6)
    s.add_image(photo)
    for q in QUESTIONS:  # turn 2 runs on the reused KV cache; the reference recomputes everything
        plan = s.plan(Turn(q, list(s.state.pending)))
        features = [u.features for u in plan.slots if u.features is not None]
        positions = tiny_qwen.family.positions(plan.ids, plan.slots)
        answer = s.ask(q)
        expected = hf_greedy(tiny_qwen, plan.ids, features, positions, 6)
        assert len(expected) >= 2 and answer == tiny_qwen.tokenizer.decode(expected, skip_special_tokens=True)
    assert s.last_turn.cache_reused


def eager_units(vlm, image):
    """From transformers' own forward: the last block's input, rotary angles and output; the attention
    matrix in full (no chunks); the natural order of the window-ordered units read off the model's own
    output (its merger after its own reordering). -> (X: list of (4C,) units, score (U,), K: list of
    (d,) keys, project: (k, 4C) -> (k, D) transformers' own merger)."""
    visual = vlm.model.model.visual
    prepared = vlm.family.prepare(image)
    grid_thw = prepared.extra["grid_thw"]
    last = visual.blocks[-1]
    got = {}
    hooks = [last.register_forward_pre_hook(lambda m, a, k: got.update(x=a[0], kw=k), with_kwargs=True),
             last.register_forward_hook(lambda m, a, o: got.__setitem__("out", o))]
    with torch.no_grad():
        pooled = visual(prepared.pixel_values, grid_thw=grid_thw).pooler_output  # (U, D) in index order
        for h in hooks:
            h.remove()
        out = got["out"]  # (N, C), window order
        C = out.shape[-1]
        windowed = visual.merger(out)  # (U, D), window order
        natural = [int(torch.cdist(pooled[j:j + 1], windowed).argmin()) for j in range(len(pooled))]
        assert len(set(natural)) == len(natural)
        attn = last.attn
        n = out.shape[0]
        qkv = attn.qkv(last.norm1(got["x"])).reshape(n, 3, attn.num_heads, -1)
        cos, sin = got["kw"]["position_embeddings"]

        def rotate(t):  # q * cos + rotate_half(q) * sin, written out
            half = t.shape[-1] // 2
            return t * cos[:, None] + torch.cat([-t[..., half:], t[..., :half]], -1) * sin[:, None]
        q, k = rotate(qkv[:, 0].float()), rotate(qkv[:, 1].float())  # (N, H, d)
        weights = torch.softmax(torch.einsum("ihd,jhd->hij", q, k) * attn.head_dim ** -0.5, dim=-1)  # (H, N, N)
        patch_score = weights.mean(dim=(0, 1))
        patch_key = k.mean(1)
    X, score, K = [], [], []
    for j in range(len(pooled)):  # natural unit j = window unit natural[j] = patches 4i .. 4i+3
        i = natural[j]
        X.append(out[4 * i:4 * i + 4].reshape(-1))
        score.append(patch_score[4 * i:4 * i + 4].mean())
        K.append(patch_key[4 * i:4 * i + 4].mean(0))

    def project(units):
        with torch.no_grad():
            return visual.merger(units.reshape(-1, C))
    return X, torch.stack(score), K, project


def eager_reference(vlm, image, dominant, contextual):
    """VisionZip on `eager_units`, selection and merging with Python loops."""
    X, score, K, project = eager_units(vlm, image)
    T = len(X)
    dom_n, ctx_n = vlm.family.budget(dominant, contextual, T)
    dom = sorted(sorted(range(T), key=lambda j: -float(score[j]))[:dom_n])
    remaining = [j for j in range(T) if j not in set(dom)]
    step = max(1, len(remaining) // ctx_n)
    targets = remaining[::step][:ctx_n]
    groups, members = [-1] * T, {t: [] for t in targets}
    for g, t in enumerate(targets):
        groups[t] = g
    for j in remaining:
        if j not in members:
            best = int(np.argmax([float(torch.nn.functional.cosine_similarity(K[j], K[t], dim=0)) for t in targets]))
            groups[j] = best
            members[targets[best]].append(j)
    tokens = {j: X[j] for j in dom}
    for t in targets:
        tokens[t] = X[t] + (torch.stack([X[j] for j in members[t]]).mean(0) if members[t] else 0)
    order = sorted(tokens)  # M-RoPE: the kept units in index order
    projected = project(torch.stack([tokens[j] for j in order]))  # transformers' own merger
    return dom, groups, projected, score, order


def test_visionzip_matches_brute_force(tiny_qwen, photo):
    comp = encode_image(tiny_qwen, photo, "visionzip", 54, 10)
    dom, groups, projected, score, order = eager_reference(tiny_qwen, photo, 54, 10)
    crop = comp.crops[0]
    rows, cols = crop.grid
    assert comp.full_tokens == rows * cols and (rows, cols) == (11, 16)  # 451x300 -> 448x308 px -> 16x11 units
    assert crop.dominant.tolist() == dom and crop.groups.tolist() == groups and not crop.includes_cls
    np.testing.assert_allclose(crop.scores, score.numpy(), rtol=1e-4, atol=1e-7)
    assert comp.token_map[:, 1].tolist() == order
    torch.testing.assert_close(comp.features, projected, rtol=1e-4, atol=1e-4)
    assert comp.num_tokens == round(176 * 64 / 576)  # the 64/576 share of this image's 176 units


def test_budget_is_a_share_of_the_units(tiny_qwen):
    small = Image.new("RGB", (56, 56), "white")  # 2x2 units: 4 x 64/576 rounds to 0
    for total, (d, c) in {64: (54, 10), 128: (108, 20)}.items():
        comp = encode_image(tiny_qwen, Image.fromarray(np.random.default_rng(0).integers(0, 255, (600, 900, 3),
                                                                                       dtype=np.uint8)), "visionzip", d, c)
        units = comp.full_tokens
        assert comp.num_tokens == round(units * total / 576)
        assert len(comp.crops[0].dominant) == max(1, round(comp.num_tokens * d / total))
    tiny = encode_image(tiny_qwen, small, "visionzip", 54, 10)
    assert tiny.num_tokens == 1 and len(tiny.crops[0].dominant) == 1  # at least one dominant unit


def test_extreme_aspect_ratio_is_refused_before_any_work(tiny_qwen):
    from pipeline import InputError
    s = ChatSession(tiny_qwen, method="visionzip")
    with pytest.raises(InputError, match="up to 200:1"):
        s.add_image(Image.new("RGB", (8000, 20)))
    assert s.state.pending == []
