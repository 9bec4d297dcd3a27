"""FastV against transformers' eager attention and a recompute-everything reference, on the tiny models."""

import numpy as np
import pytest
import torch

from pipeline import ChatSession
from pipeline.models import resolve
from tests.test_sgl import conversation_before_answer, reference_pruned_greedy

Q1, Q2 = "What is in the image?", "What colour is it?"


def test_keep_all_reproduces_the_model(tiny_vlm, photo):
    """keep_ratio 1 at fastv_layer 1 (the twins have 2 text layers): the full model's answers, two turns."""
    assert len(tiny_vlm.language_model.layers) == 2
    fastv = ChatSession(tiny_vlm, method="fastv", keep_ratio=1.0, fastv_layer=1, max_new_tokens=8)
    full = ChatSession(tiny_vlm, method="full", max_new_tokens=8)
    for s in (fastv, full):
        s.add_image(photo)
    for q in (Q1, Q2):
        assert fastv.ask(q) == full.ask(q)
        g = fastv.last_turn.guidance
        assert g.source == "fastv" and g.prune_layer == 1
        assert len(g.kept) == fastv.last_turn.visual_tokens == full.last_turn.visual_tokens


def eager_last_row(vlm, ids, features, positions, layer):
    """Brute force: transformers' eager attention over the whole prompt; the last token's row in `layer`,
    heads averaged, at the visual tokens."""
    from pipeline.generate import embed
    eager = type(vlm.model).from_pretrained(resolve(vlm.name)[0], attn_implementation="eager").eval()
    with torch.no_grad():
        out = eager.model.language_model(inputs_embeds=embed(vlm, ids, features), output_attentions=True,
                                         position_ids=vlm.family.position_ids(positions))
    visual = [i for i, t in enumerate(ids) if t == vlm.image_token_id]
    return out.attentions[layer][0, :, -1, visual].mean(0).numpy()


@pytest.mark.parametrize("fixture", ["tiny_ov", "tiny_qwen", "tiny_internvl"])
def test_selection_is_the_last_tokens_attention(fixture, photo, request):
    vlm = request.getfixturevalue(fixture)
    s = ChatSession(vlm, method="fastv", fastv_layer=1, keep_ratio=0.3, max_new_tokens=4)
    s.add_image(photo)
    for q in (Q1, Q2):  # turn 2: decided again for the new question
        ids, features, positions = conversation_before_answer(s, q)
        s.ask(q)
        g = s.last_turn.guidance
        reference = eager_last_row(vlm, ids, features, positions, layer=0)
        np.testing.assert_allclose(g.importance, reference, rtol=1e-4, atol=1e-7)
        k = int(np.floor(0.3 * len(reference)))
        assert len(g.kept) == k and g.rows == 1
        order = sorted(range(len(reference)), key=lambda j: (-reference[j], j))
        expected = set(order[:k])
        boundary = reference[order[k - 1]]  # only a near-tie at the cut may differ
        assert all(abs(reference[j] - boundary) < 1e-6 for j in expected ^ set(g.kept.tolist()))


def test_pruned_decoding_matches_recompute_reference(tiny_ov_large, photo):
    """The kept tokens FastV chose, run through the recompute-everything reference of test_sgl: the same
    greedy answer (4 text layers, pruned at layer 2)."""
    s = ChatSession(tiny_ov_large, method="fastv", fastv_layer=2, keep_ratio=0.2, max_new_tokens=6)
    s.add_image(photo)
    for q in (Q1, Q2):
        ids, features, _ = conversation_before_answer(s, q)
        answer_ids = tiny_ov_large.tokenizer(s.ask(q), add_special_tokens=False)["input_ids"]
        g = s.last_turn.guidance
        visual = torch.tensor([i for i, t in enumerate(ids) if t == tiny_ov_large.image_token_id])
        keep = torch.ones(len(ids), dtype=torch.bool)
        keep[visual] = False
        keep[visual[torch.as_tensor(g.kept)]] = True
        expected = reference_pruned_greedy(tiny_ov_large, ids, features, keep, 2, 6, tiny_ov_large.stop_ids)
        assert tiny_ov_large.tokenizer.decode(expected, skip_special_tokens=True) == \
            tiny_ov_large.tokenizer.decode(answer_ids, skip_special_tokens=True)
        assert not s.last_turn.cache_reused and s.last_turn.prefill_tokens == s.last_turn.prompt_tokens


def test_fastv_layer_is_clamped_and_checked(tiny_ov):
    from pipeline import InputError
    from pipeline.methods.fastv import fastv_layer
    assert fastv_layer(tiny_ov, 0) == 1 and fastv_layer(tiny_ov, 7) == 1  # 2 layers: K is 1
    s = ChatSession(tiny_ov, method="fastv")
    assert (s.settings.fastv_layer, s.settings.fastv_keep_ratio, s.settings.keep_ratio) == (2, 0.5, 0.35)
    for bad in (dict(keep_ratio=0), dict(fastv_keep_ratio=1.5), dict(fastv_layer=0.5), dict(fastv_layer="2")):
        with pytest.raises(InputError):
            s.set_method("fastv", **bad)
    assert s.settings.fastv_keep_ratio == 0.5
