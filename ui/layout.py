"""The page: components, and the event chain wiring them to the handlers (handlers.py)."""

import json
from types import SimpleNamespace

import gradio as gr

from pipeline.methods import registry
from pipeline.video import MAX_FRAMES

from .handlers import Handlers
from .compare_layout import compare_tab, wire_compare
from .text import (ABOUT, CHAT_PLACEHOLDER, CHAT_PLACEHOLDER_FAST, IN_LLM_NOTE, NO_IMAGE, VIEW_NAMES, drawn_knobs,
                   format_stats, vllm_note)

MODEL = "model"  # the concurrency group of the events that run a model
ANSWERS = "answers"  # --engine vllm: answers and Compares, several at once (the engine batches them)
MESSAGES = "messages"  # a message's images are decoded and checked in the queue, a few at a time
MESSAGES_AT_ONCE = 2
CHAT_HEIGHT = 560  # pixels at most; the page's style sheet fits it to the screen (assets/style.css)
MAP_HEIGHT = "min(48vh, 560px)"  # the map fits the first screen with its readout and stats under it
# the map's box as the page lays it out when a message is sent (the settings panel opened or closed, the phone
# turned): [width, height], height 0 on a narrow screen, where the style sheet lets the map be as tall as its
# picture (the tiles go under the whole image). The state passes through untouched (Gradio keeps it on the server).
MEASURE_MAP_JS = """(state, box) => { const m = document.querySelector('#map');
  if (!m || !m.clientWidth) return [state, box];
  return [state, [m.clientWidth, window.matchMedia('(max-width: 600px)').matches ? 0 : m.clientHeight]]; }"""
SESSION_TTL_S = 3600  # a tab's state is dropped after an hour without use, or when the tab closes


class Slider(gr.Slider):
    """gr.Slider whose value may be missing in an API call: None reaches the handler, which says what
    is wrong, instead of failing inside Gradio's preprocessing with a TypeError. Drawn as a slider."""
    is_template = True

    def preprocess(self, payload):
        return None if payload is None else super().preprocess(payload)


class ImagePicker(gr.Radio):
    """The picker of the image the map shows. Its choices follow the conversation in the page; an API call
    (`/map_image`) may name any image, and the handler checks it (a value not among the choices the page was
    built with reaches it, instead of failing in Gradio's own check). Drawn as a radio."""
    is_template = True

    def preprocess(self, payload):
        return payload if payload not in [value for _, value in self.choices] else super().preprocess(payload)


class MapClick(gr.EventData):
    """A click on the map (gr.SelectData's `index`: [x, y]); None where an API call sent no event data,
    which gr.SelectData itself would fail on with a TypeError before the handler could say anything."""

    @property
    def index(self):
        return self._data.get("index") if isinstance(self._data, dict) else None


def build(h: Handlers, banner: str | None, gallery_file, answers_at_once: int = 1) -> gr.Blocks:
    """The page: the settings in a side panel; the chat beside the map (with its readout and the turn's
    stats right under it) and Compare, as tabs of the right column; on a phone the columns stack, chat
    first. `answers_at_once` > 1 (an engine that batches): that many answers and Compares run together; the
    other model events (settings, the map's image) stay one at a time, and the encodes take the model's lock."""
    answers = dict(concurrency_id=MODEL) if answers_at_once <= 1 else dict(concurrency_id=ANSWERS,
                                                                          concurrency_limit=answers_at_once)
    offered = [m for m in registry.all_methods() if not m.needs_small or h.small is not None]
    with gr.Blocks(title="zipchat", delete_cache=(1800, 3600), fill_width=True) as demo:
        p = SimpleNamespace(state=gr.State(None, time_to_live=SESSION_TTL_S, delete_callback=h.forget))
        settings_panel(p, h, offered)
        gr.Markdown(f"## zipchat <span class='model-line'>· `{h.vlm.describe()}` · the map shows which visual tokens "
                    "the language model gets</span>", elem_id="header")
        if banner:
            gr.Markdown(banner, elem_id="offline-banner", elem_classes=["banner"])
        with gr.Row(elem_id="main", equal_height=False):
            chat_column(p, h, gallery_file)
            with gr.Column(scale=6, min_width=320, elem_id="map-column"):
                with gr.Tabs(elem_id="right-tabs"):
                    map_tab(p, h)
                    compare_tab(p, offered)
        # new inputs go last: positional API callers of older versions keep working
        p.settings = [p.method, p.dominant, p.contextual, p.keep_ratio, p.prune_layer, p.exit_on, p.threshold,
                      p.sgl_zip, p.tiles, p.new_tokens, p.temperature, p.top_p, p.fastv_layer, p.fastv_keep, *p.knobs]
        p.maps = [p.map_image, p.caption, p.view]
        wire_chat(p, h, answers)
        wire_map(p, h)
        wire_compare(p, h, answers)
        wire_clear(p, h)
    return demo


def settings_panel(p, h: Handlers, offered: list):
    """The side panel: the method, its budget, FastV's and SGL's settings, the knobs of other methods, and
    generation."""
    vlm = h.vlm
    with gr.Sidebar(open=False, width=330, elem_id="settings"):  # (opened on wide screens: app.PAGE_JS)
        gr.Markdown("### Settings", elem_id="settings-title")
        p.method = gr.Radio([m.label for m in offered], value=registry.label(h.method_default), elem_id="method",
                            label="Visual tokens (Manual: pick patches on the map)")
        p.budget = gr.Radio([64, 128, 192], value=64, elem_id="budget",
                            label="Budget per crop (dominant + contextual; DivPrune, VisPruner, Random and Pool "
                                  "send the same total)")
        units = vlm.family.units_per_crop - 1  # the largest budget below a whole crop
        p.dominant = Slider(1, units, value=54, step=1, elem_id="dominant",
                            label="dominant" + (" (CLS counts as one)" if vlm.family.has_cls else ""))
        p.contextual = Slider(0, 100, value=10, step=1, label="contextual", elem_id="contextual")
        p.tiles = Slider(0, 36, value=h.max_tiles, step=1, elem_id="max_tiles", visible=vlm.family.tiles,
                         label=f"{vlm.family.tile_cap_label} (0: all the checkpoint uses; fewer is faster on a "
                               "CPU; Full, FastV, DART and SGL always use all)")
        gr.Markdown(IN_LLM_NOTE, elem_classes=["note"])
        if h.options.get("engine") is not None:  # --engine vllm
            gr.Markdown(vllm_note([m.label for m in offered if m.engines is None],
                                  [m.label for m in offered if m.engines is not None]),
                        elem_classes=["note"], elem_id="engine-note")
        fastv_settings(p, h)
        sgl_settings(p, h)
        p.knobs = knob_sliders(h)
        with gr.Accordion("Generation", open=False, elem_id="generation"):
            p.new_tokens = Slider(1, max(2048, h.max_new_tokens), value=h.max_new_tokens, step=1,
                                  label="max new tokens", elem_id="max_new_tokens")
            p.temperature = Slider(0.0, 2.0, value=0.0, step=0.05, elem_id="temperature",
                                   label="temperature (0: greedy, so Compare is deterministic)")
            p.top_p = Slider(0.05, 1.0, value=0.9, step=0.05, label="top-p", elem_id="top_p")
        gr.Markdown(ABOUT, elem_classes=["note"])


def fastv_settings(p, h: Handlers):
    """FastV's two knobs, with its layer's range from the model's depth."""
    layers = len(h.vlm.language_model.layers)
    with gr.Accordion("FastV: the model prunes by its own attention", open=h.method_default == "fastv"):
        p.fastv_layer = Slider(1, max(2, layers - 1), value=2, step=1, elem_id="fastv_layer",
                               label=f"K: visual tokens kept from layer K on (1 to {layers - 1} of {layers} "
                                     f"layers; larger is taken as {layers - 1})")
        p.fastv_keep = Slider(0.01, 1.0, value=0.5, step=0.01, elem_id="fastv_keep_ratio",
                              label="keep ratio (visual tokens)")


def sgl_settings(p, h: Handlers):
    """SGL's knobs, early exit and token choice; not interactive without a small model."""
    small, vlm = h.small, h.vlm
    sgl_note = (f"`{small.name}` answers first and ranks the visual tokens; `{vlm.name}` drops the rest "
                "part-way through its layers, or is skipped when the small model is confident."
                if small else "Start with `--small-model` (e.g. llava-ov-0.5b for llava-ov-7b) to enable SGL.")
    title = "SGL: a small model guides the large one" + ("" if small else " (unavailable: no small model)")
    with gr.Accordion(title, open=h.method_default == "sgl"):
        gr.Markdown(sgl_note, elem_classes=["note"])
        on = small is not None
        p.keep_ratio = Slider(0.01, 1.0, value=0.35, step=0.01, label="keep ratio (visual tokens)", interactive=on,
                              elem_id="keep_ratio")
        p.prune_layer = Slider(0.0, 1.0, value=0.4, step=0.05, label="prune at (fraction of depth)", interactive=on,
                               elem_id="prune_layer")
        p.exit_on = gr.Checkbox(value=True, label="early exit", interactive=on, elem_id="exit_on")
        p.threshold = Slider(0.0, 1.0, value=0.8, step=0.01, label="early-exit threshold", interactive=on,
                             elem_id="threshold")
        p.sgl_zip = gr.Checkbox(value=False, label="both models see VisionZip tokens", interactive=on,
                                elem_id="sgl_zip")


def knob_sliders(h: Handlers) -> list:
    """A slider per knob of the methods whose settings the panel does not draw itself (registry.Knob), under
    its method's name: what a method registered in its own file adds to the page."""
    sliders, methods = [], {k.name: m for m in registry.all_methods() for k in m.knobs}
    for knob in drawn_knobs():
        m = methods[knob.name]
        with gr.Accordion(f"{m.label}: {m.doc}" if m.doc else m.label, open=h.method_default == m.name):
            sliders.append(Slider(knob.low, knob.high, value=knob.default, step=1 if knob.integer else knob.step,
                                  label=knob.label + (f" ({knob.help})" if knob.help else ""),
                                  elem_id=f"knob_{knob.name}"))
    return sliders


def chat_column(p, h: Handlers, gallery_file):
    with gr.Column(scale=4, min_width=320, elem_id="chat-column"):
        examples = json.loads(gallery_file.read_text())
        p.chatbot = gr.Chatbot(elem_id="chatbot", height=CHAT_HEIGHT, buttons=["copy"], show_label=False,
                               placeholder=CHAT_PLACEHOLDER if h.examples is None else CHAT_PLACEHOLDER_FAST,
                               examples=[{"text": e["question"], "files": [str(gallery_file.parent / e["image"])]}
                                         for e in examples])
        p.textbox = gr.MultimodalTextbox(  # (browsers do not call iPhone photos images: HEIC is named)
            file_types=["image", ".heic", ".heif", "video"], file_count="multiple", sources=["upload"],
            elem_id="textbox", placeholder=f"Upload an image{' or a clip' * h.takes_video} and ask about it (Enter sends)",
            show_label=False)
        with gr.Row(elem_id="chat-buttons"):
            p.stop_btn = gr.Button("Stop", variant="stop", elem_id="stop", visible=False, min_width=80)
            p.clear_btn = gr.Button("Clear", elem_id="clear", min_width=80)


def map_tab(p, h: Handlers):
    with gr.Tab("Map", id="map-tab", elem_id="map-tab"):
        # the image picker apart from the views, named, so that one choice of each never reads as two views
        p.map_choice = ImagePicker([], label="Image on the map", visible=False, elem_id="map-image")
        p.map_frame = Slider(0, MAX_FRAMES, value=0, step=1, label="frame on the map (0: all of the clip's frames)",
                             visible=False, elem_id="map-frame")  # (its maximum follows the clip; the handler checks)
        with gr.Row(elem_id="map-controls"):
            p.view = gr.Radio([(VIEW_NAMES[v], v) for v in VIEW_NAMES if v != "importance"],
                              value="kept", show_label=False, elem_id="view")
        # no fullscreen: the click readout under the map would not show there; the caption under the map, so
        # that a caption changing length (Manual's first pick) never moves the patches under a finger
        p.map_image = gr.Image(show_label=False, type="pil", interactive=False, elem_id="map",
                               height=MAP_HEIGHT, buttons=["download"])
        p.caption = gr.Markdown(NO_IMAGE, elem_id="caption")
        p.info = gr.Markdown("", elem_id="patch-info")
        p.map_box = gr.JSON(None, visible=False, elem_id="map-box")  # (filled by MEASURE_MAP_JS)
        with gr.Row(visible=False):  # /click_at: a click through the API, at (x, y) of the map image
            p.click_x, p.click_y = gr.Number(elem_id="click-x"), gr.Number(elem_id="click-y")
            p.click_at = gr.Button(elem_id="click-at")
        with gr.Row(visible=registry.get(h.method_default).kind == registry.MANUAL, elem_id="pick-row") as pick_row:
            p.radius = Slider(0, 5, value=0, step=1, label="brush (patches around the click)", elem_id="radius")
            p.from_zip = gr.Button("Start from VisionZip's", elem_id="picks-from-visionzip")
            p.no_picks = gr.Button("Clear picks", elem_id="clear-picks")
        p.pick_row = pick_row
        p.stats = gr.Markdown(format_stats(None), elem_id="stats")


def wire_chat(p, h: Handlers, answers: dict):
    """A message, then its answer; Stop."""
    def answer(trigger, api: bool):
        """A message, then its answer: after Enter in the textbox, or after an example picked in the chat."""
        submitted = trigger(h.add_message, [p.chatbot, p.textbox, p.state, *p.settings],
                            [p.chatbot, p.textbox, p.state, p.stop_btn], concurrency_id=MESSAGES,
                            concurrency_limit=MESSAGES_AT_ONCE, show_progress="hidden",
                            api_name="add_message" if api else False)
        # every event that runs a model waits in one line (MODEL): one model call at a time, whatever the event
        measured = submitted.then(h.set_display, [p.state, p.map_box], p.state, js=MEASURE_MAP_JS, queue=False,
                                  api_name=False)
        answering = measured.then(h.respond, [p.chatbot, p.state, p.view], [p.chatbot, p.state, p.stats, *p.maps],
                                  api_name="respond" if api else False, **answers)
        # the textbox comes back (and Stop goes) whatever happened: after the answer, or after a failure that
        # Gradio (or ZeroGPU: no quota, worker lost) raised outside the handler, which skips .then
        submitted.then(h.readout_after_message, p.state, p.info, queue=False, api_name=False)
        answering.then(h.finish, p.state, [p.textbox, p.stop_btn], api_name=False)
        answering.then(h.image_choices, p.state, [p.map_choice, p.map_frame], queue=False, api_name=False)
        for event in (submitted, answering):
            event.failure(h.finish, p.state, [p.textbox, p.stop_btn], api_name=False)
    answer(p.textbox.submit, api=True)
    picked = p.chatbot.example_select(h.use_example, None, p.textbox, queue=False, api_name=False)
    answer(picked.then, api=False)
    p.stop_btn.click(h.stop, p.state, None, queue=False, api_name="stop")


def wire_map(p, h: Handlers):
    """The settings (applied to the map at once), the views, the image picker, clicks and picks."""
    p.method.change(lambda: "", None, p.info, queue=False, api_name=False)  # the readout follows the method
    p.budget.change(h.pick_budget, p.budget, [p.dominant, p.contextual], queue=False, api_name=False)
    for control in p.settings:
        control.change(h.apply_settings, [p.state, p.view, *p.settings], [p.state, *p.maps, p.pick_row],
                       api_name=f"settings_{control.elem_id}", concurrency_id=MODEL)
    p.view.change(h.show_view, [p.state, p.view], [p.map_image, p.caption], queue=False, api_name="view")
    p.map_choice.input(h.show_image, [p.state, p.map_choice, p.view], [p.state, p.map_image, p.caption, p.view, p.info],
                       api_name="map_image", concurrency_id=MODEL).then(h.image_choices, p.state,
                                                                         [p.map_choice, p.map_frame], queue=False,
                                                                         api_name=False)
    p.map_frame.release(h.show_frame, [p.state, p.map_frame, p.view], [p.state, p.map_image, p.caption, p.view, p.info],
                        api_name="map_frame", concurrency_id=MODEL)

    def click_map(state, view, radius, evt: MapClick):  # (Gradio reads the event type off this signature)
        return h.click_map(state, view, radius, evt)
    p.map_image.select(click_map, [p.state, p.view, p.radius], [p.state, p.map_image, p.caption, p.info],
                       api_name="click")
    p.click_at.click(h.click_at, [p.state, p.view, p.radius, p.click_x, p.click_y],
                     [p.state, p.map_image, p.caption, p.info], api_name="click_at")
    p.from_zip.click(lambda s: h.set_picks(s, True), p.state, [p.state, p.map_image, p.caption, p.info],
                     api_name="picks_visionzip")
    p.no_picks.click(lambda s: h.set_picks(s, False), p.state, [p.state, p.map_image, p.caption, p.info],
                     api_name="picks_clear")


def wire_clear(p, h: Handlers):
    p.clear_btn.click(h.clear, p.state, [p.chatbot, p.state, p.textbox, p.map_image, p.caption, p.view, p.stats, p.info,
                                         p.compare_table, p.compare_answers, p.stop_btn, p.compare_maps,
                                         p.compare_overlap, p.compare_stop, p.compare_files, p.sweep_table,
                                         p.sweep_plot, p.sweep_files, p.sweep_stop],
                      queue=False, api_name="clear").then(h.image_choices, p.state, [p.map_choice, p.map_frame], queue=False,
                                                          api_name=False)
