"""The app's event handlers: one plain method per event, on one object holding what they share (the
models, this process's KV store, the image memory budget, the example cache). Each takes and returns
the tab's plain state (AppState), so on ZeroGPU the GPU ones can run in another process. The events are
grouped in files (chat_events.py, map_events.py, compare_events.py); the layout (layout.py) wires them;
tests can call them alone."""

import logging
import os
from dataclasses import dataclass

import gradio as gr

from pipeline import ChatSession, ChatState, KVStore
from pipeline.compare import tokens_view
from pipeline.examples import ExampleCache
from pipeline.heatmap import Display, render_map
from pipeline.kvstore import default_budget
from pipeline.memory import MemoryBudget
from pipeline.methods import registry
from pipeline.views import drawn

from .chat_events import ChatEvents
from .compare_events import CompareEvents
from .map_events import MapEvents
from .sweep_events import SweepEvents
from .text import NO_IMAGE, VIEW_NAMES

try:  # Hugging Face ZeroGPU (app.py imports it before torch, as the package asks)
    import spaces
except ImportError:
    spaces = None

log = logging.getLogger("zipchat")


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
    map_frame: int | None = None  # of a clip, the frame the map shows alone (0-based; None: all its frames)
    display: tuple | None = None  # the map's box on the page, [width, height] in CSS pixels (heatmap.Display.of)


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


class Handlers(ChatEvents, MapEvents, CompareEvents, SweepEvents):
    """`max_tiles`: the tiles per image the compress-once methods encode by default (tiling families);
    `image_memory`: bytes of images and compressed features all conversations keep together
    (memory.py); `examples`: the example images compressed ahead (examples.py); `example_paths`: their
    files (on ZeroGPU the first answer in each worker compresses them, after the person's answer)."""

    def __init__(self, vlm, small=None, max_new_tokens: int = 256, method_default: str = "visionzip",
                 session_options: dict | None = None, max_tiles: int = 0, image_memory: int = 1 << 30,
                 examples: ExampleCache | None = None, example_paths=()):
        self.vlm, self.small = vlm, small
        self.takes_video = vlm.family.takes_video  # (the chat then takes clips too)
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
        self.compare_answers = gpu(duration=lambda state, methods=None, second=None: gpu_seconds(
            state, self.big, answers=(len(methods) if isinstance(methods, (list, tuple)) and methods else 3)
            * (2 if isinstance(second, str) and second.strip() else 1))
        )(self.compare_answers)
        self.sweep_budgets = gpu(duration=lambda state, methods=None, budgets=None: gpu_seconds(
            state, self.big, answers=2 * (1 + (len(methods) if isinstance(methods, (list, tuple)) and methods else 2)
                                          * (len(budgets) if isinstance(budgets, (list, tuple)) and budgets else 5)))
        )(self.sweep_budgets)

    # ---- helpers -------------------------------------------------------------------------------
    def session_for(self, state: AppState) -> ChatSession:
        return ChatSession.resume(state.chat, self.models, kv=self.kv, **self.options)

    def new_state(self, settings: dict) -> AppState:
        session = ChatSession(self.vlm, small=self.small, max_new_tokens=self.max_new_tokens, kv=self.kv,
                              **self.options)
        session.set_method(**settings)
        return AppState(session.state)

    @staticmethod
    def set_display(state: AppState | None, box):
        """The page measured the map's box (as a message was sent): the maps are drawn for it from now on."""
        if state is not None:
            state.display = tuple(box) if isinstance(box, (list, tuple)) else None
        return state

    @staticmethod
    def display(state: AppState | None) -> Display:
        return Display.of(state.display if state is not None else None)

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
        frame = state.map_frame if state is not None else None
        shown = session.current_view(compress=False, key=key, frame=frame) if session else None
        guidance = session.guidance_view(key, frame) if shown else None
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
        if comp.times is not None and frame is not None and 0 <= frame < len(comp.times):
            caption += (f"; the map shows {comp.frame_label(frame)} of {len(comp.times) * comp.frames_per_crop} "
                        f"({comp.times[frame]:.1f} s)")
        if len(state.chat.images) > 1:
            caption = f"{self.image_name(state, key).capitalize()}: {caption}"
        if guidance is not None:  # FastV / SGL: what the large model kept of this image in the last turn
            g = session.last_turn.guidance
            caption += (f"; {registry.label(g.source)} kept {int(guidance[3].sum())} of them from layer {g.prune_layer} "
                        "in the last turn (decided per question)")
            if view == "kept":  # the kept view draws those: the rest faded, as for every other method
                comp = tokens_view(comp, guidance[3], g.source)
        if comp.method == session.settings.method and session.method.kind == registry.MANUAL and not comp.num_tokens:
            # no picks: draw what is sent instead
            comp = drawn(session.image(key), session.compression(key, method=session.method.fallback), frame)[1]
        return (render_map(image, comp, view, *extra, mark=mark, source=source, display=self.display(state)), caption,
                gr.update(choices=choices, value=view))
