"""FastV (Chen et al., ECCV 2024; the SGL paper's baseline): the large model prunes by its own attention.

Per question, like SGL, on all the image's tokens: layers < K (K = `fastv_layer`, an integer, default
2, clamped to 1 .. layers - 1) run on every token; after layer K - 1 the model keeps the
max(1, floor(keep_ratio x V)) visual tokens (V: every visual token of the conversation) that the last
prompt token attends to most in layer K - 1 (softmax over its whole row, heads averaged; ties to the
lowest index), with their original positions, for layers K.. and the decode (llm_prune.py). The
attention row is read with SGL's per-instance hooks on that one layer: no eager attention anywhere.
keep_ratio 1 reproduces the model. Nothing is compressed once: each question decides again, and the
large model's KV cache is rebuilt every turn.
"""

import time

import torch

from .base import ranked
from .llm_prune import image_spans, keep_count, visual_positions
from .registry import IN_LLM, Knob, Method, register
from .capture import Guidance, ImportanceCapture

DEFAULT_LAYER = 2
DEFAULT_KEEP_RATIO = 0.5


def fastv_layer(vlm, layer: int) -> int:
    """K clamped to 1 .. layers - 1."""
    return min(max(1, int(layer)), len(vlm.language_model.layers) - 1)


def fastv_answer(ctx):
    """One FastV turn (turn.TurnContext): a generator of text deltas; returns the answer ids."""
    large, ids, s = ctx.large, ctx.plan.ids, ctx.settings
    k_layer = fastv_layer(large, s.fastv_layer)
    visual = visual_positions(large, ids)
    if visual.numel() == 0:  # no image: nothing to prune
        return (yield from ctx.answer(ctx.request()))
    heads = large.language_model.config.num_attention_heads
    capture = []

    def watch(cache):  # the last prompt token's attention in layer K - 1, on the emptied cache
        capture.append(ImportanceCapture(large, cache, visual.to(large.device), after=len(ids) - 2,
                                         layers=[k_layer - 1]))
        return capture[0]

    def keep(h=None, cache=None):
        """After layer K - 1: the last prompt token's attention decides; the hooks come off."""
        capture[0].__exit__(None, None, None)
        attention = capture[0].importance.float().cpu() / heads  # (V,) heads averaged
        kept = ranked(attention)[:keep_count(s.fastv_keep_ratio, visual.numel())].sort().values
        mask = torch.ones(len(ids), dtype=torch.bool)
        mask[visual] = False
        mask[visual[kept]] = True
        ctx.stats.guidance = Guidance(importance=attention.numpy(), kept=kept.numpy(), prune_layer=k_layer,
                                      rows=capture[0].rows, image_spans=image_spans(ctx.plan.slots), source="fastv")
        return mask

    t_large = time.perf_counter()
    answer = yield from ctx.answer(ctx.request(prune=(k_layer, keep), watch=watch))
    ctx.stats.timings["large_s"] = time.perf_counter() - t_large
    return answer


def stats_rows(t) -> list:
    """A FastV turn's own row in the stats: what the large model kept, from which layer."""
    g = t.guidance
    if g is None:  # (no image: nothing was pruned)
        return []
    return [("FastV: large model keeps", f"{len(g.kept)} of {len(g.importance)} visual tokens from layer "
                                         f"{g.prune_layer} (the last prompt token's attention in layer "
                                         f"{g.prune_layer - 1}); decided again each question")]


KNOBS = (Knob("fastv_layer", "FastV layer", 1, 1000, DEFAULT_LAYER, step=1, integer=True,
             help="K: visual tokens kept from layer K on (clamped to 1 .. layers - 1)"),
         Knob("fastv_keep_ratio", "FastV keep ratio", 0, 1, DEFAULT_KEEP_RATIO, above_zero="a share of the visual "
              "tokens, at most 1", alias="keep_ratio", help="share of the visual tokens kept from layer K on"))

register(Method("fastv", "FastV", IN_LLM, answer=fastv_answer, images="full", engines=("transformers",),
                stats_rows=stats_rows, knobs=KNOBS, share_knob="fastv_keep_ratio", doc="the large model keeps the visual tokens its own layer K-1 attends to most"))
