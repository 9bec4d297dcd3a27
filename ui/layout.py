"""The page: components, and the event chain wiring them to the handlers (handlers.py)."""

import json

import gradio as gr

from pipeline.methods import LABELS

from .handlers import Handlers
from .text import IN_LLM_NOTE, METHOD_NAMES, NO_IMAGE, VIEW_NAMES, format_stats

SESSION_TTL_S = 3600  # a tab's state is dropped after an hour without use, or when the tab closes


class Slider(gr.Slider):
    """gr.Slider whose value may be missing in an API call: None reaches the handler, which says what
    is wrong, instead of failing inside Gradio's preprocessing with a TypeError. Drawn as a slider."""
    is_template = True

    def preprocess(self, payload):
        return None if payload is None else super().preprocess(payload)


class MapClick(gr.EventData):
    """A click on the map (gr.SelectData's `index`: [x, y]); None where an API call sent no event data,
    which gr.SelectData itself would fail on with a TypeError before the handler could say anything."""

    @property
    def index(self):
        return self._data.get("index") if isinstance(self._data, dict) else None


def build(h: Handlers, banner: str | None, gallery_file) -> gr.Blocks:
    vlm, small = h.vlm, h.small
    with gr.Blocks(title="zipchat", delete_cache=(1800, 3600)) as demo:
        gr.Markdown("# zipchat\nChat about an image while seeing which visual tokens the language model gets. "
                    "**VisionZip** keeps the few that matter (dominant tokens by attention, the rest merged into "
                    "contextual tokens); DivPrune, VisPruner, FastV, Random and Pool are there to compare (Compare, "
                    f"below the chat). The map on the right shows what is kept. Model: `{vlm.describe()}`.")
        if banner:
            gr.Markdown(banner, elem_id="offline-banner", elem_classes=["banner"])
        state = gr.State(None, time_to_live=SESSION_TTL_S, delete_callback=h.forget)
        with gr.Row():
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(elem_id="chatbot", height=480, buttons=["copy"])
                textbox = gr.MultimodalTextbox(
                    file_types=["image"], file_count="multiple", sources=["upload"], elem_id="textbox",
                    placeholder="Upload an image and ask about it (Enter sends)", show_label=False)
                with gr.Row():
                    stop_btn = gr.Button("Stop", variant="stop", elem_id="stop", visible=False)
                    clear_btn = gr.Button("Clear", elem_id="clear")
                    compare_btn = gr.Button("Compare", elem_id="compare")
                available = [label for label, m in METHOD_NAMES.items() if m != "sgl" or small is not None]
                compare_methods = gr.CheckboxGroup(  # values are the method names (the API takes those)
                    [(label, METHOD_NAMES[label]) for label in available], value=[], elem_id="compare-methods",
                    label="Compare: methods to answer the last question again (none checked: this chat's method, "
                          "VisionZip and Full)")
                with gr.Accordion("Method", open=True):
                    method = gr.Radio(available, value=LABELS[h.method_default], elem_id="method",
                                      label="Visual tokens (Manual: pick patches on the map)")
                    budget = gr.Radio([64, 128, 192], value=64, elem_id="budget",
                                      label="Budget per crop (dominant + contextual; DivPrune, VisPruner, Random and "
                                            "Pool send the same total)")
                    with gr.Row():
                        units = vlm.family.units_per_crop - 1  # the largest budget below a whole crop
                        dominant = Slider(1, units, value=54, step=1, elem_id="dominant",
                                          label="dominant" + (" (CLS counts as one)" if vlm.family.has_cls else ""))
                        contextual = Slider(0, 100, value=10, step=1, label="contextual", elem_id="contextual")
                    tiles = Slider(0, 36, value=h.max_tiles, step=1, elem_id="max_tiles", visible=vlm.family.tiles,
                                   label=f"{vlm.family.tile_cap_label} (0: all the checkpoint uses; fewer is "
                                         "faster on a CPU; Full, FastV and SGL always use all)")
                    gr.Markdown(IN_LLM_NOTE)
                layers = len(vlm.language_model.layers)
                with gr.Accordion("FastV: the model prunes by its own attention", open=False):
                    with gr.Row():
                        fastv_layer = Slider(1, max(2, layers - 1), value=2, step=1, elem_id="fastv_layer",
                                             label=f"K: visual tokens kept from layer K on (1 to {layers - 1} of "
                                                   f"{layers} layers; larger is taken as {layers - 1})")
                        fastv_keep = Slider(0.01, 1.0, value=0.5, step=0.01, elem_id="fastv_keep_ratio",
                                            label="keep ratio (visual tokens)")
                sgl_note = (f"`{small.name}` answers first and ranks the visual tokens; `{vlm.name}` drops the rest "
                            "part-way through its layers, or is skipped when the small model is confident."
                            if small else "Start with `--small-model` (e.g. llava-ov-0.5b for llava-ov-7b) to enable SGL.")
                with gr.Accordion("SGL: a small model guides the large one", open=small is not None):
                    gr.Markdown(sgl_note)
                    with gr.Row():
                        keep_ratio = Slider(0.01, 1.0, value=0.35, step=0.01, label="keep ratio (visual tokens)",
                                            interactive=small is not None, elem_id="keep_ratio")
                        prune_layer = Slider(0.0, 1.0, value=0.4, step=0.05, label="prune at (fraction of depth)",
                                             interactive=small is not None, elem_id="prune_layer")
                    with gr.Row():
                        exit_on = gr.Checkbox(value=True, label="early exit", interactive=small is not None,
                                              elem_id="exit_on")
                        threshold = Slider(0.0, 1.0, value=0.8, step=0.01, label="early-exit threshold",
                                           interactive=small is not None, elem_id="threshold")
                        sgl_zip = gr.Checkbox(value=False, label="both models see VisionZip tokens",
                                              interactive=small is not None, elem_id="sgl_zip")
                with gr.Accordion("Generation", open=False):
                    new_tokens = Slider(1, max(2048, h.max_new_tokens), value=h.max_new_tokens, step=1,
                                        label="max new tokens", elem_id="max_new_tokens")
                    with gr.Row():
                        temperature = Slider(0.0, 2.0, value=0.0, step=0.05, elem_id="temperature",
                                             label="temperature (0: greedy, so Compare is deterministic)")
                        top_p = Slider(0.05, 1.0, value=0.9, step=0.05, label="top-p", elem_id="top_p")
            with gr.Column(scale=4):
                view = gr.Radio([(VIEW_NAMES[v], v) for v in VIEW_NAMES if v != "importance"], value="kept",
                                label="Map", elem_id="view")
                caption = gr.Markdown(NO_IMAGE, elem_id="caption")
                map_image = gr.Image(label="Click a patch: what it is", type="pil", interactive=False,
                                     elem_id="map", buttons=["fullscreen", "download"])
                info = gr.Markdown("", elem_id="patch-info")
                with gr.Row(visible=h.method_default == "manual", elem_id="pick-row") as pick_row:
                    radius = Slider(0, 5, value=0, step=1, label="brush (patches around the click)", elem_id="radius")
                    from_zip = gr.Button("Start from VisionZip's", elem_id="picks-from-visionzip")
                    no_picks = gr.Button("Clear picks", elem_id="clear-picks")
                stats = gr.Markdown(format_stats(None), elem_id="stats")
        with gr.Row():
            compare_table = gr.Markdown(elem_id="compare-table")
            compare_answers_md = gr.Markdown(elem_id="compare-answers")
        compare_maps = gr.Gallery(label="Compare: the tokens each method kept (clear) of the latest image",
                                  columns=5, height=420, elem_id="compare-maps", object_fit="contain",
                                  buttons=["fullscreen", "download"])
        compare_overlap = gr.Markdown(elem_id="compare-overlap")
        examples = json.loads(gallery_file.read_text())
        gr.Examples([[{"text": e["question"], "files": [str(gallery_file.parent / e["image"])]}] for e in examples],
                    inputs=[textbox], label="Examples")

        # new inputs go last: positional API callers of older versions keep working
        settings = [method, dominant, contextual, keep_ratio, prune_layer, exit_on, threshold, sgl_zip, tiles,
                    new_tokens, temperature, top_p, fastv_layer, fastv_keep]
        maps = [map_image, caption, view]
        submitted = textbox.submit(h.add_message, [chatbot, textbox, state, *settings],
                                   [chatbot, textbox, state, stop_btn], queue=False, api_name="add_message")
        answering = submitted.then(h.respond, [chatbot, state, view], [chatbot, state, stats, *maps], api_name="respond")
        # the textbox comes back (and Stop goes) whatever happened: after the answer, or after a failure that
        # Gradio (or ZeroGPU: no quota, worker lost) raised outside the handler, which skips .then
        answering.then(h.finish, state, [textbox, stop_btn], api_name=False)
        for event in (submitted, answering):
            event.failure(h.finish, state, [textbox, stop_btn], api_name=False)
        stop_btn.click(h.stop, state, None, queue=False, api_name="stop")
        budget.change(h.pick_budget, budget, [dominant, contextual], queue=False, api_name=False)
        for control in settings:
            control.change(h.apply_settings, [state, view, *settings], [state, *maps, pick_row],
                           api_name=f"settings_{control.elem_id}")
        view.change(h.show_view, [state, view], [map_image, caption], queue=False, api_name="view")

        def click_map(state, view, radius, evt: MapClick):  # (Gradio reads the event type off this signature)
            return h.click_map(state, view, radius, evt)
        map_image.select(click_map, [state, view, radius], [state, map_image, caption, info], api_name="click")
        from_zip.click(lambda s: h.set_picks(s, True), state, [state, map_image, caption, info],
                       api_name="picks_visionzip")
        no_picks.click(lambda s: h.set_picks(s, False), state, [state, map_image, caption, info],
                       api_name="picks_clear")
        compare_btn.click(h.compare_answers, [state, compare_methods],
                          [compare_table, compare_answers_md, compare_maps, compare_overlap], api_name="compare")
        clear_btn.click(h.clear, state, [chatbot, state, textbox, map_image, caption, view, stats, info, compare_table,
                                         compare_answers_md, stop_btn, compare_maps, compare_overlap],
                        queue=False, api_name="clear")
    return demo
