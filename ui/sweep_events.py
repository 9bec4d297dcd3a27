"""The budget sweep's events (Compare's tab): the last question answered by the chosen methods at several budgets
and by Full, streamed as a progress line, then its table, its plot and its files (JSON, CSV, PNG). Methods of
Handlers (handlers.py); the work is pipeline/sweep.py's, the files pipeline/export.py's."""

import logging
import tempfile

from pipeline import InputError
from pipeline.export import save_plot, sweep_record, write_files
from pipeline.methods import registry
from pipeline.stopflag import AnsweringFlag, ClearedFlag
from pipeline.sweep import sweep_stream

from .text import compare_choices

log = logging.getLogger("zipchat")
SWEEP_BUDGETS = (16, 32, 64, 128, 192)  # the page's choices (the API takes any whole numbers)


def format_sweep_progress(p) -> str:
    at = "" if p.budget is None else f" at {p.budget} tokens per crop"
    return f"**Sweep: {registry.label(p.method)}{at}, {p.index + 1} of {p.total}** — Stop ends it."


def format_sweep(result) -> str:
    """The sweep's table: one row per point, Full first."""
    out = [f"**Budget sweep:** {result.question} — the vision tower ran {result.tower_passes} time(s) for "
           f"{sum(1 for p in result.points if p.method != 'full')} compressed point(s).", "",
           "| method | budget / crop | visual tokens | first token | agreement with Full | parts from Full | F1 vs Full |",
           "|---|---|---|---|---|---|---|"]
    for p in result.points:
        a = p.agreement
        if p.note:
            out.append(f"| {registry.label(p.method)} | {p.budget} | — | — | — | — | {p.note} |")
            continue
        out.append(f"| {registry.label(p.method)} | {'all' if p.budget is None else p.budget} | {p.visual_tokens} | "
                   f"{p.ttft_s * 1000:.0f} ms | {'—' if a is None or a.share is None else f'{a.share:.2f}'} | "
                   f"{'—' if a is None else 'never' if a.parting is None else f'token {a.parting + 1}'} | "
                   f"{'—' if a is None else f'{a.f1:.2f}'} |")
    return "\n".join(out)


def checked_budget_choices(budgets) -> list | None:
    """The page's checkbox values (numbers, or their text) -> ints; None: the defaults."""
    if budgets is None:
        return None
    if isinstance(budgets, (str, bytes)) or not isinstance(budgets, (list, tuple)):
        raise InputError("Budgets are a list of visual tokens per crop, e.g. [16, 32, 64].")
    out = []
    for b in budgets:
        try:
            out.append(int(b) if isinstance(b, str) and b.strip().isdigit() else b)
        except ValueError:
            out.append(b)
    return out


class SweepEvents:
    def sweep_budgets(self, state, methods=None, budgets=None):
        """The last question with each chosen method (default: this chat's and VisionZip) at each budget (default
        16, 32, 64, 128, 192 visual tokens per crop) and with Full: the progress while it runs, then -> (table,
        plot, [JSON, CSV, plot PNG files]). Stop ends it (the points so far stay). Nothing of the conversation
        changes."""
        if state is None or not state.chat.turns:
            yield "_Ask a question first, then sweep budgets for it._", None, None
            return
        sid = state.chat.session_id
        cleared = ClearedFlag(sid)
        try:
            session = self.session_for(state)
            chosen = compare_choices(methods) or [session.settings.method, "visionzip"]
            chosen = [m for m in dict.fromkeys(chosen) if registry.get(m).kind not in (registry.FULL, registry.MANUAL)]
            if not chosen:
                raise InputError("Choose a method with a budget to sweep (not Full or Manual).")
            stream = sweep_stream(session, chosen, checked_budget_choices(budgets), accepted=AnsweringFlag(sid).is_set())
            while True:
                try:
                    progress = next(stream)
                except StopIteration as end:
                    result = end.value
                    break
                if not cleared.is_set():
                    yield format_sweep_progress(progress), None, None
            if cleared.is_set():
                cleared.clear()
                yield "", None, None
                return
            if not result.points:
                yield "⏹ The sweep was stopped before Full answered.", None, None
                return
            folder = tempfile.mkdtemp(prefix="zipchat-sweep-")
            files = write_files(sweep_record(session, result), folder, "sweep") + [save_plot(result, f"{folder}/sweep.png")]
        except InputError as e:
            yield f"⚠️ {e}", None, None
            return
        except Exception as e:  # reported here: on ZeroGPU it would reach the page as a bare class name
            log.exception("sweep failed")
            yield f"⚠️ The sweep failed: {type(e).__name__}: {e}", None, None
            return
        table = format_sweep(result)
        if len(result.points) < 1 + len(result.methods) * len(result.budgets):
            table = "⏹ Stopped: the points so far.\n\n" + table
        yield table, files[-1], files
