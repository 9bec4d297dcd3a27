"""A turn of a compress-once method answered by vLLM: zipchat plans the prompt (its own token ids from the
checkpoint's chat template, the compressed images in the placeholders) and sends its embeddings; vLLM
decodes. The transformers engine's rules hold: the banned ids are never allowed, the stop ids end the
answer, the context window bounds it, a Stop ends it after the current token (and aborts the request)."""

import time

from ..config import MIN_TEMPERATURE
from .vllm_client import Request, Usage
from .vllm_export import prompt_embeds


def allowed_ids(vlm) -> list:
    """Every id of the output vocabulary that zipchat's decoder may emit (cached on the VLM)."""
    if "vllm_allowed" not in vlm.extra:
        vocab = vlm.model.get_output_embeddings().weight.shape[0]
        vlm.extra["vllm_allowed"] = [i for i in range(vocab) if i not in vlm.banned_ids]
    return vlm.extra["vllm_allowed"]


def vllm_request(session, plan) -> Request:
    """What vLLM is asked for this turn (checked before anything reaches the engine)."""
    vlm, s = session.vlm, session.settings
    features = [u.features for u in plan.units if u.features is not None]
    greedy = s.sampling.temperature < MIN_TEMPERATURE
    return Request(prompt_embeds(vlm, plan.ids, features),
                   max_tokens=max(1, min(s.max_new_tokens, session.context_window - len(plan.ids))),
                   allowed_ids=allowed_ids(vlm), stop_ids=sorted(vlm.stop_ids),
                   temperature=0.0 if greedy else s.sampling.temperature, top_p=1.0 if greedy else s.sampling.top_p,
                   seed=s.sampling.seed + len(session.state.turns), ignore_stops=not session.stop_at_eos)


def vllm_answer(session, plan, stats, t0, generated):
    """The turn on `session.engine` (a generator of text deltas; returns the answer ids)."""
    vlm = session.vlm
    request = vllm_request(session, plan)
    usage = Usage()
    stream = session.engine.stream(request, usage)
    text, first = "", None
    try:
        for token in stream:
            if session.stop_at_eos and token in vlm.stop_ids:
                break
            generated.append(token)
            if first is None:
                first = time.perf_counter()
                stats.ttft_s = first - t0
            delta, text = session.text_delta(vlm, generated, text)
            if delta:
                yield delta
            if session.stop_flag.is_set():
                break
    finally:
        stream.close()  # a request still running is aborted on the server
    delta, text = session.text_delta(vlm, generated, text, final=True)
    if delta:
        yield delta
    if first is not None and len(generated) > 1:
        stats.decode_tok_per_s = (len(generated) - 1) / max(time.perf_counter() - first, 1e-9)
    stats.prefill_tokens = max(usage.prompt_tokens - usage.cached_tokens, 0) if usage.prompt_tokens else len(plan.ids)
    stats.cache_reused = usage.cached_tokens > 0
    stats.engine_cached_tokens = usage.cached_tokens
    stats.engine = "vllm"
    return list(generated)
