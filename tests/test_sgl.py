"""SGL on the tiny pair (tiny-ov-small -> tiny-ov-large) against independent references."""

import math

import numpy as np
import pytest
import torch

from pipeline import ChatSession, InputError, Turn
from pipeline.models import resolve

Q1, Q2 = "What is in the image?", "What colour is it?"
# every family: its tiny pair, or (LLaVA-1.5, NeXT: one tiny model) the model guiding itself
PAIRS = {"llava_onevision": ("tiny_ov", "tiny_ov_large"), "internvl": ("tiny_internvl", "tiny_internvl_large"),
         "llava": ("tiny_llava", "tiny_llava"), "llava_next": ("tiny_next", "tiny_next"),
         "qwen2_5_vl": ("tiny_qwen", "tiny_qwen_large")}



def sgl_session(small, large, **kw):
    kw.setdefault("early_exit", None)
    return ChatSession(large, method="sgl", small=small, max_new_tokens=kw.pop("max_new_tokens", 8), **kw)


def conversation_before_answer(session, question, model="large"):
    """(ids, features, positions) the model sees for `question`, built before asking it."""
    plan = session.plan(Turn(question, list(session.state.pending)))
    ids, units = (plan.ids, plan.slots) if model == "large" else (plan.small_ids, plan.small_slots)
    vlm = session.vlm if model == "large" else session.small
    return ids, [u.features for u in units if u.features is not None], vlm.family.positions(ids, units)


def eager_importance(small, ids, features, positions, answer_fed, after):
    """Brute force: transformers' eager attention over the whole sequence in one forward (the answer's
    tokens at the positions after the prompt's largest)."""
    eager = type(small.model).from_pretrained(resolve(small.name)[0], attn_implementation="eager").eval()
    from pipeline.generate import embed
    embeds = embed(small, ids + answer_fed, features)
    after_prompt = int(positions.max()) + 1 + torch.arange(len(answer_fed))
    positions = torch.cat([positions, after_prompt.expand(positions.shape[0], -1)], dim=1)
    with torch.no_grad():
        out = eager.model.language_model(inputs_embeds=embeds, output_attentions=True,
                                         position_ids=small.family.position_ids(positions))
    visual = [i for i, t in enumerate(ids) if t == small.image_token_id]
    total = torch.zeros(len(visual))
    for att in out.attentions:  # (1, H, L, L) per layer
        total += att[0, :, after + 1:, :].sum(dim=(0, 1))[visual]
    return total.numpy()


@pytest.mark.parametrize("family", ["llava_onevision", "internvl", "qwen2_5_vl"])
def test_importance_equals_eager_attention(family, photo, request):
    tiny_ov, tiny_ov_large = (request.getfixturevalue(f) for f in PAIRS[family])
    s = sgl_session(tiny_ov, tiny_ov_large)
    s.add_image(photo)
    ids, features, positions = conversation_before_answer(s, Q1, "small")
    s.ask(Q1)
    g = s.last_turn.guidance
    assert len(g.small_tokens) >= 3
    after = max(i for i, t in enumerate(ids) if t == tiny_ov.image_token_id)
    reference = eager_importance(tiny_ov, ids, features, positions, g.small_tokens[:-1], after)
    np.testing.assert_allclose(g.importance, reference, rtol=1e-3, atol=1e-5)
    assert (np.argsort(-g.importance)[:50] == np.argsort(-reference)[:50]).all()
    assert g.rows == len(ids) - 1 - after + len(g.small_tokens) - 1

    # turn 2 (on top of the small model's reused cache): only this turn's tokens are counted
    ids2, features2, positions2 = conversation_before_answer(s, Q2, "small")
    turn_start = s.plan(Turn(Q2)).turn_start
    s.ask(Q2)
    g2 = s.last_turn.guidance
    reference2 = eager_importance(tiny_ov, ids2, features2, positions2, g2.small_tokens[:-1], turn_start - 1)
    np.testing.assert_allclose(g2.importance, reference2, rtol=1e-3, atol=1e-5)
    assert not np.allclose(g2.importance, g.importance)  # re-ranked for the new question


@pytest.mark.parametrize("family", list(PAIRS))
def test_keep_all_reproduces_the_large_model(family, photo, request):
    small, large = (request.getfixturevalue(f) for f in PAIRS[family])
    sgl = sgl_session(small, large, keep_ratio=1.0, prune_layer=0.5)
    full = ChatSession(large, method="full", max_new_tokens=8)
    for s in (sgl, full):
        s.add_image(photo)
    for q in (Q1, Q2):
        assert sgl.ask(q) == full.ask(q)
        assert sgl.last_turn.model_used == large.name and sgl.last_turn.early_exit is False
        assert len(sgl.last_turn.guidance.kept) == sgl.last_turn.visual_tokens


def reference_pruned_greedy(large, ids, features, keep, k_layer, n_new, stop_ids):
    """No KV cache: the whole pruned sequence is recomputed for every new token, with the
    decoder layers of transformers and a plain causal mask over the surviving tokens."""
    from pipeline.generate import embed, embed_token
    lm = large.language_model
    tokens = []
    for _ in range(n_new):
        h = embed(large, ids, features)
        if tokens:
            h = torch.cat([h] + [embed_token(large, t) for t in tokens], dim=1)
        pos = torch.arange(h.shape[1])
        keep_all = torch.cat([keep, torch.ones(len(tokens), dtype=torch.bool)])
        with torch.no_grad():
            if k_layer == 0:  # dropping the tokens before the LLM, original positions kept
                out = lm(inputs_embeds=h[:, keep_all], position_ids=pos[keep_all][None]).last_hidden_state
            else:
                for i, layer in enumerate(lm.layers):
                    if i == k_layer:
                        h, pos = h[:, keep_all], pos[keep_all]
                    n = h.shape[1]
                    mask = torch.tril(torch.ones(n, n, dtype=torch.bool))[None, None]
                    h = layer(h, attention_mask=mask, position_ids=pos[None],
                              position_embeddings=lm.rotary_emb(h, pos[None]))
                out = lm.norm(h)
            logits = large.model.lm_head(out[:, -1])[0]
            logits[sorted(large.banned_ids)] = float("-inf")  # ids generation never emits
            token = int(logits.argmax())
        if token in stop_ids:
            break
        tokens.append(token)
    return tokens


@pytest.mark.parametrize("prune_layer", [0.0, 0.5])
def test_pruned_decoding_matches_recompute_reference(tiny_ov, tiny_ov_large, photo, prune_layer):
    s = sgl_session(tiny_ov, tiny_ov_large, keep_ratio=0.1, prune_layer=prune_layer, max_new_tokens=6)
    s.add_image(photo)
    for q in (Q1, Q2):  # turn 2: the large model recomputes with the new question's ranking
        ids, features, _ = conversation_before_answer(s, q)
        answer = s.ask(q)
        g = s.last_turn.guidance
        visual = torch.tensor([i for i, t in enumerate(ids) if t == tiny_ov_large.image_token_id])
        keep = torch.ones(len(ids), dtype=torch.bool)
        keep[visual] = False
        keep[visual[torch.as_tensor(g.kept)]] = True
        assert len(g.kept) == math.floor(0.1 * len(visual))
        assert g.prune_layer == math.floor(prune_layer * len(tiny_ov_large.language_model.layers))
        expected = reference_pruned_greedy(tiny_ov_large, ids, features, keep, g.prune_layer, 6,
                                           tiny_ov_large.stop_ids)
        assert len(expected) >= 2
        assert answer == tiny_ov_large.tokenizer.decode(expected, skip_special_tokens=True)


def test_early_exit_skips_the_large_model(tiny_ov, tiny_ov_large, photo):
    calls = []
    hook = tiny_ov_large.language_model.layers[0].register_forward_hook(lambda *a: calls.append(1))
    try:
        s = sgl_session(tiny_ov, tiny_ov_large, early_exit=0.0)
        s.add_image(photo)
        answer = s.ask(Q1)
        t = s.last_turn
        assert t.early_exit and t.guidance.early_exit and t.model_used == "tiny-ov-small"
        assert answer == t.guidance.small_answer and calls == []
        assert 0 < t.guidance.score <= 1 and t.guidance.score == pytest.approx(
            (t.guidance.confidence + t.guidance.consistency) / 2)
        s.set_method("sgl", early_exit=1.01)
        s.ask(Q2)
        assert s.last_turn.early_exit is False and s.last_turn.model_used == "tiny-ov-large" and calls
    finally:
        hook.remove()


def test_consistency_is_the_rescored_probability(tiny_ov, tiny_ov_large, photo):
    """Consistency against a direct computation: drop all but the top 5% visual tokens before the
    LLM (original positions) and read the probabilities of the small model's own answer."""
    s = sgl_session(tiny_ov, tiny_ov_large)
    s.add_image(photo)
    ids, features, _ = conversation_before_answer(s, Q1, "small")
    s.ask(Q1)
    g = s.last_turn.guidance
    from pipeline.generate import embed
    visual = torch.tensor([i for i, t in enumerate(ids) if t == tiny_ov.image_token_id])
    top = torch.as_tensor(np.argsort(-g.importance)[: math.ceil(0.05 * len(visual))].copy())
    keep = torch.ones(len(ids) + len(g.small_tokens) - 1, dtype=torch.bool)
    keep[visual] = False
    keep[visual[top]] = True
    h = embed(tiny_ov, ids + g.small_tokens[:-1], features)
    pos = torch.arange(h.shape[1])
    with torch.no_grad():
        out = tiny_ov.language_model(inputs_embeds=h[:, keep], position_ids=pos[keep][None]).last_hidden_state
        probs = torch.softmax(tiny_ov.model.lm_head(out[0, -len(g.small_tokens):]), -1)
    p = probs[torch.arange(len(g.small_tokens)), torch.tensor(g.small_tokens)]
    assert g.consistency == pytest.approx(float(torch.exp(torch.log(p).mean())), rel=1e-4)


def test_visionzip_and_sgl_compose(tiny_ov, tiny_ov_large, photo):
    s = sgl_session(tiny_ov, tiny_ov_large, sgl_tokens="visionzip", keep_ratio=0.5)
    comp = s.add_image(photo)
    s.ask(Q1)
    t = s.last_turn
    assert t.visual_tokens == 64 * len(comp.crops) == len(t.guidance.importance)
    small_comp = s.compression(s.state.last_image_key, "small")
    for a, b in zip(comp.crops, small_comp.crops):  # the same patches and groups for both models
        assert (a.dominant == b.dominant).all() and (a.groups == b.groups).all()
    assert not torch.allclose(small_comp.features[:, :8], comp.features[:, :8])  # each model's own features
    assert len(t.guidance.kept) == t.visual_tokens // 2


def test_mismatched_pair_is_refused(tiny_llava, tiny_ov_large):
    with pytest.raises(InputError, match=r"'tiny-llava' gives 576 visual tokens \(1 crops of 24x24.*'tiny-ov-large' gives"):
        ChatSession(tiny_ov_large, method="sgl", small=tiny_llava)
    with pytest.raises(InputError, match="needs a small model"):
        ChatSession(tiny_ov_large, method="sgl")
