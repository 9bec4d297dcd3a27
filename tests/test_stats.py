"""What the turn's stats say matches what the turn did: how many prompt tokens came from the KV cache."""

from pipeline import ChatSession
from ui.text import format_stats
from tests.appclient import stat


def test_the_stats_say_how_many_prompt_tokens_came_from_the_cache(tiny_llava, photo):
    s = ChatSession(tiny_llava, method="visionzip", max_new_tokens=4)
    s.add_image(photo)
    s.ask("What is it?")
    assert stat(format_stats(s.last_turn), "KV cache reused / size").startswith("no /")
    s.ask("And its colour?")
    t = s.last_turn
    reused = t.prompt_tokens - t.prefill_tokens  # (the turn computed only the rest)
    assert 0 < reused < t.prompt_tokens and t.engine_cached_tokens == reused
    row = stat(format_stats(t), "KV cache reused / size")
    assert row.startswith(f"yes / {reused:,} of {t.prompt_tokens:,} prompt tokens from the cache / ")


def test_after_a_fastv_turn_the_kept_view_draws_what_the_large_model_kept(tiny_llava):
    from pipeline.compare import tokens_view
    from pipeline.heatmap import render_map
    from tests.appclient import CAT, VISIONZIP
    from ui.handlers import Handlers
    h = Handlers(tiny_llava, max_new_tokens=3)
    history, _, state, _ = h.add_message([], {"text": "What is it?", "files": [CAT]}, None, "FastV", *VISIONZIP[1:])
    *_, last = h.respond(history, state, "kept")
    state, shown = last[1], last[3]
    session = h.session_for(state)
    image, comp, importance, kept = session.guidance_view()
    assert 0 < kept.sum() < len(kept)  # FastV kept some of the visual tokens, not all
    expected = render_map(image, tokens_view(comp, kept, "fastv"), "kept")
    assert shown.tobytes() == expected.tobytes() != render_map(image, comp, "kept").tobytes()
