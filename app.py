"""zipchat: chat about an image while seeing which visual tokens the language model gets.

Gradio UI only: components, event wiring and launch flags. All model work is in `pipeline/`.
Run `python app.py --help` for the flags.

The per-tab state is plain data (pipeline.ChatState: the conversation, images, compressed
features on the CPU, settings). Models are loaded once at startup and looked up by name; the
handlers that run a model are wrapped in `spaces.GPU` when the `spaces` package is installed, take
the state and return (or yield, last) the updated state, because on ZeroGPU they run in another
process. KV caches live in a process-local store keyed by session: a speed-up only.
"""

import argparse
import json
import logging
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
try:  # Hugging Face ZeroGPU: imported before torch, as the `spaces` package asks
    import spaces
except ImportError:
    spaces = None
import gradio as gr  # noqa: E402

from pipeline import SGL_PAIRS, ChatSession, ChatState, InputError, KVStore, ModelUnavailable, compare, load_vlm  # noqa: E402
from pipeline.heatmap import describe, hit, render_map  # noqa: E402
from pipeline.examples import ExampleCache  # noqa: E402
from pipeline.kvstore import default_budget  # noqa: E402
from pipeline.memory import MemoryBudget  # noqa: E402
from pipeline.models import default_preset, offline_twin  # noqa: E402
from pipeline.stopflag import AnsweringFlag, ClearedFlag, StopFlag  # noqa: E402
from pipeline.visionzip import BUDGETS  # noqa: E402

log = logging.getLogger("zipchat")
ASSETS = Path(__file__).resolve().parent / "assets"
METHOD_NAMES = {"Full": "full", "VisionZip": "visionzip", "SGL": "sgl", "Manual": "manual"}
VIEW_NAMES = {"kept": "Kept tokens", "groups": "Contextual groups", "scores": "Scores", "importance": "SGL importance"}
SESSION_TTL_S = 3600  # a tab's state is dropped after an hour without use, or when the tab closes
CSS = (ASSETS / "style.css").read_text() if (ASSETS / "style.css").is_file() else None
demo = None  # the running app, once main() has built it (Gradio's reloader on a Space looks it up here)
NO_IMAGE = "_Upload an image to see which visual tokens are kept._"
STILL_ANSWERING = "An answer is still being generated in this conversation: wait for it (or press Stop), then send again."


def on_zero_gpu() -> bool:
    """Whether `spaces.GPU` runs calls on ZeroGPU workers (the `spaces` package reads SPACES_ZERO_GPU)."""
    return spaces is not None and os.environ.get("SPACES_ZERO_GPU", "").lower() in ("1", "t", "true")


def gpu(duration):
    """`spaces.GPU(duration=...)` where the `spaces` package is installed (a no-op off ZeroGPU)."""
    if spaces is None:
        return lambda fn: fn
    return spaces.GPU(duration=duration)


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


@dataclass
class AppState:
    """One browser tab: the conversation's plain state and the question waiting for an answer."""
    chat: ChatState
    question: str | None = None


def load_models(name: str, small_name: str | None = "auto", dtype=None, device_map=None):
    """-> (large vlm, small vlm or None, banner or None). Without weights, start on the tiny
    models of the same family (tiny-ov-large guided by tiny-ov-small for OneVision)."""
    banner = None
    try:
        vlm = load_vlm(name, dtype=dtype, device_map=device_map)
    except ModelUnavailable as e:
        tiny = offline_twin(name)
        print(f"[zipchat] {e}\n[zipchat] Starting on the offline tiny model '{tiny}' instead. To use real weights, "
              f"run `hf download <repo>` with network (presets: pipeline/models.py) and start again, "
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
            small = load_vlm(small_name, dtype=dtype, device_map=device_map)
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
    if t.dropped_turns:
        rows.append(("context window", f"{t.context_window} tokens: this turn dropped {t.dropped_now} turn(s) "
                                       f"({t.dropped_turns} in all)"))
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


def format_compare(results: list) -> str:
    """Markdown table, one column per method: [(method, answer, TurnStats)]."""
    rows = [("visual tokens", lambda t: t.visual_tokens), ("prompt tokens", lambda t: t.prompt_tokens),
            ("time to first token", lambda t: f"{t.ttft_s * 1000:.0f} ms"),
            ("prefill", lambda t: f"{t.prefill_s * 1000:.0f} ms"),
            ("decode", lambda t: f"{t.decode_tok_per_s:.1f} tok/s")]
    head = "| | " + " | ".join(m for m, _, _ in results) + " |\n|---|" + "---|" * len(results) + "\n"
    return head + "\n".join(f"| {name} | " + " | ".join(str(f(t)) for _, _, t in results) + " |" for name, f in rows)


def settings_from(method, dominant, contextual, keep_ratio, prune_layer, exit_on, threshold, sgl_zip,
                  max_tiles=0, max_new_tokens=256, temperature=0.0, top_p=0.9) -> dict:
    """The UI's (or an API call's) settings as ChatSession.set_method arguments; the numbers are
    checked there. Anything that is not one of the offered choices is refused with a message."""
    if method not in METHOD_NAMES:
        raise InputError(f"Unknown method {method!r}. Choose one of: {', '.join(METHOD_NAMES)}.")
    numbers = {"dominant tokens": dominant, "contextual tokens": contextual, "keep ratio": keep_ratio,
               "prune layer": prune_layer, "early-exit threshold": threshold, "max tiles": max_tiles,
               "max new tokens": max_new_tokens, "temperature": temperature, "top-p": top_p}
    for name, value in numbers.items():
        if value is None:  # (set_method reads None as "unchanged"; from the UI or the API it is a mistake)
            raise InputError(f"The {name} is missing: send a number.")
    for name, flag in (("early exit", exit_on), ("both models see VisionZip tokens", sgl_zip)):
        if not isinstance(flag, bool):
            raise InputError(f"'{name}' must be true or false (got {flag!r}).")
    return dict(method=METHOD_NAMES[method], dominant=dominant, contextual=contextual, keep_ratio=keep_ratio,
                prune_layer=prune_layer, early_exit=threshold if exit_on else None,
                sgl_tokens="visionzip" if sgl_zip else "full", max_tiles=max_tiles, max_new_tokens=max_new_tokens,
                temperature=temperature, top_p=top_p)


def gpu_seconds(state: AppState | None, big: bool, answers: int = 1) -> int:
    """A ZeroGPU slot that fits the work: short for a follow-up question, longer when images must be
    encoded first, for a 7B+ model, for SGL's two models, and per answer compared."""
    if state is None:
        return 10
    s = state.chat.settings
    seconds = 15 + (15 if big else 0) + s.max_new_tokens // (8 if big else 20)
    if state.chat.pending:
        seconds += 30 if big else 10
    if s.method == "sgl":
        seconds += 20
    return min(300, seconds * answers)


def build_demo(vlm, banner: str | None = None, max_new_tokens: int = 256, method_default: str = "visionzip",
               small=None, session_options: dict | None = None, max_tiles: int | None = None,
               image_memory: int = 1 << 30, examples: ExampleCache | None = None) -> gr.Blocks:
    """`max_tiles`: the tiles per image VisionZip encodes by default (tiling families): 4 (base + up to
    2x2) on a CPU, where the vision encoder dominates the first answer; 0 (the checkpoint's own) on a GPU.
    `image_memory`: bytes of images and compressed features all conversations keep together (memory.py).
    `examples`: the example images compressed ahead (examples.py); on ZeroGPU the first answer in each
    worker fills it, after the person's answer."""
    if max_tiles is None:
        max_tiles = 4 if vlm.device.type == "cpu" else 0
    models = {m.name: m for m in (vlm, small) if m is not None}
    kv = KVStore(default_budget(vlm.device))  # this process's KV caches, keyed by session, LRU-bounded
    memory = MemoryBudget(image_memory, fixed=(lambda: examples.nbytes) if examples is not None else None)
    big = max(sum(p.numel() for p in m.model.parameters()) for m in models.values()) > 3e9
    options = dict(session_options or {}, examples=examples)
    warm_here = [examples is not None and on_zero_gpu()]  # on ZeroGPU: once per worker, inside a GPU call

    def session_for(state: AppState) -> ChatSession:
        return ChatSession.resume(state.chat, models, kv=kv, **options)

    def new_state(settings: dict) -> AppState:
        session = ChatSession(vlm, small=small, max_new_tokens=max_new_tokens, kv=kv, **options)
        session.set_method(**settings)
        return AppState(session.state)

    def views(session: ChatSession | None, view: str = "kept"):
        """(map, caption, view choices) of the latest image. No model runs here."""
        shown = session.current_view(compress=False) if session else None
        guidance = session.guidance_view() if shown else None
        names = [v for v in VIEW_NAMES if v != "importance" or guidance is not None]
        if shown is None:
            return None, NO_IMAGE, gr.update(choices=[(VIEW_NAMES[v], v) for v in names], value="kept")
        image, comp = shown
        if view not in names or (view == "scores" and comp.crops[0].scores is None):
            view = "kept"
        extra = guidance[2:] if view == "importance" else ()
        return (render_map(image, comp, view, *extra), comp.caption(),
                gr.update(choices=[(VIEW_NAMES[v], v) for v in names], value=view))

    def add_message(history, message, state, *settings):
        """Checks the upload and the question and queues them; no model runs here."""
        history = list(history or [])
        message = message if isinstance(message, dict) else {"text": message}
        files, text = message.get("files") or [], message.get("text") or ""
        if state is not None and ClearedFlag(state.chat.session_id).is_set():  # Clear stopped its last answer
            ClearedFlag(state.chat.session_id).clear()
            state = None
        try:
            if state is not None and AnsweringFlag(state.chat.session_id).is_set():  # (an API call need not wait)
                raise InputError(STILL_ANSWERING)
            config = settings_from(*settings)
            state = state or new_state(config)
            session = session_for(state)
            session.set_method(**config)
            session.check_images()  # images dropped to free memory: says so, starts over
            if not isinstance(files, list) or not isinstance(text, str):
                raise InputError("A message is {'text': str, 'files': [paths]}.")
        except InputError as e:  # the message stays in the textbox, to send again
            history.append({"role": "assistant", "content": f"⚠️ {e}"})
            return history, gr.update(interactive=False), state, gr.update(visible=False)
        for f in files:
            path = f.get("path") if isinstance(f, dict) else f
            try:
                session.add_image(path, compress=False)
                history.append({"role": "user", "content": {"path": path}})
            except InputError as e:
                history.append({"role": "assistant", "content": f"⚠️ {e}"})
        text = text.strip()
        state.question = text or None
        if text:
            history.append({"role": "user", "content": text})
        elif not files:
            history.append({"role": "assistant", "content": "⚠️ Please type a question."})
        if text or state.chat.pending:  # from now on Stop cancels it, even while it waits in the queue
            session.accept()
        memory.touch(state.chat)
        return history, gr.update(value=None, interactive=False), state, gr.update(visible=bool(text))

    @gpu(duration=lambda history, state, view: gpu_seconds(state, big))
    def respond(history, state, view):
        """Encodes new images, streams the answer, and yields the updated state last."""
        history = list(history or [])
        skip = (gr.skip(),) * 5
        if state is None or (state.question is None and not state.chat.pending):
            yield history, *skip
            return
        session = session_for(state)
        question, state.question = state.question, None
        answer = {"role": "assistant", "content": ""}
        history.append(answer)
        try:
            if question is None:  # images without a question: encode them so the map shows
                answer["content"] = f"Got it: {session.current_view()[1].caption()}. Now ask a question about it."
            else:
                turns = len(state.chat.turns)
                for delta in session.ask_stream(question, accepted=True):
                    answer["content"] += delta
                    yield history, *skip
                if len(state.chat.turns) == turns:  # Stop pressed while the question waited: not answered
                    answer["content"] = "⏹ Stopped before the answer started."
                answer["content"] = answer["content"] or "(empty answer)"
                if not state.chat.images and len(state.chat.turns) == 1:
                    history.append({"role": "assistant", "content": "ℹ️ No image in this conversation yet: "
                                    "attach one with the 📎 button to see which visual tokens the model gets."})
        except Exception as e:
            if not isinstance(e, InputError):  # a failure must not leave the tab stuck: say it, keep the state
                log.exception("answer failed")
            message = f"⚠️ {e}" if isinstance(e, InputError) else f"⚠️ Something went wrong: {type(e).__name__}: {e}"
            if answer["content"]:
                history.append({"role": "assistant", "content": message})
            else:
                answer["content"] = message
        finally:
            session.answering.clear()  # (ask_stream clears it too; a message of images alone ends here)
        if warm_here[0]:  # ZeroGPU: the examples are compressed in the worker, after this person's answer
            warm_here[0] = False
            examples.warm(vlm, example_paths(), method_default, max_tiles=max_tiles, polite=False)  # (queued
            # questions count as answering: waiting for them here, where they wait for this call, would stall)
        cleared = ClearedFlag(state.chat.session_id)
        if cleared.is_set():  # Clear was pressed during this answer: the conversation stays cleared
            cleared.clear()
            yield [], None, format_stats(None), None, NO_IMAGE, gr.update(value="kept")
            return
        if state.chat.last_image_key is not None:
            try:
                session.current_view()  # a manual view needs VisionZip's crops: encode them now, on the GPU
            except Exception:  # noqa: BLE001 - the map waits; the chat already says what failed
                log.exception("encoding the image for the map failed")
        yield history, state, format_stats(state.chat.last_turn), *views(session, view)

    def finish(state):
        """After an answer (or a failure, maybe before the answer ran): the textbox back, Stop hidden, the
        conversation no longer answering, its memory counted."""
        if state is not None:
            AnsweringFlag(state.chat.session_id).clear()
            memory.touch(state.chat)
        return gr.update(interactive=True), gr.update(visible=False)

    def stop(state):
        if state is not None:
            StopFlag(state.chat.session_id).set()  # the answering process ends after its current token

    @gpu(duration=lambda state: 30 if big else 15)
    def compress_latest(state: AppState) -> AppState:
        """Encodes the latest image for the current settings (for the map). Fails only with a gr.Error (on
        ZeroGPU any other exception would reach the page as its bare class name)."""
        try:
            session_for(state).current_view()
        except InputError as e:
            raise gr.Error(str(e)) from None
        except Exception as e:
            log.exception("encoding the image failed")
            raise gr.Error(f"Encoding the image failed: {type(e).__name__}: {e}") from None
        return state

    def apply_settings(state, view, *settings):
        if state is None:
            return state, gr.skip(), gr.skip(), gr.skip(), gr.update(visible=settings[0] == "Manual")
        session = session_for(state)
        try:
            session.set_method(**settings_from(*settings))
        except InputError as e:
            gr.Warning(str(e))
            s = state.chat.settings
            return (state, gr.skip(), f"⚠️ Not applied: {e} Still using {s.method} ({s.dominant} + {s.contextual}).",
                    gr.skip(), gr.skip())
        if state.chat.last_image_key is not None and session.current_view(compress=False) is None:
            try:
                state = compress_latest(state)
            except gr.Error as e:  # the settings stay applied; the map waits for the next answer
                return state, gr.skip(), f"⚠️ {e.message}", gr.skip(), gr.skip()
            session = session_for(state)
        return state, *views(session, view), gr.update(visible=state.chat.settings.method == "manual")

    def forget(state):
        if state is not None:
            kv.drop(state.chat.session_id)
            memory.forget(state.chat.session_id)

    def show_view(state, view):
        return views(session_for(state) if state else None, view)[:2]

    def click_map(state, view, radius, evt: MapClick):
        """On the map: say what the clicked patch is; in the manual method, pick or unpick it (and the
        patches around it, `radius`)."""
        if state is None or state.chat.last_image_key is None or not isinstance(evt.index, (list, tuple)):
            return state, gr.skip(), gr.skip(), "_Upload an image, then click the map._"
        session = session_for(state)
        shown = session.current_view(compress=False)
        if shown is None:
            return state, gr.skip(), gr.skip(), "_The map is being prepared._"
        image, comp = shown
        spot = hit(comp, *evt.index[:2])
        if spot is None:
            return state, gr.skip(), gr.skip(), "_Click on a patch of the photo._"
        crop, unit = spot
        if state.chat.settings.method != "manual":
            guidance = session.guidance_view()
            importance = guidance[2] if guidance is not None else None
            return state, gr.skip(), gr.skip(), describe(comp, crop, unit, importance)
        try:
            picked = session.toggle_pick(crop, unit, radius=int(checked_radius(radius)))
        except InputError as e:
            return state, gr.skip(), gr.skip(), f"⚠️ {e}"
        mapped, caption, _ = views(session, "kept")
        return state, mapped, caption, f"{picked} patches picked. Ask again to answer with exactly these."

    def set_picks(state, start_from_visionzip: bool):
        if state is None or state.chat.last_image_key is None:
            return state, gr.skip(), gr.skip(), "_Upload an image first._"
        session = session_for(state)
        if not session.cached(state.chat.last_image_key, method="visionzip"):
            return state, gr.skip(), gr.skip(), "_The map is being prepared; try again in a moment._"
        picked = session.picks_from_visionzip() if start_from_visionzip else (session.set_picks({}) or 0)
        mapped, caption, _ = views(session, "kept")
        return state, mapped, caption, f"{picked} patches picked."

    def pick_budget(total):
        if total not in BUDGETS:
            return gr.skip(), gr.skip()
        return BUDGETS[total]

    @gpu(duration=lambda state: gpu_seconds(state, big, answers=3))
    def compare_answers(state):
        if state is None or not state.chat.turns:
            return "_Ask a question first, then compare it with the full model._", ""
        try:
            results = compare(session_for(state))
        except InputError as e:
            return f"⚠️ {e}", ""
        except Exception as e:  # reported here: on ZeroGPU it would reach the page as a bare class name
            log.exception("compare failed")
            return f"⚠️ Compare failed: {type(e).__name__}: {e}", ""
        return format_compare(results), "\n\n".join(f"**{m}:** {a}" for m, a, _ in results)

    def clear(state):
        if state is not None:
            sid = state.chat.session_id
            if AnsweringFlag(sid).is_set():  # an answer is running or queued: stop it, discard what it hands back
                ClearedFlag(sid).set()  # (first: the answer may end as soon as it sees Stop)
                StopFlag(sid).set()
            memory.forget(sid)
            kv.drop(sid)
        return ([], None, gr.update(value=None, interactive=True), None, NO_IMAGE, gr.skip(), format_stats(None),
                "", "", "", gr.update(visible=False))

    with gr.Blocks(title="zipchat", delete_cache=(1800, 3600)) as demo:
        gr.Markdown("# zipchat\nChat about an image. **VisionZip** keeps the few visual tokens that matter "
                    "(dominant tokens by attention, the rest merged into contextual tokens); the map on the right "
                    f"shows which. Model: `{vlm.describe()}`.")
        if banner:
            gr.Markdown(banner, elem_id="offline-banner", elem_classes=["banner"])
        state = gr.State(None, time_to_live=SESSION_TTL_S, delete_callback=forget)
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
                with gr.Accordion("Method", open=True):
                    choices = [k for k, v in METHOD_NAMES.items() if v != "sgl" or small is not None]
                    method = gr.Radio(choices, value={v: k for k, v in METHOD_NAMES.items()}[method_default],
                                      label="Visual tokens (Manual: pick patches on the map)", elem_id="method")
                    budget = gr.Radio([64, 128, 192], value=64, label="Budget per crop (dominant + contextual)")
                    with gr.Row():
                        units = vlm.family.units_per_crop - 1  # the largest budget below a whole crop
                        dominant = Slider(1, units, value=54, step=1, elem_id="dominant",
                                          label="dominant" + (" (CLS counts as one)" if vlm.family.has_cls else ""))
                        contextual = Slider(0, 100, value=10, step=1, label="contextual", elem_id="contextual")
                    tiles = Slider(0, 36, value=max_tiles, step=1, elem_id="max_tiles", visible=vlm.family.tiles,
                                   label=f"{vlm.family.tile_cap_label} (0: all the checkpoint uses; fewer is "
                                         "faster on a CPU; Full always uses all)")
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
                    new_tokens = Slider(1, max(2048, max_new_tokens), value=max_new_tokens, step=1, label="max new tokens",
                                        elem_id="max_new_tokens")
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
                with gr.Row(visible=method_default == "manual", elem_id="pick-row") as pick_row:
                    radius = Slider(0, 5, value=0, step=1, label="brush (patches around the click)", elem_id="radius")
                    from_zip = gr.Button("Start from VisionZip's", elem_id="picks-from-visionzip")
                    no_picks = gr.Button("Clear picks", elem_id="clear-picks")
                stats = gr.Markdown(format_stats(None), elem_id="stats")
        with gr.Row():
            compare_table = gr.Markdown(elem_id="compare-table")
            compare_answers_md = gr.Markdown(elem_id="compare-answers")
        gallery = json.loads((ASSETS / "examples.json").read_text())
        gr.Examples([[{"text": e["question"], "files": [str(ASSETS / e["image"])]}] for e in gallery],
                    inputs=[textbox], label="Examples")

        settings = [method, dominant, contextual, keep_ratio, prune_layer, exit_on, threshold, sgl_zip, tiles,
                    new_tokens, temperature, top_p]
        maps = [map_image, caption, view]
        submitted = textbox.submit(add_message, [chatbot, textbox, state, *settings],
                                   [chatbot, textbox, state, stop_btn], queue=False, api_name="add_message")
        answering = submitted.then(respond, [chatbot, state, view], [chatbot, state, stats, *maps], api_name="respond")
        # the textbox comes back (and Stop goes) whatever happened: after the answer, or after a failure that
        # Gradio (or ZeroGPU: no quota, worker lost) raised outside the handler, which skips .then
        answering.then(finish, state, [textbox, stop_btn], api_name=False)
        for event in (submitted, answering):
            event.failure(finish, state, [textbox, stop_btn], api_name=False)
        stop_btn.click(stop, state, None, queue=False, api_name="stop")
        budget.change(pick_budget, budget, [dominant, contextual], queue=False, api_name=False)
        for control in settings:
            control.change(apply_settings, [state, view, *settings], [state, *maps, pick_row],
                           api_name=f"settings_{control.elem_id}")
        view.change(show_view, [state, view], [map_image, caption], queue=False, api_name="view")
        map_image.select(click_map, [state, view, radius], [state, map_image, caption, info], api_name="click")
        from_zip.click(lambda s: set_picks(s, True), state, [state, map_image, caption, info], api_name="picks_visionzip")
        no_picks.click(lambda s: set_picks(s, False), state, [state, map_image, caption, info], api_name="picks_clear")
        compare_btn.click(compare_answers, state, [compare_table, compare_answers_md], api_name="compare")
        clear_btn.click(clear, state, [chatbot, state, textbox, map_image, caption, view, stats, info, compare_table,
                                       compare_answers_md, stop_btn], queue=False, api_name="clear")
    return demo


def example_paths() -> list:
    return [str(ASSETS / e["image"]) for e in json.loads((ASSETS / "examples.json").read_text())]


def checked_radius(radius):
    if radius is None or not isinstance(radius, (int, float)) or not 0 <= radius <= 5:
        raise InputError("The brush is 0 to 5 patches around the click.")
    return radius


def launch_options() -> dict:
    """What `python app.py` passes to launch(), besides host and port (tests launch with the same)."""
    # show_error: an API call that Gradio's own input checks refuse gets their message, not a generic one
    return dict(max_file_size="25mb", css=CSS, show_error=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description="zipchat: VisionZip chat about images")
    env = os.environ.get  # a Space runs `python app.py` with no arguments: its variables set the defaults
    parser.add_argument("--model", default=env("ZIPCHAT_MODEL"),
                        help="preset, hub id or local directory (default: $ZIPCHAT_MODEL, else by hardware)")
    parser.add_argument("--small-model", default=env("ZIPCHAT_SMALL_MODEL", "auto"),
                        help="small model for SGL; 'auto' picks the preset's partner (llava-ov-7b -> llava-ov-0.5b), "
                             "'' disables SGL (default: $ZIPCHAT_SMALL_MODEL, else auto)")
    parser.add_argument("--method", default=env("ZIPCHAT_METHOD", "visionzip"),
                        choices=["full", "visionzip", "sgl", "manual"])
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME") or "127.0.0.1",
                        help="address to listen on (default: $GRADIO_SERVER_NAME, else 127.0.0.1; Spaces set 0.0.0.0)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT") or 7860),
                        help="port (default: $GRADIO_SERVER_PORT, else 7860)")
    parser.add_argument("--share", action="store_true", help="create a public gradio.live link")
    parser.add_argument("--max-new-tokens", type=int, default=int(env("ZIPCHAT_MAX_NEW_TOKENS") or 256))
    parser.add_argument("--dtype", default=env("ZIPCHAT_DTYPE"), choices=["float32", "bfloat16", "float16"],
                        help="default: bf16 on a GPU, and on a CPU that computes it natively (AVX512-BF16/AMX); "
                             "else float32")
    parser.add_argument("--max-tiles", type=int, default=int(env("ZIPCHAT_MAX_TILES")) if env("ZIPCHAT_MAX_TILES") else None,
                        help="tiles per image VisionZip encodes (Qwen2.5-VL: the area of 1 + this many 448 px tiles); "
                             "default 4 on a CPU, 0 (the checkpoint's own limit) on a GPU")
    parser.add_argument("--image-memory", type=int, default=int(env("ZIPCHAT_IMAGE_MEMORY_MB") or 1024),
                        help="MB of images and compressed features all conversations keep together; past it the "
                             "least recently used idle conversation's images are dropped (default: "
                             "$ZIPCHAT_IMAGE_MEMORY_MB, else 1024)")
    parser.add_argument("--no-warm-examples", action="store_true",
                        default=env("ZIPCHAT_WARM_EXAMPLES", "1").lower() in ("0", "false", "no"),
                        help="do not compress the example images ahead (default: compress them right after launch, "
                             "at low priority; $ZIPCHAT_WARM_EXAMPLES=0 turns it off too)")
    parser.add_argument("--device-map", default=env("ZIPCHAT_DEVICE_MAP"),
                        help="'auto': let accelerate place a model too large for one GPU across the GPUs (and CPU)")
    parser.add_argument("--ignore-eos", action="store_true", help=argparse.SUPPRESS)  # tests: only Stop ends answers
    args = parser.parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("[zipchat] %(message)s"))
    log.addHandler(handler)  # zipchat's own messages; the libraries keep their defaults (no request lines)
    log.setLevel(logging.INFO)
    vlm, small, banner = load_models(args.model or default_preset(), args.small_model, dtype=args.dtype,
                                     device_map=args.device_map)
    if args.method == "sgl" and small is None:
        parser.error("--method sgl needs a small model (--small-model)")
    examples = None if args.no_warm_examples else ExampleCache()
    max_tiles = args.max_tiles if args.max_tiles is not None else (4 if vlm.device.type == "cpu" else 0)
    built = build_demo(vlm, banner, args.max_new_tokens, args.method, small=small,
                       session_options={"stop_at_eos": False} if args.ignore_eos else None, max_tiles=max_tiles,
                       image_memory=args.image_memory << 20, examples=examples)
    built.queue(default_concurrency_limit=1)  # one GPU: one generation at a time, others wait in line
    global demo
    demo = built  # where Gradio's reloader on a Space looks for the app (else it logs that it did not find it)
    sys.unraisablehook = quiet_leaked_event_loops
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, prevent_thread_lock=True,
                **launch_options())
    if examples is not None and not on_zero_gpu():  # the gallery, compressed while nobody is waiting
        threading.Thread(target=examples.warm, args=(vlm, example_paths(), args.method),
                         kwargs={"max_tiles": max_tiles}, daemon=True, name="warm-examples").start()
    demo.block_thread()


def quiet_leaked_event_loops(unraisable):
    """Gradio (6.x, `utils.safe_get_lock`) leaves an unclosed asyncio event loop behind for each lock it
    makes outside a running loop. On a Space the `spaces` reloader's code scan closes their sockets first,
    so collecting them prints "Exception ignored in BaseEventLoop.__del__ ... Invalid file descriptor: -1"
    into the log people read. Only that case is silenced; everything else is printed as usual."""
    if not (isinstance(unraisable.exc_value, ValueError) and "Invalid file descriptor" in str(unraisable.exc_value)
            and getattr(unraisable.object, "__qualname__", "") == "BaseEventLoop.__del__"):
        sys.__unraisablehook__(unraisable)


if __name__ == "__main__":
    main()
