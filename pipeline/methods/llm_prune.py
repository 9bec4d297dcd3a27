"""Pruning inside the language model, shared by SGL and FastV: the large model runs its layers below K
on every token, then only the tokens a keep mask allows, with their original positions, for layers
K.. and the whole decode (`generate.forward_layers`). Layers below K keep their full KV cache. The mask
is given (SGL: from the small model's attention) or computed once layers < K ran (FastV: from the
model's own attention in layer K - 1). The cache is rebuilt every turn: what is kept depends on the
question."""

import math
import time

import torch

from ..generate import embed, embed_token, forward_layers


def visual_positions(vlm, ids: list) -> torch.Tensor:
    """(V,) indices in `ids` of the conversation's visual tokens."""
    return torch.tensor([i for i, t in enumerate(ids) if t == vlm.image_token_id], dtype=torch.long)


def keep_count(keep_ratio: float, visual: int) -> int:
    """Visual tokens the large model keeps from layer K on: max(1, floor(keep_ratio x V))."""
    return max(1, int(math.floor(keep_ratio * visual)))


def image_spans(units: list) -> dict:
    """image key -> (start, end) of its tokens among the conversation's visual tokens."""
    spans, offset = {}, 0
    for u in units:
        if u.features is not None:
            spans[u.key[1]] = (offset, offset + len(u.features))
            offset += len(u.features)
    return spans


def fresh_lane(session):
    """The large model's lane, emptied: a pruned turn prefills the whole conversation."""
    lane = session.lane("large")
    lane.reset()
    return lane


def pruned_answer(session, lane, ids, units, stats, t0, generated, k_layer: int, keep):
    """Answer with the session's large model on its emptied `lane`, pruned at layer `k_layer`. `keep`:
    (len(ids),) bool mask, or a function () -> that mask, called once layers < k_layer ran. A generator
    of text deltas; returns the answer ids."""
    large = session.vlm
    t_large = time.perf_counter()
    positions = large.family.positions(ids, units)  # (P, L), original positions kept for the pruned tokens
    feats = [u.features for u in units if u.features is not None]

    def mask():
        return (keep() if callable(keep) else keep).to(large.device)
    logits = forward_layers(large, embed(large, ids, feats), positions, lane.cache, prune_at=k_layer, keep=mask)[-1]
    stats.prefill_s = time.perf_counter() - t_large
    stats.prefill_tokens, stats.cache_reused = len(ids), False
    fed = [0]
    first = int(positions.max()) + 1

    def step(token):
        pos = torch.full((large.family.position_rows, 1), first + fed[0])
        fed[0] += 1
        return forward_layers(large, embed_token(large, token), pos, lane.cache)[-1]

    answer = yield from session.decode(large, logits, step, stats, t0, generated,
                                       limit=session.context_window - len(ids))
    stats.timings["large_s"] = time.perf_counter() - t_large
    return answer
