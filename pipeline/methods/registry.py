"""One Method record per method, registered by the method's own file (`register(Method(...))`).

Everything outside a method's file reads the record: the app's method choice and labels, the settings
check, how a method's images are encoded, whether it has a kept set for Compare's overlap, the words
the maps and their captions use, its rows in the turn's stats, which engines can answer it. No other
file tests a method's name. A method registered at run time (a test's throw-away one, a plugin)
appears everywhere the built-in ones do.
"""

from dataclasses import dataclass, field
from typing import Callable

from ..config import checked
from ..errors import InputError

# what a method is (Method.kind)
FULL = "full"  # every visual token, as the checkpoint sends them
COMPRESS_ONCE = "compress-once"  # a text-agnostic selection per crop (`pick`): each image compressed once
IN_LLM = "in-llm"  # pruning inside the language model, decided per question (`answer`: a turn runner)
MANUAL = "manual"  # the units a person picks on the map
QUESTION = "question"  # a selection per crop conditioned on the turn's question (`pick` with `relevance`):
# every image is selected again for each question (CDPruner)
BUDGETED = (COMPRESS_ONCE, QUESTION)  # the kinds that pick per crop at the budget dominant + contextual


@dataclass(frozen=True)
class MapWords:
    """What the maps and the click readout call a method's units."""
    kept: str = "kept"  # a unit sent as itself: "dominant" (VisionZip), "picked" (Manual)
    clear: str = "clear: sent as itself"  # the kept view's legend
    faded: str = "faded: not sent as itself"
    not_sent: str = "not sent"  # a unit the method dropped
    merged: str = "merged"  # the groups view's verb: "pooled" where a token is its cell's mean (Pool)
    tokens: str = "patches"  # what its tokens are, in the map's caption: "diverse patches (max-min distance)"


@dataclass(frozen=True)
class Knob:
    """One number a method takes: the settings check reads its range, the page draws its slider from it."""
    name: str  # the setting's name (a Settings field, or a key of Settings.knobs) and set_method's keyword
    label: str  # as the page names it, and as a message about a wrong value does
    low: float
    high: float
    default: float
    step: float = 0.01
    integer: bool = False
    above_zero: str = ""  # must be above `low`'s 0: why, for the message ("a share of the visual tokens")
    alias: str = ""  # another keyword that sets it when this method is chosen (FastV's keep_ratio)
    help: str = ""

    def checked(self, value):
        """`value` as the setting takes it, or an InputError saying what is wrong with it."""
        value = checked(self.label, value, self.low, self.high, integer=self.integer)
        if self.above_zero and value <= 0:
            raise InputError(f"The {self.label} must be above 0 ({self.above_zero}).")
        return value


@dataclass(frozen=True)
class Method:
    name: str  # the API's and the UI values' name
    label: str  # as the page shows it
    kind: str  # FULL, COMPRESS_ONCE, QUESTION, IN_LLM or MANUAL
    pick: Callable | None = None  # COMPRESS_ONCE, QUESTION: (CropInput) -> Pick (methods/base.py)
    answer: Callable | None = None  # IN_LLM: (turn.TurnContext) -> a generator of text deltas
    # that returns the answer ids
    images: str | Callable | None = None  # the method its images are encoded as: None (itself), a name (FastV:
    # "full"), or (settings) -> a name (SGL: its `sgl_tokens`)
    fallback: str | None = None  # MANUAL: the method an image without picks is sent as
    engines: tuple | None = None  # the engines that can answer it (by name); None: any (it sends compressed
    # images, which any engine takes as prompt embeddings)
    kept_set: bool = True  # keeps units as themselves (Compare's overlap of kept sets)
    not_in_overlap: str = ""  # why it is left out of the overlap, where it is
    needs_small: bool = False  # answers with a small model beside the large one (SGL)
    knobs: tuple = ()  # its own settings (Knob)
    share_knob: str = ""  # IN_LLM: the knob holding the share of visual tokens it keeps (a sweep's budget sets it)
    words: MapWords = field(default_factory=MapWords)
    caption: Callable | None = None  # (Compression) -> the map's caption; None: "Label: n <tokens> = n of N"
    stats_rows: Callable | None = None  # (TurnStats) -> [(name, value)] of its own, shown after the model's row
    attention_layers: Callable | None = None  # COMPRESS_ONCE: (family, knobs) -> tower layers (0-based) whose
    # global attention per unit its `pick` reads (CropInput.received); None: VisionZip's statistic alone
    relevance: Callable | None = None  # QUESTION: (vlm, VisionOutput, question) -> [(N,) per crop]: each patch's
    # relevance to the question, as its `pick` reads it (CropInput.relevance)
    kinds: dict | None = None  # what its kept patches are, {Pick.kinds value: name} (HiPrune's three): the map
    # colours each
    doc: str = ""  # one line: what it does

    def encodes(self, settings) -> str:
        """The method this method's images are encoded as, under `settings`."""
        if self.images is None:
            return self.name
        return self.images if isinstance(self.images, str) else self.images(settings)


_REGISTRY: dict = {}  # name -> Method, in registration order (the app lists them in that order)


def register(method: Method) -> Method:
    """Add a method (a method's file calls this once, at import). A name registered again is replaced."""
    if method.kind not in (FULL, COMPRESS_ONCE, QUESTION, IN_LLM, MANUAL):
        raise ValueError(f"unknown kind {method.kind!r} for method {method.name!r}")
    if method.kind in BUDGETED and method.pick is None or method.kind == IN_LLM and method.answer is None:
        raise ValueError(f"method {method.name!r} ({method.kind}) needs its "
                         f"{'pick' if method.kind in BUDGETED else 'answer'} function")
    if method.kind == QUESTION and method.relevance is None:
        raise ValueError(f"method {method.name!r} ({method.kind}) needs its relevance function")
    _REGISTRY[method.name] = method
    return method


def unregister(name: str):
    """Remove a method registered at run time (a test's throw-away one)."""
    _REGISTRY.pop(name, None)


def names() -> tuple:
    return tuple(_REGISTRY)


def all_methods() -> list:
    return list(_REGISTRY.values())


def of_kind(kind: str) -> tuple:
    """The names of the methods of one kind, in registration order."""
    return tuple(m.name for m in _REGISTRY.values() if m.kind == kind)


def get(name) -> Method:
    """The record of `name`; an InputError naming the choices for an unknown one."""
    if isinstance(name, str) and name in _REGISTRY:
        return _REGISTRY[name]
    raise InputError(f"Unknown method {name!r}. Choose one of: {', '.join(_REGISTRY)}.")


def knobs() -> list:
    """Every registered method's knobs, each name once, in registration order."""
    out = {}
    for m in _REGISTRY.values():
        for k in m.knobs:
            out.setdefault(k.name, k)
    return list(out.values())


def label(name: str) -> str:
    return _REGISTRY[name].label if name in _REGISTRY else name
