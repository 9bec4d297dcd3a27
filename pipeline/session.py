"""ChatSession: one conversation about images and clips, the public API over its parts (docs/architecture.md).
The state (state.py) is the conversation itself and pickles (ZeroGPU); the session binds it to this process's
models (`resume`). The parts: images and compressions (conversation.py), the prompt plan (prompt.py), the
engines (engines/), the turn's decode loop and stats (turn.py), the maps' views (views.py); the method's record
(methods/registry.py) says how images are encoded and whether it answers a turn its own way."""

import threading
import time
from contextlib import nullcontext

from .config import UNSET, Sampling
from .conversation import Images
from .engines.base import Request
from .engines.transformers import TransformersEngine
from .errors import InputError
from .kvstore import KVStore
from .methods import manual, registry
from .methods.sgl import check_pair
from .prompt import plan as plan_prompt
from .questions import checked_question
from .settings import changed
from .state import ChatState, Settings, Turn
from .stopflag import AnsweringFlag, StopFlag
from . import views
from .turn import TurnContext, TurnStats, decode, new_stats, record_turn


class ChatSession:
    def __init__(self, vlm, method: str = "full", dominant: int = 54, contextual: int = 10,
                 max_new_tokens: int = 256, sampling: Sampling | None = None, reuse_cache: bool = True,
                 cache_bytes: int = 1 << 30, small=None, keep_ratio: float | None = None, prune_layer: float = 0.4,
                 early_exit: float | None = 0.8, sgl_tokens: str = "full", stop_at_eos: bool = True,
                 state: ChatState | None = None, kv: KVStore | None = None, context_window: int | None = None,
                 max_tiles: int = 0, edge_fill: float = 0.75, examples=None, fastv_layer: int = 2,
                 fastv_keep_ratio: float | None = None, stop_flag: StopFlag | None = None, engine=None,
                 clip_frames: int | None = None):
        self.vlm, self.small = vlm, small
        self.engine = engine  # None: zipchat's decoder; an engine (engines/: vLLM) for the methods it can answer
        self.stop_at_eos = stop_at_eos  # False: always max_new_tokens (benchmarks on random weights)
        self.reuse_cache = reuse_cache
        self.kv = kv if kv is not None else KVStore()  # a private store unless the app shares one
        self.decoders = {"large": TransformersEngine(vlm, self.kv, "large")}  # zipchat's decoder, per model
        if small is not None:
            check_pair(small, vlm)
            self.decoders["small"] = TransformersEngine(small, self.kv, "small")
        self.context_window = context_window or vlm.context_window
        if engine is not None and engine.max_model_len():  # the server may hold fewer positions than the model
            self.context_window = min(self.context_window, engine.max_model_len())
        self.edge_fill = edge_fill  # a turn that must drop turns drops down to this share of the window (prompt.py)
        self.images = Images(vlm, small, examples, clip_frames)  # (clip_frames: a clip's frames; None: by device)
        self._lock = threading.Lock()
        if state is None:
            self.state = ChatState(model=vlm.name, small=small.name if small else None, cache_bytes=cache_bytes,
                                   settings=Settings(sampling=sampling or Sampling()))
            self.set_method(method, dominant, contextual, keep_ratio=keep_ratio, prune_layer=prune_layer,
                            early_exit=early_exit, sgl_tokens=sgl_tokens, max_new_tokens=max_new_tokens,
                            max_tiles=max_tiles, fastv_layer=fastv_layer, fastv_keep_ratio=fastv_keep_ratio)
        elif state.model != vlm.name or state.small != (small.name if small else None):
            raise ValueError(f"this state belongs to {state.model} (+ {state.small}), not {vlm.name}")
        else:
            self.state = state
        self.stop_flag = stop_flag or StopFlag(self.state.session_id)  # (Compare's sessions share their parent's)
        self.answering = AnsweringFlag(self.state.session_id)  # seen by other processes (the app's next message)

    @classmethod
    def resume(cls, state: ChatState, models: dict, kv: KVStore | None = None, **options) -> "ChatSession":
        """Bind a conversation's state to the models loaded in this process (looked up by name)."""
        return cls(models[state.model], small=models[state.small] if state.small else None, state=state, kv=kv,
                   **options)

    @property
    def settings(self) -> Settings:
        return self.state.settings

    @property
    def last_turn(self) -> TurnStats | None:
        return self.state.last_turn

    @property
    def examples(self):
        return self.images.examples

    # ---- configuration -------------------------------------------------------------------------
    def set_method(self, method: str, dominant: int | None = None, contextual: int | None = None,
                   keep_ratio: float | None = None, prune_layer: float | None = None, early_exit=UNSET,
                   sgl_tokens: str | None = None, max_new_tokens: int | None = None, temperature: float | None = None,
                   top_p: float | None = None, max_tiles: int | None = None, fastv_layer: int | None = None,
                   fastv_keep_ratio: float | None = None, **knobs):
        """Applies from the next turn; images are re-compressed once for a new method or budget.
        Values left out (None) keep their current value; `early_exit=None` disables early exit.
        `keep_ratio` is SGL's, or FastV's when the method is "fastv" and `fastv_keep_ratio` is left out;
        `knobs`: the settings of methods registered elsewhere, by their knobs' names (registry.Knob).
        Every value is checked here (the app's events are public API): nothing changes on a bad one."""
        self.state.settings = changed(self.settings, self.vlm.family, self.small is not None, method, dominant,
                                      contextual, keep_ratio=keep_ratio, prune_layer=prune_layer, early_exit=early_exit,
                                      sgl_tokens=sgl_tokens, max_new_tokens=max_new_tokens, temperature=temperature,
                                      top_p=top_p, max_tiles=max_tiles, fastv_layer=fastv_layer,
                                      fastv_keep_ratio=fastv_keep_ratio, knobs=knobs)

    @property
    def method(self) -> registry.Method:  # the current method's record (methods/registry.py)
        return registry.get(self.settings.method)

    @property
    def visual_method(self) -> str:
        """How images are encoded for the LLM(s): as the method's record says (FastV: Full; SGL: `sgl_tokens`)."""
        return self.method.encodes(self.settings)

    def image_method(self, key: str, method: str | None = None) -> str:
        """How image `key` is encoded for `method` (default: the current one): Manual's unpicked as VisionZip's."""
        return self.images.method_for(self.state, key, method or self.visual_method)

    def reset(self):  # forget the conversation, images and caches (the settings stay)
        st = self.state
        self.kv.drop(st.session_id)
        self.state = ChatState(model=st.model, small=st.small, settings=st.settings, session_id=st.session_id,
                               cache_bytes=st.cache_bytes)

    def stop(self):
        """Ask a running ask_stream (in this process or another) to stop after the current token, or a
        question accepted and still waiting (see `accept`) to be cancelled before it starts."""
        self.stop_flag.set()

    def accept(self):
        """A question is accepted (the app's queue will answer it): a Stop from now on cancels it, an
        older Stop does not; the session counts as answering until `ask_stream` ends."""
        self.stop_flag.clear()
        self.answering.set()

    def check_images(self):
        """A conversation whose images were dropped to free memory (memory.py) starts over (an InputError)."""
        if self.state.images_dropped:
            self.kv.drop(self.state.session_id)
        self.images.check_kept(self.state)

    # ---- images --------------------------------------------------------------------------------
    def add_image(self, image, compress: bool = True):
        """Check an image; it joins the next question. With `compress` it is encoded now (else at the next
        turn). Nothing changes if the image is refused. -> its Compression (None without `compress`)."""
        self.check_images()
        return self._added(self.images.keep(self.state, image), compress)

    def add_video(self, source, num_frames: int | None = None, compress: bool = True):
        """`add_image` for a clip (MP4, WebM, MOV, animated GIF or WebP) at `num_frames` (None: `clip_frames`)."""
        self.check_images()
        return self._added(self.images.keep_clip(self.state, source, num_frames), compress)

    def _added(self, key: str, compress: bool):
        comp = self.compression(key) if compress else None
        self.state.pending.append(key)
        self.state.last_image_key = key
        return comp

    def add_images(self, images, names=None) -> list:
        """`add_image` (without encoding) for several images, all or none: when one is refused, none is
        added, and the InputError says why for each refused one (`names`: what to call them). -> keys."""
        self.check_images()
        keys = self.images.keep_all(self.state, images, names)
        for key in keys:
            self._added(key, compress=False)
        return keys

    def add_past_turn(self, question: str, answer: str, images=()):
        """Record a turn answered earlier (a conversation rebuilt from what a page still shows, after the server
        lost it): its images are kept as `add_image` keeps them, and encoded when a turn needs them; no model
        runs. Images waiting for a question join this turn first. Nothing changes if an image is refused."""
        self.check_images()
        st = self.state
        keys = self.images.keep_all(st, images)
        st.turns.append(Turn(question=checked_question(question), images=st.pending + keys, answer=str(answer)))
        st.pending = []
        st.last_image_key = keys[-1] if keys else st.last_image_key

    def image(self, key: str):  # the kept image `key` as a PIL image (a clip: video.Frames)
        return self.images.image(self.state, key)

    def cached(self, key, lane: str = "large", method: str | None = None) -> bool:
        """Whether `compression(key, lane, method)` is at hand (no model would run)."""
        return self.images.cached(self.state, key, method or self.visual_method, lane)

    def compression(self, key, lane: str = "large", method: str | None = None):
        """The Compression of image `key` for `method` (default: the current one) and `lane`'s model,
        encoded once. Manual's maps are drawn on VisionZip's (`method="visionzip"`)."""
        return self.images.compression(self.state, key, method or self.visual_method, lane)

    def current_view(self, compress: bool = True, key: str | None = None, frame: int | None = None):
        """(PIL image, Compression for the current method) of image `key` (default: the latest), or None; a clip's
        frames on one sheet, or its frame `frame` (0-based) alone (views.py)."""
        return views.current_view(self.state, self.images, compress, key, frame)

    def pick_view(self, key: str):
        """The manual method's picks of an image (methods/manual.py) as a Compression to draw (its features are not
        the model's); set_picks, toggle_pick and picks_from_visionzip edit them."""
        return manual.pick_view(self.state, self.images, key)

    def set_picks(self, picks: dict, key: str | None = None):
        """The units the manual method sends for an image ({crop: [unit, ...]}; default: the latest)."""
        manual.set_picks(self.state, self.images, picks, key)

    def toggle_pick(self, crop: int, unit: int, radius: int = 0, key: str | None = None) -> int:
        """Pick (or unpick) a unit and the (2 radius + 1)^2 block around it -> units picked for the image."""
        return manual.toggle_pick(self.state, self.images, crop, unit, radius, key)

    def picks_from_visionzip(self, key: str | None = None) -> int:
        """Start the manual picks from VisionZip's choice: its dominant units and contextual targets."""
        return manual.picks_from_visionzip(self.state, self.images, key)

    # ---- turns ---------------------------------------------------------------------------------
    def ask(self, question: str) -> str:  # the whole answer
        return "".join(self.ask_stream(question))

    def ask_stream(self, question: str, accepted: bool = False):
        """Yield the answer as text deltas. The turn is recorded even if the caller stops early.
        `accepted`: the question was accepted earlier (`accept`), and a Stop since then cancels it before
        it starts (no turn is recorded); otherwise this call accepts it."""
        self.check_images()
        question = checked_question(question)
        if not self._lock.acquire(blocking=False):
            raise InputError("An answer is still being generated in this session; stop it or wait.")
        try:
            if not accepted:
                self.accept()
            if self.stop_flag.is_set():  # stopped while waiting for its turn: nothing to answer
                self.stop_flag.clear()
                return
            yield from self._turn(question)
        finally:
            self.answering.clear()
            self._lock.release()

    def prepare_turn(self, question: str | None = None):
        """Encode the images waiting for the next `question` now (the app's map shows before the answer); the next
        turn reuses them, and their time counts in its time to first token. (CDPruner selects for `question`.)"""
        self.state.question = self.state.question if question is None else checked_question(question)
        self.images.prepare(self.state, self.visual_method)

    def plan(self, turn: Turn):
        """The prompt of `turn` as the next question (prompt.py), fitted to the context window."""
        room = min(self.settings.max_new_tokens, self.context_window // 4)  # kept free for the answer
        small = self.small if self.method.needs_small else None
        return plan_prompt(self.vlm, self.state, turn, self._slot("large"), room, self.context_window, self.edge_fill,
                           small, self._slot("small"))

    def _slot(self, lane: str):  # image key -> (its slot's key, its Compression for `lane`'s model)
        return lambda key: self.images.slot(self.state, key, self.visual_method, lane)

    def request(self, plan, lane: str = "large", **fields) -> Request:
        """What an engine is asked for `plan`'s answer (the small model's sequence on "small")."""
        vlm = self.vlm if lane == "large" else self.small
        ids, slots = (plan.ids, plan.slots) if lane == "large" else (plan.small_ids, plan.small_slots)
        s = self.settings
        return Request(ids, slots, max_tokens=min(s.max_new_tokens, self.context_window - len(ids)),
                       sampling=s.sampling, seed=s.sampling.seed + len(self.state.turns), stop_ids=sorted(vlm.stop_ids),
                       conversation=self.state.session_id, reuse=self.reuse_cache, ignore_stops=not self.stop_at_eos,
                       **fields)

    def _turn(self, question: str):
        st, vlm = self.state, self.vlm
        t0 = time.perf_counter() - self.images.ahead_s  # (images encoded ahead by prepare_turn count in its time)
        self.images.ahead_s = 0.0
        turn = Turn(question=question, images=list(st.pending))
        st.question = question  # (a question-conditioned method selects every image for it)
        if self.method.kind == registry.MANUAL:
            manual.check_picks(st)
        plan = self.plan(turn)
        stats = new_stats(plan, vlm, self.settings.method, self.images.take_counts(), self.context_window,
                          st.window_start)
        generated, finished, cancelled = [], False, False
        engine = self.engine if self.engine is not None and self.method.engines is None \
            else self.decoders["large"]  # (an in-LLM method runs on zipchat's decoder)
        # an engine that answers several requests at once: zipchat's decoder still answers one at a time
        # (a plain Lock: Gradio may resume this generator on another thread)
        one_at_a_time = vlm.answer_lock if self.engine is not None and not engine.concurrent else nullcontext()
        try:
            with one_at_a_time:
                if self.method.answer is not None:  # FastV, SGL: a turn of their own, on zipchat's decoder
                    answer = yield from self.method.answer(self._context(plan, stats, t0, generated))
                else:
                    answer = yield from decode(engine, self.request(plan), vlm.tokenizer, self.stop_flag, generated,
                                               stats, t0)
            generated[:] = answer
            finished = True
        except GeneratorExit:  # the caller stopped reading: the partial answer is the answer
            finished = cancelled = True
            raise
        finally:
            if finished or generated:  # a failure before the first token leaves no trace
                stats.stopped = self.stop_flag.is_set() or cancelled or not finished
                record_turn(st, turn, plan, stats, t0, generated, self.small if stats.early_exit else vlm)
            self.stop_flag.clear()  # a Stop that came as the answer ended does not reach the next question

    def _context(self, plan, stats, t0, generated) -> TurnContext:
        return TurnContext(plan, self.settings, self.vlm, self.small, self.decoders, stats, t0, generated,
                           self.stop_flag, lambda lane, **fields: self.request(plan, lane, **fields))

    # ---- FastV and SGL: what decided the last turn's pruning ------------------------------------------
    def guidance_view(self, key: str | None = None, frame: int | None = None):
        """(PIL image, Compression, importance, kept mask) of image `key` for the last FastV or SGL turn, or None
        (views.py; `frame` as for current_view)."""
        return views.guidance_view(self.state, self.images, key, frame)
