"""What the page says: stats and compare tables, messages, and the UI's settings as ChatSession takes them."""

from pipeline import InputError
from pipeline.methods import registry


HAND_DRAWN = ("keep_ratio", "prune_layer", "fastv_layer", "fastv_keep_ratio")  # knobs the settings panel draws itself
# (FastV's and SGL's: their ranges and labels follow the model), in these positions of the settings


def drawn_knobs() -> list:
    """The knobs the page draws as sliders of their own (registry.Knob), after the settings above."""
    return [k for k in registry.knobs() if k.name not in HAND_DRAWN]


def method_names() -> dict:
    """UI label -> method name, for every registered method (read when asked: a method registered at run
    time is offered too)."""
    return {m.label: m.name for m in registry.all_methods()}

VIEW_NAMES = {"kept": "Kept tokens", "groups": "Groups (merged / pooled)", "scores": "Scores",
              "importance": "Importance"}  # (the importance view names its method: "Importance (FastV)")
NO_IMAGE = "_Upload an image to see which visual tokens are kept._"
STILL_ANSWERING = "An answer is still being generated in this conversation: wait for it (or press Stop), then send again."
CONVERSATION_LOST = ("The server restarted (or this conversation was idle for over an hour), and the image shown above "
                     "is no longer on it, so this question was not answered. Attach the image again and send your "
                     "question: the conversation starts anew from here.")
ANSWERING = "_Answering… the stats follow when the answer ends._"
CHAT_PLACEHOLDER = "**Attach a photo (the clip) and ask about it**, or try an example:"
CHAT_PLACEHOLDER_FAST = "**Attach a photo (the clip) and ask about it**, or try an example (compressed at launch: fast):"
ABOUT = ("**How it works.** **VisionZip** keeps the few visual tokens that matter: dominant tokens by attention, the "
         "rest merged into contextual tokens, once per image. DivPrune, VisPruner, HiPrune, CDPruner (per question), FastV, DART, "
         "Random and Pool are there to compare (the Compare tab); Manual sends the patches you pick on the map. Settings apply from the next "
         "question.")
IN_LLM_NOTE = ("FastV, DART and SGL prune inside the language model, per question: they do not compress the image once, "
               "and the large model's KV cache is rebuilt every turn.")
def vllm_note(on_vllm: list, own_engine: list) -> str:
    """The settings panel's line on the vLLM engine: which of the offered methods answer where (labels)."""
    note = (f"**Engine: vLLM.** {', '.join(on_vllm[:-1])} and {on_vllm[-1]} answer through vLLM from zipchat's "
            "compressed embeddings (batched with everyone's questions, prefix-cached).")
    if own_engine:
        named = own_engine[0] if len(own_engine) == 1 else f"{', '.join(own_engine[:-1])} and {own_engine[-1]}"
        note += (f" {named} prune{'s' * (len(own_engine) == 1)} inside the language model, so "
                 f"{'they answer' if len(own_engine) > 1 else 'it answers'} on zipchat's own (transformers) engine, "
                 "one at a time.")
    return note


def format_stats(t) -> str:
    """The turn's numbers, two to a row (they sit under the map)."""
    if t is None:
        return "_Ask a question to see timings._"
    cached = getattr(t, "engine_cached_tokens", 0)  # (states pickled before it had none)
    reuse = ("yes" if t.cache_reused else "no") + (
        f" / {cached:,} of {t.prompt_tokens:,} prompt tokens from the cache" if t.cache_reused and cached else "")
    if t.images_ahead and not t.images_encoded:
        image = "compressed at launch (an example)"
    elif t.visual_tokens and not t.images_encoded:
        image = "re-used (compressed once)"
    else:
        image = f"{t.images_encoded} encoded" + (f", {t.images_ahead} compressed at launch" if t.images_ahead else "")
    rows = [
        ("model", f"{t.model_used} ({registry.label(t.method) if t.method in registry.names() else t.method})"),
        ("visual tokens to the LLM", f"{t.visual_tokens} of {t.visual_tokens_full}" + (
            clip_words(t.clip) if getattr(t, "clip", None) else "")),
        ("prompt tokens (computed this turn)", f"{t.prompt_tokens} ({t.prefill_tokens})"),
        ("time to first token", f"{t.ttft_s * 1000:.0f} ms"),
        ("image encode + compress", f"{t.encode_s * 1000:.0f} ms"),
        ("prefill", f"{t.prefill_s * 1000:.0f} ms"),
        ("decode", f"{t.new_tokens} tokens, {t.decode_tok_per_s:.1f} tok/s" + (" (stopped)" if t.stopped else "")),
        ("KV cache reused / size", f"{reuse} / {t.kv_cache_bytes / 1e6:.1f} MB"),
        ("image", image),
        ("device", f"{t.device}, {t.dtype}"),
    ]
    if getattr(t, "engine", "transformers") == "vllm":  # (states pickled before engines had no field)
        rows[5] = ("prefill", "on vLLM (inside the time to first token)")
        rows[7] = ("KV cache reused (vLLM prefix cache)", f"{'yes' if t.cache_reused else 'no'}: "
                                                         f"{t.engine_cached_tokens} prompt tokens")
        rows[9] = ("engine", f"vLLM (the image encoded on {t.device}, {t.dtype})")
    elif getattr(t, "engine", "transformers") != "transformers":  # another engine (engines/base.py)
        rows[9] = ("engine", f"{t.engine} (the image encoded on {t.device}, {t.dtype})")
    if t.dropped_turns:
        rows.append(("context window", f"{t.context_window} tokens: this turn dropped {t.dropped_now} turn(s) "
                                       f"({t.dropped_turns} in all)"))
    own = registry.get(t.method).stats_rows if t.method in registry.names() else None
    if own is not None:  # the method's own rows (FastV's and SGL's: what the large model kept), after the model's
        rows[1:1] = own(t)
    pairs = [rows[i:i + 2] for i in range(0, len(rows), 2)]
    return "| turn stat | value | turn stat | value |\n|---|---|---|---|\n" + "\n".join(
        "| " + " | ".join(f"{k} | {v}" for k, v in pair) + (" | |" if len(pair) == 1 else "") + " |" for pair in pairs)


COMPARE_COLUMNS = [  # (header, value of a TurnStats); on a phone each row stacks, its cells labelled (style.css)
    ("visual tokens", lambda t: t.visual_tokens if t.guidance is None or t.early_exit
     else f"{len(t.guidance.kept)} from layer {t.guidance.prune_layer} ({t.visual_tokens} below)"),
    ("prompt tokens", lambda t: t.prompt_tokens),
    ("first token", lambda t: f"{t.ttft_s * 1000:.0f} ms"),
    ("encode", lambda t: f"{t.encode_s * 1000:.0f} ms"),
    ("prefill", lambda t: f"{t.prefill_s * 1000:.0f} ms"),
    ("decode", lambda t: f"{t.decode_tok_per_s:.1f} tok/s" + (" (stopped)" if t.stopped else "")),
    ("agreement with Full", lambda t: "—" if t.agreement is None else f"{t.agreement.share:.2f}"),
    ("log-lik / token", lambda t: "—" if t.agreement is None or t.agreement.logprob is None
     else f"{t.agreement.logprob:.2f}"),
    ("parts from Full", lambda t: "—" if t.agreement is None
     else ("never" if t.agreement.parting is None else f"token {t.agreement.parting + 1}")),
    ("F1 vs Full", lambda t: "—" if t.agreement is None else f"{t.agreement.f1:.2f}")]
AGREEMENT_NOTE = ("_Agreement with Full: Full's answer scored under each method by teacher forcing, its per-token "
                  "probability as a share of Full's own (1.00: as likely as under Full), the mean log-likelihood per "
                  "token, the first token where the method's greedy answer leaves Full's, and the token F1 of the "
                  "two answers._")
NO_FULL_NOTE = "_Add Full to the methods to see each one's agreement with Full's answer._"


def format_compare(results: list) -> str:
    """Markdown table, one row per method, named as the page names it: [(method, answer, TurnStats)]."""
    head = "| method | " + " | ".join(h for h, _ in COMPARE_COLUMNS) + " |\n|---|" + "---|" * len(COMPARE_COLUMNS)
    table = head + "\n" + "\n".join(f"| {registry.label(m)} | " + " | ".join(str(f(t)) for _, f in COMPARE_COLUMNS)
                                     + " |" for m, _, t in results)
    scored = any(t.agreement is not None for _, _, t in results)
    return table + "\n\n" + (AGREEMENT_NOTE if scored else NO_FULL_NOTE if "full" not in [m for m, _, _ in results]
                               else "")


def format_progress(p) -> str:
    """A running Compare: which method answers, of how many, and which are done."""
    done = ", ".join(registry.label(m) for m, _, _ in p.done)
    if getattr(p, "stage", "answer") == "agreement":
        return (f"**Compare: scoring Full's answer under {registry.label(p.method)}** (agreement with Full; all "
                f"{p.total} answered) — Stop ends it.")
    return (f"**Compare: {registry.label(p.method)} answering, {p.index + 1} of {p.total}**"
            + (f" (done: {done})" if done else "") + " — Stop ends it.")


def progress_answers(p) -> str:
    """The answers of a running Compare so far, the current one as it streams."""
    answers = [(m, a) for m, a, _ in p.done] + [(p.method, p.answer + " …")]
    return "\n\n".join(f"**{registry.label(m)}:** {a}" for m, a in answers)


def settings_from(method, dominant, contextual, keep_ratio, prune_layer, exit_on, threshold, sgl_zip,
                  max_tiles=0, max_new_tokens=256, temperature=0.0, top_p=0.9, fastv_layer=2,
                  fastv_keep_ratio=0.5, *knob_values) -> dict:
    """The UI's (or an API call's) settings as ChatSession.set_method arguments; the numbers are
    checked there. Anything that is not one of the offered choices is refused with a message.
    `knob_values`: the sliders of `drawn_knobs()`, in order."""
    names = method_names()
    if not isinstance(method, str) or method not in names:
        raise InputError(f"Unknown method {method!r}. Choose one of: {', '.join(names)}.")
    numbers = {"dominant tokens": dominant, "contextual tokens": contextual, "keep ratio": keep_ratio,
               "prune layer": prune_layer, "early-exit threshold": threshold, "max tiles": max_tiles,
               "max new tokens": max_new_tokens, "temperature": temperature, "top-p": top_p,
               "FastV layer": fastv_layer, "FastV keep ratio": fastv_keep_ratio}
    knobs = drawn_knobs()
    if len(knob_values) > len(knobs):
        raise InputError(f"{len(knob_values) - len(knobs)} setting(s) too many.")
    numbers.update({k.label: v for k, v in zip(knobs, knob_values)})
    for name, value in numbers.items():
        if value is None:  # (set_method reads None as "unchanged"; from the UI or the API it is a mistake)
            raise InputError(f"The {name} is missing: send a number.")
    for name, flag in (("early exit", exit_on), ("both models see VisionZip tokens", sgl_zip)):
        if not isinstance(flag, bool):
            raise InputError(f"'{name}' must be true or false (got {flag!r}).")
    return dict(method=names[method], dominant=dominant, contextual=contextual, keep_ratio=keep_ratio,
                prune_layer=prune_layer, early_exit=threshold if exit_on else None,
                sgl_tokens="visionzip" if sgl_zip else "full", max_tiles=max_tiles, max_new_tokens=max_new_tokens,
                temperature=temperature, top_p=top_p, fastv_layer=fastv_layer, fastv_keep_ratio=fastv_keep_ratio,
                **{k.name: v for k, v in zip(knobs, knob_values)})


def compare_choices(methods: list) -> list:
    """Compare's checkbox values (UI labels, or method names through the API) -> method names."""
    if methods is None:
        return None
    if isinstance(methods, str) or not isinstance(methods, (list, tuple)):
        raise InputError("Compare takes a list of methods, e.g. ['VisionZip', 'DivPrune', 'Full'].")
    labels, names = method_names(), []
    for m in methods:
        if isinstance(m, str) and m in labels:
            names.append(labels[m])
        elif isinstance(m, str) and m in registry.names():
            names.append(m)
        else:
            raise InputError(f"Unknown method {m!r}. Choose from: {', '.join(labels)}.")
    return names


def picks_text(picked: int, image: str) -> str:
    """"12 patches picked on image 2 of 3." """
    return f"{picked} patch{'es' * (picked != 1)} picked on {image}."


def checked_radius(radius):
    if radius is None or not isinstance(radius, (int, float)) or not 0 <= radius <= 5:
        raise InputError("The brush is 0 to 5 patches around the click.")
    return radius


def clip_words(clip: tuple) -> str:
    """TurnStats.clip in words: " (a clip of 8 frames: 64 of 196 a frame)", or for pairs of frames " (a clip of 4
    frame pairs: 33 of 299 a pair)"."""
    crops, sent, full, per_crop = clip
    unit = "frame" if per_crop == 1 else "pair"
    return f" (a clip of {crops} {'frames' if per_crop == 1 else 'frame pairs'}: {sent} of {full} a {unit})"
