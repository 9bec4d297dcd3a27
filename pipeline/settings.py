"""A conversation's settings changed by a person or an API call: every value checked, with a message a
person can act on; nothing changes on a bad one (the app's events are public API)."""

from dataclasses import replace

from .config import UNSET, Settings, checked
from .errors import InputError
from .methods import registry
from .methods.visionzip import check_budget


def changed(s: Settings, family, has_small: bool, method: str, dominant=None, contextual=None, keep_ratio=None,
            prune_layer=None, early_exit=UNSET, sgl_tokens=None, max_new_tokens=None, temperature=None, top_p=None,
            max_tiles=None, fastv_layer=None, fastv_keep_ratio=None, knobs: dict | None = None) -> Settings:
    """`s` with the given values (None: unchanged; `early_exit=None` disables early exit). The methods' knobs
    (registry.Knob) are checked by their records: SGL's keep_ratio and prune_layer, FastV's fastv_layer and
    fastv_keep_ratio (`keep_ratio` is FastV's when the method is FastV and `fastv_keep_ratio` is left out: a
    knob's alias), and `knobs` {name: value} for those of methods registered elsewhere."""
    record = registry.get(method)  # (an InputError naming the choices for an unknown one)
    if record.needs_small and not has_small:
        raise InputError(f"{record.label} needs a small model: start with a small model (e.g. --small-model "
                         "llava-ov-0.5b).")
    sgl_tokens = s.sgl_tokens if sgl_tokens is None else sgl_tokens
    if sgl_tokens not in ("full", "visionzip"):
        raise InputError("sgl_tokens must be 'full' or 'visionzip'.")
    dominant = s.dominant if dominant is None else checked("dominant tokens", dominant, 1, 100_000, integer=True)
    contextual = s.contextual if contextual is None else checked("contextual tokens", contextual, 0, 100_000,
                                                                  integer=True)
    given = dict(knobs or {}, keep_ratio=keep_ratio, prune_layer=prune_layer, fastv_layer=fastv_layer,
                 fastv_keep_ratio=fastv_keep_ratio)
    fields, extra = knob_values(s, record, given)
    if early_exit is UNSET:
        early_exit = s.early_exit
    elif early_exit is not None:
        early_exit = checked("early-exit threshold", early_exit, 0, 2)
    max_new_tokens = s.max_new_tokens if max_new_tokens is None else checked(
        "max new tokens", max_new_tokens, 1, 1_000_000, integer=True)
    temperature = s.sampling.temperature if temperature is None else checked("temperature", temperature, 0, 5)
    top_p = s.sampling.top_p if top_p is None else checked("top-p", top_p, 0, 1)  # (Sampling refuses 0)
    max_tiles = s.max_tiles if max_tiles is None else checked("max tiles", max_tiles, 0, 100, integer=True)
    new = replace(s, method=method, dominant=dominant, contextual=contextual, early_exit=early_exit,
                  sgl_tokens=sgl_tokens, max_new_tokens=max_new_tokens, max_tiles=max_tiles, knobs=extra,
                  sampling=replace(s.sampling, temperature=temperature, top_p=top_p), **fields)
    if registry.get(record.encodes(new)).kind in registry.BUDGETED:
        units = family.units_per_crop
        check_budget(dominant, contextual, units, family.has_cls)
        if dominant + contextual >= units:  # would send at least what Full sends (OneVision: 729+0 x 3 crops > 1,836)
            raise InputError(f"A budget of {dominant}+{contextual} = {dominant + contextual} tokens per "
                             f"crop is not below the {units} of a whole crop: it would send as many visual tokens "
                             "as the Full method or more. Choose a smaller budget, or Full.")
    return new


def knob_values(s: Settings, record, given: dict) -> tuple:
    """The knobs' new values, checked: ({Settings field: value}, the whole Settings.knobs dict). A knob left
    out (None) keeps its value (a knob never set: its default); an unknown name is refused."""
    known = {k.name: k for k in registry.knobs()}
    unknown = [name for name in given if name not in known]
    if unknown:
        raise InputError(f"Unknown setting(s) {', '.join(map(repr, unknown))}. The methods' settings: "
                         f"{', '.join(known)}.")
    for k in record.knobs:  # (FastV's keep_ratio)
        if k.alias and given.get(k.name) is None and given.get(k.alias) is not None:
            given[k.name], given[k.alias] = given[k.alias], None
    fields, extra = {}, dict(s.knobs)
    for name, knob in known.items():
        value = given.get(name)
        if hasattr(s, name):
            if value is not None:
                fields[name] = knob.checked(value)
        elif value is not None or name not in extra:
            extra[name] = knob.default if value is None else knob.checked(value)
    return fields, extra
