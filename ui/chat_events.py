"""The chat's events: a message (checked, queued), its answer (streamed), Stop, Clear, and a tab's end. Methods
of Handlers (handlers.py), which holds what they share."""

import logging
import time
from pathlib import Path

import gradio as gr

from pipeline import ChatSession, InputError
from pipeline.images import web_copy
from pipeline.questions import checked_question
from pipeline.stopflag import AnsweringFlag, ClearedFlag, StopFlag

from .history import (MAX_REBUILT_IMAGES, RESTART_MARK, ConversationLost, bounded, past_turns, repaired, shown_answer,
                      text_message)
from .text import ANSWERING, CONVERSATION_LOST, NO_IMAGE, STILL_ANSWERING, format_stats, settings_from

log = logging.getLogger("zipchat")
MAX_IMAGES_PER_MESSAGE = 8
STREAM_EVERY_S = 0.1  # the answer's text reaches the page at most this often (each update carries the whole chat:
# on ZeroGPU a worker that yields every token runs ahead of the page, and a Stop waits for the backlog to drain)


def shown_path(path: str, session: ChatSession, key: str) -> str:
    """The file the chat shows for an uploaded image: the upload itself, or for a format browsers do not
    show (an iPhone's HEIC, a TIFF scan) a JPEG of the image as the model sees it, beside the upload."""
    try:
        copy = web_copy(path, session.image(key))
    except OSError:  # (not writable there: the chat shows the upload's name instead of a picture)
        log.exception("could not write a browser copy of %s", path)
        return path
    return str(copy) if copy is not None else path


def readable(question) -> bool:
    """Whether a past question is one the server takes (not over the length limit, valid text)."""
    try:
        return bool(checked_question(question))
    except InputError:
        return False


class ChatEvents:
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
            if len(files) > MAX_IMAGES_PER_MESSAGE:
                raise InputError(f"A message takes at most {MAX_IMAGES_PER_MESSAGE} images (this one has "
                                 f"{len(files)}): send the others in the next messages.")
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
            state.map_key = state.map_frame = None  # the map shows the newest image (a clip: all its frames)
        for path, key in zip(paths, state.chat.pending[len(state.chat.pending) - len(paths):]):
            history.append({"role": "user", "content": {"path": shown_path(path, session, key)}})
        state.question = question or None
        if question:
            history.append(text_message("user", question))
        session.accept()  # from now on Stop cancels it, even while it waits in the queue
        state.answering = "message"
        self.memory.touch(state.chat)
        return history, gr.update(value=None, interactive=False), state, gr.update(visible=bool(question))

    def rebuilt(self, history, settings: dict):
        """The conversation a page shows while the server has no state for it (the server restarted, or
        the tab was idle past its time to live), rebuilt from its messages: the same questions, answers and
        images, encoded again when the next turn needs them. None when the page shows no conversation;
        ConversationLost when its images are gone too (the person must send them again)."""
        turns, waiting = past_turns(history)
        if not turns and not waiting:
            return None
        waiting = waiting[-MAX_REBUILT_IMAGES:]
        turns = bounded(turns, waiting)  # (its latest turns: what the window would keep anyway)
        state = self.new_state(settings)
        session = self.session_for(state)
        turns = [t for t in turns if readable(t.question)]  # (a question the server would refuse now is left out)
        try:
            for t in turns:
                session.add_past_turn(t.question, t.answer, t.images)
            session.add_images(waiting)
        except InputError:  # an image that is gone
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
                    session.prepare_turn(question)  # (the turn reuses this encode; its time counts in the turn's)
                    session.current_view(key=self.shown_key(state))
                    yield history, gr.skip(), ANSWERING, *self.views(state, view, session)
                shown = 0.0
                for delta in session.ask_stream(question, accepted=True):
                    part["text"] += delta
                    if time.monotonic() - shown >= STREAM_EVERY_S:  # (what is left shows with the answer's end)
                        shown = time.monotonic()
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
        yield from self._after_answer(history, state, view, session)

    def _after_answer(self, history, state, view, session):
        """What follows an answer: the examples warmed in a ZeroGPU worker, the map, the stats (nothing after
        Clear)."""
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
                "", "", "", gr.update(visible=False), None, "", gr.update(visible=False), None, "", None, None,
                gr.update(visible=False))

    def forget(self, state):
        if state is not None:
            self.kv.drop(state.chat.session_id)
            self.memory.forget(state.chat.session_id)
