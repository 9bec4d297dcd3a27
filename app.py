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

from pipeline import ChatSession, InputError, ModelUnavailable, compare_with_full, load_vlm
from pipeline.heatmap import render_scores, render_selection
from pipeline.visionzip import BUDGETS

try:  # Hugging Face ZeroGPU: GPU work runs inside @spaces.GPU calls
    import spaces

    gpu = spaces.GPU(duration=120)
except ImportError:
    def gpu(fn):
        return fn

ASSETS = Path(__file__).resolve().parent / "assets"
METHOD_NAMES = {"Full": "full", "VisionZip": "visionzip"}
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


def default_model() -> str:
    import torch
    return "llava-ov-7b" if torch.cuda.is_available() else "llava-ov-0.5b"


def load_with_fallback(name: str):
    """-> (vlm, banner or None). Without weights, start on the tiny model of the same family."""
    try:
        return load_vlm(name), None
    except ModelUnavailable as e:
        tiny = "tiny-llava" if "1.5" in name or name == "tiny-llava" else "tiny-ov-small"
        print(f"[zipchat] {e}\n[zipchat] Starting on the offline tiny model '{tiny}' instead. To use real weights, "
              f"run `huggingface-cli download <repo>` with network (presets: pipeline/models.py) and start again, "
              f"or pass --model /path/to/local/checkpoint.", file=sys.stderr)
        banner = (f"**Offline demo:** '{name}' could not be loaded, so this runs `{tiny}`, a tiny model with "
                  "random weights. Its answers are random text until real weights are available; the compression, "
                  "heatmaps and timings are real.")
        return load_vlm(tiny), banner


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
    return "| turn stat | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


def format_compare(results: dict) -> str:
    (m_label, (m_answer, m)), (_, (f_answer, f)) = list(results.items())
    rows = [("visual tokens", m.visual_tokens, f.visual_tokens), ("prompt tokens", m.prompt_tokens, f.prompt_tokens),
            ("time to first token", f"{m.ttft_s * 1000:.0f} ms", f"{f.ttft_s * 1000:.0f} ms"),
            ("prefill", f"{m.prefill_s * 1000:.0f} ms", f"{f.prefill_s * 1000:.0f} ms"),
            ("decode", f"{m.decode_tok_per_s:.1f} tok/s", f"{f.decode_tok_per_s:.1f} tok/s")]
    table = f"| | {m_label} | full |\n|---|---|---|\n" + "\n".join(f"| {a} | {b} | {c} |" for a, b, c in rows)
    return table


def build_demo(vlm, banner: str | None = None, max_new_tokens: int = 256, method_default: str = "visionzip") -> gr.Blocks:
    def new_state(method=method_default, dominant=54, contextual=10):
        return AppState(ChatSession(vlm, method=method, dominant=dominant, contextual=contextual,
                                    max_new_tokens=max_new_tokens))

    def views(state):
        view = state.session.current_view() if state else None
        if view is None:
            return None, None, "_Upload an image to see which visual tokens are kept._"
        image, comp = view
        return render_selection(image, comp), render_scores(image, comp), comp.caption()

    def add_message(history, message, state, method, dominant, contextual):
        state = state or new_state(METHOD_NAMES[method], dominant, contextual)
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
            yield history, gr.skip(), gr.skip(), gr.skip(), gr.skip()
            return
        question, state.question = state.question, None
        history.append({"role": "assistant", "content": ""})
        try:
            for delta in state.session.ask_stream(question):
                history[-1]["content"] += delta
                yield history, gr.skip(), gr.skip(), gr.skip(), gr.skip()
        except InputError as e:
            history[-1]["content"] = f"⚠️ {e}"
        if not history[-1]["content"]:
            history[-1]["content"] = "(empty answer)"
        yield history, format_stats(state.session.last_turn), *views(state)

    def stop(state):
        if state is not None:
            state.session.stop()  # the generating thread ends after its current token

    def apply_settings(state, method, dominant, contextual):
        if state is None:
            return state, gr.skip(), gr.skip(), gr.skip()
        try:
            state.session.set_method(METHOD_NAMES[method], int(dominant), int(contextual))
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
        return [], None, None, None, "_Upload an image to see which visual tokens are kept._", format_stats(None), "", "", ""

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
                    method = gr.Radio(list(METHOD_NAMES), value={v: k for k, v in METHOD_NAMES.items()}[method_default], label="Visual tokens", elem_id="method")
                    budget = gr.Radio([64, 128, 192], value=64, label="Budget per crop (dominant + contextual)")
                    with gr.Row():
                        dominant = gr.Slider(1, 729, value=54, step=1, label="dominant (CLS counts as one)",
                                             elem_id="dominant")
                        contextual = gr.Slider(0, 100, value=10, step=1, label="contextual", elem_id="contextual")
                    with gr.Row():
                        gr.Checkbox(label="SGL: a small model guides the large one (coming with the SGL release)",
                                    interactive=False, elem_id="sgl-disabled")
            with gr.Column(scale=4):
                caption = gr.Markdown("_Upload an image to see which visual tokens are kept._", elem_id="caption")
                selection_map = gr.Image(label="Selection: dominant (outlined) and contextual groups (tinted)",
                                         type="pil", interactive=False, elem_id="selection-map")
                score_map = gr.Image(label="Selection score (attention)", type="pil", interactive=False,
                                     elem_id="score-map")
                stats = gr.Markdown(format_stats(None), elem_id="stats")
        with gr.Row():
            compare_table = gr.Markdown(elem_id="compare-table")
            compare_method = gr.Markdown(elem_id="compare-method")
            compare_full = gr.Markdown(elem_id="compare-full")
        examples = json.loads((ASSETS / "examples.json").read_text())
        gr.Examples([[{"text": e["question"], "files": [str(ASSETS / e["image"])]}] for e in examples],
                    inputs=[textbox], label="Examples")

        settings = [method, dominant, contextual]
        maps = [selection_map, score_map, caption]
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
    parser.add_argument("--small-model", default=None, help="small model for SGL (when SGL is available)")
    parser.add_argument("--method", default="visionzip", choices=["full", "visionzip"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="create a public gradio.live link")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    vlm, banner = load_with_fallback(args.model or default_model())
    demo = build_demo(vlm, banner, args.max_new_tokens, args.method)
    demo.queue(default_concurrency_limit=1)  # one GPU: one generation at a time, others wait in line
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, max_file_size="25mb", css=CSS)


if __name__ == "__main__":
    main()
