"""Compare's tab: its components (the methods, turn 2, the button and its Stop, the results, the files, the budget
sweep) and their events. Part of the page (layout.py)."""

import gradio as gr

from .sweep_events import SWEEP_BUDGETS


def compare_tab(p, offered: list):
    with gr.Tab("Compare", id="compare-tab", elem_id="compare-tab"):
        p.compare_methods = gr.CheckboxGroup(  # values are the method names (the API takes those)
            [(m.label, m.name) for m in offered], value=[], elem_id="compare-methods",
            label="Answer the last question again with (none checked: this chat's method, VisionZip and Full)")
        p.compare_second = gr.Textbox("", label="Then ask again as turn 2 (optional): each method answers this on "
                                      "the same image; compress-once methods reuse what they kept, FastV, DART and "
                                      "SGL select again", elem_id="compare-second", max_lines=2)
        with gr.Row(elem_id="compare-buttons"):  # Stop beside the button, right above the progress line
            p.compare_btn = gr.Button("Compare", variant="primary", elem_id="compare")
            p.compare_stop = gr.Button("Stop", variant="stop", elem_id="compare-stop", visible=False, min_width=80)
        p.compare_table = gr.Markdown(elem_id="compare-table")
        p.compare_answers = gr.Markdown(elem_id="compare-answers")
        p.compare_maps = gr.Gallery(label="The tokens each method kept (clear) of the latest image",
                                    show_label=False, columns=3, height="auto", elem_id="compare-maps",
                                    object_fit="contain", allow_preview=True, buttons=["fullscreen", "download"])
        p.compare_overlap = gr.Markdown(elem_id="compare-overlap")
        p.compare_files = gr.File(label="Download Compare: JSON, CSV, the maps (PNG)", file_count="multiple",
                                  interactive=False, elem_id="compare-files")
        with gr.Accordion("Budget sweep: agreement with Full and speed against visual tokens", open=False,
                          elem_id="sweep"):
            p.sweep_budgets = gr.CheckboxGroup(list(SWEEP_BUDGETS), value=list(SWEEP_BUDGETS), elem_id="sweep-budgets",
                                               label="Visual tokens per crop (the methods: those checked above; none: "
                                                     "this chat's and VisionZip; Full always runs)")
            with gr.Row(elem_id="sweep-buttons"):
                p.sweep_btn = gr.Button("Sweep", variant="primary", elem_id="sweep-run")
                p.sweep_stop = gr.Button("Stop", variant="stop", elem_id="sweep-stop", visible=False, min_width=80)
            p.sweep_table = gr.Markdown(elem_id="sweep-table")
            p.sweep_plot = gr.Image(type="filepath", show_label=False, interactive=False, elem_id="sweep-plot",
                                    buttons=["download"])
            p.sweep_files = gr.File(label="Download the sweep: JSON, CSV, plot (PNG)", file_count="multiple",
                                    interactive=False, elem_id="sweep-files")


def wire_compare(p, h, answers: dict):
    started = p.compare_btn.click(h.start_compare, p.state, [p.state, p.textbox, p.compare_stop], queue=False,
                                  api_name=False)  # (gr.Error while answering: nothing more runs)
    comparing = started.success(h.compare_answers, [p.state, p.compare_methods, p.compare_second],
                                [p.compare_table, p.compare_answers, p.compare_maps, p.compare_overlap,
                                 p.compare_files], api_name="compare", **answers)
    comparing.then(h.finish_compare, p.state, [p.textbox, p.compare_stop], api_name=False)
    comparing.failure(h.finish_compare, p.state, [p.textbox, p.compare_stop], api_name=False)
    p.compare_stop.click(h.stop, p.state, None, queue=False, api_name="stop_compare")
    started = p.sweep_btn.click(h.start_compare, p.state, [p.state, p.textbox, p.sweep_stop], queue=False,
                                api_name=False)
    sweeping = started.success(h.sweep_budgets, [p.state, p.compare_methods, p.sweep_budgets],
                               [p.sweep_table, p.sweep_plot, p.sweep_files], api_name="sweep", **answers)
    sweeping.then(h.finish_compare, p.state, [p.textbox, p.sweep_stop], api_name=False)
    sweeping.failure(h.finish_compare, p.state, [p.textbox, p.sweep_stop], api_name=False)
    p.sweep_stop.click(h.stop, p.state, None, queue=False, api_name=False)
