"""The app's event handlers: one plain method per event, on one object holding what they share (the
models, this process's KV store, the image memory budget, the example cache). Each takes and returns
the tab's plain state (AppState), so on ZeroGPU the GPU ones can run in another process. The layout
(layout.py) wires them; tests can call them alone."""

import logging
import os
from dataclasses import dataclass

import gradio as gr

from pipeline import ChatSession, ChatState, InputError, KVStore, compare
from pipeline.compare import kept_view, overlap, overlap_markdown
from pipeline.examples import ExampleCache
from pipeline.heatmap import describe, hit, render_map
from pipeline.kvstore import default_budget
from pipeline.memory import MemoryBudget
from pipeline.methods import LABELS
from pipeline.stopflag import AnsweringFlag, ClearedFlag, StopFlag
from pipeline.methods.visionzip import BUDGETS

from .text import (NO_IMAGE, STILL_ANSWERING, VIEW_NAMES, checked_radius, compare_choices, format_compare,
                   format_stats, settings_from)

try:  # Hugging Face ZeroGPU (app.py imports it before torch, as the package asks)
    import spaces
except ImportError:
    spaces = None

log = logging.getLogger("zipchat")
COMPARE_MAP_SIDE = 420  # pixels: the small kept-view map of each compared method


def on_zero_gpu() -> bool:
    """Whether `spaces.GPU` runs calls on ZeroGPU workers (the `spaces` package reads SPACES_ZERO_GPU)."""
    return spaces is not None and os.environ.get("SPACES_ZERO_GPU", "").lower() in ("1", "t", "true")


def gpu(duration):
    """`spaces.GPU(duration=...)` where the `spaces` package is installed (a no-op off ZeroGPU)."""
    if spaces is None:
        return lambda fn: fn
    return spaces.GPU(duration=duration)


@dataclass
class AppState:
    """One browser tab: the conversation's plain state and the question waiting for an answer."""
    chat: ChatState
    question: str | None = None


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


class Handlers:
    """`max_tiles`: the tiles per image the compress-once methods encode by default (tiling families);
    `image_memory`: bytes of images and compressed features all conversations keep together
    (memory.py); `examples`: the example images compressed ahead (examples.py); `example_paths`: their
    files (on ZeroGPU the first answer in each worker compresses them, after the person's answer)."""

    def __init__(self, vlm, small=None, max_new_tokens: int = 256, method_default: str = "visionzip",
                 session_options: dict | None = None, max_tiles: int = 0, image_memory: int = 1 << 30,
                 examples: ExampleCache | None = None, example_paths=()):
        self.vlm, self.small = vlm, small
        self.max_new_tokens, self.method_default, self.max_tiles = max_new_tokens, method_default, max_tiles
        self.models = {m.name: m for m in (vlm, small) if m is not None}
        self.kv = KVStore(default_budget(vlm.device))  # this process's KV caches, keyed by session, LRU-bounded
        self.examples, self.example_paths = examples, list(example_paths)
        self.memory = MemoryBudget(image_memory, fixed=(lambda: examples.nbytes) if examples is not None else None)
        self.big = max(sum(p.numel() for p in m.model.parameters()) for m in self.models.values()) > 3e9
        self.options = dict(session_options or {}, examples=examples)
        self.warm_here = examples is not None and on_zero_gpu()  # on ZeroGPU: once per worker, inside a GPU call
        # the handlers that run a model, as ZeroGPU calls (per instance: nothing global is wrapped)
        self.respond = gpu(duration=lambda history, state, view: gpu_seconds(state, self.big))(self.respond)
        self.compress_latest = gpu(duration=lambda state: 30 if self.big else 15)(self.compress_latest)
        self.compare_answers = gpu(duration=lambda state, methods=None: gpu_seconds(
            state, self.big, answers=len(methods) if isinstance(methods, (list, tuple)) and methods else 3)
        )(self.compare_answers)

    # ---- helpers -------------------------------------------------------------------------------
    def session_for(self, state: AppState) -> ChatSession:
        return ChatSession.resume(state.chat, self.models, kv=self.kv, **self.options)

    def new_state(self, settings: dict) -> AppState:
        session = ChatSession(self.vlm, small=self.small, max_new_tokens=self.max_new_tokens, kv=self.kv,
                              **self.options)
        session.set_method(**settings)
        return AppState(session.state)

    @staticmethod
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
        caption = comp.caption()
        if guidance is not None:  # FastV / SGL: what the large model kept of this image in the last turn
            g = session.last_turn.guidance
            caption += (f"; {LABELS[g.source]} kept {int(guidance[3].sum())} of them from layer {g.prune_layer} "
                        "in the last turn (decided per question)")
        return (render_map(image, comp, view, *extra), caption,
                gr.update(choices=[(VIEW_NAMES[v], v) for v in names], value=view))

    # ---- chat ----------------------------------------------------------------------------------
    def add_message(self, history, message, state, *settings):
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
            state = state or self.new_state(config)
            session = self.session_for(state)
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
        self.memory.touch(state.chat)
        return history, gr.update(value=None, interactive=False), state, gr.update(visible=bool(text))

    def respond(self, history, state, view):
        """Encodes new images, streams the answer, and yields the updated state last."""
        history = list(history or [])
        skip = (gr.skip(),) * 5
        if state is None or (state.question is None and not state.chat.pending):
            yield history, *skip
            return
        session = self.session_for(state)
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
        if self.warm_here:  # ZeroGPU: the examples are compressed in the worker, after this person's answer
            self.warm_here = False
            self.examples.warm(self.vlm, self.example_paths, self.method_default, max_tiles=self.max_tiles,
                               polite=False)  # (queued questions count as answering: waiting for them here,
            # where they wait for this call, would stall)
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
        yield history, state, format_stats(state.chat.last_turn), *self.views(session, view)

    def finish(self, state):
        """After an answer (or a failure, maybe before the answer ran): the textbox back, Stop hidden, the
        conversation no longer answering, its memory counted."""
        if state is not None:
            AnsweringFlag(state.chat.session_id).clear()
            self.memory.touch(state.chat)
        return gr.update(interactive=True), gr.update(visible=False)

    def stop(self, state):
        if state is not None:
            StopFlag(state.chat.session_id).set()  # the answering process ends after its current token

    def clear(self, state):
        if state is not None:
            sid = state.chat.session_id
            if AnsweringFlag(sid).is_set():  # an answer is running or queued: stop it, discard what it hands back
                ClearedFlag(sid).set()  # (first: the answer may end as soon as it sees Stop)
                StopFlag(sid).set()
            self.memory.forget(sid)
            self.kv.drop(sid)
        return ([], None, gr.update(value=None, interactive=True), None, NO_IMAGE, gr.skip(), format_stats(None),
                "", "", "", gr.update(visible=False), None, "")

    def forget(self, state):
        if state is not None:
            self.kv.drop(state.chat.session_id)
            self.memory.forget(state.chat.session_id)

    # ---- settings and maps ---------------------------------------------------------------------
    def compress_latest(self, state: AppState) -> AppState:
        """Encodes the latest image for the current settings (for the map). Fails only with a gr.Error (on
        ZeroGPU any other exception would reach the page as its bare class name)."""
        try:
            self.session_for(state).current_view()
        except InputError as e:
            raise gr.Error(str(e)) from None
        except Exception as e:
            log.exception("encoding the image failed")
            raise gr.Error(f"Encoding the image failed: {type(e).__name__}: {e}") from None
        return state

    def apply_settings(self, state, view, *settings):
        if state is None:
            return state, gr.skip(), gr.skip(), gr.skip(), gr.update(visible=settings[0] == "Manual")
        session = self.session_for(state)
        try:
            session.set_method(**settings_from(*settings))
        except InputError as e:
            gr.Warning(str(e))
            s = state.chat.settings
            return (state, gr.skip(), f"⚠️ Not applied: {e} Still using {s.method} ({s.dominant} + {s.contextual}).",
                    gr.skip(), gr.skip())
        if state.chat.last_image_key is not None and session.current_view(compress=False) is None:
            try:
                state = self.compress_latest(state)
            except gr.Error as e:  # the settings stay applied; the map waits for the next answer
                return state, gr.skip(), f"⚠️ {e.message}", gr.skip(), gr.skip()
            session = self.session_for(state)
        return state, *self.views(session, view), gr.update(visible=state.chat.settings.method == "manual")

    def show_view(self, state, view):
        return self.views(self.session_for(state) if state else None, view)[:2]

    def click_map(self, state, view, radius, evt):
        """On the map: say what the clicked patch is; in the manual method, pick or unpick it (and the
        patches around it, `radius`). `evt`: the click (app.MapClick)."""
        if state is None or state.chat.last_image_key is None or not isinstance(evt.index, (list, tuple)):
            return state, gr.skip(), gr.skip(), "_Upload an image, then click the map._"
        session = self.session_for(state)
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
        mapped, caption, _ = self.views(session, "kept")
        return state, mapped, caption, f"{picked} patches picked. Ask again to answer with exactly these."

    def set_picks(self, state, start_from_visionzip: bool):
        if state is None or state.chat.last_image_key is None:
            return state, gr.skip(), gr.skip(), "_Upload an image first._"
        session = self.session_for(state)
        if not session.cached(state.chat.last_image_key, method="visionzip"):
            return state, gr.skip(), gr.skip(), "_The map is being prepared; try again in a moment._"
        picked = session.picks_from_visionzip() if start_from_visionzip else (session.set_picks({}) or 0)
        mapped, caption, _ = self.views(session, "kept")
        return state, mapped, caption, f"{picked} patches picked."

    @staticmethod
    def pick_budget(total):
        if total not in BUDGETS:
            return gr.skip(), gr.skip()
        return BUDGETS[total]

    # ---- compare -------------------------------------------------------------------------------
    def compare_answers(self, state, methods=None):
        """The last question again with each chosen method (default: the session's, VisionZip and Full):
        -> (table, answers, [(kept-view map, caption)], overlap table). Nothing of the conversation changes."""
        if state is None or not state.chat.turns:
            return "_Ask a question first, then compare methods._", "", None, ""
        try:
            session = self.session_for(state)
            results = compare(session, compare_choices(methods) or None)
            maps = []
            for method, _, stats in results:
                shown = kept_view(session, method, stats)
                if shown is not None:
                    image, comp = shown
                    picture = render_map(image, comp, "kept")
                    picture.thumbnail((COMPARE_MAP_SIDE, COMPARE_MAP_SIDE))
                    maps.append((picture, f"{LABELS[method]}: {comp.num_tokens} of {comp.full_tokens} tokens"))
            names, matrix = overlap(session, results)
        except InputError as e:
            return f"⚠️ {e}", "", None, ""
        except Exception as e:  # reported here: on ZeroGPU it would reach the page as a bare class name
            log.exception("compare failed")
            return f"⚠️ Compare failed: {type(e).__name__}: {e}", "", None, ""
        answers = "\n\n".join(f"**{m}:** {a}" for m, a, _ in results)
        return format_compare(results), answers, maps or None, overlap_markdown(names, matrix)
