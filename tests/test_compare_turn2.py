"""Compare's "ask again as turn 2" (issue 34, item 4): each method answers a second question on the same image in
its own conversation; a compress-once method keeps the same units and reuses its KV cache, an in-LLM one selects
again and rebuilds it; the Jaccard of the two turns' kept units, turn 2's time to first token and cache, checked
against independent computations (fresh sessions, the guidance's kept tokens by hand)."""

import numpy as np

from pipeline import ChatSession
from pipeline.compare import compare, second_turn_markdown

Q1, Q2 = "What is in the image?", "What colour is the cat's nose?"


def kept_tokens_units(session, method, stats) -> set:
    """By hand: the (crop, unit) of the visual tokens an in-LLM turn kept (a merged token: its target)."""
    comp = session.compression(session.state.last_image_key, method="full")
    return {(int(c), int(p)) for c, p, _ in comp.token_map[stats.guidance.kept] if p >= 0}


def test_turn_two_reuses_or_reselects(tiny_ov_large, photo):
    s = ChatSession(tiny_ov_large, method="visionzip", max_new_tokens=4)
    s.add_image(photo)
    s.ask(Q1)
    results = compare(s, ["visionzip", "hiprune", "fastv", "dart"], second=Q2)
    assert [m for m, _, _ in results] == ["visionzip", "hiprune", "fastv", "dart"]
    assert len(s.state.turns) == 1  # the conversation itself is unchanged
    for method, answer, first in results:
        f = first.followup
        assert f is not None and f.question == Q2
        fresh = ChatSession(tiny_ov_large, method=method, max_new_tokens=4, reuse_cache=False)
        fresh.add_image(photo)
        assert fresh.ask(Q1) == answer
        assert fresh.ask(Q2) == f.answer  # turn 2 answers as a fresh two-turn conversation does
        if method in ("visionzip", "hiprune"):  # compressed once: the same units, the cache reused
            assert f.overlap == 1.0
            assert f.stats.cache_reused and f.stats.prefill_tokens < f.stats.prompt_tokens / 2
        else:  # selected again for the new question; the cache rebuilt
            helper = ChatSession(tiny_ov_large, method=method)
            helper.add_image(photo)
            a, b = kept_tokens_units(helper, method, first), kept_tokens_units(helper, method, f.stats)
            assert np.isclose(f.overlap, len(a & b) / len(a | b)) and f.overlap < 1.0
            assert not f.stats.cache_reused and f.stats.prefill_tokens == f.stats.prompt_tokens
    table = second_turn_markdown(results)
    assert "Ask again as turn 2:" in table and "| HiPrune | 1.00 |" in table and "again, for the new question" in table


def test_the_page_handler_takes_a_second_question(tiny_ov_large, photo):
    from tests.appclient import CAT, VISIONZIP
    from ui.handlers import Handlers
    h = Handlers(tiny_ov_large, max_new_tokens=3)
    history, _, state, _ = h.add_message([], {"text": Q1, "files": [CAT]}, None, *VISIONZIP)
    *_, last = h.respond(history, state, "kept")
    state = last[1]
    *_, (table, answers, maps, overlap_table, _files) = h.compare_answers(state, ["visionzip", "dart"], Q2)
    assert "Ask again as turn 2:** " + Q2 in overlap_table and "| DART |" in overlap_table
    assert "(turn 2)" not in answers  # the answers are turn 1's, as before
    *_, (table, answers, maps, overlap_table, _files) = h.compare_answers(state, ["visionzip"], "   ")
    assert "turn 2" not in overlap_table  # blank: no second turn
    *_, (table, *_rest) = h.compare_answers(state, ["visionzip"], 42)
    assert "turn-2 question must be text" in table


def test_cdpruner_selects_again_before_the_llm(tiny_ov_large, photo):
    """CDPruner in Compare's turn 2: the Jaccard of its kept units for the two questions, each selection made again
    by hand (encode_image with the question); the cache kept up to the image and rebuilt from it; the answer as a
    fresh two-turn conversation's."""
    from pipeline import encode_image
    s = ChatSession(tiny_ov_large, method="visionzip", max_new_tokens=4)
    s.add_image(photo)
    s.ask(Q1)
    (method, answer, first), = compare(s, ["cdpruner"], second=Q2)
    f = first.followup
    units = [{(i, int(u)) for i, c in enumerate(encode_image(tiny_ov_large, photo, "cdpruner", question=q).crops)
              for u in c.kept} for q in (Q1, Q2)]
    assert units[0] != units[1] and np.isclose(f.overlap, len(units[0] & units[1]) / len(units[0] | units[1]))
    assert f.stats.images_encoded == 1 and 0 < f.stats.prompt_tokens - f.stats.prefill_tokens
    fresh = ChatSession(tiny_ov_large, method="cdpruner", max_new_tokens=4, reuse_cache=False)
    fresh.add_image(photo)
    assert fresh.ask(Q1) == answer and fresh.ask(Q2) == f.answer
    assert "| CDPruner |" in second_turn_markdown([(method, answer, first)]) and "KV rebuilt" in \
        second_turn_markdown([(method, answer, first)])
