"""One turn: its numbers (TurnStats), the one decode loop that turns any engine's token ids into text deltas
and those numbers, and the narrow context an in-LLM method's turn runs in (TurnContext)."""

import time
from dataclasses import dataclass, field

from .engines.base import Request, Usage
from .methods.capture import Guidance


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
    guidance: Guidance | None = None  # FastV, SGL: importance per visual token, kept indices, score
    device: str = ""
    engine: str = "transformers"  # what ran the language model: zipchat's decoder, or "vllm"
    engine_cached_tokens: int = 0  # prompt tokens the engine's cache held (zipchat's KV store, vLLM's prefix cache)
    dtype: str = ""
    timings: dict = field(default_factory=dict)  # SGL: seconds spent in each model
    followup: object = None  # Compare's "ask again as turn 2": the second turn on the same image (SecondTurn)
    agreement: object = None  # Compare: how close its answer is to Full's (agreement.Agreement)
    clip: tuple | None = None  # the latest clip in the context: (crops, tokens sent a crop, tokens in full a crop,
    # frames a crop: 1, or 2 for Qwen2.5-VL's pairs)
    answer_ids: list = field(default_factory=list)  # the answer's token ids (the agreement compares them)


def text_delta(tokenizer, generated: list, text_so_far: str, final: bool = False) -> tuple:
    """-> (new text, text so far) after the answer ids `generated`: text is held back while it ends in part of
    a character (U+FFFD), unless `final`."""
    text = tokenizer.decode(generated, skip_special_tokens=True)
    if (final or not text.endswith("\ufffd")) and text.startswith(text_so_far) and len(text) > len(text_so_far):
        return text[len(text_so_far):], text
    return "", text_so_far


def decode(engine, request: Request, tokenizer, stop_flag, generated: list, stats: TurnStats | None = None,
           t0: float = 0.0, usage: Usage | None = None):
    """The one decode loop, for every engine: the engine's ids until a stop id (unless the request ignores
    them), the end of the stream (the engine stops at the request's max_tokens) or a Stop; appends to `generated` as it goes (a cancelled turn keeps its
    partial answer). With `stats`: yields the text as it grows and fills in the turn's numbers (time to first
    token from `t0`, prefill, cache, tokens per second); without, it only collects the ids (SGL's small model).
    `usage`: the engine's report, where the caller wants it. Returns the answer ids."""
    usage, text, first = usage if usage is not None else Usage(), "", None
    stream = engine.stream(request, usage)
    stop_ids = set() if request.ignore_stops else set(request.stop_ids)
    try:
        for token in stream:
            if token in stop_ids or stop_flag.is_set():
                break
            generated.append(token)
            if stats is not None:
                if first is None:
                    first = time.perf_counter()
                    stats.ttft_s = first - t0
                delta, text = text_delta(tokenizer, generated, text)
                if delta:
                    yield delta
            if stop_flag.is_set():  # (the budget is the engine's: it ends the stream after max_tokens, and
                break  # vLLM reports its usage once the stream has ended)
    finally:
        stream.close()  # a request still running ends (vLLM aborts it on the server)
        if stats is not None:
            record(stats, usage, engine.name, len(request.ids))
    if stats is not None:
        delta, text = text_delta(tokenizer, generated, text, final=True)
        if delta:  # a held-back tail
            yield delta
        if first is not None and len(generated) > 1:
            stats.decode_tok_per_s = (len(generated) - 1) / max(time.perf_counter() - first, 1e-9)
    return list(generated)


def record(stats: TurnStats, usage: Usage, engine: str, prompt_len: int):
    """The engine's report in the turn's numbers."""
    stats.engine, stats.kv_cache_bytes, stats.prefill_s = engine, usage.kv_cache_bytes, usage.prefill_s
    stats.prefill_tokens = max(usage.prompt_tokens - usage.cached_tokens, 0) if usage.prompt_tokens else prompt_len
    stats.cache_reused, stats.engine_cached_tokens = usage.cached_tokens > 0, usage.cached_tokens


def new_stats(plan, vlm, method: str, counts: tuple, window: int, window_start: int) -> TurnStats:
    """A turn's numbers before it runs: its visual and prompt tokens, the images `counts` (encoded, seconds,
    taken from the examples), the turns it left out of the window."""
    (encoded, encode_s, ahead), comps = counts, plan.compressions
    clips = [c for c in comps if c.times]
    clip = None if not clips else (len(clips[-1].times), clips[-1].num_tokens // len(clips[-1].times),
                                   clips[-1].full_tokens // len(clips[-1].times), clips[-1].frames_per_crop)
    return TurnStats(clip=clip,
        method=method, model_used=vlm.name, visual_tokens=sum(c.num_tokens for c in comps),
        visual_tokens_full=sum(c.full_tokens for c in comps), prompt_tokens=len(plan.ids), prefill_tokens=len(plan.ids),
        encode_s=encode_s, images_encoded=encoded, images_ahead=ahead, dropped_turns=plan.window_start,
        dropped_now=plan.window_start - window_start, context_window=window, device=vlm.device.type,
        dtype=str(vlm.dtype).replace("torch.", ""))


def record_turn(state, turn, plan, stats: TurnStats, t0: float, generated: list, answered_by):
    """The turn joins the conversation (state.py) with its answer as text (`answered_by`'s tokenizer), whole or
    as far as it got."""
    stats.new_tokens = len(generated)
    if not stats.ttft_s:
        stats.ttft_s = time.perf_counter() - t0
    turn.answer = answered_by.tokenizer.decode(generated, skip_special_tokens=True)
    turn.answer_tokens, turn.stopped, stats.answer_ids = len(generated), stats.stopped, list(generated)
    state.turns.append(turn)
    state.pending, state.window_start, state.last_turn = [], plan.window_start, stats


@dataclass
class TurnContext:
    """What an in-LLM method's turn may use (methods/fastv.py, methods/sgl.py): the plan, the settings, the
    large and small model with zipchat's decoder for each, the turn's stats, and the decode loop."""
    plan: object  # prompt.Plan
    settings: object  # config.Settings
    large: object  # VLM
    small: object  # VLM or None
    engines: dict  # "large"/"small" -> TransformersEngine
    stats: TurnStats
    t0: float
    generated: list
    stop_flag: object
    request_for: object  # (lane, **fields) -> Request for the plan (the small model's ids on "small")

    def request(self, lane: str = "large", **fields) -> Request:
        return self.request_for(lane, **fields)

    def answer(self, request: Request):
        """The large model answers `request` (a generator of text deltas; returns the ids)."""
        return (yield from decode(self.engines["large"], request, self.large.tokenizer, self.stop_flag,
                                  self.generated, self.stats, self.t0))

    def collect(self, request: Request, lane: str = "small", usage: Usage | None = None) -> list:
        """A model's answer ids, no text, no stats (SGL's small model answering first)."""
        out = []
        for _ in decode(self.engines[lane], request, self.model(lane).tokenizer, self.stop_flag, out, usage=usage):
            pass
        return out

    def model(self, lane: str):
        return self.large if lane == "large" else self.small
