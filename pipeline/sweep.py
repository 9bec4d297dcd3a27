"""Budget sweep: the last question answered again by chosen methods at several budgets (visual tokens per crop)
and by Full, each answer's agreement with Full's (agreement.py) and time to first token, as a table and a plot.

A budget B per crop is, for a compress-once or question-conditioned method, B = dominant + contextual split as
VisionZip's 54 + 10 (round(B x 54 / 64) dominant, the rest contextual); for an in-LLM method its keep share
(`Method.share_knob`) = B x crops / the image's full visual tokens. A budget a method cannot take (above a
crop's tokens) is a point with a note, not an error. The tower runs once per image for every budget (and
every method that reads the same tower layers): its output is kept from the first encode and each budget
selects from it (`encode_image(vision=...)`).
"""

import time
from dataclasses import dataclass, field

from .agreement import Agreement, agreement_of, forced_logprobs
from .compare import checked_methods
from .compress import encode_image, method_knobs
from .errors import InputError
from .methods import registry
from .replay import private_session

DEFAULT_BUDGETS = (16, 32, 64, 128, 192)


@dataclass
class SweepPoint:
    method: str
    budget: int | None  # visual tokens per crop asked for (None: Full)
    visual_tokens: int = 0  # what the LLM received (an in-LLM method: what it kept from its layer K on)
    full_tokens: int = 0
    ttft_s: float = 0.0  # time to first token, the shared tower's first pass included where it ran for this point
    answer: str = ""
    agreement: Agreement | None = None
    note: str = ""  # why the point has no answer


@dataclass
class Sweep:
    question: str
    image: str | None  # the latest image's key
    methods: list
    budgets: list
    points: list = field(default_factory=list)
    tower_passes: int = 0  # the vision tower's runs for the compressed images (shared across budgets)


@dataclass
class SweepProgress:
    method: str
    budget: int | None
    index: int
    total: int


def budget_settings(session, method: str, budget: int) -> dict:
    """set_method's keywords for `budget` visual tokens per crop of the latest image."""
    record = registry.get(method)
    if record.kind in registry.BUDGETED:
        dominant = max(1, round(budget * 54 / 64))
        return {"dominant": dominant, "contextual": budget - dominant}
    if record.kind == registry.IN_LLM and record.share_knob:
        key = session.state.last_image_key
        full = session.compression(key, method="full")
        return {record.share_knob: min(1.0, budget * len(full.crops) / full.full_tokens)}
    raise InputError(f"{record.label} has no budget to sweep (choose compress-once, question or in-LLM methods).")


def checked_budgets(budgets) -> list:
    if budgets is None:
        return list(DEFAULT_BUDGETS)
    if isinstance(budgets, (str, bytes)) or not isinstance(budgets, (list, tuple)) or not budgets:
        raise InputError("Budgets are a list of visual tokens per crop, e.g. [16, 32, 64, 128, 192].")
    out = []
    for b in budgets:
        if isinstance(b, bool) or not isinstance(b, (int, float)) or b != int(b) or not 1 <= b <= 4096:
            raise InputError(f"A budget is a whole number of visual tokens per crop from 1 to 4096 (got {b!r}).")
        out.append(int(b))
    return sorted(set(out))


def encode_shared(session, other, method: str, towers: dict) -> int:
    """Encode the images `other` will send for `method` at its settings, from a tower output shared across
    budgets (`towers`, by image and captured layers) -> the tower passes it took (0 or more). The compressions
    join the session's cache, where `other` and the scoring find them."""
    record, st, vlm = registry.get(method), other.state, other.vlm
    if record.kind not in registry.BUDGETED:
        return 0
    s, passes = st.settings, 0
    knobs = method_knobs(method, s.knobs)
    layers = tuple(record.attention_layers(vlm.family, knobs)) if record.attention_layers else ()
    for key in st.pending:
        ck = (key, other.images.method_key(st, key, method), vlm.name)
        if ck in session.state.compressions:
            continue
        vision = towers.get((key, layers, s.max_tiles))
        passes += vision is None
        with vlm.encode_lock:
            comp = encode_image(vlm, other.image(key), method, s.dominant, s.contextual, max_tiles=s.max_tiles,
                                knobs=s.knobs, question=st.question, vision=vision, keep_vision=True)
        comp.features = comp.features.cpu()
        towers[(key, layers, s.max_tiles)] = comp.vision
        if record.kind != registry.QUESTION:
            comp.vision = None  # (kept in `towers` while the sweep runs)
        session.state.compressions[ck] = st.compressions[ck] = comp
    return passes


def run_point(session, method: str, budget: int | None, towers: dict, max_new_tokens: int | None,
              full: SweepPoint | None, full_ids: list) -> tuple:
    """One method at one budget -> (SweepPoint, its answer ids, its log-probabilities of Full's answer, passes)."""
    settings = {} if budget is None else budget_settings(session, method, budget)
    point = SweepPoint(method, budget)
    try:
        other = private_session(session, method, max_new_tokens, **settings)
    except InputError as e:
        point.note = str(e)
        return point, [], [], 0
    other.state.question = session.state.turns[-1].question
    t0 = time.perf_counter()
    passes = encode_shared(session, other, method, towers)
    encode_s = time.perf_counter() - t0
    for _ in other.ask_stream(session.state.turns[-1].question, accepted=True):
        pass
    stats = other.last_turn
    if stats is None or stats.stopped:
        point.note = "stopped"
        return point, [], [], passes
    point.answer, point.full_tokens = other.state.turns[-1].answer, stats.visual_tokens_full
    g = stats.guidance
    point.visual_tokens = len(g.kept) if g is not None and not stats.early_exit else stats.visual_tokens
    point.ttft_s = stats.ttft_s + encode_s
    ids = stats.answer_ids
    logprobs = forced_logprobs(session, method, full_ids if full is not None else ids, **settings)
    return point, ids, logprobs, passes


def sweep_stream(session, methods: list, budgets: list | None = None, max_new_tokens: int | None = None,
                 accepted: bool = False):
    """Yields a SweepProgress before each point; returns the Sweep. Full runs first (the reference); a Stop ends
    it (the points so far stay). `accepted`: as compare_stream's."""
    st = session.state
    if not st.turns:
        raise InputError("Ask a question first; then sweep budgets for it.")
    methods = [m for m in checked_methods(session, methods) if m != "full"]
    for m in methods:
        if registry.get(m).kind not in (*registry.BUDGETED, registry.IN_LLM):
            raise InputError(f"{registry.label(m)} has no budget to sweep (Manual sends the picked patches).")
    budgets = checked_budgets(budgets)
    sweep = Sweep(st.turns[-1].question, st.last_image_key, methods, budgets)
    towers, total = {}, 1 + len(methods) * len(budgets)
    if not accepted:
        session.accept()
    try:
        yield SweepProgress("full", None, 0, total)
        full, full_ids, lps, _ = run_point(session, "full", None, towers, max_new_tokens, None, [])
        if full.note:
            return sweep
        full_lp = sum(lps) / len(lps) if lps else None
        full.agreement = agreement_of(full.answer, full_ids, lps, full.answer, full_ids, full_lp)
        sweep.points.append(full)
        for i, (method, budget) in enumerate((m, b) for m in methods for b in budgets):
            if session.stop_flag.is_set():
                break
            yield SweepProgress(method, budget, i + 1, total)
            point, ids, lps, passes = run_point(session, method, budget, towers, max_new_tokens, full, full_ids)
            sweep.tower_passes += passes
            if not point.note:
                point.agreement = agreement_of(point.answer, ids, lps, full.answer, full_ids, full_lp)
            sweep.points.append(point)
    finally:
        while sum(c.nbytes for c in st.compressions.values()) > st.cache_bytes and len(st.compressions) > 1:
            st.compressions.popitem(last=False)
        session.stop_flag.clear()
        session.answering.clear()
    return sweep


def sweep(session, methods: list, budgets: list | None = None, max_new_tokens: int | None = None) -> Sweep:
    """`sweep_stream` run to the end."""
    stream = sweep_stream(session, methods, budgets, max_new_tokens)
    while True:
        try:
            next(stream)
        except StopIteration as end:
            return end.value
