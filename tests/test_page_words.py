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
    assert "FastV prunes inside the language model" in note and "SGL" not in note and "Manual answer" in note
    accordions = [b.label for b in alone.blocks.values() if isinstance(b, gr.Accordion)]
    assert "SGL: a small model guides the large one (unavailable: no small model)" in accordions
    paired = app.build_demo(tiny_ov_large, small=tiny_ov, session_options={"engine": ReplayEngine([])})
    assert "FastV and SGL prune inside the language model" in texts_of(paired)["engine-note"].value
    accordions = [b.label for b in paired.blocks.values() if isinstance(b, gr.Accordion)]
    assert "SGL: a small model guides the large one" in accordions
