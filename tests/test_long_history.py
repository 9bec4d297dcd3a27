"""A long conversation finds the turns that fit the context window by bisection: log(turns) renders of the
conversation, not one per dropped turn (a forged 2,000-turn history held the model's queue for minutes)."""

import math

from pipeline import ChatSession
from pipeline.prompt import render
from pipeline.state import Turn


def long_session(vlm, turns: int, window: int = 2048) -> ChatSession:
    s = ChatSession(vlm, max_new_tokens=8, context_window=window)
    for i in range(turns):
        s.add_past_turn(f"question {i}: " + "tell me more " * 6, f"answer {i}: " + "and so on " * 6)
    return s


def first_fitting_one_by_one(vlm, s, question: str) -> int:
    """The rule, the slow way: the first turn kept is the first whose prompt and room for the answer fit 3/4 of
    the window (every turn tried in order)."""
    room, edge = min(s.settings.max_new_tokens, s.context_window // 4), int(s.context_window * s.edge_fill)
    slot = s._slot("large")
    for start in range(len(s.state.turns) + 1):
        if len(render(vlm, s.state, Turn(question), start, slot)[2]) + room <= edge:
            return start
    return len(s.state.turns)


def test_a_long_history_finds_its_window_by_bisection(tiny_llava, monkeypatch):
    s = long_session(tiny_llava, 200, window=1024)
    expected = first_fitting_one_by_one(tiny_llava, s, "And now?")
    assert 150 < expected < 200  # (most turns are left out: the search has a long way to go)
    renders, real = [], tiny_llava.chat.render
    monkeypatch.setattr(tiny_llava.chat, "render", lambda *a, **k: renders.append(1) or real(*a, **k))
    answer = s.ask("And now?")
    assert s.last_turn.dropped_turns == expected and s.state.window_start == expected and answer is not None
    assert len(renders) <= math.ceil(math.log2(200)) + 4  # (one per bisection step, the first try, the history)
    renders.clear()
    s.ask("And then?")  # the next turn fits on top of the kept window: one try
    assert s.last_turn.dropped_now == 0 and len(renders) <= 3
