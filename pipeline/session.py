"""ChatSession: one conversation about images, on top of a plain ChatState.

The state (state.py) is the conversation itself: the turns as text, the images, their compressed
features on the CPU, the settings. It pickles, so it can cross the ZeroGPU process boundary; the
session binds it to the models loaded in this process (`ChatSession.resume`).

Each turn renders the whole conversation with the checkpoint's chat template (chat.py); every image
placeholder becomes `num_tokens` placeholder ids whose embeddings are the image's compressed
features. A model's KV cache (a Lane, lane.py) records what its positions hold, so a turn keeps the
longest prefix the cache still matches and prefills the rest: normally the latest answer and the
new question. Caches live in a process-local KVStore keyed by session (kvstore.py); where there is
none (a new ZeroGPU worker) the turn prefills the conversation once.

How images become visual tokens is the method's (methods/, one Method record each): the compress-once
methods run at `compression`, once per image; the in-LLM methods (FastV, SGL) answer through their own
turn function, which prunes inside the language model (methods/fastv.py, methods/sgl.py: a small model
with its own lane answers first and ranks the visual tokens).
"""

import os
import threading
import time
import unicodedata
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from .chat import Message
from .compress import Compression, encode_image, method_key
from .errors import InputError
from .config import UNSET, Sampling
from .engines.vllm_answer import vllm_answer
from .generate import pick, suppress
from .images import image_digest, load_image
from .kvstore import KVStore, cache_nbytes
from .lane import Lane, Unit
from .methods import manual, registry
from .methods.capture import Guidance
from .methods.sgl import check_pair
from .settings import changed
from .state import ChatState, Settings, Turn
from .stopflag import AnsweringFlag, StopFlag

MAX_QUESTION_CHARS = int(os.environ.get("ZIPCHAT_MAX_QUESTION_CHARS", 8000))
MANUAL_NO_PICKS = ("Pick at least one patch on the map: Manual sends exactly the patches you pick (or start from "
                   "VisionZip's choice). An image of the conversation without picks is sent as VisionZip's choice.")
IMAGES_DROPPED = ("This conversation was idle while the server needed memory for others, so its images were "
                  "dropped and it starts over. Please upload the image again.")


INVISIBLE = {"\u034f", "\u115f", "\u1160", "\u2800", "\u3164", "\uffa0"}  # fillers and blanks outside Cf


def checked_question(question, allow_empty: bool = False) -> str:
    """A question as it will be asked (stripped), or an InputError a person can act on: text that is not
    valid Unicode (a lone surrogate), too long, or empty. A question made only of invisible characters
    (spaces, zero-width spaces, word joiners, a BOM: format characters) is empty. `allow_empty`: '' then."""
    if question is None and allow_empty:
        return ""
    if not isinstance(question, str):
        raise InputError("Please type a question.")
    try:
        question.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(f"The question contains a character that is not valid text (U+{ord(question[e.start]):04X}, "
                         "half of a surrogate pair). Please type it again.") from None
    if len(question) > MAX_QUESTION_CHARS:
        raise InputError(f"The question is {len(question):,} characters long; the limit is "
                         f"{MAX_QUESTION_CHARS:,}. Please shorten it.")
    if all(ch.isspace() or ch in INVISIBLE or unicodedata.category(ch) in ("Cf", "Cc", "Zs", "Zl", "Zp", "Co")
           for ch in question):
        if allow_empty:
            return ""
        raise InputError("Please type a question.")
    return question.strip()


@dataclass
class TurnStats:
    method: str
    model_used: str
    visual_tokens: int  # visual tokens in the LLM's context this turn (all images so far)
    visual_tokens_full: int  # what they would be without compression
    prompt_tokens: int  # context length when the answer starts
    prefill_tokens: int  # tokens actually computed this turn (the rest came from the KV cache)
    new_tokens: int = 0
    encode_s: float = 0.0  # image encoding + compression done for this turn
    prefill_s: float = 0.0
    ttft_s: float = 0.0  # from the question to the first answer token (encoding included)
    decode_tok_per_s: float = 0.0
    cache_reused: bool = False  # part of the KV cache of earlier turns was reused
    images_encoded: int = 0  # images encoded/compressed for this turn (0: compressed images reused)
    images_ahead: int = 0  # images whose compression this turn took from the example cache (compressed at launch)
    kv_cache_bytes: int = 0
    stopped: bool = False  # generation was cancelled
    dropped_turns: int = 0  # oldest turns left out to fit the context window, in all
    dropped_now: int = 0  # of them, those this turn left out
    context_window: int = 0
    early_exit: bool | None = None  # SGL: the small model's answer was used
    guidance: Guidance | None = None  # SGL: importance per visual token, kept indices, score
    device: str = ""
    engine: str = "transformers"  # what ran the language model: zipchat's decoder, or "vllm"
    engine_cached_tokens: int = 0  # vLLM: prompt tokens its prefix cache held
    dtype: str = ""
    timings: dict = field(default_factory=dict)  # SGL: seconds spent in each model


@dataclass
class Plan:
    """What one turn sends to the model(s): the flat ids and their units, per lane."""
    ids: list
    units: list  # list[Unit]
    compressions: list
    turn_start: int  # index in ids of this turn's first token
    window_start: int
    small_ids: list | None = None
    small_units: list | None = None


class ChatSession:
    def __init__(self, vlm, method: str = "full", dominant: int = 54, contextual: int = 10,
                 max_new_tokens: int = 256, sampling: Sampling | None = None, reuse_cache: bool = True,
                 cache_bytes: int = 1 << 30, small=None, keep_ratio: float | None = None, prune_layer: float = 0.4,
                 early_exit: float | None = 0.8, sgl_tokens: str = "full", stop_at_eos: bool = True,
                 state: ChatState | None = None, kv: KVStore | None = None, context_window: int | None = None,
                 max_tiles: int = 0, edge_fill: float = 0.75, examples=None, fastv_layer: int = 2,
                 fastv_keep_ratio: float | None = None, stop_flag: StopFlag | None = None, engine=None):
        self.vlm = vlm
        self.engine = engine  # None: zipchat's decoder; a VLLMServer (engines/): vLLM answers the compress-once methods
        self.small = small
        self.stop_at_eos = stop_at_eos  # False: always max_new_tokens (benchmarks on random weights)
        self.reuse_cache = reuse_cache
        self.kv = kv if kv is not None else KVStore()  # a private store unless the app shares one
        self.context_window = context_window or vlm.context_window
        if engine is not None and engine.max_model_len():  # the server may hold fewer positions than the model
            self.context_window = min(self.context_window, engine.max_model_len())
        self.edge_fill = edge_fill  # a turn that must drop turns drops down to this share of the window (see plan)
        self.examples = examples  # an ExampleCache (examples.py): the app's example images, compressed ahead
        self._lock = threading.Lock()
        self._lanes = {}
        self._encoded = [0, 0.0, 0]  # since the last turn: images encoded, the seconds it took, examples taken
        self._ahead_s = 0.0  # seconds prepare_turn spent on the next turn's images
        if small is not None:
            check_pair(small, vlm)
        if state is None:
            state = ChatState(model=vlm.name, small=small.name if small else None, cache_bytes=cache_bytes,
                              settings=Settings(sampling=sampling or Sampling()))
            self.state = state
            self.set_method(method, dominant, contextual, keep_ratio=keep_ratio, prune_layer=prune_layer,
                            early_exit=early_exit, sgl_tokens=sgl_tokens, max_new_tokens=max_new_tokens,
                            max_tiles=max_tiles, fastv_layer=fastv_layer, fastv_keep_ratio=fastv_keep_ratio)
        elif state.model != vlm.name or state.small != (small.name if small else None):
            raise ValueError(f"this state belongs to {state.model} (+ {state.small}), not {vlm.name}")
        self.state = state
        self.stop_flag = stop_flag or StopFlag(state.session_id)  # (Compare's sessions share their parent's)
        self.answering = AnsweringFlag(state.session_id)  # seen by other processes (the app's next message)

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

    # ---- configuration -------------------------------------------------------------------------
    def set_method(self, method: str, dominant: int | None = None, contextual: int | None = None,
                   keep_ratio: float | None = None, prune_layer: float | None = None, early_exit=UNSET,
                   sgl_tokens: str | None = None, max_new_tokens: int | None = None, temperature: float | None = None,
                   top_p: float | None = None, max_tiles: int | None = None, fastv_layer: int | None = None,
                   fastv_keep_ratio: float | None = None):
        """Applies from the next turn; images are re-compressed once for a new method or budget.
        Values left out (None) keep their current value; `early_exit=None` disables early exit.
        `keep_ratio` is SGL's, or FastV's when the method is "fastv" and `fastv_keep_ratio` is left out.
        Every value is checked here (the app's events are public API): nothing changes on a bad one."""
        self.state.settings = changed(self.settings, self.vlm.family, self.small is not None, method, dominant,
                                      contextual, keep_ratio=keep_ratio, prune_layer=prune_layer, early_exit=early_exit,
                                      sgl_tokens=sgl_tokens, max_new_tokens=max_new_tokens, temperature=temperature,
                                      top_p=top_p, max_tiles=max_tiles, fastv_layer=fastv_layer,
                                      fastv_keep_ratio=fastv_keep_ratio)

    @property
    def method(self) -> registry.Method:
        """The current method's record (methods/registry.py)."""
        return registry.get(self.settings.method)

    @property
    def visual_method(self) -> str:
        """How images are encoded for the LLM(s): Full, a compress-once method, or Manual (the in-LLM
        methods encode theirs as their record says: FastV's as Full, SGL's as its `sgl_tokens`)."""
        return self.method.encodes(self.settings)

    def image_method(self, key: str, method: str | None = None) -> str:
        """How image `key` is encoded for `method` (default: the current one): as itself, except that a
        manual method sends an image without picks as its fallback (VisionZip's choice: an earlier image
        of the conversation, say, that nobody picked patches on)."""
        method = method or self.visual_method
        fallback = registry.get(method).fallback
        return fallback if fallback and not self.state.picks.get(key) else method

    def _method_key(self, key: str, method: str | None = None):
        s = self.settings
        return method_key(self.image_method(key, method), s.dominant, s.contextual, s.max_tiles,
                          self.state.picks.get(key))

    def reset(self):
        """Forget the conversation, images and caches (the settings stay)."""
        st = self.state
        self.kv.drop(st.session_id)
        self._lanes = {}
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
        """A conversation whose images were dropped to free memory (memory.py) starts over, with a
        message (InputError) that says so."""
        st = self.state
        if st.images_dropped:  # in place: whoever holds this state (the app's tab) sees it start over
            st.turns, st.window_start, st.last_turn, st.images_dropped = [], 0, None, False
            self.kv.drop(st.session_id)
            self._lanes = {}
            raise InputError(IMAGES_DROPPED)

    # ---- images --------------------------------------------------------------------------------
    def add_image(self, image, compress: bool = True) -> Compression | None:
        """Check an image; it joins the next question. With `compress` it is encoded now (else at
        the next turn). Nothing changes if the image is refused. The conversation keeps it no larger
        than the model can use (the same tiles and crops: Family.compact_size)."""
        self.check_images()
        key = self._keep(image)
        comp = self.compression(key) if compress else None
        self.state.pending.append(key)
        self.state.last_image_key = key
        return comp

    def add_images(self, images, names=None) -> list:
        """`add_image` (without encoding) for several images, all or none: when one is refused, none is
        added, and the InputError says why for each refused one (`names`: what to call them). -> keys."""
        self.check_images()
        keys = self._keep_all(images, names)
        self.state.pending += keys
        self.state.last_image_key = keys[-1] if keys else self.state.last_image_key
        return keys

    def _keep_all(self, images, names=None) -> list:
        images, st = list(images), self.state
        before, keys, refused = set(st.images), [], []
        for i, image in enumerate(images):
            try:
                keys.append(self._keep(image))
            except InputError as e:
                name = names[i] if names else f"image {i + 1}"
                refused.append(str(e) if name in str(e) or len(images) == 1 else f"{name}: {e}")
        if refused:
            for key in set(st.images) - before:
                del st.images[key]
            raise InputError(" ".join(refused))
        return keys

    def _keep(self, image) -> str:
        image = load_image(image, fit=self.vlm.family.compact_size)
        key = image_digest(image)
        self.state.images[key] = np.asarray(image)  # uint8 (H, W, 3): 3 bytes a pixel (PIL holds RGB in 4)
        return key

    def add_past_turn(self, question: str, answer: str, images=()):
        """Record a turn that was answered earlier (a conversation rebuilt from what a page still shows,
        after the server lost it): its images are checked and kept as `add_image` keeps them, and encoded
        when a turn needs them; no model runs. Images waiting for a question (`add_image`) join this turn
        first. Nothing changes if an image is refused."""
        self.check_images()
        st = self.state
        keys = self._keep_all(images)
        st.turns.append(Turn(question=checked_question(question), images=st.pending + keys, answer=str(answer)))
        st.pending = []
        st.last_image_key = keys[-1] if keys else st.last_image_key

    def image(self, key: str) -> Image.Image:
        """The kept image `key` as a PIL image (the state keeps its pixels as a uint8 array)."""
        return Image.fromarray(self.state.images[key])

    def current_view(self, compress: bool = True, key: str | None = None):
        """(PIL image, Compression for the current method) of image `key` (default: the latest), or None.
        Without `compress`, None also when that compression is not cached yet."""
        key = key if key in self.state.images else self.state.last_image_key
        if key is None:
            return None
        if self.method.kind == registry.MANUAL:  # the picks drawn on the fallback's crops: no model runs for a click
            if not (compress or self.cached(key, method=self.method.fallback)):
                return None
            return self.image(key), self.pick_view(key)
        if not (compress or self.cached(key)):
            return None
        return self.image(key), self.compression(key)

    # the manual method's picks (methods/manual.py)
    def pick_view(self, key: str) -> Compression:
        """The manual picks of an image as a Compression to draw (its features are not the model's)."""
        return manual.pick_view(self, key)

    def set_picks(self, picks: dict, key: str | None = None):
        """The units the "manual" method sends for an image ({crop: [unit, ...]}; default: the latest)."""
        manual.set_picks(self, picks, key)

    def toggle_pick(self, crop: int, unit: int, radius: int = 0, key: str | None = None) -> int:
        """Pick (or unpick) a unit and the (2 radius + 1)^2 block around it -> units picked for the image."""
        return manual.toggle_pick(self, crop, unit, radius, key)

    def picks_from_visionzip(self, key: str | None = None) -> int:
        """Start the manual picks from VisionZip's choice: its dominant units and contextual targets."""
        return manual.picks_from_visionzip(self, key)

    def cached(self, key, lane: str = "large", method: str | None = None) -> bool:
        """Whether `compression(key, lane, method)` is at hand (no model would run)."""
        vlm = self.vlm if lane == "large" else self.small
        return (key, self._method_key(key, method), vlm.name) in self.state.compressions

    def compression(self, key, lane: str = "large", method: str | None = None) -> Compression:
        """The Compression of image `key` for `method` (default: the current one) and `lane`'s model,
        encoded once. The manual method's maps are drawn on VisionZip's (`method="visionzip"`)."""
        st = self.state
        vlm = self.vlm if lane == "large" else self.small
        method = self.image_method(key, method)
        ck = (key, self._method_key(key, method), vlm.name)
        if ck in st.compressions:
            st.compressions.move_to_end(ck)
            return st.compressions[ck]
        s = self.settings
        ahead = self.examples.get(vlm.name, key, ck[1]) if self.examples is not None and lane == "large" else None
        if ahead is not None:  # an example image, compressed when the app started: nothing to encode
            st.compressions[ck] = ahead
            self._encoded[2] += 1
            return ahead
        if lane == "large":
            with vlm.encode_lock:
                comp = encode_image(vlm, self.image(key), method, s.dominant, s.contextual,
                                    max_tiles=s.max_tiles, picks=st.picks.get(key, {}))
        else:  # the small model sees the same tokens: with a compress-once method, the large model's selection
            selection = self.compression(key, method=method) if registry.get(method).kind == registry.COMPRESS_ONCE \
                else None
            with vlm.encode_lock:
                comp = encode_image(vlm, self.image(key), method, s.dominant, s.contextual,
                                    selection_from=selection, max_tiles=s.max_tiles)
        comp.features = comp.features.cpu()  # the state holds no device tensor
        self._encoded[0] += 1
        self._encoded[1] += comp.encode_s
        st.compressions[ck] = comp
        while sum(c.nbytes for c in st.compressions.values()) > st.cache_bytes and len(st.compressions) > 1:
            st.compressions.popitem(last=False)  # dropped ones are re-encoded from st.images if needed
        return comp

    # ---- turns ---------------------------------------------------------------------------------
    def ask(self, question: str) -> str:
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

    def prepare_turn(self):
        """Encode the images waiting for the next question now (an app draws their map before the answer
        streams); the next turn reuses them, and their time counts in its time to first token."""
        start = time.perf_counter()
        for key in self.state.pending:
            self.compression(key)
        self._ahead_s += time.perf_counter() - start

    def lane(self, name: str) -> Lane:
        """The KV-cache lane of the "large" or "small" model for this turn, checked out of the store."""
        if name not in self._lanes:
            cache, signature = self.kv.checkout(self.state.session_id, name)
            self._lanes[name] = Lane(self.vlm if name == "large" else self.small, cache, signature)
        return self._lanes[name]

    def _return_lanes(self):
        for name, lane in self._lanes.items():
            if lane.cache is not None:
                self.kv.checkin(self.state.session_id, name, lane.cache, lane.signature)
        self._lanes = {}

    def _turn(self, question: str):
        st, vlm = self.state, self.vlm
        t0 = time.perf_counter() - self._ahead_s  # (images encoded ahead by prepare_turn count in its time)
        self._ahead_s = 0.0
        turn = Turn(question=question, images=list(st.pending))
        if self.method.kind == registry.MANUAL and st.images and not any(st.picks.get(k) for k in st.images):
            raise InputError(MANUAL_NO_PICKS)
        plan = self.plan(turn)  # compresses the images it needs; may drop the oldest turns
        (images_encoded, encode_s, images_ahead), self._encoded = self._encoded, [0, 0.0, 0]
        comps = plan.compressions
        stats = TurnStats(
            method=self.settings.method, model_used=vlm.name,
            visual_tokens=sum(c.num_tokens for c in comps), visual_tokens_full=sum(c.full_tokens for c in comps),
            prompt_tokens=len(plan.ids), prefill_tokens=len(plan.ids), encode_s=encode_s,
            images_encoded=images_encoded, images_ahead=images_ahead, dropped_turns=plan.window_start,
            dropped_now=plan.window_start - st.window_start, context_window=self.context_window,
            device=vlm.device.type, dtype=str(vlm.dtype).replace("torch.", ""),
        )
        generated, finished, cancelled = [], False, False
        answer_turn = self.method.answer or (ChatSession.plain_answer if self.engine is None
                                             else vllm_answer)  # the in-LLM methods: their own
        # with an engine the app answers several requests at once: zipchat's decoder still answers one at a time
        # (a plain Lock: Gradio may resume this generator on another thread)
        one_at_a_time = vlm.answer_lock if self.engine is not None and answer_turn is not vllm_answer else None
        if one_at_a_time is not None:
            one_at_a_time.acquire()
        try:
            answer = yield from answer_turn(self, plan, stats, t0, generated)
            generated[:] = answer
            finished = True
        except GeneratorExit:  # the caller stopped reading: the partial answer is the answer
            finished = cancelled = True
            raise
        finally:
            if one_at_a_time is not None:
                one_at_a_time.release()
            lane = self._lanes.get("large")
            stats.kv_cache_bytes = cache_nbytes(lane.cache) if lane else 0
            self._return_lanes()
            if finished or generated:  # a failure before the first token leaves no trace
                stats.new_tokens = len(generated)
                stats.stopped = self.stop_flag.is_set() or cancelled or not finished
                if not stats.ttft_s:
                    stats.ttft_s = time.perf_counter() - t0
                answer_vlm = self.small if stats.early_exit else vlm
                turn.answer = answer_vlm.tokenizer.decode(generated, skip_special_tokens=True)
                turn.answer_tokens, turn.stopped = len(generated), stats.stopped
                st.turns.append(turn)
                st.pending, st.window_start, st.last_turn = [], plan.window_start, stats
            self.stop_flag.clear()  # a Stop that came as the answer ended does not reach the next question

    def plan(self, turn: Turn) -> Plan:
        """Render the conversation with `turn` as the new question, fitted to the context window. When
        it does not fit, the oldest turns are left out until the prompt and room for an answer take at
        most `edge_fill` (3/4) of the window: the next turns then fit on top of the cached prefix again,
        instead of each dropping one turn and prefilling the whole conversation anew. If no kept turn
        has an image, the most recent image of the left-out turns is carried along (the user is most
        likely still talking about it), as long as it fits. Nothing fits: InputError."""
        st = self.state
        room = min(self.settings.max_new_tokens, self.context_window // 4)  # kept free for the answer
        start, carry, target = st.window_start, True, self.context_window
        while True:
            kept = st.turns[start:]
            carried = []
            if carry and not turn.images and not any(t.images for t in kept):
                carried = next((t.images for t in reversed(st.turns[:start]) if t.images), [])
            history = self._messages(kept)
            question = Message("user", turn.question, list(turn.images))
            (history[0] if history else question).images[:0] = carried  # before the first message's own
            segments = self.vlm.chat.render(history + [question])
            ids, units, comps = self._flatten(segments)
            if len(ids) + room <= target:
                break
            target = min(target, int(self.context_window * self.edge_fill))  # dropping anyway: make room
            if start < len(st.turns):
                start += 1
            elif len(ids) + room <= self.context_window:  # every turn dropped: the window is enough
                break
            elif carried:
                carry = False
            else:
                raise InputError(
                    f"This question needs {len(ids):,} tokens ({sum(c.num_tokens for c in comps):,} of them visual) "
                    f"plus room for an answer, but {self.vlm.name} reads at most {self.context_window:,}. "
                    "Shorten the question, or use VisionZip or a smaller budget for fewer visual tokens.")
        history_ids = self._flatten(self.vlm.chat.render(history, add_generation_prompt=False))[0]
        turn_start = 0
        while turn_start < min(len(history_ids), len(ids)) and history_ids[turn_start] == ids[turn_start]:
            turn_start += 1
        plan = Plan(ids, units, comps, turn_start, start)
        if self.method.needs_small:
            plan.small_ids, plan.small_units, _ = self._flatten(segments, "small")
        return plan

    @staticmethod
    def _messages(turns: list) -> list:
        messages = []
        for t in turns:
            messages += [Message("user", t.question, list(t.images)), Message("assistant", t.answer)]
        return messages

    def _flatten(self, segments, lane: str = "large"):
        """-> (ids, units, compressions): each image becomes its visual tokens' placeholder ids (and the
        family's markers around them)."""
        vlm = self.vlm if lane == "large" else self.small
        ids, units, comps = [], [], []
        for kind, value in segments:
            if kind == "text":
                for t in value:
                    units.append(Unit(("t", t), len(ids), len(ids) + 1, None))
                    ids.append(t)
            else:
                comp = self.compression(value, lane)
                comps.append(comp)
                image_ids = vlm.family.image_ids(comp.num_tokens, vlm.image_token_id)  # markers around, if any
                units.append(Unit(("i", value) + self._method_key(value), len(ids), len(ids) + len(image_ids),
                                  comp.features, comp))
                ids.extend(image_ids)
        return ids, units, comps

    def plain_answer(self, plan: Plan, stats: TurnStats, t0: float, generated: list):
        """A turn of the methods without one of their own: the large model on its cached prefix, all the
        plan's tokens (a generator of text deltas; returns the answer ids)."""
        lane = self.lane("large")
        start, features, reused = lane.reuse(plan.units, enabled=self.reuse_cache)
        stats.cache_reused, stats.prefill_tokens = reused, len(plan.ids) - start
        p0 = time.perf_counter()
        logits = lane.prefill(plan.ids, plan.units, start, features)
        stats.prefill_s = time.perf_counter() - p0
        return (yield from self.decode(self.vlm, logits, lane.step, stats, t0, generated,
                                       limit=self.context_window - len(plan.ids)))

    def decode(self, vlm, logits, step, stats, t0, generated, stream: bool = True, max_probs: list | None = None,
               limit: int | None = None):
        """Pick tokens until a stop token, the budget or a stop request; `step(token)` feeds one back
        and returns the next logits. Never picks a banned id (image placeholders, chat markers).
        Appends to `generated` as it goes (so a cancelled turn keeps its partial answer)."""
        s = self.settings
        budget = min(s.max_new_tokens, limit) if limit is not None else s.max_new_tokens
        rng = torch.Generator().manual_seed(s.sampling.seed + len(self.state.turns))
        stop_ids = vlm.stop_ids if self.stop_at_eos else set()
        text_so_far, decode_start = "", None
        while len(generated) < budget and not self.stop_flag.is_set():
            logits = suppress(logits, vlm)
            token = pick(logits, s.sampling, rng)
            if max_probs is not None:
                max_probs.append(float(torch.softmax(logits, -1).max()))
            if token in stop_ids:
                break
            generated.append(token)
            if stream:
                if len(generated) == 1:
                    stats.ttft_s = time.perf_counter() - t0
                    decode_start = time.perf_counter()
                delta, text_so_far = self.text_delta(vlm, generated, text_so_far)
                if delta:
                    yield delta
            if len(generated) >= budget or self.stop_flag.is_set():
                break
            logits = step(token)
        if stream:
            delta, text_so_far = self.text_delta(vlm, generated, text_so_far, final=True)
            if delta:  # a held-back tail
                yield delta
            if decode_start is not None and len(generated) > 1:
                stats.decode_tok_per_s = (len(generated) - 1) / max(time.perf_counter() - decode_start, 1e-9)
        return list(generated)

    @staticmethod
    def text_delta(vlm, generated: list, text_so_far: str, final: bool = False) -> tuple:
        """-> (new text, text so far) after the answer ids `generated`: text is held back while it ends in
        part of a character (U+FFFD), unless `final`."""
        text = vlm.tokenizer.decode(generated, skip_special_tokens=True)
        if (final or not text.endswith("\ufffd")) and text.startswith(text_so_far) and len(text) > len(text_so_far):
            return text[len(text_so_far):], text
        return "", text_so_far

    # ---- SGL and FastV (their turns are in methods/) ----------------------------------------------------
    def guidance_view(self, key: str | None = None):
        """(PIL image, its Compression, per-token importance, per-token kept mask) of image `key` (default:
        the latest) for the last SGL or FastV turn, while the method is still that one with the same
        tokens, or None. No model runs here."""
        t = self.state.last_turn
        key = key if key in self.state.images else self.state.last_image_key
        if (t is None or t.guidance is None or key not in t.guidance.image_spans
                or self.settings.method != t.guidance.source or not self.cached(key)):
            return None
        start, end = t.guidance.image_spans[key]
        kept = np.zeros(len(t.guidance.importance), dtype=bool)
        kept[t.guidance.kept] = True
        return self.image(key), self.compression(key), t.guidance.importance[start:end], kept[start:end]
