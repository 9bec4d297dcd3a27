"""CDPruner against references written from its rule (docs/methods.md), on every family's tiny twin: the relevance
recomputed by hand (LLaVA: CLIP's text and image features from the tiny CLIP checkpoint through CLIPModel's own
feature functions; the others: the projected tokens against the language model's word embeddings, in float64),
the DPP's fast greedy against a determinant-by-determinant greedy on the same kernel, edge budgets, the second
turn selected again (its answer equal to a fresh session's given the same kept sets), KV kept where the selection
is the same."""

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, CLIPModel

from pipeline import ChatSession, InputError, encode_image
from pipeline.compress import encode_distinct
from pipeline.methods import cdpruner

Q1, Q2 = "What colour is the cat?", "How many people are there on the road?"


def vision_output(vlm, image):
    with torch.no_grad():
        return encode_distinct(vlm.family, vlm.model, vlm.family.prepare(image), with_stats=True)


def minmax(raw: np.ndarray) -> np.ndarray:
    return (raw - raw.min() + 1e-6) / (raw.max() - raw.min())


def reference_relevance(vlm, image, question: str) -> np.ndarray:
    """(crops, N) float64, from the rule."""
    out = vision_output(vlm, image)
    patches = out.units[:, 1:] if vlm.family.has_cls else out.units
    if vlm.family.clip_text_source is not None:  # CLIP: its own text and image feature functions
        from pipeline.text_tower import ensure_tiny_clip
        path = ensure_tiny_clip(vlm.model.config.vision_config.hidden_size)
        clip, tok = CLIPModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
        tower = vlm.model.model.vision_tower
        with torch.no_grad():
            hidden = tower(vlm.family.prepare(image).pixel_values, output_hidden_states=True).hidden_states[-2]
            image_features = clip.visual_projection(tower.post_layernorm(hidden[:, 1:]))  # (B, N, E)
            text = clip.get_text_features(**tok([question], return_tensors="pt"))  # (1, E): one row of 77 tokens
        if hasattr(text, "pooler_output"):
            text = text.pooler_output
        hidden_units = hidden[:, 1:] if vlm.family.name == "llava" else None
        if hidden_units is not None:  # (the tower's own forward gives the same units zipchat selects from)
            assert torch.allclose(hidden_units, patches, atol=1e-5)
        img = image_features.double().numpy()
        txt = text.double().numpy()
        img /= np.linalg.norm(img, axis=-1, keepdims=True)
        txt /= np.linalg.norm(txt, axis=-1, keepdims=True)
        return minmax(-(img @ txt.T).mean(-1))
    ids = vlm.tokenizer(question, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    with torch.no_grad():
        words = vlm.model.get_input_embeddings().weight[ids].double().numpy()  # (M, D)
        tokens = vlm.family.project(vlm.model, patches).double().numpy()  # (B, N, D)
    words /= np.linalg.norm(words, axis=-1, keepdims=True)
    tokens /= np.linalg.norm(tokens, axis=-1, keepdims=True)
    return minmax((tokens @ words.T).mean(-1))


def determinant_greedy(kernel: np.ndarray, budget: int, relevance: np.ndarray) -> list:
    """Each step adds the unit that makes det(L[S, S]) largest (ties: lowest index); once no unit adds more than
    1e-6 of the largest diagonal entry (the rank is spent), the most relevant units not yet kept."""
    chosen, det = [], 1.0
    floor = 1e-6 * kernel.diagonal().max()
    while len(chosen) < budget:
        best, best_gain = None, -np.inf
        for j in range(len(kernel)):
            if j in chosen:
                continue
            s = chosen + [j]
            gain = np.linalg.det(kernel[np.ix_(s, s)]) / det
            if gain > best_gain:
                best, best_gain = j, gain
        if not best_gain > floor:
            rest = [int(u) for u in np.argsort(-relevance, kind="stable") if int(u) not in chosen]
            return chosen + rest[:budget - len(chosen)]
        chosen.append(best)
        det *= best_gain
    return chosen


@pytest.mark.parametrize("dominant,contextual", [(1, 0), (6, 2)])
def test_kept_sets_are_the_greedy_dpp_of_the_rule(tiny_vlm, photo, dominant, contextual):
    vlm = tiny_vlm
    comp = encode_image(vlm, photo, "cdpruner", dominant, contextual, question=Q1)
    relevance = reference_relevance(vlm, photo, Q1)
    got = cdpruner.relevance(vlm, vision_output(vlm, photo), Q1)
    assert np.allclose(np.stack([g.numpy() for g in got]), relevance, atol=2e-4)
    out = vision_output(vlm, photo)
    patches = out.units[:, 1:] if vlm.family.has_cls else out.units
    assert len(comp.crops) == len(patches)
    for c, info in enumerate(comp.crops):
        with torch.no_grad():
            tokens = vlm.family.project(vlm.model, patches[c][None])[0].double().numpy()
        tokens /= np.linalg.norm(tokens, axis=-1, keepdims=True)
        r = relevance[c]
        kernel = r[:, None] * (tokens @ tokens.T) * r[None, :]
        budget = sum(vlm.family.budget(dominant, contextual, patches.shape[1] + vlm.family.has_cls))
        assert sorted(determinant_greedy(kernel, budget, r)) == info.kept.tolist()
        assert np.allclose(info.scores, r, atol=2e-4)  # the score map shows the relevance


def test_the_fast_greedy_is_the_determinant_greedy_also_past_the_rank():
    """A kernel of rank 5 over 12 items: 5 by the DPP, the rest by relevance (both ways)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 5))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    r = rng.uniform(0.1, 1, size=12)
    kernel = r[:, None] * (x @ x.T) * r[None, :]
    for budget in (1, 3, 5, 8, 12):
        fast = cdpruner.greedy_map(torch.tensor(kernel, dtype=torch.float32), budget, torch.tensor(r)).tolist()
        assert fast == determinant_greedy(kernel, budget, r), budget
        assert len(set(fast)) == budget


def test_budgets_beyond_an_image_are_refused(tiny_llava, photo):
    s = ChatSession(tiny_llava, method="cdpruner")
    with pytest.raises(InputError):
        s.set_method("cdpruner", dominant=600, contextual=10)
    every = encode_image(tiny_llava, photo, "cdpruner", 575, 1, question=Q1)  # every unit
    assert every.num_tokens == 576 and len(set(every.crops[0].kept)) == 576
    one = encode_image(tiny_llava, photo, "cdpruner", 1, 0, question=Q1)
    assert one.num_tokens == 1


def test_the_second_turn_selects_again_and_equals_a_fresh_session(tiny_vlm, photo):
    """Turn 2 re-selects every image for its question; the KV cache is rebuilt from the first changed image, and
    the answer equals a session that starts from turn 1 as text (no cache) and is asked turn 2 (float32)."""
    s = ChatSession(tiny_vlm, method="cdpruner", max_new_tokens=6)
    s.add_image(photo)
    first = s.ask(Q1)
    kept1 = [c.kept.tolist() for c in s.current_view()[1].crops]
    second = s.ask(Q2)
    comp2 = s.current_view()[1]
    assert comp2.question == Q2 and s.last_turn.images_encoded == 1
    fresh = ChatSession(tiny_vlm, method="cdpruner", max_new_tokens=6, reuse_cache=False)
    fresh.add_past_turn(Q1, first, images=[photo])
    assert fresh.ask(Q2) == second
    assert [c.kept.tolist() for c in fresh.current_view()[1].crops] == [c.kept.tolist() for c in comp2.crops]
    reference = reference_relevance(tiny_vlm, photo, Q2)
    if any(sorted(k) != c.kept.tolist() for k, c in zip(kept1, comp2.crops)):  # the selection changed
        assert s.last_turn.prefill_tokens > s.last_turn.prompt_tokens - len(s.plan(s.state.turns[-1]).ids) / 2
    assert np.allclose(comp2.crops[0].scores, reference[0], atol=2e-4)


def test_kv_is_kept_where_the_selection_is_the_same(tiny_ov, photo):
    """Two different questions that select the same units (here a relevance that ignores the question): the slot's
    key is what is sent, not the question, so the cache is reused."""
    from dataclasses import replace
    from pipeline.methods import registry
    record = registry.get("cdpruner")
    registry.register(replace(record, relevance=lambda vlm, out, q: [torch.ones(out.units.shape[1])] * len(out.units)))
    try:
        s = ChatSession(tiny_ov, method="cdpruner", max_new_tokens=4)
        s.add_image(photo)
        s.ask(Q1)
        s.ask(Q2)
        t = s.last_turn
        assert s.current_view()[1].question == Q2 and t.images_encoded == 1  # selected again, for Q2
        assert t.cache_reused and t.prefill_tokens < t.prompt_tokens / 2  # the same units: the cache kept
    finally:
        registry.register(record)


def test_before_a_question_the_map_shows_diversity_alone(tiny_llava, photo):
    comp = encode_image(tiny_llava, photo, "cdpruner", 6, 2)
    assert "before a question" in comp.caption() and np.allclose(comp.crops[0].scores, 1)
    asked = encode_image(tiny_llava, photo, "cdpruner", 6, 2, question=Q1)
    assert f"for “{Q1}”" in asked.caption()


def test_a_new_question_reuses_the_tower_output(tiny_next, photo, monkeypatch):
    """Turn 2 selects again from the tower output its image's first selection kept: the tower does not run again,
    and the selection equals one made from scratch."""
    s = ChatSession(tiny_next, method="cdpruner", max_new_tokens=3)
    s.add_image(photo)
    s.ask(Q1)
    calls = []
    real = tiny_next.family.encode
    monkeypatch.setattr(tiny_next.family, "encode", lambda *a, **k: calls.append(1) or real(*a, **k))
    s.ask(Q2)
    assert calls == [] and s.last_turn.images_encoded == 1
    scratch = encode_image(tiny_next, photo, "cdpruner", question=Q2)
    assert [c.kept.tolist() for c in s.current_view()[1].crops] == [c.kept.tolist() for c in scratch.crops]
    assert torch.equal(s.current_view()[1].features, scratch.features.cpu())


def test_a_long_question_is_cut_into_rows_of_77_tokens(tiny_llava, photo):
    """As the authors cut it: each 77-token row gives one text embedding; one row is not padded (causal attention:
    the same embedding as padded)."""
    from pipeline.text_tower import clip_text
    tower = clip_text(tiny_llava)
    long = " ".join(["red cat on a table"] * 30)
    n = len(tower.tokenizer(long)["input_ids"])
    assert tower.text_embeds(long).shape[0] == (n - 1) // 77 + 1 >= 2
    ids = tower.tokenizer([Q1], return_tensors="pt")
    padded = {k: torch.cat([v, v.new_zeros((1, 77 - v.shape[1]))], dim=1) for k, v in ids.items()}
    with torch.no_grad():
        whole = tower.text_projection(tower.text_model(**padded).pooler_output)
    assert torch.allclose(tower.text_embeds(Q1), whole, atol=1e-5)
    encode_image(tiny_llava, photo, "cdpruner", question=long)  # (selects)
