"""ChatSession: one conversation about images, with compress-once images and a reused KV cache.

The conversation is a list of segments, ("text", token ids) or ("image", image key). Flattened,
each image becomes `num_tokens` placeholder ids whose embeddings are the image's compressed
features. A KV cache holds some prefix of that flat sequence; its identity is recorded as a
signature (token ids, and (image key, method, budget) per image), so a turn keeps the longest
prefix the cache still matches and prefills the rest — only the new question on a normal turn.

Method "sgl" adds a small model with its own KV cache (reused the same way) that answers first
and ranks the visual tokens; the large model then answers with the pruned tokens (see sgl.py).
The large model recomputes its KV cache every SGL turn: which tokens it keeps from layer K on
depends on the question, so its cache of earlier turns does not fit the new question.
"""

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch

from .compress import Compression, encode_image, method_key
from .errors import InputError
from .generate import Sampling, embed, embed_token, forward, new_cache, pick, truncate_cache
from .images import image_digest, load_image
from .sgl import Guidance, check_pair, sgl_answer
from .visionzip import check_budget

METHODS = ("full", "visionzip", "sgl")
UNCHANGED = object()  # set_method(early_exit=...) default: None already means "disabled"


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
    kv_cache_bytes: int = 0
    stopped: bool = False  # generation was cancelled
    early_exit: bool | None = None  # SGL: the small model's answer was used
    guidance: Guidance | None = None  # SGL: importance per visual token, kept indices, score
    device: str = ""
    dtype: str = ""
    timings: dict = field(default_factory=dict)  # SGL: seconds spent in each model


class ChatSession:
    def __init__(self, vlm, method: str = "full", dominant: int = 54, contextual: int = 10,
                 max_new_tokens: int = 256, sampling: Sampling | None = None, reuse_cache: bool = True,
                 cache_bytes: int = 1 << 30, small=None, keep_ratio: float = 0.35, prune_layer: float = 0.4,
                 early_exit: float | None = 0.8, sgl_tokens: str = "full", stop_at_eos: bool = True):
        self.vlm = vlm
        self.stop_at_eos = stop_at_eos  # False: always max_new_tokens (benchmarks on random weights)
        self.small = small
        self.max_new_tokens = max_new_tokens
        self.sampling = sampling or Sampling()
        self.reuse_cache = reuse_cache
        self.cache_bytes = cache_bytes
        self._lock = threading.Lock()
        self._stop = threading.Event()
        if small is not None:
            check_pair(small, vlm)
        self.sgl_tokens, self.keep_ratio, self.prune_layer, self.early_exit = "full", 0.35, 0.4, 0.8
        self.set_method(method, dominant, contextual, keep_ratio=keep_ratio, prune_layer=prune_layer,
                        early_exit=early_exit, sgl_tokens=sgl_tokens)
        self.reset()

    # ---- configuration -------------------------------------------------------------------------
    def set_method(self, method: str, dominant: int = 54, contextual: int = 10, keep_ratio: float | None = None,
                   prune_layer: float | None = None, early_exit=UNCHANGED, sgl_tokens: str | None = None):
        """Applies from the next turn; images are re-compressed once for the new method/budget.
        SGL knobs left out (None) keep their current values; `early_exit=None` disables early exit.
        For "sgl", `sgl_tokens` ("full" | "visionzip") says whether both models see VisionZip tokens."""
        if method not in METHODS:
            raise InputError(f"Unknown method '{method}'. Choose one of: {', '.join(METHODS)}.")
        if method == "sgl" and self.small is None:
            raise InputError("SGL needs a small model: start with a small model (e.g. --small-model llava-ov-0.5b).")
        sgl_tokens = sgl_tokens or self.sgl_tokens
        if sgl_tokens not in ("full", "visionzip"):
            raise InputError("sgl_tokens must be 'full' or 'visionzip'.")
        keep_ratio = self.keep_ratio if keep_ratio is None else float(keep_ratio)
        prune_layer = self.prune_layer if prune_layer is None else float(prune_layer)
        if not 0 < keep_ratio <= 1 or not 0 <= prune_layer <= 1:
            raise InputError("SGL needs 0 < keep ratio <= 1 and 0 <= prune layer <= 1 (a fraction of the depth).")
        visual = sgl_tokens if method == "sgl" else method
        if visual != "full":
            grid = self.vlm.adapter.grid
            check_budget(dominant, contextual, grid[0] * grid[1] + self.vlm.adapter.has_cls, self.vlm.adapter.has_cls)
        self.method, self.dominant, self.contextual = method, int(dominant), int(contextual)
        self.sgl_tokens, self.keep_ratio, self.prune_layer = sgl_tokens, keep_ratio, prune_layer
        if early_exit is not UNCHANGED:
            self.early_exit = early_exit

    @property
    def visual_method(self) -> str:
        """How images are encoded for the LLM(s): "full" or "visionzip"."""
        return self.sgl_tokens if self.method == "sgl" else self.method

    def reset(self):
        """Forget the conversation, images and caches."""
        self.segments = []  # [("text", [ids]) | ("image", key)]
        self.images = {}  # key -> PIL image (kept to re-compress after a method change)
        self.pending = []  # image keys added since the last question
        self.compressions = OrderedDict()  # (image key, method key, model name) -> Compression, LRU by bytes
        self.caches = {}  # "large" | "small" -> [DynamicCache, signature]
        self.last_turn = None
        self.last_compression = None
        self.last_image_key = None
        self.last_question = None
        self._last_turn_start = 0  # index in self.segments where the last turn's segments begin
        self._last_turn_images = []
        self._pending_encode_s = 0.0
        self._pending_encodes = 0

    @property
    def cache(self):
        return self.caches.get("large", [None])[0]

    def stop(self):
        """Ask a running ask_stream to stop after the current token."""
        self._stop.set()

    # ---- images --------------------------------------------------------------------------------
    def add_image(self, image) -> Compression:
        """Check, encode and compress an image once; it joins the next question."""
        image = load_image(image)
        key = image_digest(image)
        self.images[key] = image
        comp = self._compression(key)
        self.pending.append(key)
        self.last_compression = comp
        self.last_image_key = key
        return comp

    def current_view(self):
        """(PIL image, Compression for the current method) of the latest image, or None."""
        if self.last_image_key is None:
            return None
        comp = self._compression(self.last_image_key)
        self.last_compression = comp
        return self.images[self.last_image_key], comp

    def _method_key(self):
        return method_key(self.visual_method, self.dominant, self.contextual)

    def _compression(self, key, model: str = "large") -> Compression:
        vlm = self.vlm if model == "large" else self.small
        ck = (key, self._method_key(), vlm.name)  # by model, so sessions may share one cache safely
        if ck in self.compressions:
            self.compressions.move_to_end(ck)
            return self.compressions[ck]
        if model == "large":
            comp = encode_image(self.vlm, self.images[key], self.visual_method, self.dominant, self.contextual)
        else:  # the small model sees the same tokens: with VisionZip, the large model's selection
            selection = self._compression(key) if self.visual_method == "visionzip" else None
            comp = encode_image(self.small, self.images[key], self.visual_method, self.dominant, self.contextual,
                                selection_from=selection)
        self._pending_encode_s += comp.encode_s  # counted in the next turn's stats
        self._pending_encodes += 1
        self.compressions[ck] = comp
        while sum(c.nbytes for c in self.compressions.values()) > self.cache_bytes and len(self.compressions) > 1:
            self.compressions.popitem(last=False)  # dropped ones are re-encoded from self.images if needed
        return comp

    # ---- turns ---------------------------------------------------------------------------------
    def ask(self, question: str) -> str:
        return "".join(self.ask_stream(question))

    def ask_stream(self, question: str):
        """Yield the answer as text deltas. The turn is recorded even if the caller stops early."""
        if not isinstance(question, str) or not question.strip():
            raise InputError("Please type a question.")
        if not self._lock.acquire(blocking=False):
            raise InputError("An answer is still being generated in this session; stop it or wait.")
        try:
            yield from self._turn(question.strip())
        finally:
            self._lock.release()

    def _tokenize(self, text: str) -> list:
        return self.vlm.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def _user_segments(self, question: str) -> list:
        adapter = self.vlm.adapter
        first = not self.segments
        segments = []
        if first and adapter.bos and self.vlm.tokenizer.bos_token_id is not None:
            segments.append(("text", [self.vlm.tokenizer.bos_token_id]))
        images = iter(self.pending)
        for kind, text in adapter.user_turn(question, len(self.pending), first):
            segments.append(("image", next(images)) if kind == "image" else ("text", self._tokenize(text)))
        return segments

    def _flatten(self, segments, model: str = "large"):
        """-> (ids, signature units (unit, start, end, features or None), compressions used)."""
        ids, units, comps = [], [], []
        vlm = self.vlm if model == "large" else self.small
        for kind, value in segments:
            if kind == "text":
                for t in value:
                    units.append((("t", t), len(ids), len(ids) + 1, None))
                    ids.append(t)
            else:
                comp = self._compression(value, model)
                comps.append(comp)
                start = len(ids)
                ids.extend([vlm.image_token_id] * comp.num_tokens)
                units.append((("i", value) + self._method_key(), start, len(ids), comp.features))
        return ids, units, comps

    def _reuse(self, model: str, units) -> tuple:
        """Keep the longest prefix of the model's KV cache that matches the conversation.
        -> (cache, first id to run, features of the images in the rest, cache was reused)."""
        vlm = self.vlm if model == "large" else self.small
        signature = [u[0] for u in units]
        cache, cached = self.caches.get(model, (None, []))
        n = common_prefix(signature, cached) if self.reuse_cache and cache is not None else 0
        n = min(n, len(units) - 1)  # at least one token to run, for the logits
        start = units[n][1] if n > 0 else 0
        if n == 0:
            cache = new_cache(vlm)
        else:
            truncate_cache(cache, start)
        self.caches[model] = [cache, signature[:n]]
        return cache, start, [u[3] for u in units[n:] if u[3] is not None], n > 0

    def _turn(self, question: str):
        self._stop.clear()
        vlm = self.vlm
        t0 = time.perf_counter()
        new_segments = self._user_segments(question)
        ids, units, comps = self._flatten(self.segments + new_segments)  # (re-)encodes images only if needed
        if self.method == "sgl":
            small_flat = self._flatten(self.segments + new_segments, "small")
        encode_s, images_encoded = self._pending_encode_s, self._pending_encodes
        self._pending_encode_s, self._pending_encodes = 0.0, 0

        stats = TurnStats(
            method=self.method, model_used=vlm.name,
            visual_tokens=sum(c.num_tokens for c in comps), visual_tokens_full=sum(c.full_tokens for c in comps),
            prompt_tokens=len(ids), prefill_tokens=len(ids), encode_s=encode_s, images_encoded=images_encoded,
            device=vlm.device.type, dtype=str(vlm.dtype).replace("torch.", ""),
        )
        self.last_turn = stats
        self.last_question = question
        self._last_turn_start, self._last_turn_images = len(self.segments), list(self.pending)
        self.pending = []
        generated = []
        try:
            if self.method == "sgl":
                answer = yield from sgl_answer(self, ids, units, small_flat, stats, t0, generated)
            else:
                answer = yield from self._plain_answer(ids, units, stats, t0, generated)
            generated[:] = answer
        finally:
            stats.new_tokens = len(generated)
            stats.stopped = self._stop.is_set()
            if not stats.ttft_s:
                stats.ttft_s = time.perf_counter() - t0
            end = self._tokenize(vlm.adapter.end_of_turn)
            self.segments += new_segments + [("text", list(generated) + end)]
            stats.kv_cache_bytes = cache_nbytes(self.cache)

    def _plain_answer(self, ids, units, stats, t0, generated):
        vlm = self.vlm
        cache, start, features, reused = self._reuse("large", units)
        stats.cache_reused, stats.prefill_tokens = reused, len(ids) - start
        signature = [u[0] for u in units]
        p0 = time.perf_counter()
        logits = forward(vlm, embed(vlm, ids[start:], features), cache)
        stats.prefill_s = time.perf_counter() - p0
        self.caches["large"][1] = fed = list(signature)  # what the cache holds, one unit per position

        def step(token, _):
            logits = forward(vlm, embed_token(vlm, token), cache)
            fed.append(("t", token))
            return logits

        return (yield from self._decode(vlm, logits, step, stats, t0, generated))

    def _decode(self, vlm, logits, step, stats, t0, generated, stream=True, max_probs=None):
        """Pick tokens until a stop token, the budget or stop(); `step(token, fed)` feeds one back.
        Appends to `generated` as it goes (so a cancelled turn keeps its partial answer)."""
        rng = torch.Generator().manual_seed(self.sampling.seed + len(self.segments))
        stop_ids = vlm.adapter.stop_ids() if self.stop_at_eos else set()
        text_so_far, decode_start = "", None
        while len(generated) < self.max_new_tokens and not self._stop.is_set():
            token = pick(logits, self.sampling, rng)
            if max_probs is not None:
                max_probs.append(float(torch.softmax(logits, -1).max()))
            if token in stop_ids:
                break
            generated.append(token)
            if stream:
                if len(generated) == 1:
                    stats.ttft_s = time.perf_counter() - t0
                    decode_start = time.perf_counter()
                text = vlm.tokenizer.decode(generated, skip_special_tokens=True)
                if not text.endswith("\ufffd") and text.startswith(text_so_far):  # wait for whole characters
                    delta, text_so_far = text[len(text_so_far):], text
                    if delta:
                        yield delta
            if len(generated) >= self.max_new_tokens or self._stop.is_set():
                break
            logits = step(token, len(generated))
        if stream:
            text = vlm.tokenizer.decode(generated, skip_special_tokens=True)
            if text.startswith(text_so_far) and len(text) > len(text_so_far):  # flush a held-back tail
                yield text[len(text_so_far):]
            if decode_start is not None and len(generated) > 1:
                stats.decode_tok_per_s = (len(generated) - 1) / max(time.perf_counter() - decode_start, 1e-9)
        return list(generated)

    # ---- SGL (the turn itself is in sgl.py) ----------------------------------------------------
    def guidance_view(self):
        """(PIL image, its Compression, per-token importance, per-token kept mask) of the latest
        image for the last SGL turn, or None."""
        t = self.last_turn
        if t is None or t.guidance is None or self.last_image_key not in t.guidance.image_spans:
            return None
        start, end = t.guidance.image_spans[self.last_image_key]
        kept = np.zeros(len(t.guidance.importance), dtype=bool)
        kept[t.guidance.kept] = True
        return (self.images[self.last_image_key], self._compression(self.last_image_key),
                t.guidance.importance[start:end], kept[start:end])


def compare_with_full(session: ChatSession, max_new_tokens: int | None = None) -> dict:
    """Re-answer the last question twice from the same history, with no KV cache on either side:
    once with the session's method and once with all visual tokens. -> {label: (answer, TurnStats)}."""
    if session.last_question is None:
        raise InputError("Ask a question first; then it can be compared with the full model.")
    results = {}
    for label, method in ((session.method, session.method), ("full", "full")):
        other = ChatSession(session.vlm, method=method, dominant=session.dominant, contextual=session.contextual,
                            max_new_tokens=max_new_tokens or session.max_new_tokens, sampling=session.sampling,
                            cache_bytes=session.cache_bytes, small=session.small, keep_ratio=session.keep_ratio,
                            prune_layer=session.prune_layer, early_exit=session.early_exit,
                            sgl_tokens=session.sgl_tokens)
        other.images = session.images
        other.compressions = session.compressions  # shared compress-once cache (LRU-bounded)
        other.segments = session.segments[: session._last_turn_start]
        other.pending = list(session._last_turn_images)
        answer = other.ask(session.last_question)
        results[label] = (answer, other.last_turn)
    return results


def common_prefix(a: list, b: list) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def cache_nbytes(cache) -> int:
    if cache is None:
        return 0
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total
