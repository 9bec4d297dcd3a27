"""DART against a brute-force reference written from its rule (docs/methods.md): transformers' own forward over
the whole prompt (its KV cache and hidden states), then pivots and the least-alike tokens chosen with Python
lists; keep-all reproduces the model; the pruned answer equals the recompute-everything reference of test_sgl."""

import math

import numpy as np
import pytest
import torch

from pipeline import ChatSession
from tests.test_sgl import conversation_before_answer, reference_pruned_greedy

Q1, Q2 = "What is in the image?", "What colour is it?"


def reference_kept(vlm, ids, features, positions, k_layer: int, keep_ratio: float) -> tuple:
    """The rule on transformers' forward (no zipchat decoder): -> (kept indices into the visual tokens, key L1
    norms per visual token)."""
    from pipeline.generate import embed
    with torch.no_grad():
        out = vlm.model.model.language_model(inputs_embeds=embed(vlm, ids, features), use_cache=True,
                                             output_hidden_states=True, position_ids=vlm.family.position_ids(positions))
        keys = out.past_key_values.layers[k_layer - 1].keys[0]  # (H, L, d)
        norms = [float(keys[:, i].abs().sum()) for i in range(len(ids))]
        states = vlm.language_model.norm(out.hidden_states[k_layer])[0].float()  # (L, D) entering layer K
    visual = [i for i, t in enumerate(ids) if t == vlm.image_token_id]
    text = [i for i in range(visual[0] + 1, len(ids)) if i not in set(visual)]
    by_norm = sorted(range(len(visual)), key=lambda j: (-norms[visual[j]], j))
    visual_pivots = by_norm[:4]
    text_pivots = sorted(text, key=lambda i: (-norms[i], i))[:4]
    t = math.floor(len(visual) * keep_ratio / 8)
    kept, left = list(visual_pivots), [j for j in range(len(visual)) if j not in visual_pivots]

    def cos(a, b):
        return float(torch.nn.functional.cosine_similarity(states[a], states[b], dim=0))
    for pivot in [visual[j] for j in visual_pivots] + text_pivots:
        chosen = sorted(left, key=lambda j: (cos(pivot, visual[j]), j))[:t]
        kept += chosen
        left = [j for j in left if j not in chosen]
    return sorted(kept), np.array([norms[i] for i in visual])


@pytest.mark.parametrize("fixture", ["tiny_llava", "tiny_ov", "tiny_next", "tiny_qwen", "tiny_internvl"])
def test_kept_set_is_the_rule_on_the_models_own_states(fixture, photo, request):
    vlm = request.getfixturevalue(fixture)
    s = ChatSession(vlm, method="dart", max_new_tokens=3)
    s.set_method("dart", dart_layer=1, dart_keep_ratio=0.3)
    s.add_image(photo)
    for q in (Q1, Q2):  # turn 2: decided again for the new question
        ids, features, positions = conversation_before_answer(s, q)
        s.ask(q)
        g = s.last_turn.guidance
        expected, norms = reference_kept(vlm, ids, features, positions, 1, 0.3)
        assert g.source == "dart" and g.prune_layer == 1
        np.testing.assert_allclose(g.importance, norms, rtol=1e-4)
        assert len(g.kept) == len(expected) == 4 + 8 * math.floor(len(norms) * 0.3 / 8)
        assert g.kept.tolist() == expected
        assert not s.last_turn.cache_reused


def test_keep_all_reproduces_the_model(tiny_vlm, photo):
    dart = ChatSession(tiny_vlm, max_new_tokens=8)
    dart.set_method("dart", dart_layer=1, dart_keep_ratio=1.0)
    full = ChatSession(tiny_vlm, method="full", max_new_tokens=8)
    for s in (dart, full):
        s.add_image(photo)
    for q in (Q1, Q2):
        assert dart.ask(q) == full.ask(q)
        assert len(dart.last_turn.guidance.kept) == dart.last_turn.visual_tokens


def test_pruned_decoding_matches_recompute_reference(tiny_ov_large, photo):
    """The tokens DART kept, run through test_sgl's recompute-everything reference: the same greedy answer
    (4 text layers, pruned at layer 2, the authors' default)."""
    s = ChatSession(tiny_ov_large, method="dart", max_new_tokens=6)
    s.add_image(photo)
    for q in (Q1, Q2):
        ids, features, _ = conversation_before_answer(s, q)
        answer_ids = tiny_ov_large.tokenizer(s.ask(q), add_special_tokens=False)["input_ids"]
        g = s.last_turn.guidance
        assert g.prune_layer == 2
        visual = torch.tensor([i for i, t in enumerate(ids) if t == tiny_ov_large.image_token_id])
        keep = torch.ones(len(ids), dtype=torch.bool)
        keep[visual] = False
        keep[visual[torch.as_tensor(g.kept)]] = True
        expected = reference_pruned_greedy(tiny_ov_large, ids, features, keep, 2, 6, tiny_ov_large.stop_ids)
        assert tiny_ov_large.tokenizer.decode(expected, skip_special_tokens=True) == \
            tiny_ov_large.tokenizer.decode(answer_ids, skip_special_tokens=True)


def test_dart_is_transformers_only_and_its_stats_say_what_it_kept(tiny_llava, photo):
    from pipeline.methods import registry
    assert registry.get("dart").engines == ("transformers",)
    s = ChatSession(tiny_llava, method="dart", max_new_tokens=2)
    s.add_image(photo)
    s.ask(Q1)
    rows = dict(registry.get("dart").stats_rows(s.last_turn))
    assert rows["DART: large model keeps"].startswith("124 of 576 visual tokens from layer 1")  # (2 text layers)
