"""Compare's events: the last question answered again by a chosen set of methods, streamed, with a kept-view
map per method and the overlap of their kept sets. Methods of Handlers (handlers.py)."""

import logging
import re
import tempfile

import gradio as gr

from pipeline import InputError
from pipeline.compare import compare_stream, kept_view, overlap, overlap_markdown, second_turn_markdown
from pipeline.export import compare_record, write_files
from pipeline.heatmap import Display, render_map
from pipeline.methods import registry
from pipeline.stopflag import AnsweringFlag, ClearedFlag

from .text import STILL_ANSWERING, compare_choices, format_compare, format_progress, progress_answers

log = logging.getLogger("zipchat")
COMPARE_MAP_SIDE = 420  # pixels: the small kept-view map of each compared method


def kept_maps(session, results: list, display: Display = None) -> list:
    """[(kept-view map, caption)] of the latest image, one per compared method that has one. On a narrow
    screen (`display` without a height limit) the gallery shows one map per row, as wide as the map's box:
    they are drawn for it; else small, three in a row."""
    narrow = display is not None and display.height is None
    maps = []
    for method, _, stats in results:
        shown = kept_view(session, method, stats)
        if shown is not None:
            image, comp = shown
            picture = render_map(image, comp, "kept", display=display if narrow else None)
            picture.thumbnail((2 * display.width, 4 * display.width) if narrow else (COMPARE_MAP_SIDE, COMPARE_MAP_SIDE))
            maps.append((picture, f"{registry.label(method)}: {comp.num_tokens} of {comp.full_tokens} tokens"))
    return maps


def export_compare(session, results: list, maps: list) -> list:
    """Compare's files: JSON and CSV of its results, and each kept-view map as PNG -> their paths."""
    folder = tempfile.mkdtemp(prefix="zipchat-compare-")
    files = write_files(compare_record(session, results), folder, "compare")
    for (picture, caption), (method, _, _) in zip(maps, [r for r in results if kept_view(session, r[0], r[2])]):
        path = f"{folder}/kept-{re.sub(r'[^a-z0-9_-]', '', method.lower())}.png"
        picture.save(path)
        files.append(path)
    return files


class CompareEvents:
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

    def compare_answers(self, state, methods=None, second=None):
        """The last question again with each chosen method (default: the session's, VisionZip and Full),
        streamed: the progress while it runs, then -> (table, answers, [(kept-view map, caption)], overlap
        table, [files: JSON, CSV, each map as PNG]). `second` (optional): each method then answers it as turn 2 on the same image, and the overlap
        output adds what each kept again and what turn 2 cost. Stop ends it (the finished methods stay, the
        stopped one keeps its partial answer); after Clear nothing of it appears. Nothing of the conversation
        changes."""
        if state is None or not state.chat.turns:
            yield "_Ask a question first, then compare methods._", "", None, "", None
            return
        if second is not None and not isinstance(second, str):
            yield f"⚠️ The turn-2 question must be text (got {type(second).__name__}).", "", None, "", None
            return
        second = (second or "").strip() or None
        sid = state.chat.session_id
        cleared = ClearedFlag(sid)
        try:
            session = self.session_for(state)
            chosen = compare_choices(methods) or None
            # accepted by start_compare (the page), or not yet (an API call): then it accepts itself
            stream = compare_stream(session, chosen, accepted=AnsweringFlag(sid).is_set(), second=second)
            progress = None
            while True:
                try:
                    progress = next(stream)
                except StopIteration as end:
                    results = end.value
                    break
                if not cleared.is_set():
                    yield format_progress(progress), progress_answers(progress), gr.skip(), gr.skip(), gr.skip()
            if cleared.is_set():  # Clear was pressed during it: nothing of it comes back
                cleared.clear()
                yield "", "", None, "", None
                return
            if not results:
                yield "⏹ Compare was stopped before its first answer.", "", None, "", None
                return
            maps = kept_maps(session, results, self.display(state))
            names, matrix = overlap(session, results)
            files = export_compare(session, results, maps)
        except InputError as e:
            yield f"⚠️ {e}", "", None, "", None
            return
        except Exception as e:  # reported here: on ZeroGPU it would reach the page as a bare class name
            log.exception("compare failed")
            yield f"⚠️ Compare failed: {type(e).__name__}: {e}", "", None, "", None
            return
        answers = "\n\n".join(f"**{registry.label(m)}:** {a}" for m, a, _ in results)
        table = format_compare(results)
        if results[-1][2].stopped or len(results) < progress.total:
            table = f"⏹ Stopped: {len(results)} of {progress.total} methods answered (the last one in part).\n\n" + table
        follow = second_turn_markdown(results)
        yield table, answers, maps or None, overlap_markdown(names, matrix, [m for m, _, _ in results]) + \
            (f"\n\n{follow}" if follow else ""), files
