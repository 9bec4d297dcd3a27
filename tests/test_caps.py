"""What one message or one rebuilt page may make the server do is bounded: a message takes at most 8 images, a
conversation rebuilt from a page keeps its latest 100 turns and 16 image references, and a message's images are
decoded in the queue, a few at a time."""

from tests.appclient import CAT, VISIONZIP


def handlers(vlm):
    from ui.handlers import Handlers
    return Handlers(vlm, max_new_tokens=3)


def test_a_message_with_too_many_images_is_refused_whole(tiny_llava):
    h = handlers(tiny_llava)
    history, _, state, _ = h.add_message([], {"text": "What are they?", "files": [CAT] * 9}, None, *VISIONZIP)
    assert "at most 8 images (this one has 9)" in history[-1]["content"] and state is None
    history, _, state, _ = h.add_message([], {"text": "What are they?", "files": [CAT] * 8}, None, *VISIONZIP)
    assert len(state.chat.pending) == 8  # (eight references to one photo: the photo is kept once)


def forged_history(turns: int, images_per_turn: int) -> list:
    history = []
    for i in range(turns):
        history += [{"role": "user", "content": {"path": CAT}} for _ in range(images_per_turn)]
        history += [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]
    return history


def test_a_rebuilt_conversation_keeps_only_its_latest_turns_and_images(tiny_llava):
    h = handlers(tiny_llava)
    history, _, state, _ = h.add_message(forged_history(2000, 0), {"text": "And now?", "files": []}, None, *VISIONZIP)
    assert len(state.chat.turns) == 100 and state.chat.turns[-1].question == "question 1999"
    history, _, state, _ = h.add_message(forged_history(300, 1), {"text": "And now?", "files": []}, None, *VISIONZIP)
    turns = state.chat.turns
    assert sum(len(t.images) for t in turns) == 16 and len(turns) == 16 and turns[0].question == "question 284"


def test_the_message_event_runs_in_the_queue(tiny_llava):
    import app
    demo = app.build_demo(tiny_llava, max_new_tokens=3)
    events = {d.api_name: d for d in demo.fns.values()}
    assert events["add_message"].queue and events["add_message"].concurrency_limit == 2
    assert events["add_message"].concurrency_id != events["respond"].concurrency_id  # (never behind an answer)


def test_a_rebuilt_page_leaves_out_a_question_it_would_refuse(tiny_llava, monkeypatch):
    """A text-only page whose earlier question is over today's limit is rebuilt without that turn, not told that
    an image is gone."""
    import pipeline.questions
    h = handlers(tiny_llava)
    history = [{"role": "user", "content": "x" * 50}, {"role": "assistant", "content": "long"},
               {"role": "user", "content": "short"}, {"role": "assistant", "content": "ok"}]
    monkeypatch.setattr(pipeline.questions, "MAX_QUESTION_CHARS", 20)
    history, _, state, _ = h.add_message(history, {"text": "And now?", "files": []}, None, *VISIONZIP)
    assert state is not None and [t.question for t in state.chat.turns] == ["short"]
    assert "no longer on it" not in str(history[-1]["content"])
