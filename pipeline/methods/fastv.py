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

import torch

from .base import ranked
from .llm_prune import fresh_lane, image_spans, keep_count, pruned_answer, visual_positions
from .registry import IN_LLM, Method, register
from .capture import Guidance, ImportanceCapture

DEFAULT_LAYER = 2
DEFAULT_KEEP_RATIO = 0.5


def fastv_layer(vlm, layer: int) -> int:
    """K clamped to 1 .. layers - 1."""
    return min(max(1, int(layer)), len(vlm.language_model.layers) - 1)


def fastv_answer(session, plan, stats, t0, generated):
    """One FastV turn of a ChatSession (a generator of text deltas; returns the answer ids)."""
    large, ids, units = session.vlm, plan.ids, plan.units
    s = session.settings
    k_layer = fastv_layer(large, s.fastv_layer)
    visual = visual_positions(large, ids)
    if visual.numel() == 0:  # no image: nothing to prune
        return (yield from session.plain_answer(plan, stats, t0, generated))
    lane = fresh_lane(session)
    heads = large.language_model.config.num_attention_heads
    capture = ImportanceCapture(large, lane.cache, visual.to(large.device), after=len(ids) - 2, layers=[k_layer - 1])

    def keep():
        """After layer K - 1: the last prompt token's attention decides; the hooks come off."""
        capture.__exit__(None, None, None)
        attention = capture.importance.float().cpu() / heads  # (V,) heads averaged
        kept = ranked(attention)[:keep_count(s.fastv_keep_ratio, visual.numel())].sort().values
        mask = torch.ones(len(ids), dtype=torch.bool)
        mask[visual] = False
        mask[visual[kept]] = True
        stats.guidance = Guidance(importance=attention.numpy(), kept=kept.numpy(), prune_layer=k_layer,
                                  rows=capture.rows, image_spans=image_spans(units), source="fastv")
        return mask

    capture.__enter__()
    try:
        return (yield from pruned_answer(session, lane, ids, units, stats, t0, generated, k_layer, keep))
    finally:
        capture.__exit__(None, None, None)


def stats_rows(t) -> list:
    """A FastV turn's own row in the stats: what the large model kept, from which layer."""
    g = t.guidance
    if g is None:  # (no image: nothing was pruned)
        return []
    return [("FastV: large model keeps", f"{len(g.kept)} of {len(g.importance)} visual tokens from layer "
                                         f"{g.prune_layer} (the last prompt token's attention in layer "
                                         f"{g.prune_layer - 1}); decided again each question")]


register(Method("fastv", "FastV", IN_LLM, answer=fastv_answer, images="full", engines=("transformers",),
                stats_rows=stats_rows, doc="the large model keeps the visual tokens its own layer K-1 attends to most"))
