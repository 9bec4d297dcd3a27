"""Compare: the last question answered again by a chosen set of methods, from the same history, side by
side; what each method kept, as a small map, and how much the kept sets overlap.

"Kept" (for the maps and the overlap): the units sent as themselves (`CropInfo.kept`: VisionZip's
dominant units, the pruning methods' picks, the manual picks), plus VisionZip's contextual targets in
the overlap; the in-LLM methods (FastV, SGL) keep the visual tokens their large model kept in the
compared turn (a merged token counts as its target unit). A method whose record has no kept set (Pool
keeps no unit as itself, Full keeps all) is left out of the overlap. Overlap = Jaccard |A & B| / |A | B| over (crop, unit) of the latest image, between methods
that cut it into the same crops (a tile cap makes the compress-once methods' crops differ from Full's
and FastV's).

"Ask again as turn 2": each method then answers a second question in its own conversation, on the same image:
a compress-once method reuses its kept set and its KV cache, a question-conditioned one (FastV, DART, SGL)
selects again and rebuilds the cache. Per method: the Jaccard overlap of what it kept in the two turns, turn 2's
time to first token, how much of its prompt came from the cache (`SecondTurn`, on the first turn's stats).
"""

from dataclasses import dataclass, field

import numpy as np

from .agreement import agreements_stream
from .errors import InputError
from .methods import registry
from .methods.base import units_view
from .replay import private_session
from .views import drawn


def default_methods(method: str) -> list:
    """The session's method, VisionZip and Full (each once)."""
    return list(dict.fromkeys([method, "visionzip", "full"]))


def checked_methods(session, methods) -> list:
    if methods is None:
        return default_methods(session.settings.method)
    if isinstance(methods, str) or not isinstance(methods, (list, tuple)):
        raise InputError("Compare takes a list of method names, e.g. ['visionzip', 'divprune', 'full'].")
    known = registry.names()
    unknown = [m for m in methods if not isinstance(m, str) or m not in known]
    if unknown:
        raise InputError(f"Unknown method(s) {', '.join(map(repr, unknown))}. Choose from: {', '.join(known)}.")
    if not methods:
        raise InputError("Choose at least one method to compare.")
    records = [registry.get(m) for m in methods]
    for m in records:
        if m.needs_small and session.small is None:
            raise InputError(f"{m.label} needs a small model: start with a small model (e.g. --small-model "
                             "llava-ov-0.5b).")
        if m.kind == registry.MANUAL and not any(session.state.picks.values()):
            raise InputError(f"{m.label} compares the patches picked on the map: pick some first "
                             f"(Method: {m.label}).")
    return list(dict.fromkeys(methods))


@dataclass
class SecondTurn:
    """A method's second turn on the same image (Compare's "ask again as turn 2")."""
    question: str
    answer: str
    stats: object  # its TurnStats
    overlap: float | None  # Jaccard of the units kept in turn 1 and turn 2 (None: the method keeps no unit set)


@dataclass
class Progress:
    """Where a running Compare is: method `index` (0-based) of `total`, its answer so far."""
    method: str
    index: int
    total: int
    answer: str = ""
    done: list = field(default_factory=list)  # [(method, answer, TurnStats)] of the methods finished
    stage: str = "answer"  # "answer", or "agreement": Full's answer being scored under `method`


def compare_stream(session, methods: list | None = None, max_new_tokens: int | None = None,
                   accepted: bool = False, second: str | None = None, agreement: bool = True):
    """`compare`, one method after another: yields a Progress at each method's start and with each piece of
    its answer; returns the results. The session's Stop (`session.stop()`, from any thread or process)
    ends it: inside a method's decode (that method's partial answer is its result, marked stopped) or
    between methods (the rest do not run). The session counts as answering while it runs (memory.py).
    `accepted`: the app accepted it earlier (ChatSession.accept), and a Stop since then cancels it.
    `second`: a second question each method then answers in its own conversation (its `SecondTurn` lands on the
    first turn's stats, `followup`). `agreement`: with Full among the methods, each answer's agreement with Full's
    is scored once all have answered (agreement.py; on each first turn's stats, `agreement`)."""
    st = session.state
    if not st.turns:
        raise InputError("Ask a question first; then it can be compared across methods.")
    methods = checked_methods(session, methods)
    if not accepted:
        session.accept()
    results = []
    try:
        for index, method in enumerate(methods):
            if session.stop_flag.is_set():
                break
            other = private_session(session, method, max_new_tokens)
            progress = Progress(method, index, len(methods), done=list(results))
            yield progress
            for delta in other.ask_stream(st.turns[-1].question, accepted=True):
                progress.answer += delta
                yield progress
            for key, comp in other.state.compressions.items():  # what it compressed is kept for the maps
                st.compressions.setdefault(key, comp)
            if other.last_turn is None:  # stopped before it began
                break
            results.append((method, progress.answer, other.last_turn))
            if other.last_turn.stopped or (second and not (yield from second_turn(other, method, second, progress))):
                break
        if agreement and not session.stop_flag.is_set():
            for method in agreements_stream(session, results):
                yield Progress(method, len(results), len(results), done=list(results), stage="agreement")
    finally:
        while sum(c.nbytes for c in st.compressions.values()) > st.cache_bytes and len(st.compressions) > 1:
            st.compressions.popitem(last=False)
        session.stop_flag.clear()  # a Stop that came as it ended does not reach the next question
        session.answering.clear()
    return results


def second_turn(other, method: str, question: str, progress):
    """`other` answers `question` as its next turn, streamed into `progress` after a "(turn 2)" mark; its
    SecondTurn lands on the first turn's stats. -> whether it finished (not stopped)."""
    first = other.last_turn
    before = kept_units(other, method, first)  # (a method that selects per question selects again in turn 2)
    mark = "\n\n(turn 2) "
    progress.answer += mark
    yield progress
    for delta in other.ask_stream(question, accepted=True):
        progress.answer += delta
        yield progress
    if other.last_turn is first:  # stopped before turn 2 began
        return False
    first.followup = SecondTurn(question, progress.answer.split(mark, 1)[1], other.last_turn,
                                jaccard(before, kept_units(other, method, other.last_turn)))
    return not other.last_turn.stopped


def compare(session, methods: list | None = None, max_new_tokens: int | None = None, second: str | None = None,
            agreement: bool = True) -> list:
    """Re-answer the last question once per method from the same history (no KV cache; the session's
    conversation and settings unchanged; the images compressed for a method join its compression
    cache). Default: the session's method, VisionZip and Full. -> [(method, answer, TurnStats)]; fewer
    when a Stop ended it (the last one then says `stopped`). `second`: each method then answers it as turn 2
    (`stats.followup`: a SecondTurn). With Full among them, `stats.agreement` (agreement.py) on each."""
    stream = compare_stream(session, methods, max_new_tokens, second=second, agreement=agreement)
    while True:
        try:
            next(stream)
        except StopIteration as end:
            return end.value


def compare_with_full(session, max_new_tokens: int | None = None) -> dict:
    """{method: (answer, TurnStats)} for the session's method and the full model (see `compare`)."""
    method = session.settings.method
    methods = ["full", "visionzip"] if registry.get(method).kind == registry.FULL else [method, "full"]
    return {m: (a, t) for m, a, t in compare(session, methods, max_new_tokens=max_new_tokens)}


def kept_view(session, method: str, stats=None):
    """(PIL image, Compression to draw in the "kept" view) of the latest image for `method` as compared
    (`stats`: its TurnStats, for FastV's and SGL's kept tokens), or None. No model runs where the
    compression is cached (after `compare`, it is)."""
    key = session.state.last_image_key
    if key is None:
        return None
    record = registry.get(method)
    if record.kind == registry.MANUAL and session.state.picks.get(key):
        return drawn(session.image(key), session.pick_view(key))
    comp = session.compression(key, method=session.image_method(key, record.encodes(session.settings)))
    g = getattr(stats, "guidance", None)
    if record.kind == registry.IN_LLM and g is not None and key in g.image_spans:
        start, end = g.image_spans[key]
        kept = np.zeros(len(g.importance), dtype=bool)
        kept[g.kept] = True
        comp = tokens_view(comp, kept[start:end], method)
    return drawn(session.image(key), comp)


def tokens_view(comp, kept_tokens: np.ndarray, method: str):
    """A Compression whose kept view shows which of its tokens (`kept_tokens`: (num_tokens,) bool) an
    in-LLM method kept: their units as themselves (a kept contextual token: its whole group)."""
    units = [set() for _ in comp.crops]
    for crop, patch, ctx in comp.token_map[kept_tokens]:
        if ctx >= 0:
            units[crop].update(np.flatnonzero(comp.crops[crop].groups == ctx).tolist())
        elif patch >= 0:  # (not a newline token)
            units[crop].add(int(patch))
    return units_view(comp, units, method, num_tokens=int(kept_tokens.sum()))


def kept_units(session, method: str, stats=None) -> set | None:
    """{(crop, unit)} a method kept of the latest image (see the module's note), or None (Pool, Full)."""
    key, record = session.state.last_image_key, registry.get(method)
    if not record.kept_set or key is None:
        return None
    if record.kind == registry.IN_LLM:  # the tokens kept: a merged token counts as its target
        comp, g = session.compression(key, method=record.encodes(session.settings)), stats.guidance
        start, end = g.image_spans[key]
        rows = comp.token_map[g.kept[(g.kept >= start) & (g.kept < end)] - start]
        return {(int(crop), int(patch)) for crop, patch, _ in rows if patch >= 0}
    comp = kept_view(session, method, stats)[1]
    units = {(i, int(u)) for i, c in enumerate(comp.crops) for u in c.kept}
    return units | {(i, int(t)) for i, c in enumerate(comp.crops) for t in c.targets if t >= 0}


def jaccard(a: set | None, b: set | None) -> float | None:
    """The Jaccard overlap of two kept sets (None: a method without one)."""
    return None if a is None or b is None else len(a & b) / max(1, len(a | b))


def second_turn_markdown(results: list) -> str:
    """The table of Compare's second turn: per method, what it kept again and what turn 2 cost."""
    rows = [(m, t.followup) for m, _, t in results if t.followup is not None]
    if not rows:
        return ""
    out = [f"**Ask again as turn 2:** {rows[0][1].question}", "",
           "| method | kept in both turns (Jaccard) | turn 2: first token | prompt tokens from the cache | selection |",
           "|---|---|---|---|---|"]
    for method, f in rows:
        t = f.stats
        kind = registry.get(method).kind
        selection = {registry.IN_LLM: "again, for the new question (inside the LLM)",
                     registry.QUESTION: "again, for the new question (KV rebuilt from the image)"}.get(
            kind, "reused (compressed once)")
        overlap_cell = "—" if f.overlap is None else f"{f.overlap:.2f}"
        out.append(f"| {registry.label(method)} | {overlap_cell} | {t.ttft_s * 1000:.0f} ms | "
                   f"{t.prompt_tokens - t.prefill_tokens} of {t.prompt_tokens} | {selection} |")
    return "\n".join(out)


def overlap(session, results: list) -> tuple:
    """-> (methods with a kept set, matrix of Jaccard overlaps: None where their crops differ)."""
    sets, layouts = {}, {}
    for method, _, stats in results:
        units = kept_units(session, method, stats)
        if units is not None:
            sets[method] = units
            comp = kept_view(session, method, stats)[1]
            layouts[method] = [(c.grid, tuple(np.round(c.box, 1))) for c in comp.crops]
    names = list(sets)
    matrix = [[len(sets[a] & sets[b]) / max(1, len(sets[a] | sets[b])) if layouts[a] == layouts[b] else None
               for b in names] for a in names]
    return names, matrix


def overlap_markdown(names: list, matrix: list, compared: list = ()) -> str:
    """The Jaccard table, and one line for the compared methods it leaves out (Pool, Full) and why."""
    out = [registry.get(m).not_in_overlap for m in compared if registry.get(m).not_in_overlap]
    note = f"\n\n_Not in the overlap: {'; '.join(out)}._" if out else ""
    if len(names) < 2:
        return "_The overlap of kept sets needs two methods that keep units as themselves (not Full, not Pool)._" \
            if not out else f"_The overlap of kept sets needs two methods that keep units as themselves: {'; '.join(out)}._"
    head = "| kept overlap (Jaccard) | " + " | ".join(registry.label(n) for n in names) + " |\n|---|" \
        + "---|" * len(names)
    rows = [f"| {registry.label(a)} | " + " | ".join("—" if v is None else f"{v:.2f}" for v in row) + " |"
            for a, row in zip(names, matrix)]
    if any(v is None for row in matrix for v in row):
        note = "\n\n— : different crops (the tile cap applies to compress-once methods, not to Full or FastV)." + note
    return "\n".join([head] + rows) + note
