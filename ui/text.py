"""What the page says: stats and compare tables, messages, and the UI's settings as ChatSession takes them."""

from pipeline import InputError
from pipeline.methods import LABELS

METHOD_NAMES = {label: method for method, label in LABELS.items()}  # UI label -> method name
VIEW_NAMES = {"kept": "Kept tokens", "groups": "Groups (merged / pooled)", "scores": "Scores",
              "importance": "Importance (SGL / FastV)"}
NO_IMAGE = "_Upload an image to see which visual tokens are kept._"
STILL_ANSWERING = "An answer is still being generated in this conversation: wait for it (or press Stop), then send again."
IN_LLM_NOTE = ("FastV and SGL prune inside the language model, per question: they do not compress the image once, "
               "and the large model's KV cache is rebuilt every turn.")


def format_stats(t) -> str:
    if t is None:
        return "_Ask a question to see timings._"
    reuse = "yes" if t.cache_reused else "no"
    image = "re-used (compressed once)" if t.visual_tokens and not t.images_encoded else f"{t.images_encoded} encoded"
    rows = [
        ("model", f"{t.model_used} ({t.method})"),
        ("visual tokens to the LLM", f"{t.visual_tokens} of {t.visual_tokens_full}"),
        ("prompt tokens (computed this turn)", f"{t.prompt_tokens} ({t.prefill_tokens})"),
        ("time to first token", f"{t.ttft_s * 1000:.0f} ms"),
        ("image encode + compress", f"{t.encode_s * 1000:.0f} ms"),
        ("prefill", f"{t.prefill_s * 1000:.0f} ms"),
        ("decode", f"{t.new_tokens} tokens, {t.decode_tok_per_s:.1f} tok/s" + (" (stopped)" if t.stopped else "")),
        ("KV cache reused / size", f"{reuse} / {t.kv_cache_bytes / 1e6:.1f} MB"),
        ("image", image),
        ("device", f"{t.device}, {t.dtype}"),
    ]
    if t.dropped_turns:
        rows.append(("context window", f"{t.context_window} tokens: this turn dropped {t.dropped_now} turn(s) "
                                       f"({t.dropped_turns} in all)"))
    g = t.guidance
    if g is not None and g.source == "fastv":
        rows[1:1] = [("FastV: large model keeps", f"{len(g.kept)} of {len(g.importance)} visual tokens from layer "
                                                  f"{g.prune_layer} (the last prompt token's attention in layer "
                                                  f"{g.prune_layer - 1}); decided again each question")]
    elif g is not None:
        ms = {k: v * 1000 for k, v in t.timings.items() if k.endswith("_s")}
        threshold = "off" if g.threshold is None else f"{g.threshold:.2f}"
        rows[1:1] = [
            ("SGL: answered by", f"{t.model_used} ({'early exit' if t.early_exit else 'large model, pruned'})"),
            ("SGL: exit score (threshold)", f"{g.score:.3f} = ({g.confidence:.3f} + {g.consistency:.3f}) / 2 ({threshold})"),
            ("SGL: large model keeps", f"{len(g.kept)} of {len(g.importance)} visual tokens from layer {g.prune_layer}"),
            ("SGL: small model", f"{ms.get('small_answer_s', 0):.0f} ms answer + {ms.get('small_score_s', 0):.0f} ms score"
                                 + (", its KV cache reused" if t.timings.get("small_cache_reused") else "")),
            ("SGL: large model", f"{ms['large_s']:.0f} ms" if "large_s" in ms else "not run"),
        ]
    return "| turn stat | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


def format_compare(results: list) -> str:
    """Markdown table, one column per method: [(method, answer, TurnStats)]."""
    rows = [("visual tokens", lambda t: t.visual_tokens if t.guidance is None or t.early_exit
             else f"{len(t.guidance.kept)} from layer {t.guidance.prune_layer} ({t.visual_tokens} below)"),
            ("prompt tokens", lambda t: t.prompt_tokens),
            ("time to first token", lambda t: f"{t.ttft_s * 1000:.0f} ms"),
            ("image encode + compress", lambda t: f"{t.encode_s * 1000:.0f} ms"),
            ("prefill", lambda t: f"{t.prefill_s * 1000:.0f} ms"),
            ("decode", lambda t: f"{t.decode_tok_per_s:.1f} tok/s")]
    head = "| | " + " | ".join(m for m, _, _ in results) + " |\n|---|" + "---|" * len(results) + "\n"
    return head + "\n".join(f"| {name} | " + " | ".join(str(f(t)) for _, _, t in results) + " |" for name, f in rows)


def settings_from(method, dominant, contextual, keep_ratio, prune_layer, exit_on, threshold, sgl_zip,
                  max_tiles=0, max_new_tokens=256, temperature=0.0, top_p=0.9, fastv_layer=2,
                  fastv_keep_ratio=0.5) -> dict:
    """The UI's (or an API call's) settings as ChatSession.set_method arguments; the numbers are
    checked there. Anything that is not one of the offered choices is refused with a message."""
    if method not in METHOD_NAMES:
        raise InputError(f"Unknown method {method!r}. Choose one of: {', '.join(METHOD_NAMES)}.")
    numbers = {"dominant tokens": dominant, "contextual tokens": contextual, "keep ratio": keep_ratio,
               "prune layer": prune_layer, "early-exit threshold": threshold, "max tiles": max_tiles,
               "max new tokens": max_new_tokens, "temperature": temperature, "top-p": top_p,
               "FastV layer": fastv_layer, "FastV keep ratio": fastv_keep_ratio}
    for name, value in numbers.items():
        if value is None:  # (set_method reads None as "unchanged"; from the UI or the API it is a mistake)
            raise InputError(f"The {name} is missing: send a number.")
    for name, flag in (("early exit", exit_on), ("both models see VisionZip tokens", sgl_zip)):
        if not isinstance(flag, bool):
            raise InputError(f"'{name}' must be true or false (got {flag!r}).")
    return dict(method=METHOD_NAMES[method], dominant=dominant, contextual=contextual, keep_ratio=keep_ratio,
                prune_layer=prune_layer, early_exit=threshold if exit_on else None,
                sgl_tokens="visionzip" if sgl_zip else "full", max_tiles=max_tiles, max_new_tokens=max_new_tokens,
                temperature=temperature, top_p=top_p, fastv_layer=fastv_layer, fastv_keep_ratio=fastv_keep_ratio)


def compare_choices(methods: list) -> list:
    """Compare's checkbox values (UI labels, or method names through the API) -> method names."""
    if methods is None:
        return None
    if isinstance(methods, str) or not isinstance(methods, (list, tuple)):
        raise InputError("Compare takes a list of methods, e.g. ['VisionZip', 'DivPrune', 'Full'].")
    names = []
    for m in methods:
        if m in METHOD_NAMES:
            names.append(METHOD_NAMES[m])
        elif m in LABELS:
            names.append(m)
        else:
            raise InputError(f"Unknown method {m!r}. Choose from: {', '.join(METHOD_NAMES)}.")
    return names


def checked_radius(radius):
    if radius is None or not isinstance(radius, (int, float)) or not 0 <= radius <= 5:
        raise InputError("The brush is 0 to 5 patches around the click.")
    return radius
