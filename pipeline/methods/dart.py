"""DART (Wen et al., EMNLP 2025, arXiv 2502.11494: "Stop looking for important tokens ... duplication matters
more"): inside the language model, like FastV, the visual tokens that duplicate a few pivots are dropped.

Per question, on all the image's tokens (images are encoded Full). Layers < K (K = `dart_layer`, default 2,
clamped to 1 .. layers - 1) run on every token. Then, with V the conversation's visual tokens and T the other
tokens after the first visual one (the question and the template: the authors' "query tokens"):
  1. pivots: the P_v = 4 visual and P_t = 4 text tokens with the largest L1 norm of their keys in layer K - 1
     (every key head concatenated, after the rotary embedding: the KV cache's keys);
  2. t = floor(V x keep_ratio / (P_v + P_t)) (keep_ratio = `dart_keep_ratio`, the authors' 1 - 0.778 = 0.222);
  3. x = the final norm of the hidden states entering layer K; for each pivot in turn (the visual pivots, then
     the text ones, each by descending norm), the t visual tokens left (not pivots, not yet kept) least like it
     by cos(x_pivot, x_j) are kept (ties to the lowest index);
  4. kept = the visual pivots and those; the other visual tokens are dropped from layer K on, the kept ones
     keep their positions (llm_prune.py), for the whole decode.
keep_ratio 1 keeps every visual token: the model's own answer. Where zipchat departs from the authors' code
(ZichenWen1/DART, and LightCompress's `token_reduction/dart.py`): the pivots are taken in that fixed order (the
authors iterate a Python set of indices); several images count as one visual sequence; V < P_v or no text
after the image take what there is. Nothing is compressed once: the large model's KV cache is rebuilt every
turn; transformers engine only (it prunes inside zipchat's decoder).
"""

import math
import time

import torch
import torch.nn.functional as F

from .base import ranked
from .capture import Guidance
from .llm_prune import image_spans, visual_positions
from .registry import IN_LLM, Knob, Method, register

DEFAULT_LAYER = 2
DEFAULT_KEEP_RATIO = 1 - 0.778  # the authors' reduction ratio 0.778: 128 of LLaVA-1.5's 576 tokens
VISUAL_PIVOTS, TEXT_PIVOTS = 4, 4


def dart_layer(vlm, layer: int) -> int:
    """K clamped to 1 .. layers - 1."""
    return min(max(1, int(layer)), len(vlm.language_model.layers) - 1)


def select(keys: torch.Tensor, states: torch.Tensor, visual: torch.Tensor, text: torch.Tensor,
           keep_ratio: float) -> tuple:
    """keys (L, H*d) of layer K - 1, states (L, D) entering layer K after the final norm, visual (V,) and text
    (T,) positions -> (kept: sorted indices into the V visual tokens, key L1 norm per visual token (V,))."""
    norms = keys.float().abs().sum(-1)  # (L,) L1 norm of each token's keys
    v_norm = norms[visual]
    if keep_ratio >= 1:
        return torch.arange(len(visual)), v_norm
    visual_pivots = ranked(v_norm)[:VISUAL_PIVOTS]  # indices into visual
    text_pivots = text[ranked(norms[text])[:TEXT_PIVOTS]] if len(text) else text  # positions
    per_pivot = int(math.floor(len(visual) * keep_ratio / (VISUAL_PIVOTS + TEXT_PIVOTS)))
    unit = F.normalize(states.float(), dim=-1)  # (L, D)
    left = torch.ones(len(visual), dtype=torch.bool)
    left[visual_pivots] = False
    kept = [visual_pivots]
    for pivot in torch.cat([visual[visual_pivots], text_pivots]).tolist():
        candidates = left.nonzero().squeeze(1)
        if not len(candidates) or not per_pivot:
            break
        similarity = unit[visual[candidates]] @ unit[pivot]  # (C,)
        chosen = candidates[ranked(-similarity)[:per_pivot]]  # the least alike, ties to the lowest index
        left[chosen] = False
        kept.append(chosen)
    return torch.cat(kept).sort().values, v_norm


def dart_answer(ctx):
    """One DART turn (turn.TurnContext): a generator of text deltas; returns the answer ids."""
    large, ids, s = ctx.large, ctx.plan.ids, ctx.settings
    knobs = {k.name: s.knobs.get(k.name, k.default) for k in KNOBS}
    k_layer = dart_layer(large, knobs["dart_layer"])
    visual = visual_positions(large, ids)
    if visual.numel() == 0:  # no image: nothing to prune
        return (yield from ctx.answer(ctx.request()))
    is_visual = torch.zeros(len(ids), dtype=torch.bool)
    is_visual[visual] = True
    text = torch.arange(int(visual[0]) + 1, len(ids))
    text = text[~is_visual[text]]

    def keep(h, cache):
        """After layer K - 1: its keys (in the cache) pick the pivots, the states entering layer K the rest."""
        keys = cache.layers[k_layer - 1].keys[0]  # (H_kv, L, d)
        keys = keys.transpose(0, 1).reshape(keys.shape[1], -1).cpu()  # (L, H_kv * d)
        states = large.language_model.norm(h)[0].cpu()  # (L, D)
        kept, v_norm = select(keys, states, visual, text, float(knobs["dart_keep_ratio"]))
        mask = ~is_visual.clone()
        mask[visual[kept]] = True
        ctx.stats.guidance = Guidance(importance=v_norm.numpy(), kept=kept.numpy(), prune_layer=k_layer,
                                      image_spans=image_spans(ctx.plan.slots), source="dart")
        return mask

    t_large = time.perf_counter()
    answer = yield from ctx.answer(ctx.request(prune=(k_layer, keep)))
    ctx.stats.timings["large_s"] = time.perf_counter() - t_large
    return answer


def stats_rows(t) -> list:
    g = t.guidance
    if g is None:
        return []
    return [("DART: large model keeps", f"{len(g.kept)} of {len(g.importance)} visual tokens from layer "
                                        f"{g.prune_layer} (4 visual and 4 text pivots by key norm in layer "
                                        f"{g.prune_layer - 1}, and the tokens least like them); decided again "
                                        "each question")]


KNOBS = (Knob("dart_layer", "DART layer", 1, 1000, DEFAULT_LAYER, step=1, integer=True,
              help="K: duplicates dropped from layer K on (clamped to 1 .. layers - 1)"),
         Knob("dart_keep_ratio", "DART keep ratio", 0, 1, round(DEFAULT_KEEP_RATIO, 3), step=0.001,
              above_zero="a share of the visual tokens, at most 1",
              help="share of the visual tokens kept from layer K on (1: all)"))

register(Method("dart", "DART", IN_LLM, answer=dart_answer, images="full", engines=("transformers",),
                stats_rows=stats_rows, knobs=KNOBS, share_knob="dart_keep_ratio",
                doc="the large model drops the visual tokens that duplicate a few pivots, at layer K"))
