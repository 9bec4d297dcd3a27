"""zipchat: chat about an image while seeing which visual tokens the language model gets.

Gradio UI only: components, event wiring and launch flags. All model work is in `pipeline/`.
Run `python app.py --help` for the flags.
"""

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
import gradio as gr  # noqa: E402

from pipeline import SGL_PAIRS, ChatSession, InputError, ModelUnavailable, compare_with_full, load_vlm
from pipeline.models import default_preset
from pipeline.heatmap import render_importance, render_scores, render_selection
from pipeline.visionzip import BUDGETS

try:  # Hugging Face ZeroGPU: GPU work runs inside @spaces.GPU calls
    import spaces

    gpu = spaces.GPU(duration=120)
except ImportError:
    def gpu(fn):
        return fn

ASSETS = Path(__file__).resolve().parent / "assets"
METHOD_NAMES = {"Full": "full", "VisionZip": "visionzip", "SGL": "sgl"}
SESSION_TTL_S = 3600  # a browser session's model state is dropped after an hour without use, or when its tab closes
CSS = (ASSETS / "style.css").read_text() if (ASSETS / "style.css").is_file() else None


@dataclass
class AppState:
    """One browser session: its chat session (images, caches, KV) and the question being answered."""
    session: ChatSession
    question: str | None = None
    log: list = field(default_factory=list)

    def close(self):
        self.session.reset()  # drops images, compressions and the KV cache of this tab


def load_models(name: str, small_name: str | None = "auto"):
    """-> (large vlm, small vlm or None, banner or None). Without weights, start on the tiny
    models of the same family (tiny-ov-large guided by tiny-ov-small for OneVision)."""
    banner = None
    try:
        vlm = load_vlm(name)
    except ModelUnavailable as e:
        tiny = "tiny-llava" if "1.5" in name or name == "tiny-llava" else "tiny-ov-large"
        print(f"[zipchat] {e}\n[zipchat] Starting on the offline tiny model '{tiny}' instead. To use real weights, "
              f"run `huggingface-cli download <repo>` with network (presets: pipeline/models.py) and start again, "
              f"or pass --model /path/to/local/checkpoint.", file=sys.stderr)
        banner = (f"**Offline demo:** '{name}' could not be loaded, so this runs `{tiny}`, a tiny model with "
                  "random weights. Its answers are random text until real weights are available; the compression, "
                  "heatmaps and timings are real.")
        vlm, name = load_vlm(tiny), tiny
    if small_name == "auto":
        small_name = SGL_PAIRS.get(name)
    small = None
    if small_name:
        try:
            small = load_vlm(small_name)
        except ModelUnavailable as e:
            print(f"[zipchat] SGL disabled: {e}", file=sys.stderr)
    return vlm, small, banner


def format_stats(t) -> str:
    if t is None:
        return "_Ask a question to see timings._"
    reuse = "yes" if t.cache_reused else "no"
    image = "re-used (compressed once)" if t.visual_tokens and not t.images_encoded else f"{t.images_encoded} encoded"
    rows = [
        ("model", f"{t.model_used} ({t.method})"),
        ("visual tokens to the LLM", f"{t.visual_tokens} of {t.visual_tokens_full}"),
        ("prompt tokens (computed this turn)", f"{t.prompt_tokens} ({t.prefill_tokens})"),
        ("time to first token", f"{t.ttft_s * 1000:.0f} ms"),
        ("image encode + compress", f"{t.encode_s * 1000:.0f} ms"),
        ("prefill", f"{t.prefill_s * 1000:.0f} ms"),
        ("decode", f"{t.new_tokens} tokens, {t.decode_tok_per_s:.1f} tok/s" + (" (stopped)" if t.stopped else "")),
        ("KV cache reused / size", f"{reuse} / {t.kv_cache_bytes / 1e6:.1f} MB"),
        ("image", image),
        ("device", f"{t.device}, {t.dtype}"),
    ]
    if t.guidance is not None:
        g, ms = t.guidance, {k: v * 1000 for k, v in t.timings.items() if k.endswith("_s")}
        threshold = "off" if g.threshold is None else f"{g.threshold:.2f}"
        rows[1:1] = [
            ("SGL: answered by", f"{t.model_used} ({'early exit' if t.early_exit else 'large model, pruned'})"),
            ("SGL: exit score (threshold)", f"{g.score:.3f} = ({g.confidence:.3f} + {g.consistency:.3f}) / 2 ({threshold})"),
            ("SGL: large model keeps", f"{len(g.kept)} of {len(g.importance)} visual tokens from layer {g.prune_layer}"),
            ("SGL: small model", f"{ms.get('small_answer_s', 0):.0f} ms answer + {ms.get('small_score_s', 0):.0f} ms score"
                                 + (", its KV cache reused" if t.timings.get("small_cache_reused") else "")),
            ("SGL: large model", f"{ms['large_s']:.0f} ms" if "large_s" in ms else "not run"),
        ]
    return "| turn stat | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


def format_compare(results: dict) -> str:
    (m_label, (m_answer, m)), (_, (f_answer, f)) = list(results.items())
    rows = [("visual tokens", m.visual_tokens, f.visual_tokens), ("prompt tokens", m.prompt_tokens, f.prompt_tokens),
            ("time to first token", f"{m.ttft_s * 1000:.0f} ms", f"{f.ttft_s * 1000:.0f} ms"),
            ("prefill", f"{m.prefill_s * 1000:.0f} ms", f"{f.prefill_s * 1000:.0f} ms"),
            ("decode", f"{m.decode_tok_per_s:.1f} tok/s", f"{f.decode_tok_per_s:.1f} tok/s")]
    table = f"| | {m_label} | full |\n|---|---|---|\n" + "\n".join(f"| {a} | {b} | {c} |" for a, b, c in rows)
    return table


def build_demo(vlm, banner: str | None = None, max_new_tokens: int = 256, method_default: str = "visionzip",
               small=None, session_options: dict | None = None) -> gr.Blocks:
    def sgl_options(keep_ratio, prune_layer, exit_on, threshold, sgl_zip):
        return dict(keep_ratio=keep_ratio, prune_layer=prune_layer, early_exit=threshold if exit_on else None,
                    sgl_tokens="visionzip" if sgl_zip else "full")

    def new_state(method, dominant, contextual, *sgl):
        return AppState(ChatSession(vlm, method=METHOD_NAMES[method], dominant=int(dominant),
                                    contextual=int(contextual), max_new_tokens=max_new_tokens, small=small,
                                    **sgl_options(*sgl), **(session_options or {})))

    def views(state):
        view = state.session.current_view() if state else None
        if view is None:
            return None, None, None, "_Upload an image to see which visual tokens are kept._"
        image, comp = view
        guidance = state.session.guidance_view()
        importance = render_importance(*guidance) if guidance else None  # shown after an SGL turn only
        return (render_selection(image, comp), render_scores(image, comp),
                gr.Image(value=importance, visible=importance is not None), comp.caption())

    @gpu  # encodes the uploaded images
    def add_message(history, message, state, *settings):
        try:
            state = state or new_state(*settings)
        except InputError as e:
            history.append({"role": "assistant", "content": f"⚠️ {e}"})
            return history, gr.MultimodalTextbox(value=None, interactive=False), state, *views(state)
        for path in message.get("files", []):
            try:
                state.session.add_image(path)
                history.append({"role": "user", "content": {"path": path}})
            except InputError as e:
                history.append({"role": "assistant", "content": f"⚠️ {e}"})
        text = (message.get("text") or "").strip()
        state.question = text or None
        if text:
            history.append({"role": "user", "content": text})
        elif not message.get("files"):
            history.append({"role": "assistant", "content": "⚠️ Please type a question."})
        return history, gr.MultimodalTextbox(value=None, interactive=False), state, *views(state)

    @gpu
    def respond(history, state):
        if state is None or state.question is None:
            yield history, gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
            return
        question, state.question = state.question, None
        history.append({"role": "assistant", "content": ""})
        try:
            for delta in state.session.ask_stream(question):
                history[-1]["content"] += delta
                yield history, gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
        except InputError as e:
            history[-1]["content"] = f"⚠️ {e}"
        if not history[-1]["content"]:
            history[-1]["content"] = "(empty answer)"
        yield history, format_stats(state.session.last_turn), *views(state)

    def stop(state):
        if state is not None:
            state.session.stop()  # the generating thread ends after its current token

    @gpu  # re-compresses the current image for the maps
    def apply_settings(state, method, dominant, contextual, *sgl):
        if state is None:
            return state, gr.skip(), gr.skip(), gr.skip(), gr.skip()
        try:
            state.session.set_method(METHOD_NAMES[method], int(dominant), int(contextual), **sgl_options(*sgl))
        except InputError as e:
            gr.Warning(str(e))
        return state, *views(state)

    def pick_budget(total):
        dominant, contextual = BUDGETS[int(total)]
        return dominant, contextual

    @gpu
    def compare(state):
        if state is None or state.session.last_question is None:
            return "_Ask a question first, then compare it with the full model._", "", ""
        try:
            results = compare_with_full(state.session)
        except InputError as e:
            return f"⚠️ {e}", "", ""
        (m_label, (m_answer, _)), (_, (f_answer, _)) = list(results.items())
        return format_compare(results), f"**{m_label}:** {m_answer}", f"**full:** {f_answer}"

    def clear():
        return ([], None, None, None, None, "_Upload an image to see which visual tokens are kept._",
                format_stats(None), "", "", "")

    with gr.Blocks(title="zipchat") as demo:
        gr.Markdown("# zipchat\nChat about an image. **VisionZip** keeps the few visual tokens that matter "
                    "(dominant tokens by attention, the rest merged into contextual tokens); the maps on the right "
                    f"show which. Model: `{vlm.describe()}`.")
        if banner:
            gr.Markdown(banner, elem_id="offline-banner", elem_classes=["banner"])
        state = gr.State(None, time_to_live=SESSION_TTL_S, delete_callback=lambda s: s and s.close())
        with gr.Row():
            with gr.Column(scale=5):
                chatbot = gr.Chatbot(elem_id="chatbot", height=520, buttons=["copy"])
                textbox = gr.MultimodalTextbox(
                    file_types=["image"], file_count="multiple", sources=["upload"], elem_id="textbox",
                    placeholder="Upload an image and ask about it (Enter sends)", show_label=False)
                with gr.Row():
                    stop_btn = gr.Button("Stop", variant="stop", elem_id="stop")
                    clear_btn = gr.Button("Clear", elem_id="clear")
                    compare_btn = gr.Button("Compare with full", elem_id="compare")
                with gr.Accordion("Method", open=True):
                    choices = [k for k, v in METHOD_NAMES.items() if v != "sgl" or small is not None]
                    method = gr.Radio(choices, value={v: k for k, v in METHOD_NAMES.items()}[method_default],
                                      label="Visual tokens", elem_id="method")
                    budget = gr.Radio([64, 128, 192], value=64, label="Budget per crop (dominant + contextual)")
                    with gr.Row():
                        dominant = gr.Slider(1, 729, value=54, step=1, label="dominant (CLS counts as one)",
                                             elem_id="dominant")
                        contextual = gr.Slider(0, 100, value=10, step=1, label="contextual", elem_id="contextual")
                sgl_note = (f"`{small.name}` answers first and ranks the visual tokens; `{vlm.name}` drops the rest "
                            "part-way through its layers, or is skipped when the small model is confident."
                            if small else "Start with `--small-model` (e.g. llava-ov-0.5b for llava-ov-7b) to enable SGL.")
                with gr.Accordion("SGL: a small model guides the large one", open=small is not None):
                    gr.Markdown(sgl_note)
                    with gr.Row():
                        keep_ratio = gr.Slider(0.01, 1.0, value=0.35, step=0.01, label="keep ratio (visual tokens)",
                                               interactive=small is not None, elem_id="keep_ratio")
                        prune_layer = gr.Slider(0.0, 1.0, value=0.4, step=0.05, label="prune at (fraction of depth)",
                                                interactive=small is not None, elem_id="prune_layer")
                    with gr.Row():
                        exit_on = gr.Checkbox(value=True, label="early exit", interactive=small is not None,
                                              elem_id="exit_on")
                        threshold = gr.Slider(0.0, 1.0, value=0.8, step=0.01, label="early-exit threshold",
                                              interactive=small is not None, elem_id="threshold")
                        sgl_zip = gr.Checkbox(value=False, label="both models see VisionZip tokens",
                                              interactive=small is not None, elem_id="sgl_zip")
            with gr.Column(scale=4):
                caption = gr.Markdown("_Upload an image to see which visual tokens are kept._", elem_id="caption")
                selection_map = gr.Image(label="Selection: dominant (outlined) and contextual groups (tinted)",
                                         type="pil", interactive=False, elem_id="selection-map")
                score_map = gr.Image(label="Selection score (attention)", type="pil", interactive=False,
                                     elem_id="score-map")
                importance_map = gr.Image(label="SGL: small model's importance (kept tokens outlined)", type="pil",
                                          interactive=False, elem_id="importance-map", visible=False)
                stats = gr.Markdown(format_stats(None), elem_id="stats")
        with gr.Row():
            compare_table = gr.Markdown(elem_id="compare-table")
            compare_method = gr.Markdown(elem_id="compare-method")
            compare_full = gr.Markdown(elem_id="compare-full")
        examples = json.loads((ASSETS / "examples.json").read_text())
        gr.Examples([[{"text": e["question"], "files": [str(ASSETS / e["image"])]}] for e in examples],
                    inputs=[textbox], label="Examples")

        settings = [method, dominant, contextual, keep_ratio, prune_layer, exit_on, threshold, sgl_zip]
        maps = [selection_map, score_map, importance_map, caption]
        submitted = textbox.submit(add_message, [chatbot, textbox, state, *settings], [chatbot, textbox, state, *maps],
                                   queue=False, api_name="add_message")
        answering = submitted.then(respond, [chatbot, state], [chatbot, stats, *maps], api_name="respond")
        answering.then(lambda: gr.MultimodalTextbox(interactive=True), None, [textbox], api_name=False)
        stop_btn.click(stop, state, None, cancels=[answering], queue=False, api_name="stop")
        budget.change(pick_budget, budget, [dominant, contextual], queue=False, api_name=False)
        for control in settings:
            control.change(apply_settings, [state, *settings], [state, *maps], api_name=f"settings_{control.elem_id}")
        compare_btn.click(compare, state, [compare_table, compare_method, compare_full], api_name="compare")
        clear_btn.click(lambda s: s and s.close(), state, None, queue=False, api_name=False).then(
            clear, None, [chatbot, state, *maps, stats, compare_table, compare_method, compare_full], queue=False,
            api_name="clear")
    return demo


def main(argv=None):
    parser = argparse.ArgumentParser(description="zipchat: VisionZip chat about images")
    parser.add_argument("--model", default=None, help="preset, hub id or local directory (default: by hardware)")
    parser.add_argument("--small-model", default="auto",
                        help="small model for SGL; 'auto' picks the preset's partner (llava-ov-7b -> llava-ov-0.5b), "
                             "'' disables SGL")
    parser.add_argument("--method", default="visionzip", choices=["full", "visionzip", "sgl"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="create a public gradio.live link")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    vlm, small, banner = load_models(args.model or default_preset(), args.small_model)
    if args.method == "sgl" and small is None:
        parser.error("--method sgl needs a small model (--small-model)")
    demo = build_demo(vlm, banner, args.max_new_tokens, args.method, small=small)
    demo.queue(default_concurrency_limit=1)  # one GPU: one generation at a time, others wait in line
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, max_file_size="25mb", css=CSS)


if __name__ == "__main__":
    main()
