"""What the settings panel says follows what this app can do: the engine's note names the methods it offers,
and SGL's section says it is unavailable without a small model, closed as it is."""

import gradio as gr

import app
from tests.test_architecture import ReplayEngine


def texts_of(demo) -> dict:
    return {getattr(b, "elem_id", None) or id(b): b for b in demo.blocks.values()}


def test_the_engine_note_names_only_the_methods_offered(tiny_llava, tiny_ov_large, tiny_ov):
    alone = app.build_demo(tiny_llava, session_options={"engine": ReplayEngine([])})
    note = texts_of(alone)["engine-note"].value
    assert "FastV and DART prune inside the language model" in note and "SGL" not in note and "Manual answer" in note
    accordions = [b.label for b in alone.blocks.values() if isinstance(b, gr.Accordion)]
    assert "SGL: a small model guides the large one (unavailable: no small model)" in accordions
    paired = app.build_demo(tiny_ov_large, small=tiny_ov, session_options={"engine": ReplayEngine([])})
    assert "FastV, DART and SGL prune inside the language model" in texts_of(paired)["engine-note"].value
    accordions = [b.label for b in paired.blocks.values() if isinstance(b, gr.Accordion)]
    assert "SGL: a small model guides the large one" in accordions


def test_manual_without_picks_draws_what_is_sent(tiny_llava):
    """Manual sends an image without picks as VisionZip's choice: the map draws that, not every patch faded."""
    from pipeline.heatmap import render_map
    from tests.appclient import CAT, VISIONZIP
    from ui.handlers import Handlers
    h = Handlers(tiny_llava, max_new_tokens=3)
    history, _, state, _ = h.add_message([], {"text": "", "files": [CAT]}, None, "Manual", *VISIONZIP[1:])
    *_, last = h.respond(history, state, "kept")
    state, shown, caption = last[1], last[3], last[4]
    session = h.session_for(state)
    sent = session.compression(state.chat.last_image_key, method="visionzip")
    assert "Manual sends it as VisionZip's choice" in caption
    assert shown.tobytes() == render_map(session.image(state.chat.last_image_key), sent, "kept").tobytes()
    session.toggle_pick(0, 5)  # one pick: the map draws the picks
    picked, caption, _ = h.views(state, "kept")
    assert "1 patch picked by hand" in caption and picked.tobytes() != shown.tobytes()


def test_a_message_with_a_new_image_clears_the_click_readout(tiny_llava):
    """The readout describes a patch of the image the map showed; a message with a new image moves the map to it,
    so the readout is cleared (by an event after the message), and a question alone keeps it."""
    from tests.appclient import CAT, VISIONZIP
    from ui.handlers import Handlers
    h = Handlers(tiny_llava, max_new_tokens=3)
    _, _, state, _ = h.add_message([], {"text": "What?", "files": [CAT]}, None, *VISIONZIP)
    assert h.readout_after_message(state) == ""
    state.chat.pending = []  # (answered)
    assert not isinstance(h.readout_after_message(state), str)  # gr.skip(): the readout stays
    demo = app.build_demo(tiny_llava)
    info = texts_of(demo)["patch-info"]
    events = [d for d in demo.fns.values() if getattr(d.fn, "__name__", "") == "readout_after_message"]
    assert len(events) == 2 and all(info in d.outputs for d in events)  # (after Enter, and after an example)
