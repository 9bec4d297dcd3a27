"""What SGL and FastV share about pruning inside the language model: which positions are visual, how many
stay, where each image's tokens are. The pruned pass itself is zipchat's decoder's (engines/transformers.py:
a request with `prune`): layers below K on every token, then only the kept ones with their original
positions, for layers K.. and the whole decode; the cache is rebuilt every turn, since what is kept
depends on the question."""

import math

import torch


def visual_positions(vlm, ids: list) -> torch.Tensor:
    """(V,) indices in `ids` of the conversation's visual tokens."""
    return torch.tensor([i for i, t in enumerate(ids) if t == vlm.image_token_id], dtype=torch.long)


def keep_count(keep_ratio: float, visual: int) -> int:
    """Visual tokens the large model keeps from layer K on: max(1, floor(keep_ratio x V))."""
    return max(1, int(math.floor(keep_ratio * visual)))


def image_spans(slots: list) -> dict:
    """image key -> (start, end) of its tokens among the conversation's visual tokens."""
    spans, offset = {}, 0
    for u in slots:
        if u.features is not None:
            spans[u.key[1]] = (offset, offset + len(u.features))
            offset += len(u.features)
    return spans
