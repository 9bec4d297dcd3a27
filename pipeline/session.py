"""ChatSession: one conversation about images, with compress-once images and a reused KV cache.

The conversation is a list of segments, ("text", token ids) or ("image", image key). Flattened,
each image becomes `num_tokens` placeholder ids whose embeddings are the image's compressed
features. The KV cache holds some prefix of that flat sequence; its identity is recorded as a
signature (token ids, and (image key, method, budget) per image), so a turn prefills exactly the
part of the conversation the cache does not hold — only the new question on a normal turn, all
of it after a method change.
"""

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from .compress import Compression, encode_image, method_key
from .errors import InputError
from .generate import Sampling, embed, embed_token, forward, new_cache, pick, truncate_cache
from .images import image_digest, load_image
from .visionzip import check_budget

METHODS = ("full", "visionzip", "sgl")


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
    cache_reused: bool = False  # the KV cache of earlier turns was reused
    images_encoded: int = 0  # images encoded/compressed for this turn (0: compressed images reused)
    kv_cache_bytes: int = 0
    stopped: bool = False  # generation was cancelled
    early_exit: bool | None = None  # SGL: the small model's answer was used
    guidance: object = None  # SGL: importance per visual token, kept indices, score
    device: str = ""
    dtype: str = ""
    timings: dict = field(default_factory=dict)  # extra per-model times (SGL)


class ChatSession:
    def __init__(self, vlm, method: str = "full", dominant: int = 54, contextual: int = 10,
                 max_new_tokens: int = 256, sampling: Sampling | None = None, reuse_cache: bool = True,
                 cache_bytes: int = 1 << 30, **sgl_options):
        self.vlm = vlm
        self.max_new_tokens = max_new_tokens
        self.sampling = sampling or Sampling()
        self.reuse_cache = reuse_cache
        self.cache_bytes = cache_bytes
        self.sgl_options = sgl_options
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.set_method(method, dominant, contextual)
        self.reset()

    # ---- configuration -------------------------------------------------------------------------
    def set_method(self, method: str, dominant: int = 54, contextual: int = 10):
        """Applies from the next turn; images are re-compressed once for the new method/budget."""
        if method not in METHODS:
            raise InputError(f"Unknown method '{method}'. Choose one of: {', '.join(METHODS)}.")
        if method == "sgl":
            raise InputError("SGL is not available yet in this build.")
        if method != "full":
            grid = self.vlm.adapter.grid
            check_budget(dominant, contextual, grid[0] * grid[1] + self.vlm.adapter.has_cls, self.vlm.adapter.has_cls)
        self.method, self.dominant, self.contextual = method, int(dominant), int(contextual)

    def reset(self):
        """Forget the conversation, images and caches."""
        self.segments = []  # [("text", [ids]) | ("image", key)]
        self.images = {}  # key -> PIL image (kept to re-compress after a method change)
        self.pending = []  # image keys added since the last question
        self.compressions = OrderedDict()  # (key, method_key) -> Compression, LRU by bytes
        self.cache = None
        self.cached_signature = []
        self.last_turn = None
        self.last_compression = None
        self.last_image_key = None
        self.last_question = None
        self._last_turn_start = 0  # index in self.segments where the last turn's segments begin
        self._last_turn_images = []
        self._pending_encode_s = 0.0
        self._pending_encodes = 0

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
        return method_key(self.method, self.dominant, self.contextual)

    def _compression(self, key) -> Compression:
        ck = (key, self._method_key())
        if ck in self.compressions:
            self.compressions.move_to_end(ck)
            return self.compressions[ck]
        method = "full" if self.method == "full" else "visionzip"
        comp = encode_image(self.vlm, self.images[key], method, self.dominant, self.contextual)
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

    def _flatten(self, segments):
        """-> (ids, signature units with their id spans and features, compressions used)."""
        ids, units, comps = [], [], []
        for kind, value in segments:
            if kind == "text":
                for t in value:
                    units.append((("t", t), len(ids), len(ids) + 1, None))
                    ids.append(t)
            else:
                comp = self._compression(value)
                comps.append(comp)
                start = len(ids)
                ids.extend([self.vlm.image_token_id] * comp.num_tokens)
                units.append((("i", value) + self._method_key(), start, len(ids), comp.features))
        return ids, units, comps

    def _turn(self, question: str):
        self._stop.clear()
        vlm = self.vlm
        t0 = time.perf_counter()
        new_segments = self._user_segments(question)
        ids, units, comps = self._flatten(self.segments + new_segments)  # (re-)encodes images only if needed
        encode_s, images_encoded = self._pending_encode_s, self._pending_encodes
        self._pending_encode_s, self._pending_encodes = 0.0, 0
        signature = [u[0] for u in units]

        # How much of the conversation is already in the KV cache? Keep the longest common prefix.
        n_cached_units = common_prefix(signature, self.cached_signature) if self.reuse_cache and self.cache else 0
        n_cached_units = min(n_cached_units, len(units) - 1)  # at least one token to run for the logits
        start = units[n_cached_units][1] if n_cached_units > 0 else 0
        if n_cached_units == 0:
            self.cache = new_cache(vlm)
        else:
            truncate_cache(self.cache, start)
        self.cached_signature = signature[:n_cached_units]
        features = [u[3] for u in units[n_cached_units:] if u[3] is not None]

        stats = TurnStats(
            method=self.method, model_used=vlm.name,
            visual_tokens=sum(c.num_tokens for c in comps), visual_tokens_full=sum(c.full_tokens for c in comps),
            prompt_tokens=len(ids), prefill_tokens=len(ids) - start, encode_s=encode_s,
            cache_reused=n_cached_units > 0, images_encoded=images_encoded,
            device=vlm.device.type, dtype=str(vlm.dtype).replace("torch.", ""),
        )
        self.last_turn = stats
        self.last_question = question
        self._last_turn_start, self._last_turn_images = len(self.segments), list(self.pending)
        self.pending = []
        generator = torch.Generator().manual_seed(self.sampling.seed + len(self.segments))
        generated, fed = [], 0
        stop_ids = vlm.adapter.stop_ids()
        text_so_far = ""
        try:
            p0 = time.perf_counter()
            logits = forward(vlm, embed(vlm, ids[start:], features), self.cache)
            stats.prefill_s = time.perf_counter() - p0
            self.cached_signature = signature
            decode_start = None
            while len(generated) < self.max_new_tokens and not self._stop.is_set():
                token = pick(logits, self.sampling, generator)
                if token in stop_ids:
                    break
                generated.append(token)
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
                logits = forward(vlm, embed_token(vlm, token), self.cache)
                fed += 1
                self.cached_signature = signature + [("t", t) for t in generated[:fed]]
            text = vlm.tokenizer.decode(generated, skip_special_tokens=True)
            if text.startswith(text_so_far) and len(text) > len(text_so_far):  # flush a held-back tail
                yield text[len(text_so_far):]
            if decode_start is not None and len(generated) > 1:
                stats.decode_tok_per_s = (len(generated) - 1) / max(time.perf_counter() - decode_start, 1e-9)
        finally:
            stats.new_tokens = len(generated)
            stats.stopped = self._stop.is_set()
            if not stats.ttft_s:
                stats.ttft_s = time.perf_counter() - t0
            end = self._tokenize(vlm.adapter.end_of_turn)
            self.segments += new_segments + [("text", generated + end)]
            stats.kv_cache_bytes = cache_nbytes(self.cache)


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


def compare_with_full(session: ChatSession, max_new_tokens: int | None = None) -> dict:
    """Re-answer the last question twice from the same history, with no KV cache on either side:
    once with the session's method and once with all visual tokens. -> {label: (answer, TurnStats)}."""
    if session.last_question is None:
        raise InputError("Ask a question first; then it can be compared with the full model.")
    results = {}
    for label, method in ((session.method, session.method), ("full", "full")):
        other = ChatSession(session.vlm, method=method, dominant=session.dominant, contextual=session.contextual,
                            max_new_tokens=max_new_tokens or session.max_new_tokens, sampling=session.sampling,
                            cache_bytes=session.cache_bytes)
        other.images = session.images
        other.compressions = session.compressions  # shared compress-once cache (LRU-bounded)
        other.segments = session.segments[: session._last_turn_start]
        other.pending = list(session._last_turn_images)
        answer = other.ask(session.last_question)
        results[label] = (answer, other.last_turn)
    return results
