"""The app's event handlers: one plain method per event, on one object holding what they share (the
models, this process's KV store, the image memory budget, the example cache). Each takes and returns
the tab's plain state (AppState), so on ZeroGPU the GPU ones can run in another process. The layout
(layout.py) wires them; tests can call them alone."""

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from pipeline import ChatSession, ChatState, InputError, KVStore
from pipeline.compare import compare_stream, kept_view, overlap, overlap_markdown
from pipeline.examples import ExampleCache
from pipeline.images import web_copy
from pipeline.session import checked_question
from pipeline.heatmap import describe, hit, render_map
from pipeline.kvstore import default_budget
from pipeline.memory import MemoryBudget
from pipeline.methods import registry
from pipeline.stopflag import AnsweringFlag, ClearedFlag, StopFlag
from pipeline.methods.visionzip import BUDGETS

from .history import RESTART_MARK, ConversationLost, past_turns, repaired, shown_answer, text_message
from .text import (ANSWERING, CONVERSATION_LOST, NO_IMAGE, STILL_ANSWERING, VIEW_NAMES, checked_radius, compare_choices,
                   format_compare, format_progress, format_stats, method_names, picks_text, progress_answers,
                   settings_from)

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
    answering: str | None = None  # what this tab accepted and has not finished: "message" or "compare"
    map_key: str | None = None  # the image the map shows (None: the latest)


def gpu_seconds(state: AppState | None, big: bool, answers: int = 1) -> int:
    """A ZeroGPU slot that fits the work: short for a follow-up question, longer when images must be
    encoded first, for a 7B+ model, for SGL's two models, and per answer compared."""
    if state is None:
        return 10
    s = state.chat.settings
    seconds = 15 + (15 if big else 0) + s.max_new_tokens // (8 if big else 20)
    if state.chat.pending:
        seconds += 30 if big else 10
    if registry.get(s.method).needs_small:
        seconds += 20
    return min(300, seconds * answers)


def picks_shown(label) -> bool:
    """Whether the method the page names `label` (a UI label) is picked by hand: the picking tools show."""
    name = method_names().get(label) if isinstance(label, str) else None
    return name is not None and registry.get(name).kind == registry.MANUAL


def shown_path(path: str, session: ChatSession, key: str) -> str:
    """The file the chat shows for an uploaded image: the upload itself, or for a format browsers do not
    show (an iPhone's HEIC, a TIFF scan) a JPEG of the image as the model sees it, beside the upload."""
    try:
        copy = web_copy(path, session.image(key))
    except OSError:  # (not writable there: the chat shows the upload's name instead of a picture)
        log.exception("could not write a browser copy of %s", path)
        return path
    return str(copy) if copy is not None else path


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
    def shown_key(state: AppState | None) -> str | None:
        """The image the map shows: the one picked above the map, else the latest."""
        if state is None:
            return None
        return state.map_key if state.map_key in state.chat.images else state.chat.last_image_key

    @staticmethod
    def image_name(state: AppState, key: str) -> str:
        """How the messages name an image: "image 2 of 3" when the conversation has several."""
        keys = list(state.chat.images)
        return f"image {keys.index(key) + 1} of {len(keys)}" if len(keys) > 1 and key in keys else "this image"

    def views(self, state: AppState | None, view: str = "kept", session: ChatSession | None = None, mark=None):
        """(map, caption, view choices) of the image the map shows (`mark`: a clicked (crop, unit) outlined).
        No model runs here."""
        session = session or (self.session_for(state) if state is not None else None)
        key = self.shown_key(state)
        shown = session.current_view(compress=False, key=key) if session else None
        guidance = session.guidance_view(key) if shown else None
        names = [v for v in VIEW_NAMES if v != "importance" or guidance is not None]
        source = registry.label(session.last_turn.guidance.source) if guidance is not None else "SGL"
        choices = [(VIEW_NAMES[v] + (f" ({source})" if v == "importance" else ""), v) for v in names]
        if shown is None:
            return None, NO_IMAGE, gr.update(choices=choices, value="kept")
        image, comp = shown
        if view not in names or (view == "scores" and comp.crops[0].scores is None):
            view = "kept"
        extra = guidance[2:] if view == "importance" else ()
        caption = comp.caption()
        if len(state.chat.images) > 1:
            caption = f"{self.image_name(state, key).capitalize()}: {caption}"
        if guidance is not None:  # FastV / SGL: what the large model kept of this image in the last turn
            g = session.last_turn.guidance
            caption += (f"; {registry.label(g.source)} kept {int(guidance[3].sum())} of them from layer {g.prune_layer} "
                        "in the last turn (decided per question)")
        return (render_map(image, comp, view, *extra, mark=mark, source=source), caption,
                gr.update(choices=choices, value=view))

    # ---- chat ----------------------------------------------------------------------------------
    def add_message(self, history, message, state, *settings):
        """Checks the upload and the question and queues them; no model runs here. A message is taken
        whole or not at all: when an image or the question is refused, the person reads why and the
        message stays in the textbox to send again. A page whose conversation the server no longer has
        (a restart, an expired tab) is rebuilt from the messages it shows."""
        history = repaired(list(history or []))
        message = message if isinstance(message, dict) else {"text": message}
        files, text = message.get("files") or [], message.get("text") or ""
        if state is not None and ClearedFlag(state.chat.session_id).is_set():  # Clear stopped its last answer
            ClearedFlag(state.chat.session_id).clear()
            state = None
        try:
            if not isinstance(files, list) or not isinstance(text, str):
                raise InputError("A message is {'text': str, 'files': [paths]}.")
            if state is not None and AnsweringFlag(state.chat.session_id).is_set():  # (an API call need not wait)
                raise InputError(STILL_ANSWERING)
            question = checked_question(text, allow_empty=True)
            if not question and not files:
                raise InputError("Please type a question.")
            config = settings_from(*settings)
            if state is None:
                state = self.rebuilt(history, config) or self.new_state(config)
            session = self.session_for(state)
            session.set_method(**config)
            session.check_images()  # images dropped to free memory: says so, starts over
            paths = [f.get("path") if isinstance(f, dict) else f for f in files]
            session.add_images(paths, names=[Path(p).name if isinstance(p, str) else "a file" for p in paths])
        except ConversationLost as e:
            history.append({"role": "assistant", "content": f"{RESTART_MARK} {e}"})
            return history, gr.update(interactive=False), None, gr.update(visible=False)
        except InputError as e:  # the message stays in the textbox, to send again
            history.append({"role": "assistant", "content": f"⚠️ {e}"})
            return history, gr.update(interactive=False), state, gr.update(visible=False)
        if paths:
            state.map_key = None  # the map shows the newest image
        for path, key in zip(paths, state.chat.pending[len(state.chat.pending) - len(paths):]):
            history.append({"role": "user", "content": {"path": shown_path(path, session, key)}})
        state.question = question or None
        if question:
            history.append(text_message("user", question))
        session.accept()  # from now on Stop cancels it, even while it waits in the queue
        state.answering = "message"
        self.memory.touch(state.chat)
        return history, gr.update(value=None, interactive=False), state, gr.update(visible=bool(question))

    def rebuilt(self, history, settings: dict) -> AppState | None:
        """The conversation a page shows while the server has no state for it (the server restarted, or
        the tab was idle past its time to live), rebuilt from its messages: the same questions, answers and
        images, encoded again when the next turn needs them. None when the page shows no conversation;
        ConversationLost when its images are gone too (the person must send them again)."""
        turns, waiting = past_turns(history)
        if not turns and not waiting:
            return None
        state = self.new_state(settings)
        session = self.session_for(state)
        try:
            for t in turns:
                session.add_past_turn(t.question, t.answer, t.images)
            session.add_images(waiting)
        except InputError:
            raise ConversationLost(CONVERSATION_LOST) from None
        log.info("rebuilt a conversation of %d turns and %d images from its page", len(turns), len(state.chat.images))
        return state

    @staticmethod
    def use_example(evt: gr.SelectData):
        """An example picked in the empty chat -> the message it sends (its question and photo)."""
        value = evt.value if isinstance(evt.value, dict) else {}
        files = [f.get("path") if isinstance(f, dict) else f for f in value.get("files") or []]
        return {"text": value.get("text") or "", "files": [f for f in files if f]}

    def respond(self, history, state, view):
        """Encodes new images, streams the answer, and yields the updated state last."""
        history = list(history or [])
        skip = (gr.skip(),) * 5
        if state is None or (state.question is None and not state.chat.pending):
            yield history, *skip
            return
        session = self.session_for(state)
        question, state.question = state.question, None
        answer = text_message("assistant", "")
        part = answer["content"][0]  # (its text grows as the answer streams)
        history.append(answer)
        try:
            if question is None:  # images without a question: encode them so the map shows
                part["text"] = f"Got it: {session.current_view()[1].caption()}. Now ask a question about it."
            else:
                turns = len(state.chat.turns)
                if state.chat.pending and not session.stop_flag.is_set():  # the map as soon as the image is in
                    session.prepare_turn()  # (the turn reuses this encode; its time counts in the turn's)
                    session.current_view(key=self.shown_key(state))
                    yield history, gr.skip(), ANSWERING, *self.views(state, view, session)
                for delta in session.ask_stream(question, accepted=True):
                    part["text"] += delta
                    yield history, *skip
                if len(state.chat.turns) == turns:  # Stop pressed while the question waited: not answered
                    part["text"] = "⏹ Stopped before the answer started."
                else:  # the answer as the conversation keeps it (what a rebuilt conversation reads back)
                    part["text"] = shown_answer(state.chat.turns[-1])
                if not state.chat.images and len(state.chat.turns) == 1:
                    history.append({"role": "assistant", "content": "ℹ️ No image in this conversation yet: "
                                    "attach one with the 📎 button to see which visual tokens the model gets."})
        except Exception as e:
            if not isinstance(e, InputError):  # a failure must not leave the tab stuck: say it, keep the state
                log.exception("answer failed")
            message = f"⚠️ {e}" if isinstance(e, InputError) else f"⚠️ Something went wrong: {type(e).__name__}: {e}"
            if part["text"]:
                history.append({"role": "assistant", "content": message})
            else:
                part["text"] = message
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
                session.current_view(key=self.shown_key(state))  # a manual view needs VisionZip's crops: now
            except Exception:  # noqa: BLE001 - the map waits; the chat already says what failed
                log.exception("encoding the image for the map failed")
        yield history, state, format_stats(state.chat.last_turn), *self.views(state, view, session)

    def finish(self, state, what: str = "message"):
        """After an answer (or a Compare: `what`), or a failure, maybe before it ran: the textbox back, Stop
        hidden, the conversation no longer answering (unless something else it accepted still runs: a
        message refused during a Compare leaves the Compare answering), its memory counted."""
        if state is not None:
            if state.answering == what:
                AnsweringFlag(state.chat.session_id).clear()
                state.answering = None
            self.memory.touch(state.chat)
        return gr.update(interactive=True), gr.update(visible=False)

    def finish_compare(self, state):
        return self.finish(state, "compare")

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
        """Encodes the image the map shows for the current settings. Fails only with a gr.Error (on
        ZeroGPU any other exception would reach the page as its bare class name)."""
        try:
            self.session_for(state).current_view(key=self.shown_key(state))
        except InputError as e:
            raise gr.Error(str(e)) from None
        except Exception as e:
            log.exception("encoding the image failed")
            raise gr.Error(f"Encoding the image failed: {type(e).__name__}: {e}") from None
        return state

    def apply_settings(self, state, view, *settings):
        if state is None:
            return state, gr.skip(), gr.skip(), gr.skip(), gr.update(visible=picks_shown(settings[0]))
        session = self.session_for(state)
        try:
            session.set_method(**settings_from(*settings))
        except InputError as e:
            gr.Warning(str(e))
            s = state.chat.settings
            return (state, gr.skip(), f"⚠️ Not applied: {e} Still using {s.method} ({s.dominant} + {s.contextual}).",
                    gr.skip(), gr.skip())
        if state.chat.last_image_key is not None and session.current_view(compress=False,
                                                                          key=self.shown_key(state)) is None:
            try:
                state = self.compress_latest(state)
            except gr.Error as e:  # the settings stay applied; the map waits for the next answer
                return state, gr.skip(), f"⚠️ {e.message}", gr.skip(), gr.skip()
        return state, *self.views(state, view), gr.update(visible=session.method.kind == registry.MANUAL)

    def show_view(self, state, view):
        return self.views(state, view)[:2]

    def image_choices(self, state):
        """The picker of the image the map shows: one choice per image of the conversation (shown when
        there are several)."""
        keys = list(state.chat.images) if state is not None else []
        shown = self.shown_key(state)
        return gr.update(choices=[(f"image {i + 1}", str(i + 1)) for i in range(len(keys))], visible=len(keys) > 1,
                         value=str(keys.index(shown) + 1) if shown in keys else None)

    def show_image(self, state, number, view):
        """The map shows image `number` (1-based, as the picker names them): its picks, clicks and views."""
        keys = list(state.chat.images) if state is not None else []
        try:
            index = int(number) - 1
        except (TypeError, ValueError):
            index = -1
        if not 0 <= index < len(keys):
            return state, gr.skip(), f"⚠️ No image {number!r} in this conversation ({len(keys)} images).", gr.skip(), ""
        state.map_key = keys[index]
        if self.session_for(state).current_view(compress=False, key=state.map_key) is None:
            try:
                state = self.compress_latest(state)
            except gr.Error as e:
                return state, gr.skip(), f"⚠️ {e.message}", gr.skip(), ""
        return state, *self.views(state, view), ""

    def click_map(self, state, view, radius, evt):
        """On the map: say what the clicked patch is; in the manual method, pick or unpick it (and the
        patches around it, `radius`). `evt`: the click (app.MapClick)."""
        if state is None or state.chat.last_image_key is None or not isinstance(evt.index, (list, tuple)):
            return state, gr.skip(), gr.skip(), "_Upload an image, then click the map._"
        session, key = self.session_for(state), self.shown_key(state)
        shown = session.current_view(compress=False, key=key)
        if shown is None:
            return state, gr.skip(), gr.skip(), "_The map is being prepared._"
        image, comp = shown
        spot = hit(comp, *evt.index[:2])
        if spot is None:
            return state, gr.skip(), gr.skip(), "_Click on a patch of the photo._"
        crop, unit = spot
        if registry.get(state.chat.settings.method).kind != registry.MANUAL:
            guidance = session.guidance_view(key)
            importance = guidance[2] if guidance is not None else None
            source = registry.label(session.last_turn.guidance.source) if guidance is not None else "SGL"
            marked = self.views(state, view, session, mark=spot)[0]
            return state, marked, gr.skip(), describe(comp, crop, unit, importance, source)
        try:
            picked = session.toggle_pick(crop, unit, radius=int(checked_radius(radius)), key=key)
        except InputError as e:
            return state, gr.skip(), gr.skip(), f"⚠️ {e}"
        mapped, caption, _ = self.views(state, "kept", session, mark=spot)
        return state, mapped, caption, f"{picks_text(picked, self.image_name(state, key))} Ask again to answer with " \
                                       "exactly these."

    def set_picks(self, state, start_from_visionzip: bool):
        if state is None or state.chat.last_image_key is None:
            return state, gr.skip(), gr.skip(), "_Upload an image first._"
        session, key = self.session_for(state), self.shown_key(state)
        if not session.cached(key, method=session.method.fallback or "visionzip"):
            return state, gr.skip(), gr.skip(), "_The map is being prepared; try again in a moment._"
        picked = session.picks_from_visionzip(key) if start_from_visionzip else (session.set_picks({}, key) or 0)
        mapped, caption, _ = self.views(state, "kept", session)
        return state, mapped, caption, picks_text(picked, self.image_name(state, key))

    @staticmethod
    def pick_budget(total):
        if total not in BUDGETS:
            return gr.skip(), gr.skip()
        return BUDGETS[total]

    # ---- compare -------------------------------------------------------------------------------
    def start_compare(self, state):
        """Compare pressed, before it queues: refused (gr.Error) while this conversation answers; else
        accepted (a Stop from now on cancels it, even while it waits) and counted as answering."""
        if state is None or not state.chat.turns:
            return state, gr.skip(), gr.skip()  # compare_answers says what to do
        if AnsweringFlag(state.chat.session_id).is_set():
            raise gr.Error(STILL_ANSWERING)
        self.session_for(state).accept()
        state.answering = "compare"
        self.memory.touch(state.chat)
        return state, gr.update(interactive=False), gr.update(visible=True)

    def compare_answers(self, state, methods=None):
        """The last question again with each chosen method (default: the session's, VisionZip and Full),
        streamed: the progress while it runs, then -> (table, answers, [(kept-view map, caption)], overlap
        table). Stop ends it (the finished methods stay, the stopped one keeps its partial answer); after
        Clear nothing of it appears. Nothing of the conversation changes."""
        if state is None or not state.chat.turns:
            yield "_Ask a question first, then compare methods._", "", None, ""
            return
        sid = state.chat.session_id
        cleared = ClearedFlag(sid)
        try:
            session = self.session_for(state)
            chosen = compare_choices(methods) or None
            # accepted by start_compare (the page), or not yet (an API call): then it accepts itself
            stream = compare_stream(session, chosen, accepted=AnsweringFlag(sid).is_set())
            progress = None
            while True:
                try:
                    progress = next(stream)
                except StopIteration as end:
                    results = end.value
                    break
                if not cleared.is_set():
                    yield format_progress(progress), progress_answers(progress), gr.skip(), gr.skip()
            if cleared.is_set():  # Clear was pressed during it: nothing of it comes back
                cleared.clear()
                yield "", "", None, ""
                return
            if not results:
                yield "⏹ Compare was stopped before its first answer.", "", None, ""
                return
            maps = []
            for method, _, stats in results:
                shown = kept_view(session, method, stats)
                if shown is not None:
                    image, comp = shown
                    picture = render_map(image, comp, "kept")
                    picture.thumbnail((COMPARE_MAP_SIDE, COMPARE_MAP_SIDE))
                    maps.append((picture, f"{registry.label(method)}: {comp.num_tokens} of {comp.full_tokens} tokens"))
            names, matrix = overlap(session, results)
        except InputError as e:
            yield f"⚠️ {e}", "", None, ""
            return
        except Exception as e:  # reported here: on ZeroGPU it would reach the page as a bare class name
            log.exception("compare failed")
            yield f"⚠️ Compare failed: {type(e).__name__}: {e}", "", None, ""
            return
        answers = "\n\n".join(f"**{registry.label(m)}:** {a}" for m, a, _ in results)
        table = format_compare(results)
        if results[-1][2].stopped or len(results) < progress.total:
            table = f"⏹ Stopped: {len(results)} of {progress.total} methods answered (the last one in part).\n\n" + table
        yield table, answers, maps or None, overlap_markdown(names, matrix, [m for m, _, _ in results])
