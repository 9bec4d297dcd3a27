"""The compress-once methods (DivPrune, VisPruner, Random, Pool) against brute-force references on every
family's tiny model: units, attention and keys from transformers' own eager forward (the references of
test_visionzip.py and test_qwen.py), each rule written out with full matrices and Python loops, and the
family's projector from the eager model. Selection identical, tokens equal; then the session: the image
compressed once, the KV cache reused exactly; FastV's keep-all reproduces the model."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline import ChatSession, encode_image
from pipeline.images import image_digest
from pipeline.models import resolve
from tests import test_qwen, test_visionzip

METHODS = ["divprune", "vispruner", "random", "pool"]
DOMINANT, CONTEXTUAL = 54, 10
_EAGER = {}


def crops_of(vlm, image):
    """Per crop: (candidate units X (N, C), their attention for VisPruner (N,), project (k, C) -> (k, D))."""
    if vlm.name not in _EAGER:
        if vlm.family.name == "qwen2_5_vl":
            X, score, _, project = test_qwen.eager_units(vlm, image)
            _EAGER[vlm.name] = [(torch.stack(X), score, project)]
        else:
            eager = type(vlm.model).from_pretrained(resolve(vlm.name)[0], attn_implementation="eager").eval()

            def project(units):
                with torch.no_grad():
                    return eager.model.multi_modal_projector(units)
            out = []
            for X, score, _ in test_visionzip.eager_units(vlm, eager, image):
                if vlm.family.has_cls:  # CLS is never a candidate; VisPruner reads its row, heads averaged
                    heads = eager.config.vision_config.num_attention_heads
                    out.append((X[1:], score[1:] / heads, project))
                else:
                    out.append((X, score, project))
            _EAGER[vlm.name] = out
    return _EAGER[vlm.name]


def cosines(X):
    """The whole N x N cosine matrix in float32 (rows normalised, one product). The tiny models' units
    are all alike (cos ~ 0.999), so the references take the arithmetic of these few numbers as the
    pipeline does: a last-bit difference would reorder near-ties."""
    unit = F.normalize(X.float(), dim=-1)
    return unit @ unit.T


def pipeline_units(vlm, image):
    """Per crop: the candidate units as the pipeline's tower gives them, and its projector (the tower and
    projector are checked against transformers' eager forward by the features below and test_visionzip)."""
    from pipeline.compress import encode_distinct
    family = vlm.family
    with torch.no_grad():
        out = encode_distinct(family, vlm.model, family.prepare(image), True)
    offset = 1 if family.has_cls else 0
    return [(u[offset:], torch.no_grad()(lambda x: family.project(vlm.model, x[None])[0])) for u in out.units]


def reference_divprune(P, budget):
    D = 1 - cosines(P)  # the whole N x N matrix
    n = len(P)
    nearest = [min(float(D[i, j]) for j in range(n) if j != i) for i in range(n)]
    picked = [int(np.argmax(nearest))]  # first maximum: the lowest index on a tie
    while len(picked) < min(budget, n):
        to_set = D[picked].min(dim=0).values.tolist()
        best = max((j for j in range(n) if j not in picked), key=lambda j: (to_set[j], -j))
        picked.append(best)
    return sorted(picked)


def reference_vispruner(X, a, budget, ratio=0.5):
    order = sorted(range(len(a)), key=lambda j: (-float(a[j]), j))
    important = order[: math.floor(budget * ratio)]
    residual = order[len(important):]
    need = budget - len(important)
    S = cosines(X)
    while (n := min(8, len(residual) - need)) > 0:
        evens, odds = residual[0::2], residual[1::2]
        s = {i: max((float(S[i, j]) for j in odds), default=float("-inf")) for i in evens}
        ranked = sorted(evens, key=lambda i: (-s[i], i))
        residual = ranked[n:] + odds
    return sorted(important + residual)


def reference_random(image, crop, n, budget):
    with torch.random.fork_rng():  # exactly the rule as written: the global seed
        torch.manual_seed(int(image_digest(image)[:15], 16) + crop)
        return sorted(torch.randperm(n)[:budget].tolist())


def reference_pool(rows, cols, budget):
    """-> (gr, gc) by the rule written out: every pair near the grid's aspect ratio, the most cells."""
    if rows * cols <= budget:
        return rows, cols
    ideal = math.sqrt(budget * rows / cols)
    best = None
    for gr in (math.floor(ideal), math.ceil(ideal)):
        gr = min(max(gr, 1), rows, budget)
        gc = min(cols, max(1, budget // gr))
        if best is None or gr * gc > best[0] * best[1]:
            best = (gr, gc)
    return best


@pytest.mark.parametrize("method", METHODS)
def test_selection_matches_brute_force(tiny_vlm, photo, method):
    vlm = tiny_vlm
    # A throwaway first forward: after another model's eager forward in the same process, the first forward
    # of transformers' own Qwen2.5-VL tower differs from every later one (by up to 0.06, in about a third of
    # processes on an AMX CPU; seen with the plain `visual(...)` call, no zipchat code involved).
    with torch.no_grad():
        vlm.family.encode(vlm.model, vlm.family.prepare(photo), with_stats=False)
    comp = encode_image(vlm, photo, method, DOMINANT, CONTEXTUAL)
    crops = crops_of(vlm, photo)
    assert len(comp.crops) == len(crops)
    at = 0
    for c, (info, (X, a, project), (X_pipe, project_pipe)) in enumerate(zip(comp.crops, crops,
                                                                            pipeline_units(vlm, photo))):
        torch.testing.assert_close(X_pipe, X, rtol=1e-3, atol=5e-4)
        rows, cols = info.grid
        assert len(X) == rows * cols
        budget = sum(vlm.family.budget(DOMINANT, CONTEXTUAL, len(X)))
        if method == "pool":
            gr, gc = reference_pool(rows, cols, budget)
            tokens, centres, cell_of = [], [], np.zeros(rows * cols, int)
            r_edges = [i * rows // gr for i in range(gr + 1)]
            c_edges = [j * cols // gc for j in range(gc + 1)]
            P = project(X)
            for i in range(gr):
                for j in range(gc):
                    members = [r * cols + q for r in range(r_edges[i], r_edges[i + 1])
                               for q in range(c_edges[j], c_edges[j + 1])]
                    assert members  # no empty cell
                    cell_of[members] = i * gc + j
                    tokens.append(torch.stack([P[m] for m in members]).mean(0))
                    centres.append(((r_edges[i] + r_edges[i + 1] - 1) // 2) * cols + (c_edges[j] + c_edges[j + 1] - 1) // 2)
            assert gr * gc <= budget and len(info.kept) == 0
            assert info.groups.tolist() == cell_of.tolist()
            assert comp.token_map[at:at + gr * gc, 1].tolist() == centres
            expected = torch.stack(tokens)
        else:
            if method == "divprune":
                kept = reference_divprune(project_pipe(X_pipe), budget)
            elif method == "vispruner":
                kept = reference_vispruner(X_pipe, a, budget)
                np.testing.assert_allclose(info.scores / info.scores.sum(), (a / a.sum()).numpy(), rtol=1e-3, atol=1e-6)
            else:
                kept = reference_random(photo, c, len(X), budget)
            assert info.kept.tolist() == kept and len(kept) == budget
            assert (info.groups == -1).sum() == budget and set(np.unique(info.groups)) <= {-1, -2}
            assert comp.token_map[at:at + budget, 1].tolist() == kept  # sent as themselves, in index order
            expected = project(X[kept])
        n = len(expected)
        torch.testing.assert_close(comp.features[at:at + n], expected, rtol=1e-3, atol=5e-4)
        at += n
    assert comp.num_tokens == at


def test_pool_cells_follow_the_aspect_ratio():
    from pipeline.methods.pool import cells
    assert cells(24, 24, 64) == (8, 8)  # 3x3 units a cell, as DESIGN's example
    assert cells(27, 27, 64) == (8, 8)
    assert cells(24, 24, 128) == (11, 11) and cells(24, 24, 192) == (13, 14)
    assert cells(11, 16, 20) == (4, 5)  # Qwen2.5-VL's 451x300 photo at its 20-unit share
    assert cells(2, 40, 64) == (2, 32) and cells(1, 3, 64) == (1, 3)
    for rows, cols, budget in [(24, 24, 64), (11, 16, 20), (3, 50, 10), (27, 27, 192), (1, 700, 64)]:
        gr, gc = cells(rows, cols, budget)
        assert gr * gc <= budget and gr <= rows and gc <= cols


@pytest.mark.parametrize("method", METHODS)
def test_compressed_once_and_kv_reuse_exact(tiny_vlm, photo, method):
    """Two turns: the image encoded once, the second turn prefilling only the new tokens on the reused
    cache, and the same answer as a session that recomputes everything (no cache reuse)."""
    reused = ChatSession(tiny_vlm, method=method, max_new_tokens=6)
    fresh = ChatSession(tiny_vlm, method=method, max_new_tokens=6, reuse_cache=False)
    for s in (reused, fresh):
        s.add_image(photo)
    for q in ("What is in the image?", "What colour is it?"):
        assert reused.ask(q) == fresh.ask(q)
    t = reused.last_turn
    assert t.cache_reused and t.images_encoded == 0 and t.prefill_tokens < t.prompt_tokens / 2
    assert not fresh.last_turn.cache_reused and fresh.last_turn.prefill_tokens == fresh.last_turn.prompt_tokens
    assert t.visual_tokens == encode_image(tiny_vlm, photo, method, DOMINANT, CONTEXTUAL).num_tokens < t.visual_tokens_full


def test_large_crops_take_the_row_by_row_path(monkeypatch):
    """Past FULL_MATRIX units the similarity matrix is never held whole: the same picks as with it."""
    from pipeline.methods import base, divprune, vispruner
    torch.manual_seed(0)
    x, attention = torch.randn(300, 32), torch.rand(300)
    whole = divprune.max_min_picks(x, 40), vispruner.select(x, attention, 40)
    for module in (base, divprune, vispruner):
        monkeypatch.setattr(module, "FULL_MATRIX", 10, raising=False)
    by_rows = divprune.max_min_picks(x, 40), vispruner.select(x, attention, 40)
    assert whole[0].tolist() == by_rows[0].tolist() and sorted(whole[1].tolist()) == sorted(by_rows[1].tolist())
    assert len(set(whole[0].tolist())) == 40 and len(set(whole[1].tolist())) == 40
