"""A conversation's settings changed by a person or an API call: every value checked, with a message a
person can act on; nothing changes on a bad one (the app's events are public API)."""

from dataclasses import replace

from .config import UNSET, Settings, checked
from .errors import InputError
from .methods import registry
from .methods.visionzip import check_budget


def changed(s: Settings, family, has_small: bool, method: str, dominant=None, contextual=None, keep_ratio=None,
            prune_layer=None, early_exit=UNSET, sgl_tokens=None, max_new_tokens=None, temperature=None, top_p=None,
            max_tiles=None, fastv_layer=None, fastv_keep_ratio=None) -> Settings:
    """`s` with the given values (None: unchanged; `early_exit=None` disables early exit). `keep_ratio` is
    SGL's, or FastV's when the method is "fastv" and `fastv_keep_ratio` is left out."""
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
    if method == "fastv" and fastv_keep_ratio is None:
        fastv_keep_ratio, keep_ratio = keep_ratio, None
    keep_ratio = s.keep_ratio if keep_ratio is None else checked("keep ratio", keep_ratio, 0, 1)
    if keep_ratio <= 0:
        raise InputError("The SGL keep ratio must be above 0 (a share of the visual tokens, at most 1).")
    fastv_keep_ratio = s.fastv_keep_ratio if fastv_keep_ratio is None else checked("FastV keep ratio",
                                                                                   fastv_keep_ratio, 0, 1)
    if fastv_keep_ratio <= 0:
        raise InputError("The FastV keep ratio must be above 0 (a share of the visual tokens, at most 1).")
    fastv_layer = s.fastv_layer if fastv_layer is None else checked("FastV layer", fastv_layer, 1, 1000, integer=True)
    prune_layer = s.prune_layer if prune_layer is None else checked("prune layer", prune_layer, 0, 1)
    if early_exit is UNSET:
        early_exit = s.early_exit
    elif early_exit is not None:
        early_exit = checked("early-exit threshold", early_exit, 0, 2)
    max_new_tokens = s.max_new_tokens if max_new_tokens is None else checked(
        "max new tokens", max_new_tokens, 1, 1_000_000, integer=True)
    temperature = s.sampling.temperature if temperature is None else checked("temperature", temperature, 0, 5)
    top_p = s.sampling.top_p if top_p is None else checked("top-p", top_p, 0, 1)  # (Sampling refuses 0)
    max_tiles = s.max_tiles if max_tiles is None else checked("max tiles", max_tiles, 0, 100, integer=True)
    new = replace(s, method=method, dominant=dominant, contextual=contextual, keep_ratio=keep_ratio,
                  prune_layer=prune_layer, early_exit=early_exit, sgl_tokens=sgl_tokens, max_new_tokens=max_new_tokens,
                  max_tiles=max_tiles, fastv_layer=fastv_layer, fastv_keep_ratio=fastv_keep_ratio,
                  sampling=replace(s.sampling, temperature=temperature, top_p=top_p))
    if registry.get(record.encodes(new)).kind == registry.COMPRESS_ONCE:
        units = family.units_per_crop
        check_budget(dominant, contextual, units, family.has_cls)
        if dominant + contextual >= units:  # would send at least what Full sends (OneVision: 729+0 x 3 crops > 1,836)
            raise InputError(f"A budget of {dominant}+{contextual} = {dominant + contextual} tokens per "
                             f"crop is not below the {units} of a whole crop: it would send as many visual tokens "
                             "as the Full method or more. Choose a smaller budget, or Full.")
    return new
