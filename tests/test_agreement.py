"""Agreement with Full (issue 35, item 1): Full's answer scored under each method by teacher forcing, checked
against a brute-force computation (one full forward per answer token, no cache, through the model's own
classes), and Full's agreement with itself exactly 1.0 with no parting token (float32, every family)."""

import math

import pytest
import torch

from pipeline import ChatSession
from pipeline.agreement import agreements, first_parting, forced_logprobs
from pipeline.compare import compare, private_session
from pipeline.generate import embed, forward_layers, suppress
from pipeline.state import Turn

Q = "What is in the image?"


def conversation(vlm, photo, method="visionzip", tokens=5):
    s = ChatSession(vlm, method=method, max_new_tokens=tokens)
    s.add_image(photo)
    s.ask(Q)
    return s


def prompt_of(session, method):
    """The method's prompt for the session's last question: (ids, slots, features)."""
    other = private_session(session, method, None)
    other.prepare_turn(Q)
    plan = other.plan(Turn(question=Q, images=list(other.state.pending)))
    return plan.ids, plan.slots, other.request(plan).features


def brute_force_logprobs(vlm, ids, slots, features, answer, keep=None, prune_at=None) -> list:
    """log p(answer[i] | prompt, answer[:i]), one whole forward per token (no cache): the model's own decoder
    (`keep`/`prune_at`: the tokens an in-LLM method kept from layer K on, through the layer-by-layer pass)."""
    out = []
    prompt_pos = vlm.family.positions(ids, slots)
    for i in range(len(answer)):
        seq = ids + answer[:i]
        after = int(prompt_pos.max()) + 1 + torch.arange(i)
        pos = torch.cat([prompt_pos, after[None].expand(prompt_pos.shape[0], i)], 1)
        embeds = embed(vlm, seq, features)
        with torch.inference_mode():
            if keep is None:
                hidden = vlm.language_model(inputs_embeds=embeds, position_ids=vlm.family.position_ids(pos)
                                            ).last_hidden_state[:, -1]
                logits = vlm.model.lm_head(hidden).float()[0]
            else:
                from pipeline.generate import new_cache
                mask = torch.cat([keep, torch.ones(i, dtype=torch.bool)])
                logits = forward_layers(vlm, embeds, pos, new_cache(vlm), prune_at=prune_at, keep=mask)[-1]
        out.append(float(torch.log_softmax(suppress(logits, vlm), -1)[answer[i]]))
    return out


def test_full_agrees_with_itself(tiny_vlm, photo):
    s = conversation(tiny_vlm, photo)
    results = compare(s, ["full", "visionzip"])
    full = results[0][2].agreement
    assert full.share == 1.0 and full.parting is None and full.f1 == 1.0
    assert full.tokens == len(results[0][2].answer_ids) > 0
    vz = results[1][2].agreement
    assert vz is not None and 0 < vz.share and vz.tokens == full.tokens
    assert vz.parting == first_parting(results[1][2].answer_ids, results[0][2].answer_ids)
    assert math.isclose(vz.share, math.exp(vz.logprob - full.logprob), rel_tol=1e-12)


def test_compress_once_logprob_equals_brute_force(tiny_vlm, photo):
    s = conversation(tiny_vlm, photo)
    full_ids = compare(s, ["full"], agreement=False)[0][2].answer_ids
    for method in ("visionzip", "full", "random"):
        got = forced_logprobs(s, method, full_ids)
        want = brute_force_logprobs(tiny_vlm, *prompt_of(s, method), full_ids)
        assert got == pytest.approx(want, abs=2e-4), method


def test_fastv_logprob_equals_brute_force(tiny_ov_large, photo):
    """An in-LLM method: Full's answer scored after FastV's pruned prefill = the pruned pass run whole per token
    with the same kept tokens (the last prompt token's attention decides them, so every pass keeps the same)."""
    s = conversation(tiny_ov_large, photo, method="fastv", tokens=6)
    results = compare(s, ["full", "fastv"], agreement=False)
    full_ids, fastv_stats = results[0][2].answer_ids, results[1][2]
    got = forced_logprobs(s, "fastv", full_ids)
    ids, slots, features = prompt_of(s, "full")
    visual = torch.tensor([i for i, t in enumerate(ids) if t == tiny_ov_large.image_token_id])
    keep = torch.ones(len(ids), dtype=torch.bool)
    keep[visual] = False
    keep[visual[torch.as_tensor(fastv_stats.guidance.kept)]] = True  # (kept: indices among the visual tokens)
    from pipeline.methods.fastv import fastv_layer
    k = fastv_layer(tiny_ov_large, s.settings.fastv_layer)
    want = brute_force_logprobs(tiny_ov_large, ids, slots, features, full_ids, keep=keep, prune_at=k)
    assert got == pytest.approx(want, abs=2e-4)
    assert results[1][2].agreement is None  # (agreement=False scores nothing)


def test_compare_scores_every_method_and_a_stop_scores_none(tiny_ov_large, photo):
    s = conversation(tiny_ov_large, photo)
    results = compare(s, ["visionzip", "fastv", "full"])
    scored = {m: t.agreement for m, _, t in results}
    assert all(a is not None for a in scored.values())
    assert agreements(s, [r for r in results if r[0] != "full"]) == {}  # no Full: nothing to agree with
    assert len(s.state.turns) == 1  # the conversation is unchanged


def test_greedy_flags_of_a_forced_answer(tiny_llava, photo):
    """lmms-eval's "is greedy": Full's own greedy answer is the most likely token at every step under Full; a
    first token swapped for another is not."""
    from pipeline.agreement import answer_logprobs
    s = conversation(tiny_llava, photo, method="full")
    ids = s.last_turn.answer_ids
    other = private_session(s, "full", None)
    logprobs, greedy = answer_logprobs(other, Q, ids)
    assert greedy == [True] * len(ids) and len(logprobs) == len(ids)
    swapped = [(ids[0] + 1) % len(tiny_llava.tokenizer)] + ids[1:]
    assert answer_logprobs(private_session(s, "full", None), Q, swapped)[1][0] is False
